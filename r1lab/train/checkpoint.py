"""Self-verifying checkpoints, exact resume, and a guard against resuming with other settings."""

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
import yaml

from r1lab.model.hf_format import load_model, save_model
from r1lab.model.lora import CONFIG_FILE as ADAPTER_CONFIG
from r1lab.model.lora import has_lora, load_adapter_weights, save_adapter
from r1lab.model.tokenizer import Tokenizer
from r1lab.model.transformer import CausalLM
from r1lab.train.distributed import World
from r1lab.train.memory_budget import gigabytes
from r1lab.train.sharding import distributed_checkpoint, full_state_dict, load_full_state_dict

STATE_FILE = "trainer_state.pt"
OPTIMIZER_DIR = "optimizer"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.yaml"
CHANGES_FILE = "config_changes.jsonl"
# Settings that can differ on resume without changing what the run trains.
RESUME_FREE_FIELDS = frozenset({"steps", "save_every", "eval_every", "samples_every", "threads", "device",
                                "dist_timeout_s", "shard", "time_limit_s", "resume", "out", "allow_config_change"})
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull")  # safetensors' Rust error names
_FULL_BELOW = 1 << 20  # bytes free under which a write that failed without saying why is taken for a full disk


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (one line; a ValueError, so the CLI prints it)."""


class DiskFullError(ValueError):
    """A save that found no space left (what it wrote is removed)."""


class ConfigChangeError(ValueError):
    """Resuming with settings that would change the run."""


def save_checkpoint(run_dir: Path, step: int, model: CausalLM, tokenizer: Tokenizer,
                    optimizer: torch.optim.Optimizer, keep: int = 2, world: World = World(),
                    adapter_base: str | None = None, extra: dict | None = None) -> Path:
    """Every rank calls this: rank 0 writes all but the optimizer state, of which each rank writes its part. A LoRA
    run (adapter_base: its base model) saves its adapter only; extra is returned by checkpoint_extra."""
    final = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    state = full_state_dict(model) if adapter_base is None else None  # a sharded model's weights, onto rank 0
    needed = tensor_bytes(state if state is not None else model.state_dict()) + tensor_bytes(optimizer.state)
    with written_directory(final, needed, world.main) as tmp:
        if world.main:
            if adapter_base is None:
                save_model(model, tmp, state=state)
            else:
                save_adapter(model, tmp, adapter_base)
            tokenizer.save(tmp)
            rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save({"step": step, "rng": rng, **({"extra": extra} if extra is not None else {})},
                       tmp / STATE_FILE)
        world.barrier()
        with _single_process_is_meant():
            dcp, state_dict = distributed_checkpoint()
            dcp.save({"optimizer": state_dict.get_optimizer_state_dict(model, optimizer)},
                     checkpoint_id=tmp / OPTIMIZER_DIR)
        world.barrier()
        if world.main:
            write_manifest(tmp)
    if world.main:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


@contextlib.contextmanager
def written_directory(final: Path, needed_bytes: int, owner: bool = True):
    """A temporary directory renamed to `final` (by its owner rank) when the block ends; on failure it is removed
    (a full disk raised as DiskFullError) and an earlier `final` stays as it was."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    try:
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        yield tmp
        if owner:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(final.parent)  # the rename itself survives a power cut
    except BaseException as err:  # torch.distributed.checkpoint raises BaseExceptions; re-raised below
        full = _is_disk_full(err, tmp)
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        free = shutil.disk_usage(_existing(final)).free
        raise DiskFullError(f"{final}: no space left on the device while saving: it needs about "
                            f"{gigabytes(needed_bytes)} and {gigabytes(free)} is free; nothing was left half "
                            f"written (earlier checkpoints are intact); free some space and run again") from None


def tensor_bytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return sum(tensor_bytes(v) for v in values)


def _is_disk_full(err: BaseException, directory: Path) -> bool:
    """Whether err or an error in its chain (or a dcp rank's) says the disk is full; else, for errors that do not
    say why (torch.save's "file write failed"), whether it is now full."""
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


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def _single_process_is_meant():
    """Silence torch.distributed.checkpoint's warning that it runs without a process group."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def write_manifest(directory: Path) -> None:
    """manifest.json: size and sha256 of every file, each flushed to disk first."""
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
        with contextlib.suppress(OSError):  # some file systems cannot sync a directory; the data files matter
            os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, oldest first, intact or not (not .tmp)."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))


def checkpoint_step(path: Path) -> int:
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
    """A checkpoint from before manifests: a whole trainer_state.pt zip, safetensors as long as their headers say."""
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
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))  # then the JSON header, then the tensor data
            if header_len > size:
                return f"size {size} is shorter than its header"
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as err:
        return f"unreadable header ({type(err).__name__})"
    return None if size == 8 + header_len + end else f"size {size} != {8 + header_len + end}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of the run, or None; broken newer ones are skipped silently."""
    return next((p for p in reversed(list_checkpoints(run_dir)) if checkpoint_problem(p) is None), None)


def find_resume_checkpoint(run_dir: Path, log: Callable[[str], object] = print) -> Path | None:
    """The newest intact checkpoint (broken newer ones logged), None without any; CheckpointError if none is intact."""
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


def load_checkpoint(path: Path, model: CausalLM, optimizer: torch.optim.Optimizer) -> int:
    """Restore weights, optimizer and RNG states in place; returns the steps done, or raises CheckpointError."""
    path = Path(path)
    if has_lora(model) or (path / ADAPTER_CONFIG).exists():
        _restore_adapter(path, model)
    else:
        _restore_model(path, model)
    try:
        state = torch.load(path / STATE_FILE, map_location=next(model.parameters()).device, weights_only=False)
        if "optimizer" in state:  # written before checkpoints used torch.distributed.checkpoint
            optimizer.load_state_dict(state["optimizer"])
        else:
            dcp, state_dict = distributed_checkpoint()
            layout = state_dict.get_optimizer_state_dict(model, optimizer)  # to fill (initialised if it is fresh)
            with _single_process_is_meant():
                dcp.load({"optimizer": layout}, checkpoint_id=path / OPTIMIZER_DIR)
            state_dict.set_optimizer_state_dict(model, optimizer, layout)
        rng = state["rng"]
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return int(state["step"])
    except Exception as err:  # unpickling and torch's own checks raise many types; all mean "not this run's state"
        raise CheckpointError(f"{path / STATE_FILE}: cannot be restored ({type(err).__name__}: "
                              f"{_first_line(err)})") from None


def checkpoint_extra(path: Path) -> dict | None:
    try:
        return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False).get("extra")
    except Exception as err:  # as in load_checkpoint
        raise CheckpointError(f"{Path(path) / STATE_FILE}: cannot be restored ({type(err).__name__}: "
                              f"{_first_line(err)})") from None


def _restore_model(path: Path, model: CausalLM) -> None:
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    try:
        saved = load_model(path, device=device, dtype=dtype).state_dict()
    except (ValueError, OSError, RuntimeError) as err:  # safetensors raises its own errors, all ValueError/OSError
        raise CheckpointError(f"{path}: its model cannot be read ({_first_line(err)})") from None
    mine = model.state_dict()
    for name in sorted(set(saved) | set(mine)):
        a, b = saved.get(name), mine.get(name)
        if a is None or b is None or a.shape != b.shape:
            raise CheckpointError(
                f"{path}: its model does not fit this run's ({name}: {_shape(a)} in the checkpoint, {_shape(b)} "
                f"in the model being trained); resume with the model the run started from")
    load_full_state_dict(model, saved)


def _restore_adapter(path: Path, model: CausalLM) -> None:
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


def _shape(t: torch.Tensor | None) -> str:
    return "absent" if t is None else "x".join(map(str, t.shape)) or "scalar"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_config_change(run_dir: Path, new_config: dict, step: int, allow: bool = False,
                        free: frozenset[str] = RESUME_FREE_FIELDS) -> list[dict]:
    """Refuse (ConfigChangeError) to resume with settings other than the run's (effective_config), `free` fields and
    those missing on either side excepted; with allow, append the changes to CHANGES_FILE and return them."""
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
    """RUN/config.yaml with RUN/config_changes.jsonl applied in order; None for a run without config.yaml."""
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
    """On resume: only the `free` fields of config.yaml are updated; a run without one gets new_config whole."""
    path = Path(run_dir) / CONFIG_FILE
    if path.exists():
        config = yaml.safe_load(path.read_text()) or {}
        # resume and allow_config_change describe this command, not the run: recorded, repeating the run from
        # RUN/config.yaml elsewhere would try to resume
        kept = free - {"resume", "allow_config_change"}
        config.update({name: _normal(new_config[name]) for name in kept if name in new_config and name in config})
    else:
        config = _normal(new_config)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, path)


def _normal(value: object) -> object:
    """A value as config.yaml holds it (tuples as lists), to compare saved and current values."""
    return json.loads(json.dumps(value, default=str))
