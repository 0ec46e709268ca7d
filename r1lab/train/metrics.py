"""Run logging: per-step metrics (JSONL, mirrored to TensorBoard and trackers), samples, a live progress bar."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from r1lab.train.trackers import open_trackers, parse_report_to

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"

# What the progress bar shows (metric, label); the trainers log many more keys to the files.
LIVE_KEYS = (("reward/mean", "reward"), ("accuracy", "acc"), ("completion_len/mean", "len"), ("kl", "kl"))  # RL
LOSS_KEYS = (("loss", "loss"), ("mtp_loss", "mtp_loss"))  # pretraining and SFT (mtp_loss: with an MTP module)


def _clean(value: Any) -> Any:
    """JSON-safe copy: tensors/numpy scalars become Python numbers, NaN and inf become None (null)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return _clean(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def _append_jsonl(path: Path, row: dict) -> None:
    # Open, write, close per call: a crash mid-run loses at most the line being written.
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(_clean(row), allow_nan=False, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a missing file gives [] and a torn last line (crash) is skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines() if Path(path).exists() else ():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return [row for row in rows if isinstance(row, dict)]


def _truncate_jsonl(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if not isinstance(r.get("step"), int) or r["step"] <= step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a crash here leaves either the old or the new file


class MetricsLogger(contextlib.AbstractContextManager):
    """metrics.jsonl and eval.jsonl, mirrored to TensorBoard; resume_step drops the rows after the checkpoint."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None,
                 trackers: Iterable[Any] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.trackers = list(trackers)  # r1lab/train/trackers.py: W&B, trackio, MLflow
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.eval_path = self.run_dir / EVAL_FILE
        self._tb_wanted = tensorboard
        self._writer: Any = None
        self._purge_step: int | None = None
        if resume_step is not None:
            self.truncate_after(resume_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        _append_jsonl(self.metrics_path, {"step": int(step), **metrics})
        self._scalars("", metrics, step)

    def log_eval(self, step: int, split: str, result: dict[str, Any]) -> None:
        row = {k: v for k, v in result.items() if k != "records"}  # records belong in the samples/eval JSON
        _append_jsonl(self.eval_path, {"step": int(step), "split": split, **row})
        self._scalars(f"eval/{split}/", row, step)

    def truncate_after(self, step: int) -> None:
        """Drop training rows after `step` and evaluations at or after it (evaluated again), TensorBoard's too."""
        _truncate_jsonl(self.metrics_path, step)
        _truncate_jsonl(self.eval_path, step - 1)
        self._purge_step = step + 1
        self.close()  # TensorBoard's writer is reopened lazily with purge_step

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __exit__(self, *exc: object) -> None:
        self.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def _scalars(self, prefix: str, metrics: dict[str, Any], step: int) -> None:
        scalars = {prefix + key: float(value) for key, value in metrics.items() if not isinstance(value, bool) and (
            isinstance(value, (int, float)) or hasattr(value, "item") and getattr(value, "ndim", 1) == 0)}
        for tracker in self.trackers:
            tracker.log(int(step), scalars)
        writer = self._tb()
        for key, value in scalars.items() if writer is not None else ():
            writer.add_scalar(key, value, int(step))

    def _tb(self) -> Any:
        if not self._tb_wanted:
            return None
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as e:  # tensorboard missing or broken: the JSONL still has everything
                warnings.warn(f"TensorBoard logging disabled ({e}); metrics still go to {self.metrics_path}")
                self._tb_wanted = False
                return None
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=self._purge_step,
                                         flush_secs=10)
        return self._writer


def open_metrics(run_dir: Path, cfg: Any, resume_step: int) -> MetricsLogger:
    names = parse_report_to(cfg.report_to)
    return MetricsLogger(run_dir, tensorboard="tensorboard" in names, resume_step=resume_step,
                         trackers=open_trackers(names, run_dir, dataclasses.asdict(cfg)))


def save_samples(run_dir: Path, step: int, records: Iterable[dict]) -> Path:
    """Write run_dir/samples/step_XXXXXX.jsonl, one record per completion."""
    path = Path(run_dir) / "samples" / f"step_{step:06d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(_clean(r), allow_nan=False, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


def format_live_metrics(metrics: dict[str, Any] | None, keys: tuple = LIVE_KEYS) -> str:
    """A short 'reward 0.42  acc 31.0%  len 87' string of the metrics worth watching live."""
    if not metrics:
        return ""
    parts = []
    for key, label in keys:
        value = _clean(metrics.get(key))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{label} {100 * value:.1f}%" if label == "acc" else f"{label} {value:.3g}")
    return "  ".join(parts)


class TrainingProgress:
    """A rich progress bar on a terminal; on a pipe, a line after the first step, every ~5% and at the end."""

    def __init__(self, total_steps: int, start_step: int = 0, console: Any = None, keys: tuple = LIVE_KEYS) -> None:
        self.total, self.start_step, self.keys, self.console = total_steps, start_step, keys, console or Console()
        self._progress: Any = None
        self._task: Any = None
        self._t0 = time.monotonic()
        self._every = max(1, (total_steps - start_step) // 20)

    def __enter__(self) -> TrainingProgress:
        self._t0 = time.monotonic()
        if self.console.is_terminal:
            self._progress = Progress(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                                      TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[live]}"),
                                      console=self.console)
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total, completed=self.start_step, live="")
        return self

    def update(self, step: int, metrics: dict[str, Any] | None = None) -> None:
        live = format_live_metrics(metrics, self.keys)
        done = step - self.start_step
        if self._progress is not None:
            self._progress.update(self._task, completed=step, live=live)
        elif done == 1 or done % self._every == 0 or step >= self.total:  # the first: an ETA before 5% of the run
            elapsed = time.monotonic() - self._t0
            eta = elapsed / max(done, 1) * max(self.total - step, 0)
            self.console.print(f"step {step}/{self.total}  elapsed {_hms(elapsed)}  eta {_hms(eta)}  {live}".rstrip(),
                               highlight=False, soft_wrap=True)  # one line per update, whatever the log's width

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


training_progress = TrainingProgress
