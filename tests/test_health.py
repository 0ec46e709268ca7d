"""The loud checks (r1lab/train/health.py): a stale sampler, an importance ratio far from 1 and a sampler/trainer
log-prob drift each give a metric and a warning line, said once until the check passes again."""

import pytest
import torch

from r1lab.train import grpo
from r1lab.train.health import RunHealth, weights_fingerprint


def varied_rewards(tmp_path) -> list[str]:
    """A reward that differs within groups, so that every step has a gradient (the tiny base scores 0 otherwise)."""
    (tmp_path / "vary.py").write_text("def vary(completion, problem):\n    return float(len(completion) % 2)\n")
    return ["--reward-functions", f'{{"{tmp_path / "vary.py"}:vary": 1.0}}']


def test_the_fingerprint_moves_with_any_update_and_not_without():
    model = torch.nn.Linear(300, 300)
    before = weights_fingerprint(model)
    assert weights_fingerprint(model) == before
    with torch.no_grad():
        model.weight.add_(1e-3)
    assert weights_fingerprint(model) != before


def test_each_check_warns_once_until_it_passes_again():
    said = []
    health = RunHealth(said.append)
    fine = {"importance_ratio/mean": 1.0, "logprob_diff/mean": 1e-6}
    assert health.check(1, fine, 1.0, 2.0, 1e-6) == {"sync/policy_changed": 1.0, "health/warnings": 0.0}
    stale = health.check(2, fine, 1.0, 1.0, 1e-6)
    assert stale["sync/policy_changed"] == 0.0 and len(said) == 1 and "did not change" in said[0]
    health.check(3, fine, 1.0, 1.0, 1e-6)
    assert len(said) == 1  # still standing: not said again
    health.check(4, fine, 1.0, 2.0, 1e-6)
    health.check(5, fine, 1.0, 1.0, 1e-6)
    assert len(said) == 2  # failed again after passing
    off = health.check(6, {"importance_ratio/mean": 1.4, "logprob_diff/mean": 0.3}, None, None, 1e-6)
    assert off["health/warnings"] == 2.0 and "1.400" in said[-2] and "0.300" in said[-1]
    # no update applied, or a learning rate of 0: unchanged weights are expected
    assert "sync/policy_changed" not in health.check(7, {"skipped_nonfinite": 1}, 1.0, 1.0, 1e-6)
    assert "sync/policy_changed" not in health.check(8, fine, 1.0, 1.0, 0.0)
    assert "sync/policy_changed" not in health.check(9, {**fine, "grad_norm": 0.0}, 1.0, 1.0, 1e-6)  # all-equal groups


@pytest.mark.slow  # whole runs: the checks themselves are the two tests above
def test_a_weight_sync_that_stopped_is_caught_in_a_run(tiny_base, tmp_path, monkeypatch, capsys):
    from r1lab.cli import main

    monkeypatch.setattr(grpo, "sync_rollout_policy", lambda rollout, model: None)  # the bf16 sampler never updated
    main(["grpo", "--model", str(tiny_base), "--steps", "2", "--prompts-per-step", "2", "--samples-per-prompt", "4",
          "--max-new-tokens", "8", "--eval-every", "0", *varied_rewards(tmp_path), "--dtype", "bfloat16", "--lr", "1e-3",
          "--out", str(tmp_path / "run"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.count("the sampler's weights did not change") == 1, out
    import json
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("sync/policy_changed") for r in rows if "sync/policy_changed" in r] == [0.0] * sum(
        "sync/policy_changed" in r for r in rows) and any("sync/policy_changed" in r for r in rows)


@pytest.mark.slow
def test_a_sound_run_raises_no_warning(tiny_base, tmp_path, capsys):
    import json

    from r1lab.cli import main

    main(["grpo", "--model", str(tiny_base), "--steps", "2", "--prompts-per-step", "2", "--samples-per-prompt", "4",
          "--max-new-tokens", "8", "--eval-every", "0", *varied_rewards(tmp_path), "--lr", "1e-3", "--out", str(tmp_path / "run"),
          "--device", "cpu"])
    assert "WARNING" not in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    changed = [r["sync/policy_changed"] for r in rows if "sync/policy_changed" in r]
    assert changed and all(c == 1.0 for c in changed) and all(r["health/warnings"] == 0 for r in rows)
