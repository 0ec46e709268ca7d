"""The command line: YAML + flag overrides, clear errors for bad input, `r1lab eval` output."""

import errno
import json
import re

import pytest

from r1lab.cli import build_parser, main
from r1lab.config import GRPOConfig, resolve


def test_flags_override_yaml_and_bools_work_as_switches(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("prompts_per_step: 4\nsamples_per_prompt: 6\nlr: 1.0e-5\n")
    args = build_parser().parse_args(["grpo", "--config", str(cfg_file), "--samples-per-prompt", "12", "--resume"])
    cfg = resolve(GRPOConfig, args)
    assert (cfg.prompts_per_step, cfg.samples_per_prompt, cfg.lr, cfg.resume) == (4, 12, 1e-5, "true")


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


@pytest.fixture
def dispatched(monkeypatch):
    """Records the commands main() would run, so that a test sees what ran without training anything."""
    from r1lab import cli

    monkeypatch.delenv("R1LAB_DEBUG", raising=False)
    calls = []
    monkeypatch.setattr(cli, "dispatch", lambda command, cfg: calls.append((command, cfg)))
    return calls


def refused(argv, capsys) -> str:
    """main(argv) must stop with exit status 2 and a one-message error, no traceback; returns the message."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("flags, expected", [
    (["--warmup-steps", "-1"], "warmup_steps: -1 is below the minimum 0"),
    (["--max-grad-norm", "-1"], "max_grad_norm: -1 is below the minimum 0"),
    (["--top-p", "0"], "top_p: 0 is not in (0, 1]"),
    (["--temperature", "nan"], "temperature: nan is not a finite number"),
    (["--reward-timeout-s", "-1"], "reward_timeout_s: -1 must be > 0"),
    (["--task-options", "{min_term: 3}"], "unknown option 'min_term' for task 'arithmetic' (did you mean "
                                          "'min_terms'?)"),
])
def test_bad_flags_stop_grpo_before_its_first_step(tiny_base, tmp_path, capsys, monkeypatch, flags, expected):
    monkeypatch.delenv("R1LAB_DEBUG", raising=False)
    out = tmp_path / "run"
    err = refused(["grpo", "--model", str(tiny_base), "--out", str(out), "--steps", "1", "--eval-every", "0",
                   "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "8", *flags], capsys)
    assert err.startswith("r1lab grpo: error: invalid settings:\n  ") and expected in err
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("text, expected", [
    ("lr: fast\n", "lr: 'fast' is not a number"),
    ("steps: 2.5\n", "steps: 2.5 is not an integer"),
    ("task_options: [1, 2]\n", "task_options: [1, 2] is not a mapping"),
    ("allow_config_change: 'no'\n", "allow_config_change: 'no' is not true or false"),
    ("learning_rate: 1.0e-5\n", "unknown field 'learning_rate' (did you mean 'lr'?)"),
    ("lr: 1e-5\n  steps: 3\n", "run.yaml:2:8: malformed YAML"),
    ("lr: 1e-5\nsteps: 3\nlr: 2e-5\n", "run.yaml:3:1: malformed YAML: 'lr' is given twice (first on line 1)"),
    ("task_options: {min_terms: 3, min_terms: 4}\n", "run.yaml:1:30: malformed YAML: 'min_terms' is given twice"),
])
def test_bad_yaml_stops_before_anything_runs(tmp_path, capsys, dispatched, text, expected):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(text)
    err = refused(["grpo", "--config", str(cfg_file), "--out", str(tmp_path / "run")], capsys)
    assert err.startswith("r1lab grpo: error: ") and expected in err
    assert dispatched == []


def test_cuda_without_cuda_is_one_line_before_the_weights_load(tmp_path, capsys, dispatched, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = refused(["eval", "--model", str(tmp_path / "model"), "--device", "cuda:0"], capsys)
    assert "device: 'cuda:0' but CUDA is not available on this machine" in err and len(err.splitlines()) == 2
    assert dispatched == []


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"r1lab {version('r1lab')}"


@pytest.mark.parametrize("argv, expected", [
    (["grpo", "--lr-rate", "1e-5"], "r1lab grpo: error: unrecognized arguments: --lr-rate 1e-5 (did you mean --lr?)"),
    (["sft", "--warmpu-steps=3"], "unrecognized arguments: --warmpu-steps=3 (did you mean --warmup-steps?)"),
    (["grop"], "invalid choice: 'grop'"),
])
def test_a_misspelt_flag_or_command_gets_a_suggestion(argv, expected, capsys, dispatched):
    err = refused(argv, capsys)
    assert expected in err
    assert "(did you mean " in err and dispatched == []


def test_an_occupied_out_is_refused_unless_resume_or_overwrite(tmp_path, capsys, dispatched):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    err = refused(["grpo", "--out", str(out)], capsys)
    assert f"out: {out} already holds files (metrics.jsonl)" in err and "--resume" in err and "--overwrite" in err
    assert refused(["grpo", "--out", str(out), "--resume", "--overwrite"], capsys)
    assert dispatched == []
    main(["grpo", "--out", str(out), "--resume"])
    assert dispatched[-1][1].resume and (out / "metrics.jsonl").exists()  # resumes in place
    main(["grpo", "--out", str(out), "--overwrite"])
    assert not out.exists() and (tmp_path / "run.old-1" / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert "moved" in capsys.readouterr().err and len(dispatched) == 2
    out.mkdir()
    (out / "config.yaml").write_text("")
    main(["sft", "--out", str(out), "--overwrite"])
    assert (tmp_path / "run.old-2" / "config.yaml").exists()  # the first moved-aside run stays as it was


def test_merge_refuses_to_write_over_the_model_or_adapter_it_reads(tmp_path, capsys, dispatched):
    base, adapter, merged = tmp_path / "base", tmp_path / "run" / "adapter", tmp_path / "merged"
    for directory in (base, adapter, merged):
        directory.mkdir(parents=True)
        (directory / "config.json").write_text("{}")
    for out in (base, adapter, tmp_path / "run"):  # --overwrite would move it aside: refused too
        for extra in ([], ["--overwrite"]):
            err = refused(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out), *extra], capsys)
            assert f"out: {out} holds the " in err and "that this command reads; choose another --out" in err
    assert (base / "config.json").exists() and (adapter / "config.json").exists() and dispatched == []
    err = refused(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(merged)], capsys)
    assert f"out: {merged} already holds files (config.json)" in err and "--overwrite" in err  # as the runs' out
    main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(merged), "--overwrite"])
    assert (tmp_path / "merged.old-1" / "config.json").exists() and [c for c, _ in dispatched] == ["merge"]


def test_pretrain_refuses_an_occupied_out_and_stage_reusing_commands_do_not(tmp_path, capsys, dispatched):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.yaml").write_text("")
    err = refused(["pretrain", "--out", str(tmp_path / "base")], capsys)
    assert "--overwrite" in err and "--resume" not in err  # pretraining has no checkpoints to resume
    for command in ("demo", "distill", "pipeline"):  # they reuse the stages already done in out, by design
        main([command, "--out", str(tmp_path / "base")])
    assert [command for command, _ in dispatched] == ["demo", "distill", "pipeline"]


def test_an_out_that_is_a_file_is_refused_by_every_command_with_a_run_directory(tmp_path, capsys, dispatched):
    (tmp_path / "notes.txt").write_text("mine\n")
    for command in ("demo", "distill", "pipeline", "pretrain", "merge"):  # demo's failed with NotADirectoryError
        err = refused([command, "--out", str(tmp_path / "notes.txt")], capsys)
        assert f"out: {tmp_path / 'notes.txt'} is a file, not a run directory" in err
    assert (tmp_path / "notes.txt").read_text() == "mine\n" and dispatched == []


def test_a_results_file_out_never_writes_over_what_the_command_reads(tmp_path, capsys, dispatched):
    model, data, completions = tmp_path / "model", tmp_path / "data.jsonl", tmp_path / "completions.jsonl"
    model.mkdir()
    for path in (model / "config.json", data, completions):
        path.write_text("{}\n")
    for argv, out in ((["eval", "--model", str(model)], model / "config.json"),
                      (["eval", "--model", str(model), "--task", str(data)], data),
                      (["sample", "--model", str(model), "--task", str(data)], model / "sft.jsonl"),
                      (["score", "--task", str(data), "--completions", str(completions)], completions)):
        err = refused([*argv, "--out", str(out)], capsys)
        assert f"out: {out} would write over the " in err and "that this command reads" in err
    err = refused(["eval", "--model", str(model), "--out", str(tmp_path)], capsys)  # it failed after the whole eval
    assert f"out: {tmp_path} is a directory; --out names the file to write" in err
    assert all(p.read_text() == "{}\n" for p in (model / "config.json", data, completions)) and dispatched == []
    main(["eval", "--model", str(model), "--task", str(data), "--out", str(tmp_path / "eval.json")])
    assert [command for command, _ in dispatched] == ["eval"]


def test_a_yaml_file_not_in_utf8_names_the_file_and_line(tmp_path, capsys, dispatched):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_bytes("lr: 1.0e-5\nsystem: Réponds en français\n".encode("latin-1"))  # saved by a Windows editor
    err = refused(["grpo", "--config", str(cfg_file), "--out", str(tmp_path / "run")], capsys)
    assert f"error: {cfg_file}:2: not valid UTF-8 (byte 0xe9; save the file as UTF-8)" in err and dispatched == []


def test_eval_and_sample_refuse_prompts_that_do_not_fit_the_context(tiny_base, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("R1LAB_DEBUG", raising=False)
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": "1+1", "answer": "2"}, {"prompt": "9" * 600, "answer": "9"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    every_row = {"eval": ["--split", "all"], "sample": []}
    for command, out in (("eval", "eval.json"), ("sample", "sft.jsonl")):  # they generated past the context (or
        base = [command, "--model", str(tiny_base), "--out", str(tmp_path / out)]  # ran out of memory allocating it)
        err = refused([*base, "--max-new-tokens", "1000000000"], capsys)
        assert "max_new_tokens 1000000000 leaves no room for a prompt in the model's context of 512 tokens" in err
        err = refused([*base, "--task", str(data), "--max-new-tokens", "8", "--problems", "0", *every_row[command]],
                      capsys)
        assert re.search(r"data.jsonl:2: prompt of \d+ tokens \+ max_new_tokens 8 > context 512", err)
        assert not (tmp_path / out).exists()
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl"),
                                   OSError(errno.EROFS, "Read-only file system", "/runs/x/eval.jsonl")])
def test_a_full_or_read_only_disk_is_one_line_naming_the_file(error, tmp_path, capsys, monkeypatch):
    from r1lab import cli

    monkeypatch.delenv("R1LAB_DEBUG", raising=False)

    def dispatch(command, cfg):
        raise error  # as metrics.jsonl, TensorBoard, sample's rows or eval's results meet a full disk

    monkeypatch.setattr(cli, "dispatch", dispatch)
    err = refused(["pretrain", "--out", str(tmp_path / "run")], capsys)
    assert err.count("\n") == 1 and f"cannot write {error.filename}: {error.strerror}; free some space" in err
