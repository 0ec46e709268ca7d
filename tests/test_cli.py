"""The command line: YAML + flag overrides, clear errors for bad input, `r1lab eval` output."""

import json

import pytest

from r1lab.cli import build_parser, main
from r1lab.config import GRPOConfig, resolve


def test_flags_override_yaml_and_bools_work_as_switches(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("prompts_per_step: 4\nsamples_per_prompt: 6\nlr: 1.0e-5\n")
    args = build_parser().parse_args(["grpo", "--config", str(cfg_file), "--samples-per-prompt", "12", "--resume"])
    cfg = resolve(GRPOConfig, args)
    assert (cfg.prompts_per_step, cfg.samples_per_prompt, cfg.lr, cfg.resume) == (4, 12, 1e-5, True)


def test_unknown_yaml_field_names_the_file_and_field(tmp_path, capsys):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("prompts_per_stepp: 4\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", "--config", str(cfg_file)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "run.yaml" in err and "prompts_per_stepp" in err


def test_malformed_dataset_row_is_reported_before_training(tiny_base, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2"}\n')
    with pytest.raises(SystemExit):
        main(["grpo", "--model", str(tiny_base), "--task", str(data), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "train.jsonl:2" in err and "answer" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eval_prints_a_table_and_writes_json(tiny_base, tmp_path, capsys, dtype):
    out = tmp_path / "eval.json"
    main(["eval", "--model", str(tiny_base), "--task-options", "{min_terms: 3, max_terms: 4}", "--problems", "6",
          "--samples", "4", "--max-new-tokens", "24", "--out", str(out), "--dtype", dtype])
    result = json.loads(out.read_text())["test"]
    assert {"pass@1", "cons@4", "pass@4", "format_rate"} <= set(result)
    assert "pass@1" in capsys.readouterr().out
