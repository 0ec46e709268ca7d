"""The malloc swap for a large model on the CPU (r1lab/cpu/malloc.py): the `r1lab` program restarts itself under
tcmalloc (else jemalloc), once, keeping the user's own settings; a small model, a GPU run, the switch, or a missing
library leave glibc's malloc, the last with a warning that says what to install."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r1lab.cpu import malloc
from r1lab.cpu.process import LARGE_MODEL_BYTES

REPO = Path(__file__).resolve().parents[1]
needs_tcmalloc = pytest.mark.skipif(not ctypes.util.find_library("tcmalloc_minimal"),
                                    reason="libtcmalloc-minimal4 is not installed (apt-get install it)")
needs_a_malloc = pytest.mark.skipif(malloc.find_candidate() is None,
                                    reason="neither libtcmalloc-minimal4 nor libjemalloc2 is installed")


def model_dir(path: Path, size: int) -> Path:
    """A directory whose weights file has `size` bytes (sparse: only its size is read before the relaunch)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with open(path / "model.safetensors", "wb") as f:
        f.truncate(size)
    return path


def r1lab(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    for name in ("LD_PRELOAD", malloc.RELAUNCHED, "MALLOC_CONF"):
        if name not in env:
            full_env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "r1lab", *args], env=full_env, capture_output=True, text=True,
                          timeout=300)


def test_tcmalloc_is_the_first_choice_and_the_users_preload_is_kept(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: f"lib{name}.so.4")
    env = malloc.preload_env({"LD_PRELOAD": "libmine.so"})
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libmine.so" and "MALLOC_CONF" not in env
    assert env[malloc.RELAUNCHED] == "tcmalloc_minimal"


def test_jemalloc_is_the_second_choice_with_its_tuning_unless_the_user_has_one(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: f"lib{name}.so.2" if name == "jemalloc" else None)
    env = malloc.preload_env({"LD_PRELOAD": "libmine.so", "MALLOC_CONF": "narenas:1"})
    assert env["LD_PRELOAD"] == "libjemalloc.so.2 libmine.so"
    assert env["MALLOC_CONF"] == "narenas:1"
    assert env[malloc.RELAUNCHED] == "jemalloc"
    assert "dirty_decay_ms" in malloc.preload_env({})["MALLOC_CONF"]
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert malloc.preload_env({}) is None


def test_only_a_large_model_on_the_cpu_and_not_switched_off(monkeypatch):
    assert malloc.wanted(LARGE_MODEL_BYTES, True, LARGE_MODEL_BYTES)
    assert not malloc.wanted(LARGE_MODEL_BYTES - 1, True, LARGE_MODEL_BYTES)
    assert not malloc.wanted(LARGE_MODEL_BYTES, False, LARGE_MODEL_BYTES)  # a GPU run
    for off in ("0", "false", "off"):
        monkeypatch.setenv(malloc.SWITCH, off)
        assert not malloc.wanted(LARGE_MODEL_BYTES, True, LARGE_MODEL_BYTES)


def test_without_a_library_it_warns_with_what_to_install_and_goes_on(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(malloc, "preloaded", lambda: None)
    monkeypatch.delenv(malloc.RELAUNCHED, raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("relaunched without a library"))
    with pytest.warns(RuntimeWarning, match="apt-get install libtcmalloc-minimal4"):
        malloc.relaunch_with_preferred_malloc("grpo")


def test_a_relaunch_the_loader_refused_is_not_repeated(monkeypatch):
    monkeypatch.setattr(malloc, "preloaded", lambda: None)
    monkeypatch.setenv(malloc.RELAUNCHED, "jemalloc")
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("relaunched twice"))
    with pytest.warns(RuntimeWarning, match="not in use"):
        malloc.relaunch_with_preferred_malloc("grpo")


@pytest.mark.slow
@needs_tcmalloc
def test_the_program_restarts_once_under_tcmalloc_for_a_large_model_on_the_cpu(tmp_path):
    large = model_dir(tmp_path / "large", LARGE_MODEL_BYTES)
    out = r1lab("eval", "--model", str(large), "--task", "arithmetic", "--device", "cpu")
    assert out.stderr.count("restarting with tcmalloc_minimal") == 1, out.stderr
    # the restarted process got as far as reading the (empty) weights: the same command line ran again
    assert out.returncode != 0 and "restarting" in out.stderr.splitlines()[0], out.stderr


@pytest.mark.slow  # two eval commands: test_only_a_large_model_on_the_cpu_and_not_switched_off is the fast check
@needs_a_malloc
def test_a_small_model_a_gpu_run_or_the_switch_keep_glibc(tmp_path):
    small = model_dir(tmp_path / "small", 1000)
    large = model_dir(tmp_path / "large", LARGE_MODEL_BYTES)
    for args, env in (((small, "cpu"), {}), ((large, "cpu"), {malloc.SWITCH: "0"})):
        out = r1lab("eval", "--model", str(args[0]), "--task", "arithmetic", "--device", args[1], **env)
        assert "restarting" not in out.stderr, out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("candidate", malloc.CANDIDATES, ids=lambda candidate: candidate[0])
def test_each_malloc_serves_a_preloaded_process(candidate, monkeypatch):
    if not ctypes.util.find_library(candidate[0]):
        pytest.skip(f"{candidate[1]} is not installed (apt-get install {candidate[1]})")
    monkeypatch.setattr(malloc, "CANDIDATES", (candidate,))
    env = malloc.preload_env({**os.environ, "PYTHONPATH": str(REPO)})
    code = "from r1lab.cpu import malloc; import torch; torch.ones(1 << 20); print(malloc.preloaded())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == candidate[0], out.stderr
