"""A run whose update leaves the weights non-finite stops there with one line naming the step and the learning rate,
exits non-zero through the CLI's error path, keeps the checkpoints of earlier steps and saves no model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r1lab.model.architecture import ModelConfig
from r1lab.model.transformer import CausalLM
from r1lab.train.checkpoint import checkpoint_problem, list_checkpoints
from r1lab.train.optimizer import TrainingDiverged, make_optimizer, weights_finite
from r1lab.train.supervised import train_lm

REPO = Path(__file__).resolve().parents[1]


def tiny() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))


def test_a_nan_or_inf_anywhere_in_the_weights_or_buffers_is_found():
    model = tiny()
    assert weights_finite(model)
    for poison in (float("nan"), float("inf"), -float("inf")):
        for tensor in (model.lm_head.weight, model.model.layers[0].mlp.down_proj.weight):
            kept = tensor.data[0, 0].item()
            tensor.data[0, 0] = poison
            assert not weights_finite(model)
            tensor.data[0, 0] = kept
    model.inv_freq[-1] = float("nan")  # a buffer (the rotary frequencies)
    assert not weights_finite(model)


@pytest.mark.parametrize("in_backward", [False, True])
def test_an_update_that_breaks_the_weights_stops_before_the_step_is_reported(in_backward):
    model = tiny()
    docs = [[1 + (i * 7 + j) % 30 for j in range(12)] for i in range(8)]
    reported = []
    with pytest.raises(TrainingDiverged) as info:
        train_lm(model, docs, steps=5, batch_size=4, lr=1e300, warmup=0, pad_id=0, seed=0,
                 optimizer=make_optimizer(model, 1e300, 0.0, 0.95), max_grad_norm=0.0 if in_backward else 1.0,
                 optimizer_in_backward=in_backward, name="sft", on_step=lambda step, _: reported.append(step))
    message = str(info.value)
    assert message.startswith("sft step 1: the weights are no longer finite") and "lr 1e+300" in message
    assert "\n" not in message and reported == []  # never logged, never checkpointed


def test_a_sane_learning_rate_trains_through():
    model = tiny()
    docs = [[1 + (i * 7 + j) % 30 for j in range(12)] for i in range(8)]
    losses = train_lm(model, docs, steps=3, batch_size=4, lr=1e-2, warmup=0, pad_id=0, seed=0,
                      optimizer=make_optimizer(model, 1e-2, 0.0, 0.95))
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


# ---------------------------------------------------------------- end to end, through the `r1lab` command


def r1lab(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "r1lab", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def all_finite(model_dir: Path) -> bool:
    return all(torch.isfinite(t).all() for f in model_dir.glob("*.safetensors") for t in load_file(f).values())


GRPO = ["--task", "arithmetic", "--task-options", '{"min_terms": 3, "max_terms": 4}', "--prompts-per-step", "4",
        "--samples-per-prompt", "4", "--micro-batch-size", "16", "--max-new-tokens", "16", "--eval-every", "0",
        "--samples-every", "0", "--save-every", "1", "--threads", "2", "--device", "cpu"]


@pytest.mark.slow
def test_grpo_at_lr_1e300_exits_non_zero_with_one_line_and_saves_nothing(tiny_base, tmp_path):
    out = tmp_path / "run"
    done = r1lab("grpo", "--model", str(tiny_base), "--out", str(out), "--steps", "3", "--lr", "1e300", *GRPO)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert errors == ["r1lab grpo: error: grpo step 1: the weights are no longer finite after the optimizer's update "
                      "(lr 1e+300, weight_decay 0): the learning rate is likely too large; the run stops without "
                      "saving a model (checkpoints of earlier steps are kept): lower lr"]
    assert not (out / "model").exists() and list_checkpoints(out) == []
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_a_resumed_run_that_diverges_keeps_its_last_good_checkpoint(tiny_base, tmp_path):
    out = tmp_path / "run"
    first = r1lab("grpo", "--model", str(tiny_base), "--out", str(out), "--steps", "2", "--lr", "1e-4", *GRPO)
    assert first.returncode == 0, first.stderr
    model_before = (out / "model" / "model.safetensors").read_bytes()
    done = r1lab("grpo", "--model", str(tiny_base), "--out", str(out), "--steps", "4", "--lr", "1e300", "--resume",
                 "--allow-config-change", *GRPO)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error: grpo step 3: the weights are no longer finite" in done.stderr
    assert [p.name for p in list_checkpoints(out)] == ["step_000001", "step_000002"]  # nothing saved at step 3
    assert all(checkpoint_problem(p) is None and all_finite(p) for p in list_checkpoints(out))
    assert (out / "model" / "model.safetensors").read_bytes() == model_before  # the first run's, untouched
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2]


@pytest.mark.slow
def test_pretrain_at_lr_1e300_exits_non_zero_without_a_base_model(tmp_path):
    out = tmp_path / "base"
    done = r1lab("pretrain", "--out", str(out), "--steps", "3", "--lr", "1e300", "--documents", "64",
                 "--batch-size", "8", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2",
                 "--num-kv-heads", "1", "--intermediate-size", "48", "--threads", "2")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "r1lab pretrain: error: pretrain step 1: the weights are no longer finite" in done.stderr
    assert not (out / "model").exists() and not (out / "model.tmp").exists()
