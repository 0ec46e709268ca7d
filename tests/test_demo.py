"""The demo pipeline end to end at toy size: base, GRPO, evaluations, report, HF-format model, control reuse."""

import json

import pytest
import yaml

from r1lab.commands.demo import run_demo
from r1lab.config import DemoConfig

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
    lines.clear()
    assert run_demo(cfg, log=lines.append) == report
    assert any("R1-Zero GRPO: reusing" in line for line in lines)  # its finished GRPO run is not made again


def test_the_deepseek_v3_demo_runs_beside_the_dense_one_and_compares_the_bases(tmp_path):
    dense = DemoConfig(out=str(tmp_path), pretrain_steps=5, grpo_steps=1, eval_problems=4)
    run_demo(dense, log=lambda *_: None)
    report = run_demo(DemoConfig(out=str(tmp_path), pretrain_steps=5, grpo_steps=1, eval_problems=4,
                                 arch="deepseek-v3"), log=lambda *_: None)
    assert report == tmp_path / "grpo-deepseek-v3" / "report" / "report.md"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "grpo-deepseek-v3" / "model")
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    table = report.read_text().split("## Tiny bases")[1].split("##")[0]
    assert "| metric | dense | deepseek-v3 |" in table
    facts = {arch: json.loads((tmp_path / base / "architecture.json").read_text())
             for arch, base in (("dense", "base"), ("deepseek-v3", "base-deepseek-v3"))}
    assert "moe/load_max_over_mean" in facts["deepseek-v3"] and "moe/load_max_over_mean" not in facts["dense"]
    assert facts["deepseek-v3"]["active_parameters"] < facts["deepseek-v3"]["parameters"]
    assert facts["dense"]["active_parameters"] == facts["dense"]["parameters"]
    assert 4 * facts["deepseek-v3"]["kv_cache_bytes_per_token_bf16"] <= \
        facts["deepseek-v3"]["multi_head_kv_cache_bytes_per_token_bf16"]


def test_the_tool_demo_runs_in_its_own_directories_and_plots_the_tool_use(tmp_path):
    cfg = DemoConfig(out=str(tmp_path), tools="python", pretrain_steps=3, grpo_steps=1, eval_problems=4)
    report = run_demo(cfg, log=lambda *_: None)
    assert report == tmp_path / "grpo-tools" / "report" / "report.md"
    assert "<python>" in (tmp_path / "base-tools" / "corpus_sample.txt").read_text()
    grpo = yaml.safe_load((tmp_path / "grpo-tools" / "config.yaml").read_text())
    assert grpo["tools"] == "python" and grpo["task_options"]["ops"] == "*"
    text = report.read_text()
    assert "tool_use.png" in text and (report.parent / "tool_use.png").exists() and "| tool_calls |" in text
    assert "Tool calls per held-out sample went from" in text
    metrics = [json.loads(line) for line in (tmp_path / "grpo-tools" / "metrics.jsonl").read_text().splitlines()]
    assert "tools/rollouts_with_calls" in metrics[0]

    control = run_demo(DemoConfig(out=str(tmp_path), tools="python", pretrain_steps=3, grpo_steps=1, eval_problems=4,
                                  control="random-reward"), log=lambda *_: None)
    assert control == tmp_path / "grpo-tools-random-reward" / "report" / "report.md"
    assert "R1-Zero GRPO (verifier rewards), other run" in control.read_text()
    assert not (tmp_path / "base").exists()  # the tool demo never touches the plain demo's runs
