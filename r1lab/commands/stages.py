"""What the multi-stage commands (demo, distill, pipeline) share: reusing a stage already run with the same settings,
and evaluating several models on one held-out set."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import yaml
from safetensors import safe_open

from r1lab.commands.pretrain import pretrain
from r1lab.config import EvalConfig, GRPOConfig, PretrainConfig
from r1lab.engine.engine import Engine
from r1lab.model.loading import load_policy, pick_device
from r1lab.rewards.tasks.base import Task
from r1lab.train.evaluate import EvalResult, evaluate_policy, heldout_problems
from r1lab.train.objective import mismatch_kind
from r1lab.train.stopping import RunStopped, StopOnInterrupt, stop_reason


def check_models_exist(cfg, *names: str) -> None:
    """Refuses, before the first stage, a model directory given in cfg that is none (a later stage reads it)."""
    for name in names:
        if (path := getattr(cfg, name)) and not (Path(path) / "config.json").is_file():
            raise ValueError(f"{name}: {path}: no config.json (expected a Hugging Face model directory)")


def started_with(cfg, config_path: Path, since: Path) -> bool:
    """Whether config_path holds cfg's settings (but resume) and `since` is newer than cfg.model and cfg.data."""
    if isinstance(cfg, GRPOConfig):  # grpo records the mismatch correction it settled on, not "auto"
        cfg = dataclasses.replace(cfg, mismatch_correction=mismatch_kind(cfg))
    recorded = yaml.safe_load(config_path.read_text()) if config_path.exists() else None
    settings = dataclasses.asdict(cfg)
    if not isinstance(recorded, dict) or {**recorded, "resume": None} != {**settings, "resume": None}:
        return False
    inputs = [Path(v) for v in (getattr(cfg, "model", ""), getattr(cfg, "data", "")) if v and Path(v).exists()]
    return all(_newest_mtime(p) <= since.stat().st_mtime for p in inputs)


def _newest_mtime(path: Path) -> float:
    """A file's modification time; for a directory (a model), that of its newest file."""
    if path.is_file():
        return path.stat().st_mtime
    return max((f.stat().st_mtime for f in path.iterdir() if f.is_file()), default=path.stat().st_mtime)


def run_stage(name: str, cfg, config_path: Path, output: Path, fn: Callable[[], object], log) -> float:
    """Run fn() for a stage, or reuse its earlier output; the seconds it took (then or now), kept beside its config."""
    timing = config_path.with_name(config_path.stem.split(".")[0] + ".seconds.json")
    if output.exists() and started_with(cfg, config_path, since=output):  # finished with these settings and inputs
        log(f"{name}: reusing {output} (same settings)")
        return json.loads(timing.read_text())["seconds"] if timing.exists() else 0.0
    log(f"\n== {name}")
    # an output left from other settings would pass for this run's were it killed before writing its own
    output.unlink(missing_ok=True)
    if getattr(cfg, "resume", None) == "false":
        if started_with(cfg, config_path, since=config_path):
            cfg.resume = "auto"  # this stage was stopped or killed with these settings: on from its newest checkpoint
        else:  # those of a run with other settings, not to be resumed from were this one killed before its first
            shutil.rmtree(config_path.parent / "checkpoints", ignore_errors=True)
    start = time.perf_counter()
    StopOnInterrupt.asked_by = None
    try:
        fn()
    except RunStopped as stopped:
        if stopped.step is None:
            raise
        raise RunStopped(f"stopped by {stop_reason()} in the stage '{name}' after its step {stopped.step} (checkpoint "
                         f"{stopped.checkpoint}); run the same command again to go on from there") from None
    seconds = time.perf_counter() - start
    timing.write_text(json.dumps({"seconds": seconds}) + "\n")
    if StopOnInterrupt.asked_by:  # a Ctrl-C in the stage's last step: it finished, and the command ends here
        raise RunStopped(f"stopped by {stop_reason()} after the stage '{name}' finished; run the same command again to "
                         f"go on with the next one (the finished stages are reused)")
    return seconds


def tiny_grpo_config(model, out, steps: int, **settings) -> GRPOConfig:
    """The demo's GRPO preset for the tiny models (at lr 2e-4 they collapse)."""
    preset = dict(prompts_per_step=16, samples_per_prompt=8, micro_batch_size=128, lr=3e-5, max_new_tokens=64,
                  eval_every=10, eval_samples=8, save_every=20, samples_every=10)
    return GRPOConfig(model=str(model), out=str(out), steps=steps, **{**preset, **settings})


def model_stage(name: str, cfg, fn: Callable, log) -> tuple[Path, float]:
    """run_stage for a command that saves cfg.out/model (config.yaml beside it): that directory, and the seconds."""
    model = Path(cfg.out) / "model"
    return model, run_stage(name, cfg, Path(cfg.out) / "config.yaml", model / "model.safetensors",
                            lambda: fn(cfg, log=log), log)


def pretrained_base(cfg: PretrainConfig, log) -> Path:
    """The model directory of the tiny base of cfg, pretrained now or reused."""
    return model_stage("pretrained base", cfg, pretrain, log)[0]


def evaluate_models(models: dict[str, Path], task: Task, ec: EvalConfig, log) -> dict[str, EvalResult]:
    """Every model on the same held-out problems with the same seeds."""
    problems = heldout_problems(task, ec.split, ec.problems, ec.seed)
    results = {}
    for label, model_dir in models.items():
        model, tokenizer = load_policy(str(model_dir), pick_device("auto"))
        results[label] = evaluate_policy(Engine(model.eval(), tokenizer), task, ec, problems)
        log(f"eval {label}: pass@1 {results[label].pass_at_1:.1%}")
    return results


def parameter_count(model_dir: Path) -> int:
    """Parameters in a model directory's safetensors files, from their headers (no weights are loaded)."""
    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total
