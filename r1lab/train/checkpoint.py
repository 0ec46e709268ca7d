"""Atomic checkpoints that verify themselves, exact resume, and a guard against resuming with other settings.

A checkpoint is a directory run/checkpoints/step_NNNNNN holding the model in Hugging Face format (it loads in
transformers as is), optimizer/ (the optimizer state in torch.distributed.checkpoint's format, written by every
rank of a torchrun job and read back at any number of ranks, one included), trainer_state.pt (RNG states, step)
and manifest.json (size and sha256 of every other file). It is written under a temporary name, the manifest last, and renamed into place, so a run killed
mid-save leaves the previous checkpoint intact; and a checkpoint damaged afterwards (a full disk, a copy cut
short) fails its manifest check, so that resuming falls back to the previous intact one instead of crashing. A save
that fails (a full disk above all) removes what it had written, and a full disk is said in one line (DiskFullError)
with the directory and the space the save needs; the final model (written_directory) is saved the same way.

Checkpoints written before manifests existed are trusted if their files read whole: every safetensors file is
as long as its header says, and trainer_state.pt is a complete zip archive (torch.save's format).

Resuming a run with settings that change what it trains (lr, samples_per_prompt, ...) is refused unless allowed
(allow_config_change); an allowed change is appended to RUN/config_changes.jsonl, never written over the run's
config.yaml, so that the run's record says which settings held from which step.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import random
import shutil
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from r1lab.model.hf_format import load_model, save_model
from r1lab.model.lora import CONFIG_FILE as ADAPTER_CONFIG
from r1lab.model.lora import has_lora, load_adapter_weights, save_adapter
from r1lab.model.tokenizer import Tokenizer
from r1lab.model.transformer import CausalLM
from r1lab.train.distributed import World
from r1lab.train.sharding import full_state_dict, load_full_state_dict

STATE_FILE = "trainer_state.pt"
OPTIMIZER_DIR = "optimizer"  # torch.distributed.checkpoint's directory: loads at any number of ranks
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.yaml"
CHANGES_FILE = "config_changes.jsonl"
# Settings that can differ on resume without changing what the run trains: how long it runs, how often it
# saves, evaluates and logs, and where. SFT's cosine schedule depends on the number of steps: it passes a list
# without "steps" and "epochs".
RESUME_FREE_FIELDS = frozenset({"steps", "save_every", "eval_every", "samples_every", "threads", "device",
                                "dist_timeout_s", "shard", "time_limit_s", "resume", "out", "allow_config_change"})


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line (a ValueError, so the CLI prints it as such)."""


class DiskFullError(ValueError):
    """A save that found no space left: what it had written is removed; one line naming the directory."""


class ConfigChangeError(ValueError):
    """Resuming with settings that would change the run; the message lists each field as old -> new."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- writing


def save_checkpoint(run_dir: Path, step: int, model: CausalLM, tokenizer: Tokenizer,
                    optimizer: torch.optim.Optimizer, keep: int = 2, world: World = World(),
                    adapter_base: str | None = None, extra: dict | None = None) -> Path:
    """Every rank of the job calls this (run_dir on a file system they all see); rank 0 writes all but the
    optimizer state, which each rank writes its part of. A LoRA run (adapter_base: its base model) checkpoints its
    adapter (PEFT's format) instead of the whole model: the base never changes. extra: a trainer's own state
    (picklable; async GRPO's rollouts in flight), given back by checkpoint_extra."""
    final = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    state = full_state_dict(model) if adapter_base is None else None  # a sharded model's weights, onto rank 0
    needed = tensor_bytes(state if state is not None else model.state_dict()) + tensor_bytes(optimizer.state)
    with _removed_on_failure(tmp, final, needed, world.main):
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
            if adapter_base is None:
                save_model(model, tmp, state=state)
            else:
                save_adapter(model, tmp, adapter_base)
            tokenizer.save(tmp)
            torch.save({"step": step, "rng": rng_state(), **({"extra": extra} if extra is not None else {})},
                       tmp / STATE_FILE)
        world.barrier()
        with _single_process_is_meant():
            dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=tmp / OPTIMIZER_DIR)
        world.barrier()
        if world.main:
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(final.parent)  # the rename itself survives a power cut
    if world.main:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


@contextlib.contextmanager
def written_directory(final: Path, needed_bytes: int):
    """Yields a temporary directory to write `final` into, renamed into place when the block ends: a failed write
    (a full disk: DiskFullError) leaves no partial directory behind, and an earlier `final` stays as it was."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _removed_on_failure(tmp, final, needed_bytes):
        tmp.mkdir(parents=True)
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)


def tensor_bytes(tree) -> int:
    """Bytes of the tensors in a (nested) state dict: what saving it writes, give or take the headers."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return sum(tensor_bytes(v) for v in values)


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, final: Path, needed_bytes: int, owner: bool = True):
    """Any failure inside removes tmp (when this process owns it) and is raised again; one for lack of space
    becomes DiskFullError. torch.distributed.checkpoint raises a BaseException, hence the broad catch."""
    try:
        yield
    except BaseException as err:  # noqa: BLE001 - re-raised below, whatever it is
        full = _is_disk_full(err, tmp)
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        free = shutil.disk_usage(_existing(final)).free
        raise DiskFullError(f"{final}: no space left on the device while saving: it needs about "
                            f"{_gigabytes(needed_bytes)} and {_gigabytes(free)} is free; nothing was left half "
                            f"written (earlier checkpoints are intact); free some space and run again") from None


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull")  # safetensors' Rust error names


def _is_disk_full(err: BaseException, directory: Path) -> bool:
    """Whether err (or one it was raised from, or one a torch.distributed.checkpoint rank reported) says the disk
    is full; or, for errors that do not say why (torch.save's "file write failed"), whether the disk is now full."""
    pending, seen = [err], set()
    while pending:
        e = pending.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno in _NO_SPACE) or any(t in str(e) for t in _NO_SPACE_TEXTS):
            return True
        pending += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
        for failure in failures.values() if isinstance(failures, dict) else ():
            pending.append(failure[0] if isinstance(failure, tuple) else failure)
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        return False
    return shutil.disk_usage(_existing(directory)).free < _FULL_BELOW


_FULL_BELOW = 1 << 20  # bytes free under which a write that failed without saying why is taken for a full disk


def _existing(path: Path) -> Path:
    """path, or its nearest ancestor that exists (what disk_usage can be asked about)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.1f} MB"


@contextlib.contextmanager
def _single_process_is_meant():
    """torch.distributed.checkpoint warns when it runs without a process group: one process is what r1lab means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def write_manifest(directory: Path) -> None:
    """manifest.json listing size and sha256 of every file in directory, each flushed to disk first: written
    last, so a manifest is only ever present beside complete files."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        _fsync(path)
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = directory / MANIFEST_FILE
    manifest.write_text(json.dumps({"format": 1, "files": files}, indent=1) + "\n")
    _fsync(manifest)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the data files are what matters
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- finding an intact checkpoint


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Every checkpoint directory of the run, oldest first, intact or not (temporary ones excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory was saved at, from its name step_NNNNNN."""
    return int(Path(path).name.rpartition("_")[2])


def checkpoint_problem(path: Path) -> str | None:
    """None if the checkpoint is intact, else what is wrong, e.g. "model.safetensors: size 123 != 456"."""
    path = Path(path)
    manifest = path / MANIFEST_FILE
    if not manifest.exists():
        return _legacy_problem(path)
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST_FILE} is unreadable ({type(err).__name__})"
    if STATE_FILE not in expected:
        return f"{MANIFEST_FILE} does not list {STATE_FILE}"
    for name, (size, _) in expected.items():  # sizes first: a truncation is found without reading gigabytes
        if not (path / name).is_file():
            return f"{name}: missing"
        if (actual := (path / name).stat().st_size) != size:
            return f"{name}: size {actual} != {size}"
    for name, (_, digest) in expected.items():
        if _sha256(path / name) != digest:
            return f"{name}: sha256 differs from the manifest"
    return None


def _legacy_problem(path: Path) -> str | None:
    """A checkpoint from before manifests: intact if its files read whole."""
    if not (path / STATE_FILE).is_file():
        return f"{STATE_FILE}: missing"
    try:
        with zipfile.ZipFile(path / STATE_FILE) as archive:
            if (bad := archive.testzip()) is not None:
                return f"{STATE_FILE}: {bad} is corrupt"
    except (zipfile.BadZipFile, OSError) as err:
        return f"{STATE_FILE}: not a complete archive ({err})"
    weights = sorted(path.glob("model*.safetensors"))
    if not weights:
        return "model.safetensors: missing"
    for file in weights:
        if (problem := _safetensors_problem(file)) is not None:
            return f"{file.name}: {problem}"
    return None


def _safetensors_problem(file: Path) -> str | None:
    """Whether the file is as long as its header says (8-byte length, JSON header, then the tensor data)."""
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size:
                return f"size {size} is shorter than its header"
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as err:
        return f"unreadable header ({type(err).__name__})"
    return None if size == 8 + header_len + end else f"size {size} != {8 + header_len + end}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of the run, or None; broken newer ones are skipped silently (use
    find_resume_checkpoint to name them)."""
    return next((p for p in reversed(list_checkpoints(run_dir)) if checkpoint_problem(p) is None), None)


def find_resume_checkpoint(run_dir: Path, log: Callable[[str], object] = print) -> Path | None:
    """The newest intact checkpoint to resume from; None when the run has no checkpoint at all.

    Each broken newer one is named through log, e.g. "checkpoint step_000004 is incomplete (model.safetensors:
    size 123 != 456), resuming from step_000002". CheckpointError when there are checkpoints but none is intact:
    starting over silently would throw away the run.
    """
    broken = []
    for path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            for name, why in broken:
                log(f"checkpoint {name} is incomplete ({why}), resuming from {path.name}")
            return path
        broken.append((path.name, problem))
    if broken:
        listed = "; ".join(f"{name}: {why}" for name, why in broken)
        raise CheckpointError(f"{Path(run_dir) / 'checkpoints'}: no intact checkpoint to resume from ({listed})")
    return None


# ---------------------------------------------------------------- loading


def load_checkpoint(path: Path, model: CausalLM, optimizer: torch.optim.Optimizer) -> int:
    """Restore weights, optimizer and RNG states in place; return the number of steps already done.

    CheckpointError (one line) when the checkpoint cannot be read or its model has another shape than this
    run's, e.g. a resume with another --model.
    """
    if has_lora(model) or (Path(path) / ADAPTER_CONFIG).exists():
        _restore_adapter(Path(path), model)
    else:
        _restore_model(Path(path), model)
    try:
        state = torch.load(Path(path) / STATE_FILE, map_location=next(model.parameters()).device, weights_only=False)
        if "optimizer" in state:  # written before checkpoints used torch.distributed.checkpoint
            optimizer.load_state_dict(state["optimizer"])
        else:
            restore_optimizer(Path(path) / OPTIMIZER_DIR, model, optimizer)
        set_rng_state(state["rng"])
        return int(state["step"])
    except Exception as err:  # unpickling and torch's own checks raise many types; all mean "not this run's state"
        raise CheckpointError(f"{Path(path) / STATE_FILE}: cannot be restored ({type(err).__name__}: "
                              f"{_first_line(err)})") from None


def checkpoint_extra(path: Path) -> dict | None:
    """The extra state save_checkpoint was given (None where it had none)."""
    try:
        return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False).get("extra")
    except Exception as err:  # as in load_checkpoint: whatever unpickling raises means the state cannot be read
        raise CheckpointError(f"{Path(path) / STATE_FILE}: cannot be restored ({type(err).__name__}: "
                              f"{_first_line(err)})") from None


def _restore_model(path: Path, model: CausalLM) -> None:
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    try:
        saved = load_model(path, device=device, dtype=dtype)
    except (ValueError, OSError, RuntimeError) as err:  # safetensors raises its own errors, all ValueError/OSError
        raise CheckpointError(f"{path}: its model cannot be read ({_first_line(err)})") from None
    _check_same_shapes(path, saved, model)
    load_full_state_dict(model, saved.state_dict())


def _restore_adapter(path: Path, model: CausalLM) -> None:
    """A LoRA run's checkpoint into its model's adapters (a full model's checkpoint, or an adapter for a run without
    LoRA, does not fit: one line saying so)."""
    if not has_lora(model):
        raise CheckpointError(f"{path}: it holds a LoRA adapter and this run trains the whole model; resume with "
                              f"the run's own lora_rank")
    if not (path / ADAPTER_CONFIG).exists():
        raise CheckpointError(f"{path}: it holds a whole model and this run trains LoRA adapters; resume with the "
                              f"run's own lora_rank")
    try:
        load_adapter_weights(model, path)
    except (ValueError, OSError) as err:
        raise CheckpointError(f"{path}: its adapter does not fit this run's ({_first_line(err)})") from None


def restore_optimizer(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer state saved by save_checkpoint, at whatever number of ranks wrote it."""
    state = get_optimizer_state_dict(model, optimizer)  # the layout to fill (initialised if the optimizer is fresh)
    with _single_process_is_meant():
        dcp.load({"optimizer": state}, checkpoint_id=directory)
    set_optimizer_state_dict(model, optimizer, state)


def _check_same_shapes(path: Path, saved: CausalLM, model: CausalLM) -> None:
    theirs, mine = saved.state_dict(), model.state_dict()
    for name in sorted(set(theirs) | set(mine)):
        a, b = theirs.get(name), mine.get(name)
        if a is None or b is None or a.shape != b.shape:
            raise CheckpointError(
                f"{path}: its model does not fit this run's ({name}: {_shape(a)} in the checkpoint, {_shape(b)} "
                f"in the model being trained); resume with the model the run started from")


def _shape(t: torch.Tensor | None) -> str:
    return "absent" if t is None else "x".join(map(str, t.shape)) or "scalar"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------- settings on resume


def check_config_change(run_dir: Path, new_config: dict, step: int, allow: bool = False,
                        free: frozenset[str] = RESUME_FREE_FIELDS) -> list[dict]:
    """Refuse (ConfigChangeError, each field as "field: old -> new") to resume a run with settings other than
    those it ran with, fields in `free` excepted; with allow, append each change to RUN/config_changes.jsonl
    (step, field, old, new, time) and return the records. config.yaml itself is not touched.

    "Those it ran with" are config.yaml plus the changes recorded so far, so an allowed change is asked for
    once. Fields missing from either side (added or removed by another r1lab version) are not compared.
    """
    saved = effective_config(run_dir)
    if saved is None:
        return []
    changes = [(name, _normal(saved[name]), _normal(new_config[name])) for name in saved
               if name in new_config and name not in free and _normal(saved[name]) != _normal(new_config[name])]
    if not changes:
        return []
    if not allow:
        shown = "\n".join(f"  {name}: {json.dumps(old)} -> {json.dumps(new)}" for name, old, new in changes)
        raise ConfigChangeError(
            f"{run_dir}: resuming with other settings than the run was trained with would mix two runs:\n{shown}\n"
            f"start a new run (another out directory), or allow the change (allow_config_change) to continue "
            f"and record it in {CHANGES_FILE}")
    time = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    records = [{"step": step, "field": name, "old": old, "new": new, "time": time} for name, old, new in changes]
    with (Path(run_dir) / CHANGES_FILE).open("a") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    return records


def effective_config(run_dir: Path) -> dict | None:
    """The settings the run trains with now: RUN/config.yaml with RUN/config_changes.jsonl applied in order;
    None for a run without config.yaml."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return None
    config = yaml.safe_load(path.read_text()) or {}
    changes = Path(run_dir) / CHANGES_FILE
    for line in changes.read_text().splitlines() if changes.exists() else ():
        if line.strip():
            record = json.loads(line)
            config[record["field"]] = record["new"]
    return config


def update_run_config(run_dir: Path, new_config: dict, free: frozenset[str] = RESUME_FREE_FIELDS) -> None:
    """On resume, in place of writing config.yaml afresh: only the `free` fields take their new values (a longer
    run, another device), so the file keeps the settings the run started with. Without a config.yaml (a run
    from before they were written), new_config is written whole."""
    path = Path(run_dir) / CONFIG_FILE
    if path.exists():
        config = yaml.safe_load(path.read_text()) or {}
        config.update({name: _normal(new_config[name]) for name in free if name in new_config and name in config})
    else:
        config = _normal(new_config)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, path)


def _normal(value: object) -> object:
    """A value as config.yaml holds it (tuples as lists), so that a saved and a current value compare equal."""
    return json.loads(json.dumps(value, default=str))
