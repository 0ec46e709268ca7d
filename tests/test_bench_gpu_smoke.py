"""CPU smoke test of bench/grpo_gpu.py (the GPU benchmark) in its --tiny mode: the whole pipeline runs, each side in
its own child process, and every figure it reports is there and positive. About 30 s on a 2-core CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")  # the bench builds its model directory with transformers

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "grpo_gpu.py"
# --tiny: 8 prompts x G=4, 16-token prompts, 16 completion tokens, 2 rounds of which 1 is measured
COMPLETIONS, PROMPT_TOKENS, NEW_TOKENS = 8 * 4, 16, 16


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_gpu")  # shared: the second run reuses the model the first one built


def run_bench(workdir: Path, *flags: str) -> tuple[dict, str]:
    figures = workdir / f"figures{'_'.join(flags)}.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--workdir", str(workdir), "--json", str(figures),
                           *flags], capture_output=True, text=True, timeout=150, cwd=REPO)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(figures.read_text()), proc.stdout


def assert_positive(figures: dict, *keys: str) -> None:
    for key in keys:
        assert isinstance(figures.get(key), (int, float)) and figures[key] > 0, (key, figures.get(key))


@pytest.mark.slow
def test_r1lab_side_and_rollout_floor(workdir):
    res, stdout = run_bench(workdir, "--r1lab-only")
    assert res["model"]["vocab_size"] == 1024 and res["model"]["params"] > 0
    r1 = res["r1lab"]
    assert r1["tokens_ok"] and r1["completion_tokens_per_round"] == [COMPLETIONS * NEW_TOKENS] * 2
    assert_positive(r1, "tokens_per_s", "median_round_tokens_per_s", "rollout_tokens_per_s", "peak_rss_mb")
    assert "--device" in r1["argv"] and "--dtype" not in r1["argv"]  # float32 is r1lab's default: never passed
    assert r1["memory"]["max_allocated"] is None  # CPU: no device memory to report
    ro = res["rollout"]
    assert ro["cpu_fast_paths"]  # set up as `r1lab grpo` is: the rollouts it times are the ones users get
    assert ro["batch"] == COMPLETIONS and ro["new_tokens"] == NEW_TOKENS and ro["prompt_tokens"] == [PROMPT_TOKENS] * 8
    assert_positive(ro, "tokens_per_s", "copy_bytes_per_s", "matmul_flops_per_s", "weights_bytes",
                    "bandwidth_floor_tokens_per_s", "compute_floor_tokens_per_s", "roofline_floor_tokens_per_s",
                    "share_of_bandwidth_floor")
    assert_positive(r1["floor_s"], "rollout", "forward_backward", "optimizer")
    assert "trl" not in res and res["ratio"] is None
    assert "bandwidth floor" in stdout and "compl tok/s" in stdout and "floor of the whole step" in stdout


@pytest.mark.slow
def test_trl_side(workdir):
    pytest.importorskip("trl")
    res, stdout = run_bench(workdir, "--trl-only")
    trl = res["trl"]
    assert (trl["completion_len_min"], trl["completion_len_max"]) == (NEW_TOKENS, NEW_TOKENS)  # EOS suppressed
    assert trl["completion_tokens_per_round"] == [COMPLETIONS * NEW_TOKENS] * 2
    assert_positive(trl, "tokens_per_s", "median_round_tokens_per_s", "rollout_tokens_per_s", "peak_rss_mb")
    cfg = trl["trl_config"]
    assert cfg["beta"] == 0 and cfg["num_generations"] == 4 and cfg["generation_batch_size"] == COMPLETIONS
    assert "r1lab" not in res and "rollout" not in res
    assert "trl" in stdout


def test_decode_floor_arithmetic(monkeypatch):
    """Hand-computed: prompt 2, 3 new tokens, 2 rows; bytes 100 (prefill) + 160 + 180, FLOPs 192 + 224 + 232."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    import grpo_gpu

    figures = {"batch": 2, "prompts": 1, "prompt_tokens": [2], "new_tokens": 3, "weights_bytes": 100,
               "kv_bytes_per_position": 10, "params": 50, "embedding_params": 10, "num_layers": 1, "num_heads": 1,
               "head_dim": 1, "copy_bytes_per_s": 1000.0, "matmul_flops_per_s": 1000.0}
    floors = grpo_gpu.decode_floors(figures)
    assert floors["bytes_read"] == 440 and floors["kv_bytes_mean_per_step"] == 70
    assert floors["bandwidth_floor_tokens_per_s"] == pytest.approx(6 / 0.44)
    assert floors["compute_floor_tokens_per_s"] == pytest.approx(6 / 0.648)
    assert floors["roofline_floor_tokens_per_s"] == pytest.approx(6 / 0.648)  # compute is the slower, every step


@pytest.mark.parametrize("micro", [2, 1])
def test_step_floor_arithmetic(monkeypatch, micro):
    """Hand-computed: one prompt of 2 tokens, G = 2 completions of 3; body 40 parameters, LM head 10, one head of
    dimension 1 (4 FLOPs per key). One micro-batch: 2 x 40 x (2 + 6) + 2 x 10 x 6 = 760, attention 4 x (3 + 2 x 12)
    = 108; two (one completion each, the prompt run in both): 2 x (400 + 60 + 4 x 15). Forward and backward 3x, at
    1,000 FLOP/s. AdamW 28 x 50 bytes at 1,000 B/s; the rollout at the decode roofline (6 tokens in 0.648 s)."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    import grpo_gpu

    ro = {"batch": 2, "prompts": 1, "prompt_tokens": [2], "new_tokens": 3, "weights_bytes": 100,
          "kv_bytes_per_position": 10, "params": 50, "embedding_params": 10, "num_layers": 1, "num_heads": 1,
          "head_dim": 1, "copy_bytes_per_s": 1000.0, "matmul_flops_per_s": 1000.0}
    ro.update(grpo_gpu.decode_floors(ro))
    floors = grpo_gpu.step_floors(ro, {"samples_per_prompt": 2, "prompt_tokens": 2, "max_new_tokens": 3,
                                       "micro_batch_size": micro, "prompts_per_step": 1})
    assert floors["forward_backward"] == pytest.approx(3 * (868 if micro == 2 else 1040) / 1000)
    assert floors["optimizer"] == pytest.approx(1.4) and floors["rollout"] == pytest.approx(0.648)
    assert floors["score"] == floors["sync"] == 0


def test_child_env_gpus_and_path(monkeypatch):
    """The CPU bench hides the GPUs from its children; the GPU bench's children see the parent's; both can put the
    working tree's r1lab first on PYTHONPATH (bench/common.py, shared by the two benches)."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    import common

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert common.child_env(2)["CUDA_VISIBLE_DEVICES"] == ""
    env = common.child_env(2, hide_gpus=False)
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["OMP_NUM_THREADS"] == "2" and env["HF_HUB_OFFLINE"] == "1"
    assert common.with_repo_on_path({"PYTHONPATH": "x"})["PYTHONPATH"] == f"{REPO}{os.pathsep}x"
    assert common.with_repo_on_path({})["PYTHONPATH"] == str(REPO)
