"""Tests for r1lab.train.evaluate: pass@k estimator, majority vote, evaluate() on a fake engine/task/scorer."""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from itertools import combinations

import pytest
from pathlib import Path

from r1lab.config import EvalConfig, GRPOConfig
from r1lab.rewards.tasks.base import Problem
from r1lab.train import grpo
from r1lab.train.evaluate import (EvalResult, evaluate, evaluate_policy, majority_vote, pass_at_k, pass_ks,
                                  print_table, save_json)


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edge_cases():
    assert pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    for bad in [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_at_k_large_n_is_stable():
    exact = 1 - math.comb(900, 100) / math.comb(1000, 100)
    assert pass_at_k(1000, 100, 100) == pytest.approx(exact, rel=1e-9)


def test_pass_ks():
    assert pass_ks(1) == [1]
    assert pass_ks(8) == [1, 2, 4, 8]
    assert pass_ks(6) == [1, 2, 4, 6]


def test_majority_vote():
    assert majority_vote(["a", "b", "b", "a"]) == "a"  # tie: first seen wins
    assert majority_vote(["b", "a", "a", "b"]) == "b"
    assert majority_vote([None, "x", None, "y", "y"]) == "y"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


# --- fakes -----------------------------------------------------------------------------------------


@dataclass
class FakeSample:
    prompt_index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str


class FakeEngine:
    """Returns canned completions: prompt ids are [problem number]; sample j is canned[number][j]."""

    def __init__(self, canned: dict[int, list[str]]):
        self.canned = canned
        self.calls: list[dict] = []

    def generate(self, prompt_ids, *, num_samples=1, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, seed=None):
        self.calls.append(dict(n_prompts=len(prompt_ids), num_samples=num_samples, temperature=temperature,
                               top_p=top_p, seed=seed, max_new_tokens=max_new_tokens))  # fmt: skip
        out = []
        for i, ids in enumerate(prompt_ids):
            for j in range(num_samples):
                text = self.canned[ids[0]][j]
                reason = "length" if text.endswith("...") else "stop"
                out.append(FakeSample(i, list(range(len(text))), text, [0.0] * len(text), reason))
        return out


class FakeTask:
    name = "fake"

    def canonical(self, answer: str) -> str:
        return answer.strip().lower()

    def score(self, problem: Problem, answer: str) -> float:
        return float(self.canonical(answer) == self.canonical(problem.answer))


@dataclass
class FakeRewards:
    total: list[float]
    components: dict[str, list[float]]
    correct: list[bool]
    answers: list[str | None]
    errors: int = 0
    timeouts: int = 0


def fake_scorer(task, problems, completions, weights=None, timeout_s=5.0, response_prefix=""):
    answers = []
    for text in completions:
        m = re.search(r"<answer>(.*?)</answer>", response_prefix + text, re.S)
        answers.append(m.group(1) if m else None)
    acc = [0.0 if a is None else task.score(p, a) for p, a in zip(problems, answers)]
    fmt = [float(a is not None) for a in answers]
    total = [a + f for a, f in zip(acc, fmt)]
    return FakeRewards(total, {"accuracy": acc, "format": fmt}, [a == 1 for a in acc], answers)


def ans(x: str) -> str:
    return f"<think>hmm</think><answer>{x}</answer>"


PROBLEMS = [Problem("p0", "3", {"id": 0}), Problem("p1", "Seven", {"id": 1}), Problem("p2", "5", {"id": 2})]
CANNED = {
    0: [ans("3"), ans(" 3 "), ans("4"), "no answer..."],  # c=2, vote "3" right
    1: [ans("one"), ans("ONE"), ans("seven"), ans("two")],  # c=1, vote "one" wrong
    2: ["x", "y...", "z", "w"],  # c=0, no answers
}


def run_fake(**kw) -> tuple[EvalResult, FakeEngine]:
    engine = FakeEngine(CANNED)
    result = evaluate(engine, FakeTask(), PROBLEMS, lambda p: [p.meta["id"]], k=4, scorer=fake_scorer, **kw)
    return result, engine


def test_evaluate_known_figures():
    result, engine = run_fake(batch_prompts=2)
    assert result.k == 4 and result.n_problems == 3
    assert result.pass_at_1 == pytest.approx((0.5 + 0.25 + 0.0) / 3)
    assert result.cons_at_k == pytest.approx(1 / 3)
    assert result.pass_at[2] == pytest.approx((5 / 6 + 0.5 + 0.0) / 3)
    assert result.pass_at[4] == pytest.approx(2 / 3)
    assert result.format_rate == pytest.approx(7 / 12)
    lengths = [len(t) for texts in CANNED.values() for t in texts]
    assert result.mean_length == pytest.approx(sum(lengths) / len(lengths))
    assert result.truncation_rate == pytest.approx(2 / 12)
    # chunking: 2 + 1 prompts, paper sampling defaults, distinct seeds per chunk
    assert [c["n_prompts"] for c in engine.calls] == [2, 1]
    assert all(c["num_samples"] == 4 and c["temperature"] == 0.6 and c["top_p"] == 0.95 for c in engine.calls)
    assert engine.calls[0]["seed"] != engine.calls[1]["seed"]


def test_evaluate_records_and_to_dict():
    result, _ = run_fake()
    rec = result.records[1]
    assert rec["prompt"] == "p1" and rec["reference"] == "Seven" and rec["majority"] == "one"
    assert [s["correct"] for s in rec["samples"]] == [False, False, True, False]
    d = result.to_dict()
    assert set(d) == {"pass@1", "cons@4", "pass@2", "pass@4", "format_rate", "mean_length", "truncation_rate",
                      "language_consistency", "k", "n_problems", "tokens_per_s"}
    assert d["truncation_rate"] == pytest.approx(2 / 12)  # was computed, then dropped from the saved figures
    assert "records" in result.to_dict(include_records=True)


def test_tokens_per_s_is_completion_tokens_over_generation_time_only(monkeypatch):
    """A fake clock that moves 0.5 s per generate call and 7 s per scoring call: the throughput counts the
    generated tokens over the generation time alone."""
    import r1lab.train.evaluate as evaluate_module

    clock = [0.0]
    monkeypatch.setattr(evaluate_module.time, "perf_counter", lambda: clock[0])

    class TimedEngine(FakeEngine):
        def generate(self, *args, **kwargs):
            clock[0] += 0.5
            return super().generate(*args, **kwargs)

    def slow_scorer(*args, **kwargs):
        clock[0] += 7.0
        return fake_scorer(*args, **kwargs)

    result = evaluate(TimedEngine(CANNED), FakeTask(), PROBLEMS, lambda p: [p.meta["id"]], k=4, scorer=slow_scorer,
                      batch_prompts=2)
    tokens = sum(len(t) for texts in CANNED.values() for t in texts)
    assert result.tokens_per_s == pytest.approx(tokens / 1.0)  # two generate calls
    assert result.to_dict()["tokens_per_s"] == result.tokens_per_s


def test_evaluate_rejects_bad_input():
    with pytest.raises(ValueError):
        evaluate(FakeEngine(CANNED), FakeTask(), [], lambda p: [0], scorer=fake_scorer)


def test_print_table_and_save_json(tmp_path):
    from rich.console import Console

    result, _ = run_fake()
    console = Console(file=io.StringIO(), width=120, record=True)
    print_table({"base": result, "after RL": result.to_dict()}, "Held-out", console=console)
    text = console.export_text()
    assert "after RL" in text and "cons@4" in text and "pass@4" in text and "33.3%" in text
    one = {**result.to_dict(), "k": 1, "cons@1": 0.5, "pass@1": 0.5}
    table = print_table({"base": one}, "Held-out", console=Console(file=io.StringIO()))
    assert list(table.columns[0].cells) == ["pass@1", "format rate", "mean length"]  # no pass@1 twice, no cons@1
    path = save_json(tmp_path / "eval.json", {"base": result})
    loaded = json.loads(path.read_text())
    assert loaded["base"]["pass@1"] == pytest.approx(result.pass_at_1)
    assert len(loaded["base"]["records"]) == 3


class HangingCanonicalTask(FakeTask):
    """A verifier whose canonical form never returns: voting must stay under the scorers' timeout."""

    def canonical(self, answer: str) -> str:
        import time

        time.sleep(30)
        return answer

    def score(self, problem: Problem, answer: str) -> float:
        return float(answer.strip() == problem.answer)


def test_majority_vote_runs_under_the_timeout():
    import time

    start = time.monotonic()
    result = evaluate(FakeEngine(CANNED), HangingCanonicalTask(), PROBLEMS[:1], lambda p: [p.meta["id"]], k=4,
                      scorer=fake_scorer, timeout_s=0.2)
    assert time.monotonic() - start < 10  # 3 answers x 0.2 s, not 3 x 30 s
    assert result.cons_at_k == 0.0 and result.records[0]["majority"] is None  # no canonical form, no vote


class TextEngine(FakeEngine):
    """FakeEngine with the tokenizer evaluate_policy encodes prompts with: the problem number as the prompt."""

    class tokenizer:
        @staticmethod
        def encode(text):
            return [int(text.rsplit(" ", 1)[-1])]


def test_heldout_evaluation_uses_the_runs_language():
    # The held-out evaluation in GRPO once measured language consistency against "en" whatever --language said.
    cfg = GRPOConfig(language="zh", eval_samples=4, max_new_tokens=16, template="none")
    assert grpo.heldout_config(cfg).language == "zh"
    problems = [Problem("p 0", "3", {"id": 0})]
    figures = {lang: evaluate_policy(TextEngine(CANNED), FakeTask(), EvalConfig(**{**vars(grpo.heldout_config(cfg)),
                                                                                  "language": lang}), problems)
               for lang in ("en", "zh")}
    assert figures["en"].language_consistency >= 0.75  # "hmm" is written in Latin script
    assert figures["zh"].language_consistency == 0.0


def test_eval_on_a_data_file_counts_each_row_once(tiny_base, tmp_path, capsys):
    """`--split all` evaluates every row once; a split smaller than --problems is not cycled; the printed count is
    the distinct problems; results never go inside the model directory."""
    from r1lab.cli import main

    data = tmp_path / "twenty.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{n}+1", "answer": str(n + 1)}) + "\n" for n in range(20)))
    common = ["--model", str(tiny_base), "--task", str(data), "--samples", "2", "--max-new-tokens", "4"]
    main(["eval", *common, "--split", "all", "--problems", "0"])
    assert tiny_base.name == "model" and (tiny_base.parent / "config.yaml").exists()  # a pretraining run's model
    saved = json.loads((tiny_base.parent / "eval.json").read_text())["all"]
    assert saved["n_problems"] == 20 and "all, 20 problems" in " ".join(capsys.readouterr().out.split())
    assert not (tiny_base / "eval.json").exists()
    from r1lab.rewards.tasks.dataset import in_test_split

    main(["eval", *common, "--split", "train", "--problems", "200", "--out", str(tmp_path / "train.json")])
    train_rows = sum(not in_test_split(f"{n}+1", 0.1) for n in range(20))
    assert json.loads((tmp_path / "train.json").read_text())["train"]["n_problems"] == train_rows < 200


def test_a_generated_task_refuses_every_row(tiny_base, capsys):
    from r1lab.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tiny_base), "--problems", "0"])
    assert "generates its problems" in capsys.readouterr().err


def test_a_runs_model_is_evaluated_into_the_run(tmp_path):
    from r1lab.config import EvalConfig
    from r1lab.train.evaluate import results_path

    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert results_path(EvalConfig(model=str(tmp_path / "run" / "model"))) == tmp_path / "run" / "eval.json"
    assert results_path(EvalConfig(model=str(tmp_path / "run" / "model"), out="x.json")) == Path("x.json")
    (tmp_path / "mine").mkdir()  # a model directory of the user's own: results in the current directory
    assert results_path(EvalConfig(model=str(tmp_path / "mine"))) == Path("eval-mine.json")


def test_save_json_on_a_full_disk_leaves_the_earlier_file_whole(tmp_path, monkeypatch):
    result, _ = run_fake()
    path = save_json(tmp_path / "step_000002.json", {"heldout": result})
    before = path.read_text()
    real_write = Path.write_text

    def full_disk(self, text, *args, **kwargs):  # the disk fills after the first 4 KiB
        real_write(self, text[:4096], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError):
        save_json(path, {"heldout": {**result.to_dict(), "records": result.records * 50}})
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
