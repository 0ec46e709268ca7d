"""Experiment trackers beside metrics.jsonl (`--report-to wandb,trackio,mlflow`): the config and every number."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from r1lab.suggest import did_you_mean

REPORTERS = ("tensorboard", "wandb", "trackio", "mlflow")
IDS_FILE = "trackers.json"


def parse_report_to(value: str) -> list[str]:
    """The trackers named in a comma-separated list ("none": no tracker, not even TensorBoard)."""
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    return [] if names == ["none"] else names


def report_to_problem(value: str) -> str | None:
    """What is wrong with a --report-to value: an unknown name, or a tracker whose package is not installed."""
    names = parse_report_to(value)
    if "none" in names:
        return "'none' cannot be combined with trackers"
    for name in names:
        if name not in REPORTERS:
            return f"{name!r} is not one of: {', '.join(REPORTERS)}, none{did_you_mean(name, REPORTERS)}"
        if name != "tensorboard" and importlib.util.find_spec(name) is None:  # each package is named as its tracker
            return f"{name} is not installed: pip install 'r1lab[{name}]' (or pip install {name})"
    return None


def open_trackers(names: list[str], run_dir: Path, config: dict) -> list[Any]:
    """The trackers other than TensorBoard, started (or resumed, by RUN/trackers.json's ids)."""
    ids_path = Path(run_dir) / IDS_FILE
    ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
    trackers = [TRACKERS[name](Path(run_dir), config, ids.get(name)) for name in names if name in TRACKERS]
    ids.update({t.name: t.run_id for t in trackers if t.run_id})
    if ids:
        ids_path.write_text(json.dumps(ids, indent=2))
    return trackers


class WandbTracker:
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict, run_id: str | None):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "r1lab"), name=run_dir.name, config=config,
                              dir=os.environ.get("WANDB_DIR") or str(run_dir), id=run_id, resume="allow")
        self.api, self.run_id = self.run, self.run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.api.log(metrics, step=step)

    def close(self) -> None:
        self.api.finish()


class TrackioTracker(WandbTracker):
    name = "trackio"

    def __init__(self, run_dir: Path, config: dict, run_id: str | None):
        import trackio

        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "r1lab"), name=run_id or run_dir.name,
                                config=config, resume="allow", embed=False)
        self.api, self.run_id = trackio, run_id or run_dir.name  # trackio logs through the module


class MlflowTracker:
    name = "mlflow"
    INVALID = re.compile(r"[^\w\-. /]")  # MLflow refuses other characters in names (pass@1 -> pass_1)

    def __init__(self, run_dir: Path, config: dict, run_id: str | None):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # no server: a file store in the run, which needs no database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or (run_dir.resolve() / "mlruns").as_uri())
        if run_id is None:
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "r1lab"))
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_dir.name)
        self.run_id = self.run.info.run_id
        if run_id is None:
            mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics({self.INVALID.sub("_", k): v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


TRACKERS = {"wandb": WandbTracker, "trackio": TrackioTracker, "mlflow": MlflowTracker}
