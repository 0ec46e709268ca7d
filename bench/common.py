"""What the two GRPO benchmarks share: bench/grpo_vs_trl.py (tiny Qwen2, CPU) and bench/grpo_gpu.py (Qwen2.5-0.5B
shape, one GPU, with a CPU smoke mode).

* fixtures: the random-init Qwen2 saved with ``save_pretrained``, its tokenizer's saving, the reuse of an already
  built model directory, the prompts file;
* child processes: their environment (offline, thread counts), the runner that tees a child's output to a log and
  measures its wall time, peak RSS and the CPU other processes used meanwhile, and the wait for a quiet machine;
* figures: the median, the package versions, the plain-text table, the JSON file.

Each bench keeps its own workload (model shape, tokenizer, prompts), its sides and its report. Both scripts put this
folder first on ``sys.path``, so ``import common`` works whether they run as scripts or are imported by the tests.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
SEED = 0
BUSY_CORES = 0.2  # warn when other processes used more than this many cores on average during a side's run
REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_INFO = "bench_model_info.json"  # written last into a model directory: a half-built one is rebuilt


# ----------------------------------------------------------------------------------------------
# Fixtures: model directory, tokenizer, prompts
# ----------------------------------------------------------------------------------------------


def save_random_qwen2(model_dir: Path, vocab: int, eos_id: int, shape: dict, dtype: str = "float32") -> int:
    """A random-init (seed SEED) Qwen2ForCausalLM saved with save_pretrained (safetensors) in dtype; returns its
    parameter count (tied embeddings counted once)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(SEED)
    config = Qwen2Config(
        vocab_size=vocab, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, **shape
    )
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    model.save_pretrained(model_dir, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def save_tokenizer(tok, out_dir: Path):
    """Save a `tokenizers` Tokenizer as tokenizer.json + tokenizer_config.json, with <|endoftext|> as both eos and pad
    (AutoTokenizer and r1lab's loader both read it from there)."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def cached_model_info(model_dir: Path, same: Callable[[dict], bool], mismatch: str) -> dict | None:
    """The info of a model directory built by an earlier run (so that the model is built once per workdir), or None
    when there is none yet. Exits when it holds another model than asked for (`same(info)` is false), saying
    "ERROR: MODEL_DIR holds " + mismatch, where mismatch's "{info}" stands for what the directory holds."""
    info_path = model_dir / MODEL_INFO
    if not info_path.exists():
        return None
    info = json.loads(info_path.read_text())
    if not same(info):
        sys.exit(f"ERROR: {model_dir} holds " + mismatch.format(info=info))
    return info


def write_model_info(model_dir: Path, info: dict) -> dict:
    (model_dir / MODEL_INFO).write_text(json.dumps(info, indent=2))
    return info


def write_prompts(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def make_workdir(workdir: Path | None, prefix: str) -> Path:
    """The run's directory, absolute (children run elsewhere); a fresh temp dir when none is given."""
    workdir = (workdir or Path(tempfile.mkdtemp(prefix=prefix))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def go_offline() -> None:
    """The models are built locally: never let transformers or tokenizers reach for the hub (nor fork-warn)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------------------------
# Child processes
# ----------------------------------------------------------------------------------------------


def child_env(threads: int, hide_gpus: bool = True) -> dict:
    """The environment of a measured child: offline, `threads` OpenMP/MKL threads, unbuffered output. The CPU bench
    hides the GPUs from both sides; the GPU bench passes hide_gpus=False and the children see what the parent sees."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
    )
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def with_repo_on_path(env: dict) -> dict:
    """env with the repository root first on PYTHONPATH: the child imports the working tree's r1lab, as
    `python -m r1lab` from the repository root would."""
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _cpu_busy_s() -> float | None:
    """Machine-wide busy CPU seconds so far (all cores), from /proc/stat; None where unavailable."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(max_wait_s: float, window_s: float = 3.0) -> float | None:
    """Wait (up to max_wait_s) until the machine is idle: < BUSY_CORES cores busy over window_s.
    Returns the last busy-cores reading."""
    deadline = time.monotonic() + max_wait_s
    said = False
    while True:
        b0 = _cpu_busy_s()
        time.sleep(window_s)
        b1 = _cpu_busy_s()
        if b0 is None or b1 is None:
            return None
        cores = (b1 - b0) / window_s
        if cores < BUSY_CORES or time.monotonic() >= deadline:
            if said or cores >= BUSY_CORES:
                print(f"machine busy: {cores:.2f} cores" + (" (gave up waiting)" if cores >= BUSY_CORES else " -> quiet"))
            return cores
        if not said:
            print(f"machine busy ({cores:.2f} cores used by other processes); waiting up to {max_wait_s:.0f}s ...")
            said = True


def run_child(cmd: list[str], env: dict, log_path: Path, cwd: Path | None = None) -> dict:
    """Run cmd, tee its output to log_path. Returns returncode, wall_s, peak_rss_mb and cpu_s of that child,
    and foreign_cores: average CPU (in cores) used by *other* processes meanwhile (a noisy-neighbour check)."""
    print("$ " + " ".join(map(str, cmd)), flush=True)
    busy0 = _cpu_busy_s()
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert p.stdout is not None
        for line in iter(p.stdout.readline, b""):
            log.write(line)
            sys.stdout.buffer.write(b"  | " + line)
            sys.stdout.flush()
        # os.wait4 gives this child's own rusage (RUSAGE_CHILDREN would max over all children so far)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    busy1 = _cpu_busy_s()
    cpu_s = ru.ru_utime + ru.ru_stime
    foreign = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - cpu_s) / wall
    return {
        "rc": p.returncode,
        "wall_s": wall,
        "peak_rss_mb": ru.ru_maxrss / 1024.0,  # Linux: KiB -> MiB
        "cpu_s": cpu_s,
        "foreign_cores": foreign,
    }


def run_for_result(cmd: list[str], env: dict, log_path: Path, result: Path, label: str,
                   cwd: Path | None = None) -> tuple[dict, dict]:
    """run_child for a child that writes its figures as JSON to `result`; returns (figures, run_child's dict).
    Exits, naming the log, when the child fails or writes nothing (a stale result of an earlier run is removed
    first, so it cannot pass for this one's)."""
    result.unlink(missing_ok=True)
    proc = run_child(cmd, env, log_path, cwd=cwd)
    if proc["rc"] != 0 or not result.exists():
        sys.exit(f"ERROR: the {label} failed (exit code {proc['rc']}); see {log_path}")
    return json.loads(result.read_text()), proc


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers", "r1lab"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def versions_line(v: dict) -> str:
    return f"versions: torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, r1lab {v['r1lab']}"


def print_table(cols: list[str], rows: list[list[str]]) -> None:
    """Left-aligned columns, each as wide as its widest cell, under a header and a dashed rule."""
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths)))


def write_figures(path: Path | None, res: dict) -> None:
    """Every figure of the run as JSON at path (the --json flag), when one is given."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2, default=str))
        print(f"figures written to {path}")


def check_rounds(p, a) -> None:
    """The parse-time checks both benches make of the GRPO rounds and group size (p: the ArgumentParser)."""
    if not 0 <= a.warmup < a.rounds:
        p.error("need 0 <= --warmup < --rounds")
    if a.samples_per_prompt < 2:
        p.error("GRPO needs --samples-per-prompt >= 2")


def r1lab_command(*args) -> list[str]:
    """A child running r1lab with this interpreter (args as text)."""
    return [sys.executable, "-m", "r1lab", *map(str, args)]


def add_run_args(p, smoke: dict) -> None:
    """The arguments of a bench that runs r1lab children: --threads, --wait-quiet, --smoke (these sizes) and --json."""
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads of every child")
    p.add_argument("--wait-quiet", type=float, default=0, help="before each run, wait up to S s for an idle CPU")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (" + ", ".join(f"{k} {v}" for k, v in smoke.items()) + "): a check only")
    p.add_argument("--json", type=Path, help="write every figure here")
