"""Checkpoints that verify themselves, a one-line error for another model, and the settings guard on resume."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import safetensors
import safetensors.torch
import torch
import yaml

from r1lab.model.architecture import ModelConfig
from r1lab.model.tokenizer import build_tiny_tokenizer
from r1lab.model.transformer import CausalLM
import r1lab.train.checkpoint as checkpoint_module
from r1lab.train.checkpoint import (CHANGES_FILE, MANIFEST_FILE, STATE_FILE, CheckpointError, ConfigChangeError,
                                    DiskFullError, check_config_change, checkpoint_problem, checkpoint_step,
                                    effective_config, find_resume_checkpoint, latest_checkpoint, list_checkpoints,
                                    load_checkpoint, save_checkpoint, update_run_config)
from r1lab.train.resume import save_final


def tiny_model(hidden: int = 32) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def trained(model: CausalLM) -> torch.optim.Optimizer:
    """An optimizer with state, after one step that moved the weights."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 64, (2, 8))).float().pow(2).mean().backward()
    optimizer.step()
    return optimizer


@pytest.fixture
def run(tmp_path):
    """A run directory with checkpoints at steps 2 and 4."""
    model = tiny_model()
    optimizer = trained(model)
    for step in (2, 4):
        save_checkpoint(tmp_path, step, model, build_tiny_tokenizer(), optimizer)
    return tmp_path


def step_dir(run, step: int):
    return run / "checkpoints" / f"step_{step:06d}"


def truncate(path, keep: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_manifest_lists_every_file_and_the_newest_is_found(run):
    manifest = json.loads((step_dir(run, 4) / MANIFEST_FILE).read_text())["files"]
    assert {STATE_FILE, "model.safetensors", "config.json"} <= set(manifest)
    assert manifest[STATE_FILE]["size"] == (step_dir(run, 4) / STATE_FILE).stat().st_size
    messages = []
    assert find_resume_checkpoint(run, messages.append) == step_dir(run, 4)
    assert messages == [] and checkpoint_step(step_dir(run, 4)) == 4


@pytest.mark.parametrize("name", ["model.safetensors", STATE_FILE])
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(run, name):
    size = (step_dir(run, 4) / name).stat().st_size
    truncate(step_dir(run, 4) / name)
    messages = []
    assert find_resume_checkpoint(run, messages.append) == step_dir(run, 2)
    assert messages == [f"checkpoint step_000004 is incomplete ({name}: size 100 != {size}), "
                        "resuming from step_000002"]
    assert latest_checkpoint(run) == step_dir(run, 2)


@pytest.mark.parametrize("name", ["config.json", STATE_FILE, MANIFEST_FILE])
def test_a_deleted_file_falls_back(run, name):
    (step_dir(run, 4) / name).unlink()
    messages = []
    found = find_resume_checkpoint(run, messages.append)
    if name == MANIFEST_FILE:  # no manifest: judged as a checkpoint from before manifests, whose files are whole
        assert found == step_dir(run, 4) and messages == []
    else:
        assert found == step_dir(run, 2)
        assert f"({name}: missing)" in messages[0]


def test_same_size_corruption_is_caught_by_the_hash(run):
    path = step_dir(run, 4) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    messages = []
    assert find_resume_checkpoint(run, messages.append) == step_dir(run, 2)
    assert "model.safetensors: sha256 differs" in messages[0]


def test_all_broken_is_a_clear_error_and_none_is_a_fresh_start(run, tmp_path):
    truncate(step_dir(run, 4) / STATE_FILE)
    (step_dir(run, 2) / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no intact checkpoint to resume from \(step_000004: "
                                              r"trainer_state.pt: size 100 != \d+; step_000002: model.safetensors: "
                                              r"missing\)"):
        find_resume_checkpoint(run, lambda _: None)
    assert latest_checkpoint(run) is None
    assert find_resume_checkpoint(tmp_path / "new_run") is None


@pytest.mark.parametrize("name, cut, problem", [
    ("model.safetensors", 100, "is shorter than its header"),  # cut inside the header
    ("model.safetensors", -16, "size {short} != {size}"),  # the header says how long the data must be
    (STATE_FILE, -16, "not a complete archive"),
])
def test_checkpoints_from_before_manifests_count_if_they_read_whole(run, name, cut, problem):
    for step in (2, 4):
        (step_dir(run, step) / MANIFEST_FILE).unlink()
    assert find_resume_checkpoint(run) == step_dir(run, 4)
    size = (step_dir(run, 4) / name).stat().st_size
    truncate(step_dir(run, 4) / name, cut)
    messages = []
    assert find_resume_checkpoint(run, messages.append) == step_dir(run, 2)
    assert f"({name}: " in messages[0] and problem.format(short=size - 16, size=size) in messages[0]


def test_load_restores_and_another_model_shape_is_one_line(run):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert load_checkpoint(step_dir(run, 4), model, optimizer) == 4
    assert optimizer.state  # the saved AdamW moments are back
    other = tiny_model(hidden=16)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(step_dir(run, 4), other, torch.optim.AdamW(other.parameters()))
    message = str(info.value)
    assert "\n" not in message and "does not fit this run's" in message and "in the checkpoint" in message


def test_saves_rotate_and_leftover_temporary_directories_are_ignored(run):
    (run / "checkpoints" / "step_000006.tmp").mkdir()
    model = tiny_model()
    save_checkpoint(run, 8, model, build_tiny_tokenizer(), trained(model))
    assert [p.name for p in list_checkpoints(run)] == ["step_000004", "step_000008"]


# ---------------------------------------------------------------- a full disk


def no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def safetensors_no_space(tensors, filename, metadata=None):
    with open(filename, "wb") as f:  # part of the file made it to the disk, as it does when the disk fills up
        f.write(b"\0" * 64)
    raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                      'message: "No space left on device" })')


def torch_save_no_space(obj, path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"PK")
    raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")  # says nothing of why


def dcp_no_space(*_args, **_kwargs):
    import torch.distributed.checkpoint as dcp  # ~0.7 s to import: only where a test needs it

    try:
        no_space()
    except OSError as err:  # torch.distributed.checkpoint reports each rank's failure in one BaseException
        raise dcp.api.CheckpointException("save failed", {0: (err, None)}) from None


@pytest.mark.parametrize("where", ["safetensors", "torch.save", "optimizer", "manifest"])
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(run, monkeypatch, where):
    before = {p.name: p.read_bytes() for p in step_dir(run, 4).iterdir() if p.is_file()}
    if where == "safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", safetensors_no_space)
    elif where == "torch.save":  # torch.save's error does not say the disk is full: the free space does
        monkeypatch.setattr(checkpoint_module.torch, "save", torch_save_no_space)
        monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9, 0))
    elif where == "optimizer":
        monkeypatch.setattr("torch.distributed.checkpoint.save", dcp_no_space)
    else:
        monkeypatch.setattr(checkpoint_module, "write_manifest", no_space)
    model = tiny_model()
    with pytest.raises(DiskFullError) as info:
        save_checkpoint(run, 6, model, build_tiny_tokenizer(), trained(model))
    message = str(info.value)
    assert "\n" not in message and str(step_dir(run, 6)) in message and "needs about" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]  # no .tmp
    assert {p.name: p.read_bytes() for p in step_dir(run, 4).iterdir() if p.is_file()} == before
    assert checkpoint_problem(step_dir(run, 4)) is None and latest_checkpoint(run) == step_dir(run, 4)


def test_another_failure_while_saving_is_raised_as_it_is_and_cleaned_up(run, monkeypatch):
    def broken(*_args, **_kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoint_module, "write_manifest", broken)
    model = tiny_model()
    with pytest.raises(PermissionError):
        save_checkpoint(run, 6, model, build_tiny_tokenizer(), trained(model))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]


def test_the_final_model_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    model = tiny_model()
    save_final(model, build_tiny_tokenizer(), tmp_path, adapter_base=None)
    saved = (tmp_path / "model" / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    monkeypatch.setattr(safetensors.torch, "save_file", safetensors_no_space)
    with pytest.raises(DiskFullError, match="no space left"):
        save_final(model, build_tiny_tokenizer(), tmp_path, adapter_base=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no model.tmp
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == saved  # the earlier model, unchanged


# ---------------------------------------------------------------- settings on resume

SAVED = {"model": "base", "lr": 1e-6, "samples_per_prompt": 8, "steps": 100, "device": "cpu",
         "reward_functions": {"m:f": 0.5}, "task_options": {"ops": ["+", "-"]}}


@pytest.fixture
def config_run(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(SAVED, sort_keys=False))
    return tmp_path


def test_a_changed_setting_is_refused_with_the_difference(config_run):
    new = {**SAVED, "lr": 2e-6, "samples_per_prompt": 4}
    with pytest.raises(ConfigChangeError) as info:
        check_config_change(config_run, new, step=50)
    message = str(info.value)
    assert "  lr: 1e-06 -> 2e-06\n  samples_per_prompt: 8 -> 4\n" in message
    assert not (config_run / CHANGES_FILE).exists()


def test_free_fields_and_equal_values_pass(config_run):
    same = {**SAVED, "steps": 300, "device": "cuda", "task_options": {"ops": ("+", "-")}, "new_field": 1}
    assert check_config_change(config_run, same, step=50) == []


def test_an_allowed_change_is_recorded_and_config_yaml_kept(config_run):
    before = (config_run / "config.yaml").read_text()
    new = {**SAVED, "lr": 2e-6}
    records = check_config_change(config_run, new, step=50, allow=True)
    assert [(r["step"], r["field"], r["old"], r["new"]) for r in records] == [(50, "lr", 1e-6, 2e-6)]
    lines = [json.loads(line) for line in (config_run / CHANGES_FILE).read_text().splitlines()]
    assert lines == records and "time" in lines[0]
    assert (config_run / "config.yaml").read_text() == before
    assert effective_config(config_run)["lr"] == 2e-6
    assert check_config_change(config_run, new, step=80) == []  # already recorded: allowed without asking again
    with pytest.raises(ConfigChangeError, match="lr: 2e-06 -> 1e-06"):
        check_config_change(config_run, SAVED, step=80)  # going back is a change too


def test_update_run_config_takes_only_free_fields(config_run):
    update_run_config(config_run, {**SAVED, "steps": 300, "lr": 5.0})
    saved = yaml.safe_load((config_run / "config.yaml").read_text())
    assert saved["steps"] == 300 and saved["lr"] == 1e-6
    fresh = config_run / "fresh"
    fresh.mkdir()
    update_run_config(fresh, {"lr": 1.0, "task_options": {"ops": ("+",)}})
    assert yaml.safe_load((fresh / "config.yaml").read_text()) == {"lr": 1.0, "task_options": {"ops": ["+"]}}
    shutil.rmtree(fresh)


def test_a_resume_leaves_config_yaml_repeatable_in_another_directory(config_run):
    (config_run / "config.yaml").write_text(yaml.safe_dump({**SAVED, "resume": "false", "allow_config_change": False}))
    update_run_config(config_run, {**SAVED, "resume": "true", "allow_config_change": True, "steps": 300})
    saved = yaml.safe_load((config_run / "config.yaml").read_text())
    # resume 'true' was recorded: `--config RUN/config.yaml --out NEW` then failed on NEW's missing checkpoint
    assert (saved["resume"], saved["allow_config_change"], saved["steps"]) == ("false", False, 300)
