"""bench/readme_results.py writes each measured block into its page: the README's headline results, every other figure
in docs/benchmarks.md; each block in one place, and the pages as the filed figures render them."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("readme_results", ROOT / "bench" / "readme_results.py")
readme_results = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(readme_results)


def pages_copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    shutil.copy(ROOT / "README.md", root / "README.md")
    for page in (ROOT / "docs").glob("*.md"):
        shutil.copy(page, root / "docs" / page.name)
    return root


def results_copy(tmp_path: Path, *names: str) -> Path:
    results = tmp_path / "results"
    results.mkdir()
    for name in names:
        shutil.copy(ROOT / "bench" / "results" / f"{name}.json", results / f"{name}.json")
    return results


def test_every_block_has_a_page_and_a_filed_result():
    assert set(readme_results.PAGES) == set(readme_results.RENDERERS)
    assert set(readme_results.PAGES.values()) == {Path("README.md"), Path("docs/benchmarks.md")}
    assert {p.stem for p in (ROOT / "bench" / "results").glob("*.json")} == set(readme_results.PAGES)


def test_the_pages_are_what_the_filed_results_render(tmp_path):
    # nothing between the markers is edited by hand, and every block is on its page once and nowhere else
    root = pages_copy(tmp_path)
    texts = readme_results.render_pages(root, ROOT / "bench" / "results")
    for page, text in texts.items():
        assert text == (ROOT / page).read_text(), f"{page} differs from `python bench/readme_results.py --render`"
    for name, page in readme_results.PAGES.items():
        assert texts[page].count(f"<!-- results:{name} -->") == 1


def test_a_block_is_rewritten_on_its_own_page(tmp_path):
    root = pages_copy(tmp_path)
    for name in ("demo", "tests"):  # one on the README, one on docs/benchmarks.md
        page = root / readme_results.PAGES[name]
        page.write_text(readme_results.block_pattern(name).sub(
            lambda m: f"{m.group(1)}\nstale\n{m.group(2)}", page.read_text()))
    results = results_copy(tmp_path, "demo", "tests")
    tests = json.loads((results / "tests.json").read_text())
    tests["fast_s"] = 1.0
    (results / "tests.json").write_text(json.dumps(tests))

    changed = readme_results.render_readme(root, results)

    assert sorted(changed) == [Path("README.md"), Path("docs/benchmarks.md")]
    readme, benchmarks = (root / "README.md").read_text(), (root / "docs" / "benchmarks.md").read_text()
    assert "stale" not in readme and "stale" not in benchmarks
    assert readme_results.render_demo(json.loads((results / "demo.json").read_text())) in readme
    assert "`make test-fast` 1 s (" in benchmarks and "`make test-fast` 1 s (" not in readme
    assert readme_results.render_readme(root, results) == []  # rendering again changes nothing


@pytest.mark.parametrize("where", ["other page", "twice", "missing"])
def test_a_block_off_its_page_is_refused(tmp_path, where):
    root = pages_copy(tmp_path)
    benchmarks = root / "docs" / "benchmarks.md"
    block = readme_results.block_pattern("tests").search(benchmarks.read_text()).group(0)
    if where == "other page":
        (root / "README.md").write_text((root / "README.md").read_text() + "\n" + block + "\n")
    elif where == "twice":
        benchmarks.write_text(benchmarks.read_text() + "\n" + block + "\n")
    else:
        benchmarks.write_text(benchmarks.read_text().replace(block, ""))
    with pytest.raises(SystemExit, match=r"results:tests -->.*docs/benchmarks\.md"):
        readme_results.render_pages(root, results_copy(tmp_path, "tests"))


def test_help_runs_without_running_anything():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "readme_results.py"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--render" in done.stdout and "docs/benchmarks.md" in done.stdout


def test_the_speculative_block_says_a_smoke_run_is_no_figure_and_renders_a_measured_one():
    filed = json.loads((ROOT / "bench" / "results" / "speculative.json").read_text())
    smoke = dict(filed, figures={**filed["figures"], "args": {**filed["figures"]["args"], "smoke": True}})
    assert readme_results.render_speculative(smoke).startswith("Not measured yet")
    measured = dict(filed, figures={**filed["figures"], "args": {**filed["figures"]["args"], "smoke": False}})
    text = readme_results.render_speculative(measured)
    assert "| greedy, one sample |" in text and "| GRPO's sampling: temperature 1, k = " in text
    assert "Greedy completions with and without MTP drafts: identical" in text and "`r1lab grpo`" in text


def test_the_async_grpo_block_says_a_smoke_run_is_no_figure_and_renders_a_measured_one():
    filed = json.loads((ROOT / "bench" / "results" / "async_grpo.json").read_text())
    smoke = dict(filed, figures={**filed["figures"], "args": {**filed["figures"]["args"], "smoke": True}})
    assert readme_results.render_async_grpo(smoke).startswith("Not measured yet")
    measured = dict(filed, figures={**filed["figures"], "args": {**filed["figures"]["args"], "smoke": False}})
    text = readme_results.render_async_grpo(measured)
    seed = filed["figures"]["seeds"][0]
    assert f"| {seed['seed']} | {seed['sync']['wall_s']:.1f} | {seed['async']['wall_s']:.1f} | " in text
    assert "The random-reward control (synchronous" in text and "(the bar: at most 0.8x" in text
