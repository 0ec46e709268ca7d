#!/usr/bin/env python
"""Benchmark: r1lab GRPO vs TRL's GRPOTrainer, same tiny model, same workload, this CPU.

One run of this script:

1. builds (once, deterministically) a tiny random-init Qwen2 (~4.2M parameters) plus a byte-level BPE
   tokenizer made in code, saved with ``save_pretrained`` into ``WORKDIR/model``;
2. writes ``WORKDIR/prompts.jsonl``: 512 short arithmetic prompts with ``prompt`` and ``answer`` columns;
3. runs TRL's ``GRPOTrainer`` in a child process (this same file, ``--_trl-child``);
4. runs ``python -m r1lab grpo ...`` in a child process;
5. prints one table (completion tokens/s of both sides, peak RSS, ratio r1lab/TRL) and writes it to ``--json``.

Both sides get the same model directory, the same G (samples per prompt), prompts per step, updates per
round, completion length (end-of-text suppressed in both, so every completion has exactly that many
tokens), fp32, and the same number of torch threads. The first round of each side is a warm-up and is
not measured. Throughput = completion tokens generated in the measured rounds / wall time of those
rounds, where a round is end to end: generation + reward + advantage + all optimizer updates.

TRL is a bench-only dependency (``pip install -e .[bench]``); r1lab itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
SEED = 0

# Tiny Qwen2: 4 layers, hidden 256, GQA 4 heads / 2 KV heads, SwiGLU 688, tied embeddings.
# With a 5056-token vocabulary that is 4,198,656 parameters (~4.2M).
MODEL_SHAPE = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
)
DEFAULT_VOCAB = 5056
BUSY_CORES = 0.2  # warn when other processes used more than this many cores on average during a side's run


# ----------------------------------------------------------------------------------------------
# Fixtures: prompts, tokenizer, model
# ----------------------------------------------------------------------------------------------


def make_prompts(n: int, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.choice((2, 3))
        terms = [rng.randint(0, 9) for _ in range(k)]
        rows.append({"prompt": f"What is {'+'.join(map(str, terms))}? ", "answer": str(sum(terms))})
    return rows


def _tokenizer_corpus(prompts: list[dict], seed: int = SEED) -> list[str]:
    """Deterministic training text: the prompts plus pseudo-words, enough distinct pairs for a ~5k BPE vocab."""
    rng = random.Random(seed + 1)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + list("aeiou")
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(6000)]
    lines = [p["prompt"] + p["answer"] for p in prompts]
    for _ in range(4000):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + rng.choice(".,!?"))
    lines += [f"{a}+{b}={a + b}" for a in range(100) for b in range(0, 100, 7)]
    return lines


def make_tokenizer(out_dir: Path, prompts: list[dict], vocab_size: int):
    """Byte-level BPE trained in code; saved as tokenizer.json + tokenizer_config.json (AutoTokenizer loads it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(prompts), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def make_model_dir(model_dir: Path, prompts: list[dict], vocab_size: int = DEFAULT_VOCAB, **shape_overrides) -> dict:
    """Build (or reuse) the tiny model dir. Returns {'params', 'vocab_size', 'eos_id', 'shape'}."""
    shape = {**MODEL_SHAPE, **{k: v for k, v in shape_overrides.items() if v is not None}}
    info_path = model_dir / "bench_model_info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("requested_vocab", info["vocab_size"]) != vocab_size or info["shape"] != shape:
            sys.exit(f"ERROR: {model_dir} holds a model of another shape/vocab ({info}); use another --workdir")
        return info
    from transformers import AutoTokenizer

    model_dir.mkdir(parents=True, exist_ok=True)
    make_tokenizer(model_dir, prompts, vocab_size)
    tok = AutoTokenizer.from_pretrained(model_dir)  # round-trip check: what both sides will load
    eos_id = tok.convert_tokens_to_ids(EOS_TOKEN)
    assert tok.eos_token_id == eos_id and tok.pad_token_id == eos_id, (tok.eos_token_id, tok.pad_token_id)
    vocab = len(tok)
    params = save_random_qwen2(model_dir, vocab, eos_id, shape)
    info = {"params": params, "vocab_size": vocab, "requested_vocab": vocab_size, "eos_id": eos_id, "shape": shape}
    info_path.write_text(json.dumps(info, indent=2))
    return info


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


def write_prompts(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


# ----------------------------------------------------------------------------------------------
# TRL side (runs in a child process: `grpo_vs_trl.py --_trl-child ...`)
# ----------------------------------------------------------------------------------------------


def trl_child(a: argparse.Namespace, device: str = "cpu", weights_dtype: str = "float32", bf16: bool = False,
              micro_batch_size: int = 0) -> None:
    """TRL's GRPOTrainer on the bench workload; writes its figures to a.result.

    The defaults are this CPU bench's: CPU, fp32, one micro-batch per round. bench/grpo_gpu.py runs the same child
    on "cuda" with bf16 (TrainingArguments.bf16: autocast), the weights loaded in weights_dtype, and micro-batches
    of micro_batch_size completions (gradient accumulation over them gives one optimizer step per update, as
    r1lab's micro-batches do).
    """
    import torch

    torch.set_num_threads(a.threads)
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    completions_per_round = a.prompts_per_step * a.samples_per_prompt
    micro = micro_batch_size or completions_per_round
    if completions_per_round % micro:
        raise ValueError(f"{completions_per_round} completions per round do not split into micro-batches of {micro}")
    accumulation = completions_per_round // micro
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, weights_dtype))
    eos_id = tok.eos_token_id
    ds = load_dataset("json", data_files=str(a.prompts), split="train")

    def reward_len_mod3(completions, **kwargs):  # trivial and cheap on purpose
        return [float(len(c) % 3) for c in completions]

    ckpt_field = (
        "activation_checkpointing"
        if "activation_checkpointing" in GRPOConfig.__dataclass_fields__
        else "gradient_checkpointing"
    )
    config = GRPOConfig(
        output_dir=str(a.run_dir),
        # one generation round = prompts_per_step * G completions, all in ONE optimizer step
        # (on the CPU one micro-batch; on the GPU `accumulation` micro-batches accumulated):
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation,  # => generation_batch_size = completions_per_round
        num_generations=a.samples_per_prompt,
        num_iterations=a.updates,  # each round's batch is reused for `updates` optimizer steps
        max_steps=a.rounds * a.updates,
        max_completion_length=a.max_new_tokens,
        generation_kwargs={"suppress_tokens": [eos_id]},  # end-of-text never sampled -> fixed length
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=a.lr,
        beta=0.0,
        loss_type="dapo",
        use_vllm=False,
        use_cpu=device == "cpu",
        bf16=bf16,
        fp16=False,
        seed=a.seed,
        data_seed=a.seed,
        report_to="none",
        logging_steps=1,  # metrics are accumulated anyway; printing is removed below
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
        remove_unused_columns=False,
        # TRL's default is gradient checkpointing ON; off is faster on this tiny model (fairer to TRL).
        # transformers 5 renamed it activation_checkpointing (gradient_checkpointing is a deprecated alias).
        **{ckpt_field: a.trl_gradient_checkpointing},
    )

    stats = {"round_tokens": [], "round_lengths": [], "gen_score_s": [], "logs": []}

    class CountingGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            stats["gen_score_s"].append(time.perf_counter() - t)
            lengths = out["completion_mask"].sum(dim=1)
            stats["round_tokens"].append(int(lengths.sum()))
            stats["round_lengths"].append((int(lengths.min()), int(lengths.max()), int(lengths.numel())))
            return out

    class RoundTimer(TrainerCallback):
        """A round = `updates` optimizer steps on one generated batch; time it from its first step's begin
        to its last step's end (generation happens inside the first step's training_step)."""

        def __init__(self):
            self.t_begin = None
            self.round_times = []
            self.round_bounds = []

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step % a.updates == 0:
                self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % a.updates == 0:
                t = time.perf_counter()
                self.round_times.append(t - self.t_begin)
                self.round_bounds.append((self.t_begin, t))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                stats["logs"].append({"step": state.global_step, **logs})

    timer = RoundTimer()
    trainer = CountingGRPOTrainer(
        model=model,
        reward_funcs=reward_len_mod3,
        args=config,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[timer],
    )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0

    import resource

    n = len(timer.round_times)
    assert n == a.rounds, f"expected {a.rounds} rounds, timed {n}"
    assert len(stats["round_tokens"]) == a.rounds, f"expected {a.rounds} generations, saw {stats['round_tokens']}"
    w = a.warmup
    meas_tokens = sum(stats["round_tokens"][w:])
    meas_time = sum(timer.round_times[w:])
    # wall clock from the end of the last warm-up round to the end of the last round (includes the
    # dataloader and callbacks between rounds); for information
    wall_between = timer.round_bounds[-1][1] - timer.round_bounds[w - 1][1] if w > 0 else None
    lengths = stats["round_lengths"]
    res = {
        "side": "trl",
        "rounds": a.rounds,
        "warmup_rounds": w,
        "rounds_measured": a.rounds - w,
        "completions_per_round": completions_per_round,
        "completion_tokens_per_round": stats["round_tokens"],
        "completion_len_min": min(x[0] for x in lengths),
        "completion_len_max": max(x[1] for x in lengths),
        "completions_seen_per_round": [x[2] for x in lengths],
        "round_time_s": timer.round_times,
        "generate_and_score_s": stats["gen_score_s"],  # part of round_time_s: generation + rewards + advantages
        "trl_mean_length": [x.get("completions/mean_length") for x in stats["logs"] if "completions/mean_length" in x],
        "measured_tokens": meas_tokens,
        "measured_time_s": meas_time,
        "tokens_per_s": meas_tokens / meas_time,
        "median_round_tokens_per_s": _median(
            [t / s for t, s in zip(stats["round_tokens"][w:], timer.round_times[w:], strict=True)]
        ),
        "tokens_per_s_wallclock": (meas_tokens / wall_between) if wall_between else None,
        "train_total_s": total,
        "optimizer_steps": trainer.state.global_step,
        "threads": torch.get_num_threads(),
        "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trl_config": {
            k: getattr(config, k)
            for k in (
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "steps_per_generation",
                "generation_batch_size",
                "num_generations",
                "num_iterations",
                "max_steps",
                "max_completion_length",
                "generation_kwargs",
                "temperature",
                "top_p",
                "top_k",
                "learning_rate",
                "beta",
                "loss_type",
                "scale_rewards",
                ckpt_field,
                "use_vllm",
                "use_cpu",
                "bf16",
                "fp16",
                "seed",
            )
        },
    }
    Path(a.result).write_text(json.dumps(res, indent=2, default=str))
    print(
        f"[trl] rounds={a.rounds} measured={a.rounds - w} tokens={meas_tokens} time={meas_time:.2f}s "
        f"-> {res['tokens_per_s']:.1f} completion tok/s (lengths {res['completion_len_min']}..{res['completion_len_max']}; "
        f"generate+score {sum(stats['gen_score_s'][w:]):.2f}s of {meas_time:.2f}s)",
        flush=True,
    )


# ----------------------------------------------------------------------------------------------
# Parent: child processes, measurement, table
# ----------------------------------------------------------------------------------------------


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="",  # CPU benchmark on both sides
    )
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


def run_trl(a, model_dir: Path, prompts: Path, workdir: Path) -> dict:
    result = workdir / "trl_result.json"
    result.unlink(missing_ok=True)
    cmd = [
        sys.executable, os.path.abspath(__file__), "--_trl-child",
        "--model", str(model_dir), "--prompts", str(prompts), "--run-dir", str(workdir / "trl_run"),
        "--result", str(result), "--rounds", str(a.rounds), "--warmup", str(a.warmup),
        "--updates", str(a.updates), "--prompts-per-step", str(a.prompts_per_step),
        "--samples-per-prompt", str(a.samples_per_prompt), "--max-new-tokens", str(a.max_new_tokens),
        "--threads", str(a.threads), "--lr", str(a.lr), "--seed", str(a.seed),
    ]  # fmt: skip
    if a.trl_gradient_checkpointing:
        cmd.append("--trl-gradient-checkpointing")
    if a.wait_quiet:
        wait_until_quiet(a.wait_quiet)
    proc = run_child(cmd, _child_env(a.threads), workdir / "trl.log")
    if proc["rc"] != 0 or not result.exists():
        sys.exit(f"ERROR: the TRL run failed (exit code {proc['rc']}); see {workdir / 'trl.log'}")
    res = json.loads(result.read_text())
    res.update(peak_rss_mb=proc["peak_rss_mb"], process=proc)
    return res


def r1lab_grpo_argv(a, model_dir: Path, prompts: Path, run_dir: Path) -> list[str]:
    """Arguments of `r1lab` (after `python -m r1lab`) for the bench workload."""
    return [
        "grpo",
        "--model", str(model_dir), "--task", str(prompts), "--template", "none",
        "--steps", str(a.rounds), "--prompts-per-step", str(a.prompts_per_step),
        "--samples-per-prompt", str(a.samples_per_prompt), "--updates-per-batch", str(a.updates),
        "--max-new-tokens", str(a.max_new_tokens), "--suppress-eos", "true",
        # TRL trains every completion; so must r1lab (its rewards here are all zero: it would skip every sequence)
        "--skip-zero-advantage", "false",
        "--eval-every", "0", "--save-every", "0", "--out", str(run_dir),
        "--seed", str(a.seed), "--lr", str(a.lr),
    ]  # fmt: skip


def run_r1lab(a, model_dir: Path, prompts: Path, workdir: Path) -> dict:
    run_dir = workdir / "r1lab_run"
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "r1lab", *r1lab_grpo_argv(a, model_dir, prompts, run_dir)]
    env = _child_env(a.threads)
    repo_root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = str(repo_root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if a.wait_quiet:
        wait_until_quiet(a.wait_quiet)
    proc = run_child(cmd, env, workdir / "r1lab.log", cwd=repo_root)
    if proc["rc"] != 0:
        sys.exit(
            f"ERROR: the r1lab run failed (exit code {proc['rc']}); see {workdir / 'r1lab.log'}.\n"
            f"The benchmark needs `python -m r1lab grpo` with the flags shown above, writing "
            f"RUN_DIR/metrics.jsonl (keys: step, step_time_s, completion_tokens, tokens_per_s)."
        )
    return summarise_r1lab_run(a, metrics, proc)


def summarise_r1lab_run(a, metrics: Path, proc: dict) -> dict:
    """The figures of a finished r1lab run from its RUN_DIR/metrics.jsonl; exits with a message when they are missing."""
    if not metrics.exists():
        sys.exit(f"ERROR: r1lab exited 0 but wrote no {metrics}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "step_time_s" in r and "completion_tokens" in r]
    if len(steps) != a.rounds:
        sys.exit(
            f"ERROR: expected {a.rounds} step lines with step_time_s and completion_tokens in {metrics}, "
            f"found {len(steps)} (of {len(rows)} lines)"
        )
    steps.sort(key=lambda r: r.get("step", 0))
    meas = steps[a.warmup :]
    tokens = [int(r["completion_tokens"]) for r in steps]
    expected = a.prompts_per_step * a.samples_per_prompt * a.max_new_tokens
    meas_tokens = sum(int(r["completion_tokens"]) for r in meas)
    meas_time = sum(float(r["step_time_s"]) for r in meas)
    return {
        "side": "r1lab",
        "rounds": a.rounds,
        "warmup_rounds": a.warmup,
        "rounds_measured": len(meas),
        "completions_per_round": a.prompts_per_step * a.samples_per_prompt,
        "completion_tokens_per_round": tokens,
        "tokens_ok": all(t == expected for t in tokens),
        # the task's reward on a random model is uniform within every group (all zero); r1lab must still run its
        # updates then (drop_uniform_groups off, skip_zero_advantage off), or it would skip the training half of a round
        "zero_variance_groups": [r.get("zero_variance_groups") for r in steps],
        "round_time_s": [float(r["step_time_s"]) for r in steps],
        "measured_tokens": meas_tokens,
        "measured_time_s": meas_time,
        "tokens_per_s": meas_tokens / meas_time,
        "median_round_tokens_per_s": _median(
            [int(r["completion_tokens"]) / float(r["step_time_s"]) for r in meas]
        ),
        "peak_rss_mb": proc["peak_rss_mb"],
        "process": proc,
    }


def run_side(side: str, a, model_dir: Path, prompts: Path, workdir: Path) -> dict:
    """One measured run of one side, with its sanity checks printed."""
    r = run_trl(a, model_dir, prompts, workdir) if side == "trl" else run_r1lab(a, model_dir, prompts, workdir)
    check_side(side, r, a)
    return r


def check_side(side: str, r: dict, a) -> None:
    """Print a warning when a side's run was not the workload asked for (lengths, tokens per round)."""
    if side == "trl":
        if r["completion_len_min"] != a.max_new_tokens or r["completion_len_max"] != a.max_new_tokens:
            print(f"WARNING: TRL completion lengths {r['completion_len_min']}..{r['completion_len_max']}"
                  f" != {a.max_new_tokens}: EOS suppression did not hold")
        return
    zv = [x for x in r["zero_variance_groups"][a.warmup :] if x is not None]
    if zv and min(zv) >= 1.0:
        print("NOTE: every r1lab group had a uniform reward (expected with a random model); this is like-for-like "
              "only because r1lab still runs its updates then (drop_uniform_groups and skip_zero_advantage off).")
    if not r["tokens_ok"]:
        print(f"WARNING: r1lab completion_tokens per step {r['completion_tokens_per_round']} != "
              f"{a.prompts_per_step * a.samples_per_prompt * a.max_new_tokens}")


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers", "r1lab"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def print_table(res: dict) -> None:
    a = res["args"]
    cols = ["side", "compl/round", "tok/compl", "rounds meas.", "compl tok/s", "median round tok/s",
            "peak RSS MB", "other procs (cores)"]
    rows = []
    for side in ("r1lab", "trl"):
        r = res.get(side)
        if not r:
            continue
        rows.append(
            [
                side,
                str(r["completions_per_round"]),
                str(a["max_new_tokens"]),
                str(r["rounds_measured"]),
                f"{r['tokens_per_s']:,.1f}",
                f"{r['median_round_tokens_per_s']:,.1f}",
                f"{r['peak_rss_mb']:,.0f}",
                "?" if r["process"]["foreign_cores"] is None else f"{r['process']['foreign_cores']:.2f}",
            ]
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    print()
    print(f"GRPO throughput, CPU, {a['threads']} threads: G={a['samples_per_prompt']}, "
          f"{a['prompts_per_step']} prompts/round, {a['updates']} update(s)/round, "
          f"{a['max_new_tokens']} tokens/completion (EOS suppressed), fp32")
    m = res["model"]
    print(f"model: Qwen2 random init, {m['params']:,} parameters, vocab {m['vocab_size']} ({res['model_dir']})")
    v = res["versions"]
    print(f"versions: torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, r1lab {v['r1lab']}")
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths)))
    if res.get("ratio") is not None:
        print(f"ratio r1lab/TRL (completion tokens/s): {res['ratio']:.2f}x")
    busy = [s for s in ("r1lab", "trl") if res.get(s) and (res[s]["process"]["foreign_cores"] or 0) > BUSY_CORES]
    if busy:
        print(f"WARNING: other processes used > {BUSY_CORES} cores on average during the {' and '.join(busy)} run(s); "
              "the machine was not quiet and these figures are not reliable. Re-run on an idle machine.")
    print()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None, help="where model, prompts and runs go (default: a temp dir)")
    p.add_argument("--rounds", type=int, default=6, help="GRPO rounds (steps) per side, warm-up included")
    p.add_argument("--warmup", type=int, default=1, help="first rounds excluded from the measurement")
    p.add_argument("--updates", type=int, default=1, help="optimizer updates per round (TRL num_iterations)")
    p.add_argument("--pairs", type=int, default=3,
                   help="measured TRL/r1lab pairs, order alternating; the median ratio is the headline")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--samples-per-prompt", type=int, default=8, help="G")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion length (EOS suppressed)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both sides")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--n-prompts", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB, help="tokenizer/model vocabulary")
    p.add_argument("--num-layers", type=int, default=None, help="override the number of layers (4)")
    p.add_argument("--intermediate-size", type=int, default=None, help="override the MLP width (688)")
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="keep TRL's own default gradient_checkpointing=True (slower here); default: off")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                   help="before each side, wait up to S seconds for other processes to leave the CPU idle")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--r1lab-only", action="store_true")
    g.add_argument("--trl-only", action="store_true")
    # internal: TRL child
    p.add_argument("--_trl-child", dest="trl_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--prompts", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not 0 <= a.warmup < a.rounds:
        p.error("need 0 <= --warmup < --rounds")
    if a.samples_per_prompt < 2:
        p.error("GRPO needs --samples-per-prompt >= 2")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.trl_child:
        trl_child(a)
        return

    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="r1lab_bench_"))
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    prompts_rows = make_prompts(a.n_prompts, a.seed)
    prompts_path = workdir / "prompts.jsonl"
    write_prompts(prompts_path, prompts_rows)
    model_dir = workdir / "model"
    info = make_model_dir(
        model_dir, prompts_rows, a.vocab_size, num_hidden_layers=a.num_layers, intermediate_size=a.intermediate_size
    )
    print(f"model: {model_dir}  ({info['params']:,} parameters, vocab {info['vocab_size']}, eos id {info['eos_id']})")
    print(f"prompts: {prompts_path}  ({len(prompts_rows)} rows)")

    res = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                 if k not in ("trl_child", "model", "prompts", "run_dir", "result")},
        "model": info,
        "model_dir": str(model_dir),
        "prompts": str(prompts_path),
        "versions": versions(),
        "cpu": {"cores": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor()},
    }
    pairs = []
    for i in range(a.pairs):
        # The order alternates between pairs, so a machine that speeds up or slows down over the run does not
        # favour one side; each pair's ratio compares two runs made one right after the other.
        sides = ["trl", "r1lab"] if i % 2 == 0 else ["r1lab", "trl"]
        pair = {side: run_side(side, a, model_dir, prompts_path, workdir) for side in sides
                if not (side == "trl" and a.r1lab_only) and not (side == "r1lab" and a.trl_only)}
        pair["ratio"] = pair["r1lab"]["tokens_per_s"] / pair["trl"]["tokens_per_s"] if len(pair) == 2 else None
        pairs.append(pair)
        if a.pairs > 1:
            print_table({**res, **pair})
    res.update(pairs[-1])
    res["pairs"] = pairs
    ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
    res["median_ratio"] = _median(ratios) if ratios else None
    print_table(res)
    if len(ratios) > 1:
        print(f"ratio r1lab/TRL per pair: {', '.join(f'{r:.2f}x' for r in ratios)}; "
              f"median over {len(ratios)} pairs: {res['median_ratio']:.2f}x")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2, default=str))
        print(f"figures written to {a.json}")


if __name__ == "__main__":
    main()
