"""`--report-to`: W&B (offline), trackio (local) and MLflow (a file store) get the run's config, its metrics per step
and its held-out evaluations; a misspelt or missing tracker is refused before anything runs."""

import json

import pytest

from r1lab.cli import main
from r1lab.train.metrics import MetricsLogger
from r1lab.train.trackers import parse_report_to, report_to_problem


class Recorder:
    name, run_id = "recorder", None

    def __init__(self):
        self.logged, self.closed = [], False

    def log(self, step, metrics):
        self.logged.append((step, metrics))

    def close(self):
        self.closed = True


def test_metrics_and_evaluations_reach_every_tracker_as_numbers(tmp_path):
    recorder = Recorder()
    with MetricsLogger(tmp_path, tensorboard=False, trackers=[recorder]) as logger:
        logger.log(1, {"reward": 0.5, "note": "text", "skipped": True})
        logger.log_eval(1, "heldout", {"pass@1": 0.25, "records": [1]})
    assert recorder.logged == [(1, {"reward": 0.5}), (1, {"eval/heldout/pass@1": 0.25})] and recorder.closed


def test_wandb_writes_under_wandb_dir_when_the_user_set_it(tmp_path, monkeypatch):
    """WANDB_DIR is wandb's own setting: passing dir= to wandb.init overrides it, so it is passed only when unset."""
    import sys
    import types

    from r1lab.train.trackers import WandbTracker

    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or types.SimpleNamespace(id="abc"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    WandbTracker(tmp_path / "run", {}, None)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "mine"))
    WandbTracker(tmp_path / "run", {}, None)
    assert [c["dir"] for c in calls] == [str(tmp_path / "run"), str(tmp_path / "mine")]


def test_report_to_names_are_checked():
    assert parse_report_to("tensorboard, WandB") == ["tensorboard", "wandb"] and parse_report_to("none") == []
    assert "did you mean 'wandb'" in report_to_problem("wandbb")
    assert "cannot be combined" in report_to_problem("none,wandb")
    assert report_to_problem("tensorboard,mlflow") is None


def test_a_misspelt_tracker_is_refused_at_start(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["grpo", "--report-to", "wandbb", "--out", str(tmp_path / "run")])
    assert "report_to: 'wandbb' is not one of" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_wandb_trackio_and_mlflow_get_the_run(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # trackio's local store, read when it is imported
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("wandb", "trackio", "mlflow"):
        pytest.importorskip(name)
    import trackio.sqlite_storage as storage

    monkeypatch.setattr(storage, "TRACKIO_DIR", tmp_path / "trackio", raising=False)
    run = tmp_path / "run"
    main(["grpo", "--model", str(tiny_base), "--steps", "2", "--prompts-per-step", "2", "--samples-per-prompt", "2",
          "--max-new-tokens", "6", "--eval-every", "1", "--eval-problems", "2", "--eval-samples", "2",
          "--report-to", "tensorboard,wandb,trackio,mlflow", "--out", str(run), "--device", "cpu"])
    ids = json.loads((run / "trackers.json").read_text())
    assert set(ids) == {"wandb", "trackio", "mlflow"}

    [offline] = (run / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb")
    records = offline.read_bytes()  # the offline run's records (protobuf): their keys are stored as text
    assert b"step_time_s" in records and b"eval/" in records and b"samples_per_prompt" in records

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    history = client.get_metric_history(ids["mlflow"], "step_time_s")
    assert [m.step for m in history] == [1, 2]
    assert client.get_run(ids["mlflow"]).data.params["samples_per_prompt"] == "2"
    assert client.get_metric_history(ids["mlflow"], "eval/heldout/pass_1") or client.get_metric_history(
        ids["mlflow"], "eval/test/pass_1")  # pass@1, in MLflow's alphabet

    logs = storage.SQLiteStorage.get_logs("r1lab", ids["trackio"])
    assert [row["step"] for row in logs if "step_time_s" in row] == [1, 2], logs
