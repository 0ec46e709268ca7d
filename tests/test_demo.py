"""The demo pipeline end to end at toy size: base, GRPO, evaluations, report, HF-format model, control reuse."""

import json

import pytest

from r1lab.config import DemoConfig
from r1lab.demo import run_demo

pytestmark = pytest.mark.slow  # end-to-end runs of whole commands: the full suite only (make test)

transformers = pytest.importorskip("transformers")


def test_demo_runs_end_to_end_and_writes_a_report(tmp_path):
    cfg = DemoConfig(out=str(tmp_path), pretrain_steps=20, grpo_steps=2, eval_problems=8)
    lines = []
    report = run_demo(cfg, log=lines.append)
    text = report.read_text()
    assert "pass@1" in text and "cons@8" in text and "heldout_accuracy.png" in text
    assert (report.parent / "heldout_accuracy.png").exists() and (report.parent / "completion_length.png").exists()
    evals = [json.loads(line) for line in (tmp_path / "grpo" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "grpo" / "model")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "grpo" / "model")
    assert model.config.vocab_size == len(tok)
    assert any("report:" in line for line in lines) and any("final model:" in line for line in lines)

    control = run_demo(DemoConfig(out=str(tmp_path), pretrain_steps=20, grpo_steps=2, eval_problems=8,
                                  control="random-reward"), log=lines.append)
    assert any("pretrained base: reusing" in line for line in lines)
    assert "R1-Zero GRPO (verifier rewards), other run" in control.read_text()
