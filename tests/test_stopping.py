"""Stopping and resuming as users do it: Ctrl-C finishes the step, saves a checkpoint and exits 130 without a
traceback (a second Ctrl-C at once); every run ends with a checkpoint; --resume true without one is an error naming
the directory, --resume auto starts afresh."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r1lab.cli import main

REPO = Path(__file__).resolve().parents[1]


def grpo_argv(model, out, steps=200):
    return ["grpo", "--model", str(model), "--steps", str(steps), "--prompts-per-step", "2", "--samples-per-prompt",
            "2", "--max-new-tokens", "6", "--eval-every", "0", "--save-every", "0", "--out", str(out),
            "--device", "cpu", "--threads", "1"]


def start(argv):
    return subprocess.Popen([sys.executable, "-m", "r1lab", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def wait_for_steps(out: Path, n: int, process, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("signum, said, status", [(signal.SIGINT, "Ctrl-C", 130), (signal.SIGTERM, "SIGTERM", 143)])
def test_ctrl_c_or_sigterm_finishes_the_step_saves_a_checkpoint_and_resume_goes_on(tiny_base, tmp_path, signum, said,
                                                                                 status):
    out = tmp_path / "run"
    process = start(grpo_argv(tiny_base, out))
    wait_for_steps(out, 2, process)
    process.send_signal(signum)
    sent = time.monotonic()
    _, err = process.communicate(timeout=60)
    assert process.returncode == status and time.monotonic() - sent < 30, err
    assert "Traceback" not in err and f"stopped by {said} after step" in err, err
    step = int(err.split(f"stopped by {said} after step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step_{step:06d}").is_dir()
    assert not (out / "model").exists()  # a stopped run is not a finished one
    main([*grpo_argv(tiny_base, out, steps=step + 1), "--resume", "true"])
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 2)) and (out / "model").exists()


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tiny_base, tmp_path):
    out = tmp_path / "run"
    process = start(grpo_argv(tiny_base, out))
    wait_for_steps(out, 1, process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    # 130, or killed by the second SIGINT itself when it lands while the interpreter is already shutting down (the
    # shell shows 130 for both)
    assert process.returncode in (130, -signal.SIGINT) and "Traceback" not in err, err


def test_every_run_ends_with_a_checkpoint_and_resume_true_needs_one(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    main(grpo_argv(tiny_base, out, steps=2))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002"]
    empty = tmp_path / "empty"
    with pytest.raises(SystemExit) as stopped:
        main([*grpo_argv(tiny_base, empty, steps=1), "--resume", "true"])
    assert stopped.value.code == 2
    assert f"{empty / 'checkpoints'} holds no checkpoint" in capsys.readouterr().err
    main([*grpo_argv(tiny_base, empty, steps=1), "--resume", "auto"])
    assert "--resume auto: no checkpoint" in capsys.readouterr().out
    assert (empty / "model").exists()


def test_sft_ends_with_a_checkpoint(tiny_base, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{n}+1", "completion": f" <answer>{n + 1}</answer>"}) + "\n"
                            for n in range(8)))
    out = tmp_path / "sft"
    main(["sft", "--model", str(tiny_base), "--data", str(data), "--steps", "3", "--batch-size", "2", "--out", str(out),
          "--device", "cpu"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000003"]


def test_a_ctrl_c_in_a_stages_last_step_stops_the_command_after_that_stage(tmp_path):
    from dataclasses import dataclass

    from r1lab.commands.stages import run_stage
    from r1lab.config import save_config
    from r1lab.train.stopping import RunStopped, StopOnInterrupt

    @dataclass
    class StageConfig:
        steps: int = 1

    cfg, config_path, output = StageConfig(), tmp_path / "stage" / "config.yaml", tmp_path / "stage" / "out"

    def stage():  # a run asked to stop in its last step: it finishes, as grpo and sft do
        save_config(cfg, config_path)
        with StopOnInterrupt() as stop:
            stop._on_signal(signal.SIGINT, None)
        output.write_text("done")

    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(RunStopped, match="after the stage 'stage' finished; run the same command again"):
            run_stage("stage", cfg, config_path, output, stage, log=lambda *_: None)
    finally:
        signal.signal(signal.SIGINT, handler)
    lines = []
    run_stage("stage", cfg, config_path, output, lambda: pytest.fail("ran again"), log=lines.append)
    assert lines == [f"stage: reusing {output} (same settings)"]  # the stage it finished is kept


def test_a_stage_stopped_mid_run_goes_on_from_its_checkpoint_when_the_command_is_run_again(tmp_path):
    from dataclasses import dataclass

    from r1lab.commands.stages import run_stage
    from r1lab.config import save_config
    from r1lab.train.stopping import RunStopped

    @dataclass
    class StageConfig:
        steps: int = 2
        resume: str = "false"

    config_path, output = tmp_path / "stage" / "config.yaml", tmp_path / "stage" / "out"
    stale = tmp_path / "stage" / "checkpoints" / "step_000001"
    save_config(StageConfig(steps=1), config_path)  # an earlier run of other settings left its checkpoint
    stale.mkdir(parents=True)
    modes = []

    def stage(cfg, stop_at=None):
        modes.append(cfg.resume)
        save_config(cfg, config_path)
        if stop_at:
            raise RunStopped.at_step(stop_at, config_path.parent / "checkpoints" / f"step_{stop_at:06d}")
        output.write_text("done")

    cfg = StageConfig()
    with pytest.raises(RunStopped, match="in the stage 'stage' after its step 1 .*run the same command again"):
        run_stage("stage", cfg, config_path, output, lambda: stage(cfg, stop_at=1), log=lambda *_: None)
    assert not stale.exists()  # not resumed from: it is of other settings
    cfg = StageConfig()  # the command run again
    run_stage("stage", cfg, config_path, output, lambda: stage(cfg), log=lambda *_: None)
    assert modes == ["false", "auto"]  # the second run went on from the stage's checkpoint (--resume auto)
    lines = []
    run_stage("stage", StageConfig(), config_path, output, lambda: pytest.fail("ran again"), log=lines.append)
    assert lines == [f"stage: reusing {output} (same settings)"]  # its config records resume: auto, no matter


def test_sigterm_asks_for_the_clean_stop_and_a_repeat_asks_again_rather_than_ending_the_process():
    from r1lab.train.stopping import RunStopped, StopOnInterrupt

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with StopOnInterrupt() as stop:
            # a preempted job's processes each get SIGTERM: under torchrun a rank gets its own and the launcher's
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs in this (the main) thread between two bytecodes
            assert stop.requested() and StopOnInterrupt.asked_by == signal.SIGTERM
            stopped = RunStopped.at_step(3, Path("run/checkpoints/step_000003"))
        assert stopped.status == 143 and str(stopped).startswith("stopped by SIGTERM after step 3; checkpoint run/")
        assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]  # the handlers are the process's again
    finally:
        StopOnInterrupt.asked_by = None
        for signum, handler in before.items():
            signal.signal(signum, handler)
