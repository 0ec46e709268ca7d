"""Tests for r1lab.train.metrics (JSONL logging, resume truncation, samples, progress) and r1lab.commands.report."""

from __future__ import annotations

import io
import json
import math
import warnings

import pytest

from r1lab.commands.report import format_value, markdown_table, plot_curves, write_report
from r1lab.train.metrics import MetricsLogger, format_live_metrics, read_jsonl, save_samples, training_progress


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]  # strict: every line valid JSON


def test_logger_writes_valid_jsonl_with_nan_as_null(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"loss": float("nan"), "kl": float("inf"), "reward/mean": 0.5, "n": 3})
        log.log_eval(1, "heldout", {"pass@1": 0.25, "cons@8": 0.5, "records": [{"big": 1}]})
    rows = lines(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 1, "loss": None, "kl": None, "reward/mean": 0.5, "n": 3}]
    assert lines(tmp_path / "eval.jsonl") == [{"step": 1, "split": "heldout", "pass@1": 0.25, "cons@8": 0.5}]


def test_logger_converts_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(2, {"loss": torch.tensor(1.5), "bad": torch.tensor(float("nan"))})
    assert lines(tmp_path / "metrics.jsonl") == [{"step": 2, "loss": 1.5, "bad": None}]


def test_truncate_after_on_resume(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 6):
            log.log(step, {"loss": step})
            log.log_eval(step, "heldout", {"pass@1": step / 10})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # torn line from a crash
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=3) as log:
        assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        # the evaluation at the resume step is run again by the resumed run, so it is dropped too
        assert [r["step"] for r in lines(tmp_path / "eval.jsonl")] == [1, 2]
        log.log(4, {"loss": 40})
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tensorboard's own deprecation noise
        with MetricsLogger(tmp_path) as log:
            log.log(1, {"reward/mean": 0.1, "note": "text is skipped"})
            log.log_eval(1, "heldout", {"pass@1": 0.2})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_save_samples(tmp_path):
    recs = [{"prompt": "q", "completion": "c", "reward": 1.0, "components": {"accuracy": float("nan")},
             "answer": None, "correct": False}]  # fmt: skip
    path = save_samples(tmp_path, 12, recs)
    assert path == tmp_path / "samples" / "step_000012.jsonl"
    assert lines(path)[0]["components"] == {"accuracy": None}


def test_progress_is_quiet_off_terminal():
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=120)
    with training_progress(100, start_step=0, console=console) as bar:
        for step in range(1, 101):
            bar.update(step, {"reward/mean": 0.5, "accuracy": 0.25, "completion_len/mean": 80.0})
    out = buf.getvalue().splitlines()
    assert 10 <= len(out) <= 21
    assert out[-1].startswith("step 100/100") and "acc 25.0%" in out[-1]


def test_progress_off_terminal_has_an_eta_from_the_first_step_on_one_line_each():
    from rich.console import Console

    from r1lab.train.metrics import LOSS_KEYS

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=30)  # narrower than a line: no line is wrapped
    with training_progress(200, start_step=50, console=console, keys=LOSS_KEYS) as bar:
        for step in range(51, 201):
            bar.update(step, {"loss": 2.5, "reward/mean": 0.5})
    out = buf.getvalue().splitlines()
    assert out[0].startswith("step 51/200  elapsed ") and out[-1].startswith("step 200/200")  # the first step, resumed
    assert all(line.startswith("step ") and " eta " in line and line.endswith("loss 2.5") for line in out), out


def test_progress_on_terminal_shows_the_bar():
    import re

    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    with training_progress(5, start_step=2, console=console) as bar:
        bar.update(3, {"reward/mean": 0.1})
    screen = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue())  # the text without terminal escapes
    last = screen.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("step 3/5") and "━" in last and last.endswith("reward 0.1")  # resumed at 2, then 3 of 5
    assert format_live_metrics({"kl": 0.01, "x": 1}) == "kl 0.01"


def synthetic_run(run_dir, n_steps=30, shift=0.0):
    with MetricsLogger(run_dir, tensorboard=False) as log:
        for s in range(1, n_steps + 1):
            acc = min(1.0, shift + s / n_steps)
            log.log(s, {"reward/mean": 1 + acc, "reward/accuracy": acc, "reward/format": 1.0, "reward/std": 0.3,
                        "completion_len/mean": 50 + s, "completion_len/max": 128, "kl": 0.001 * s,
                        "zero_variance_groups": 0.1, "loss": float("nan") if s == 3 else 0.01})  # fmt: skip
            if s % 10 == 0:
                log.log_eval(s, "heldout", {"pass@1": acc / 2, "cons@8": acc / 1.5, "k": 8})


def test_write_report(tmp_path):
    run, control = tmp_path / "run", tmp_path / "control"
    synthetic_run(run)
    synthetic_run(control, n_steps=10, shift=-0.5)
    tables = {"Held-out evaluation": {"base": {"pass@1": 0.1, "cons@8": 0.2, "mean_length": 87.25, "k": 8},
                                      "after GRPO": {"pass@1": 0.4567, "format_rate": 1.0}}}  # fmt: skip
    examples = {"before": [{"prompt": "2+2?", "completion": "```\ncode\n```", "answer": "5", "reference": "4",
                            "correct": False}],
                "after": [{"prompt": "2+2?", "completion": "<answer>4</answer>", "answer": "4", "reference": "4",
                           "correct": True}] * 5}  # fmt: skip
    path = write_report(run, title="Countdown R1-Zero", tables=tables, examples=examples,
                        notes=["tiny run"], compare_runs={"random reward": control})  # fmt: skip
    assert path == run / "report" / "report.md"
    md = path.read_text()
    for png in ("reward.png", "heldout_accuracy.png", "completion_length.png", "diagnostics.png"):
        assert (run / "report" / png).stat().st_size > 1000
        assert f"]({png})" in md
    assert "| pass@1 | 10.0% | 45.7% |" in md and "| mean_length | 87.25 | - |" in md
    assert "````text\n```\ncode\n```\n````" in md  # fence longer than the completion's own backticks
    assert md.count("**Example") == 1 + 3  # at most 3 per side
    assert "random reward" in md and "- tiny run" in md


def test_report_without_metrics(tmp_path):
    path = write_report(tmp_path, title="empty", tables={})
    assert "No training metrics" in path.read_text()
    assert plot_curves(tmp_path) == {}


def test_formatting():
    assert format_value("format_rate", 0.5) == "50.0%"
    assert format_value("k", 8) == "8"
    assert format_value("tokens_per_s", 12345.6) == "12,346"
    assert format_value("kl", 0.00123) == "0.00123"
    assert format_value("x", math.nan) == "-"
    assert markdown_table({"a|b": {"pass@2": 1.0}}).splitlines()[0] == "| metric | a\\|b |"


@pytest.mark.slow
def test_report_command_for_a_grpo_run_and_an_sft_run(tmp_path, capsys):
    from r1lab.cli import main

    grpo_run, sft_run = tmp_path / "grpo", tmp_path / "sft"
    synthetic_run(grpo_run)
    for step, p in ((0, 0.1), (30, 0.6)):  # what GRPO's held-out evaluation writes beside eval.jsonl
        record = {"prompt": "2+2?", "completion": f" <answer>{step}</answer>", "answer": str(step), "reference": "4",
                  "correct": False}
        (grpo_run / "eval").mkdir(exist_ok=True)
        (grpo_run / "eval" / f"step_{step:06d}.json").write_text(json.dumps(
            {"heldout": {"pass@1": p, "cons@8": p, "k": 8, "records": [{"samples": [record], **record}]}}))
    main(["report", str(grpo_run)])
    md = (grpo_run / "report" / "report.md").read_text()
    assert "Held-out pass@1 10.0% -> 60.0% (+50.0 points)" in md and "| pass@1 | 10.0% | 60.0% |" in md
    with MetricsLogger(sft_run, tensorboard=False) as log:
        for s in range(1, 6):
            log.log(s, {"loss": 2.0 / s, "grad_norm": 1.0, "lr": 1e-4})
        log.log_eval(0, "heldout", {"loss": 2.5})
        log.log_eval(5, "heldout", {"loss": 0.5})
    main(["report", "--run", str(sft_run), "--title", "my SFT"])
    md = (sft_run / "report" / "report.md").read_text()
    assert md.startswith("# my SFT") and "Held-out loss" in md and (sft_run / "report" / "diagnostics.png").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])  # not a run directory
    assert exit_info.value.code == 2 and "no metrics.jsonl" in capsys.readouterr().err


def test_report_of_a_pretrain_run_draws_its_loss(tiny_base, tmp_path):
    import shutil

    from r1lab.cli import main

    run = shutil.copytree(tiny_base.parent, tmp_path / "base")  # a pretrain run: it logs metrics.jsonl as sft does
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 81)) and rows[-1]["loss"] < rows[0]["loss"]
    main(["report", str(run)])
    md = (run / "report" / "report.md").read_text()
    assert "80 steps logged" in md and (run / "report" / "diagnostics.png").stat().st_size > 10_000


def test_the_tool_use_plot_counts_calls_per_completion(tmp_path):
    from r1lab.commands.report import _plot_tool_use

    rows = [{"step": s, "tools/calls_per_rollout": 2.0, "tools/rollouts_with_calls": 1.0} for s in range(1, 4)]
    evals = [{"step": 0, "split": "heldout", "tool_calls": 1.5}, {"step": 3, "split": "heldout", "tool_calls": 2.0}]
    path = _plot_tool_use(rows, evals, {}, {}, "heldout", tmp_path)
    assert path == tmp_path / "tool_use.png" and path.stat().st_size > 5_000
    # calls per rollout alone (an environment's replies have no share to plot) still draws it
    (tmp_path / "alone").mkdir()
    assert _plot_tool_use([{k: v for k, v in r.items() if k != "tools/rollouts_with_calls"} for r in rows], [], {}, {},
                          "heldout", tmp_path / "alone") is not None
