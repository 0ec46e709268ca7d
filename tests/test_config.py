"""Settings are declared once (type, help, allowed values) and validated in resolve(), for flags and YAML alike."""

import dataclasses
import typing

import pytest
import torch

from r1lab.cli import COMMANDS, build_parser
from r1lab.config import EvalConfig, GRPOConfig, PretrainConfig, SampleConfig, SFTConfig, Spec, resolve

CONFIGS = [command.settings for command in COMMANDS.values()]


def resolve_flags(command: str, *flags: str):
    return resolve(COMMANDS[command].settings, build_parser().parse_args([command, *flags]))


def resolve_yaml(tmp_path, text: str, command: str = "grpo", *flags: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return resolve_flags(command, "--config", str(path), *flags)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_declares_a_one_line_help_and_its_defaults_are_valid(cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("r1lab")
        assert isinstance(spec, Spec) and spec.help and "\n" not in spec.help, f.name
        assert hints[f.name] in (int, float, str, bool, dict), f.name
    assert cls().find_problems() == []


@pytest.mark.parametrize("flags, expected", [
    (["--warmup-steps", "-1"], "warmup_steps: -1 is below the minimum 0"),
    (["--max-grad-norm", "-1"], "max_grad_norm: -1 is below the minimum 0"),
    (["--lr", "0"], "lr: 0 must be > 0"),
    (["--top-p", "0"], "top_p: 0 is not in (0, 1]"),
    (["--top-p", "1.5"], "top_p: 1.5 is not in (0, 1]"),
    (["--temperature", "nan"], "temperature: nan is not a finite number"),
    (["--temperature", "0"], "temperature: 0 must be > 0"),
    (["--lr", "inf"], "lr: inf is not a finite number"),
    (["--reward-timeout-s", "-1"], "reward_timeout_s: -1 must be > 0"),
    (["--steps", "0"], "steps: 0 is below the minimum 1"),
    (["--steps", "2.5"], "steps: '2.5' is not an integer"),
    (["--lr", "fast"], "lr: 'fast' is not a number"),
    (["--samples-per-prompt", "1"], "samples_per_prompt: 1 is below the minimum 2"),
    (["--clip-low", "1"], "clip_low: 1 is not in [0, 1)"),
    (["--resume", "maybe"], "resume: 'maybe' is not one of: false, true, auto"),
    (["--allow-config-change", "maybe"], "allow_config_change: 'maybe' is not one of true, false"),
    (["--task-options", "[1, 2]"], "task_options: [1, 2] is not a mapping"),
    (["--task-options", "{a: "], "task_options: '{a: ' is not a YAML mapping"),
    (["--dtype", "fp16"], "dtype: 'fp16' is not one of: float32, bfloat16"),
    (["--loss-norm", "tokens"], "loss_norm: 'tokens' is not one of: token, sequence, constant (did you mean 'token'?)"),
    (["--control", "shuffle"], "control: 'shuffle' is not one of: none, random-reward"),
    (["--template", "chatml"], "template: 'chatml' is not one of"),
    (["--device", "gpu"], "device: 'gpu' is not one of auto, cpu, cuda, cuda:N, mps"),
    (["--language", "klingon"], "language: 'klingon' is not one of"),
    (["--task", "countdwn"], "task: 'countdwn' is not a built-in task (arithmetic, code, countdown), a data file"),
    (["--seed", "-1"], "seed: -1 is not in [0, 4294967295]"),
    (["--model", ""], "model: must not be empty"),
])
def test_a_bad_flag_is_refused_naming_field_value_and_allowed_range(flags, expected):
    with pytest.raises(ValueError) as err:
        resolve_flags("grpo", *flags)
    assert str(err.value).startswith("invalid settings:\n  ")
    assert expected in str(err.value)


@pytest.mark.parametrize("command, flags, expected", [
    ("eval", ["--split", "dev"], "split: 'dev' is not one of: test, train, all"),
    ("eval", ["--problems", "-1"], "problems: -1 is below the minimum 0"),
    ("sft", ["--eval-fraction", "1"], "eval_fraction: 1 is not in [0, 1)"),
    ("sft", ["--template", "none"], "template: 'none' is not one of: auto, chat, r1zero"),
    ("sample", ["--min-language-score", "2"], "min_language_score: 2 is not in [0, 1]"),
    ("serve", ["--port", "70000"], "port: 70000 is not in [1, 65535]"),
    ("serve", ["--log-level", "verbose"], "log_level: 'verbose' is not one of"),
    ("chat", ["--top-p", "0"], "top_p: 0 is not in (0, 1]"),
    ("pretrain", ["--task", "countdown"], "task: 'countdown' is not one of: arithmetic"),
    ("pretrain", ["--think-share", "-0.1"], "think_share: -0.1 is not in [0, 1]"),
    ("demo", ["--control", "random"], "control: 'random' is not one of: none, random-reward"),
    ("demo", ["--arch", "deepseek"], "arch: 'deepseek' is not one of: dense, deepseek-v3"),
    ("pretrain", ["--arch", "deepseek-v3", "--experts", "2", "--experts-per-token", "3"],
     "experts_per_token (3) is more than experts (2)"),
    ("pretrain", ["--arch", "deepseek-v3", "--dense-layers", "4"], "dense_layers (4) leaves no MoE layer"),
    ("pretrain", ["--arch", "deepseek-v3", "--activation-checkpointing", "true"], "activation_checkpointing is for "
                                                                                     "dense models"),
    ("pretrain", ["--balance-loss-weight", "-1"], "balance_loss_weight: -1 is below the minimum 0"),
    ("distill", ["--epochs", "0"], "epochs: 0 must be > 0"),
    ("pipeline", ["--rl-lr", "-1"], "rl_lr: -1 must be > 0"),
])
def test_every_command_validates_its_fields(command, flags, expected):
    with pytest.raises(ValueError, match="invalid settings") as err:
        resolve_flags(command, *flags)
    assert expected in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("lr: fast\n", "lr: 'fast' is not a number"),
    ("steps: 2.5\n", "steps: 2.5 is not an integer"),
    ("steps: '3'\n", "steps: '3' is not an integer (it is quoted: write it without quotes)"),
    ("task_options: [1, 2]\n", "task_options: [1, 2] is not a mapping"),
    ("lr: .nan\n", "lr: nan is not a finite number"),
    ("allow_config_change: 'no'\n", "allow_config_change: 'no' is not true or false (it is quoted: write it without quotes)"),
    ("allow_config_change: 1\n", "allow_config_change: 1 is not true or false"),
    ("resume: 1\n", "resume: 1 is not text"),
    ("language: no\n", "language: False is not text (YAML read it as a boolean: put it in quotes)"),
    ("steps: ~\n", "steps: None is not an integer"),
    ("warmup_steps: -1\n", "warmup_steps: -1 is below the minimum 0"),
    ("learning_rate: 1.0e-5\n", "run.yaml: unknown field 'learning_rate' (did you mean 'lr'?)"),
    ("prompts_per_stepp: 4\n", "run.yaml: unknown field 'prompts_per_stepp' (did you mean 'prompts_per_step'?)"),
])
def test_a_bad_yaml_value_is_refused_naming_the_field(tmp_path, text, expected):
    with pytest.raises(ValueError, match="invalid settings") as err:
        resolve_yaml(tmp_path, text)
    assert expected in str(err.value)


def test_every_bad_field_is_listed_in_one_message(tmp_path):
    with pytest.raises(ValueError) as err:
        resolve_yaml(tmp_path, "lr: fast\nlearning_rate: 1\n", "grpo", "--warmup-steps", "-1", "--top-p", "0")
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid settings:" and len(lines) == 5
    fields = {line.split(":")[0].strip() for line in lines[1:]}
    assert fields == {"lr", "warmup_steps", "top_p", str(tmp_path / "run.yaml")}


def test_booleans_yaml_ones_and_flag_words_and_a_quoted_no_is_refused(tmp_path):
    assert resolve_yaml(tmp_path, "allow_config_change: no\nscale_by_std: false\n").allow_config_change is False
    assert resolve_yaml(tmp_path, "allow_config_change: true\n").allow_config_change is True
    assert resolve_flags("grpo", "--allow-config-change").allow_config_change is True
    assert resolve_flags("grpo", "--allow-config-change", "no").allow_config_change is False
    assert resolve_flags("grpo", "--allow-config-change", "YES").allow_config_change is True
    # resume is false, true or auto: a boolean (YAML, Python, the flag words) is the same choice
    assert resolve_yaml(tmp_path, "resume: no\n").resume == "false"
    assert resolve_yaml(tmp_path, "resume: true\n").resume == "true"
    assert resolve_flags("grpo", "--resume").resume == "true"
    assert resolve_flags("grpo", "--resume", "YES").resume == "true"
    assert resolve_flags("grpo", "--resume", "auto").resume == "auto"
    assert resolve_flags("grpo", "--scale-by-std", "0").scale_by_std is False
    with pytest.raises(ValueError, match="allow_config_change: 'no' is not true or false"):
        resolve_yaml(tmp_path, "allow_config_change: 'no'\n")  # refused, never read as true (a non-empty string)


def test_numbers_yaml_exponents_and_ints_for_floats(tmp_path):
    cfg = resolve_yaml(tmp_path, "lr: 1e-5\nclip_high: 1\nweight_decay: 0\n")
    assert cfg.lr == 1e-5 and isinstance(cfg.lr, float)  # YAML 1.1 would read 1e-5 as text
    assert cfg.clip_high == 1.0 and isinstance(cfg.clip_high, float) and isinstance(cfg.weight_decay, float)
    assert resolve_flags("grpo", "--lr", "3e-6", "--steps", "7").steps == 7


@pytest.mark.parametrize("text, expected", [
    ("lr: 1e-5\n  steps: 3\n", "run.yaml:2:8: malformed YAML"),
    ("steps: [1, 2\n", "run.yaml:2:1: malformed YAML"),
    ("- lr\n- steps\n", "run.yaml: must be a mapping of field: value, not list"),
])
def test_malformed_yaml_is_one_line_naming_file_and_line(tmp_path, text, expected):
    with pytest.raises(ValueError) as err:
        resolve_yaml(tmp_path, text)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="--config .*nope.yaml"):
        resolve_flags("grpo", "--config", str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("task, options, expected", [
    ("arithmetic", "{min_term: 3}", "unknown option 'min_term' for task 'arithmetic' (did you mean 'min_terms'?)"),
    ("countdown", "{max_numbr: 5}", "unknown option 'max_numbr' for task 'countdown' (did you mean 'max_number'?)"),
    ("code", "{famlies: [sum]}", "unknown option 'famlies' for task 'code' (did you mean 'families'?)"),
    ("data.jsonl", "{prompt_fild: q}", "unknown option 'prompt_fild' for task 'data.jsonl' (did you mean "
                                       "'prompt_field'?)"),
    ("arithmetic", "{max_terms: many}", "task_options: max_terms: 'many' is not an integer"),
    ("arithmetic", "{min_terms: 5, max_terms: 3}", "task_options: need 2 <= min_terms <= max_terms, got 5, 3"),
])
def test_task_options_are_checked_against_the_task(task, options, expected):
    with pytest.raises(ValueError, match="invalid settings") as err:
        resolve_flags("grpo", "--task", task, "--task-options", options)
    assert expected in str(err.value)
    assert resolve_flags("grpo", "--task-options", "{min_terms: 3, max_terms: 4}").task_options["max_terms"] == 4


def test_cuda_is_refused_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"device: '{device}' but CUDA is not available on this machine"):
            resolve_flags("eval", "--device", device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_flags("eval", "--device", "cuda:0").device == "cuda:0"
    with pytest.raises(ValueError, match=r"device: 'cuda:1' but this machine has 1 CUDA device\(s\)"):
        resolve_flags("eval", "--device", "cuda:1")


@pytest.mark.parametrize("cfg, expected", [
    (SFTConfig(steps=0, epochs=0), "set steps >= 1, or steps 0 and epochs > 0"),
    (SampleConfig(min_tokens=10, max_tokens=5), "max_tokens 5 is below min_tokens 10"),
    (GRPOConfig(eval_every=5, eval_samples=0), "eval_samples and eval_problems must be at least 1 when eval_every > 0"),
    (PretrainConfig(hidden_size=100, num_heads=3), "hidden_size 100 is not num_heads 3 times an even head size"),
    (PretrainConfig(num_heads=4, num_kv_heads=3), "num_heads 4 is not a multiple of num_kv_heads 3"),
    (PretrainConfig(think_share=0.9, untagged_share=0.2), "think_share + untagged_share is 1.1, above 1"),
])
def test_rules_across_fields_still_apply(cfg, expected):
    with pytest.raises(ValueError, match="invalid .* config: ") as err:
        cfg.check()
    assert expected in str(err.value)


def test_programmatic_configs_are_checked_too_and_zero_temperature_means_greedy_outside_grpo():
    with pytest.raises(ValueError, match="invalid GRPO config: lr: -1 must be > 0; top_p: 0 is not in"):
        GRPOConfig(lr=-1, top_p=0).check()
    EvalConfig(temperature=0).check()  # the engine decodes greedily at temperature 0
    SampleConfig(temperature=0, language="").check()
    assert resolve_flags("eval", "--temperature", "0").temperature == 0.0


def test_help_gives_each_flag_its_description_allowed_values_and_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["grpo", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--top-p FLOAT nucleus sampling of rollouts (1 = off) (allowed: (0, 1]; default: 1.0)" in text
    assert "--warmup-steps INT steps of linear learning-rate warmup (allowed: >= 0; default: 0)" in text
    assert "(one of: token, sequence, constant; default: 'token')" in text
    assert "--allow-config-change [BOOL] resume with settings that change the run" in text
    assert "--resume [STR] continue from the newest intact checkpoint in out" in text
    assert "or false (one of: false, true, auto; default: 'false')" in text
    assert "--overwrite" in text
