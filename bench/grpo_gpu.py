#!/usr/bin/env python
"""Benchmark: r1lab GRPO vs TRL's GRPOTrainer on one GPU, at the exact shape of Qwen2.5-0.5B.

One run of this script:

1. builds (once) a random-init Qwen2 of Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads / 2 KV heads, FFN 4864,
   vocabulary 151,936, tied embeddings, 494,032,768 parameters) in bfloat16, with a synthetic byte-level BPE
   tokenizer of exactly that vocabulary, saved with ``save_pretrained`` into ``WORKDIR/model-qwen2.5-0.5b``;
2. writes ``WORKDIR/prompts-64.jsonl``: synthetic prompts of exactly 64 tokens (``prompt`` and ``answer`` columns);
3. runs ``r1lab grpo`` in a child process, through a wrapper that records the child's peak GPU memory;
4. runs TRL's ``GRPOTrainer`` (Hugging Face ``generate``, no vLLM) in a child process: the CPU bench's TRL child;
5. times r1lab's ``Engine.generate`` alone at the rollout batch (32 prompts x 8 samples, 256 new tokens) and
   compares it with the memory-bandwidth floor of that decode: (weights + KV cache read per step) / measured copy rate;
6. prints one table and writes every figure to ``--json``.

Both GRPO sides get the same model directory, G, prompts per round, micro-batch, updates per round, prompt and
completion lengths (end-of-text suppressed in both: every completion is exactly 256 tokens), beta 0, bf16. See
bench/README.md for the fairness rules. ``--cpu`` runs the same shape on the CPU in fp32 with a small workload and
prints where r1lab's time and memory go; ``--tiny`` runs the same pipeline on the CPU with a 2-layer model in
seconds: the CI smoke test (tests/test_bench_gpu_smoke.py).

What it shares with the CPU bench (bench/grpo_vs_trl.py) is in bench/common.py (model saving, child processes, figures)
and bench/sides.py (the TRL child, the ``r1lab grpo`` command line, the metrics reader, the sanity checks).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import shutil
import string
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# common.py and sides.py sit next to this file: importable whether it runs as a script or is imported (the tests)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import sides  # noqa: E402

BYTE_TOKENS = 256  # ids 1..256: the byte-level alphabet; id 0 is <|endoftext|>; the rest are whole words
# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer): a word with its leading space is one piece
QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Qwen2.5-0.5B's config.json, less its weights: random init gives the same cost per token.
QWEN25_05B_SHAPE = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
TINY_SHAPE = {**QWEN25_05B_SHAPE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "max_position_embeddings": 512}


@dataclass(frozen=True)
class Workload:
    """Everything that defines a run; the command-line flags override the per-round fields."""

    name: str
    shape: dict
    vocab_size: int
    device: str
    dtype: str
    prompts_per_step: int
    samples_per_prompt: int
    prompt_tokens: int
    max_new_tokens: int
    updates: int
    rounds: int  # GRPO rounds per side, warm-up included
    warmup: int
    micro_batch_size: int  # completions per forward/backward pass, both sides
    rollout_repeats: int  # timed Engine.generate calls (after one warm-up call)
    copy_mib: int  # size of the tensor copied to measure the memory bandwidth
    matmul_n: int  # side of the square matrices multiplied to measure the matmul rate


GPU_WORKLOAD = Workload("qwen2.5-0.5b", QWEN25_05B_SHAPE, 151_936, "cuda", "bfloat16", prompts_per_step=32,
                        samples_per_prompt=8, prompt_tokens=64, max_new_tokens=256, updates=4, rounds=4, warmup=1,
                        micro_batch_size=64, rollout_repeats=3, copy_mib=2048, matmul_n=8192)
# The same shape on this machine's CPU, in fp32 with all cores: a workload both sides finish in minutes
CPU_WORKLOAD = Workload("qwen2.5-0.5b-fp32", QWEN25_05B_SHAPE, 151_936, "cpu", "float32", prompts_per_step=2,
                        samples_per_prompt=4, prompt_tokens=32, max_new_tokens=32, updates=1, rounds=3, warmup=1,
                        micro_batch_size=8, rollout_repeats=5, copy_mib=1024, matmul_n=2048)
TINY_WORKLOAD = Workload("tiny", TINY_SHAPE, 1024, "cpu", "float32", prompts_per_step=8, samples_per_prompt=4,
                         prompt_tokens=16, max_new_tokens=16, updates=1, rounds=2, warmup=1, micro_batch_size=32,
                         rollout_repeats=2, copy_mib=64, matmul_n=256)
OVERRIDABLE = ("prompts_per_step", "samples_per_prompt", "prompt_tokens", "max_new_tokens", "updates", "rounds",
               "warmup", "micro_batch_size", "rollout_repeats")


# ----------------------------------------------------------------------------------------------
# Fixtures: tokenizer, model, prompts
# ----------------------------------------------------------------------------------------------


def word_tokens(n: int) -> list[str]:
    """The first n byte-level tokens " a" .. " z", " aa" .. " zz", " aaa" ... (a space is "Ġ" at byte level):
    shortest first, so that each word's prefix is a token before the word is."""
    def words():
        for length in itertools.count(1):
            for letters in itertools.product(string.ascii_lowercase, repeat=length):
                yield "\u0120" + "".join(letters)

    return list(itertools.islice(words(), n))


def build_tokenizer(out_dir: Path, vocab_size: int) -> int:
    """A byte-level BPE with exactly vocab_size entries, built in code; returns the end-of-text id.

    Id 0 is <|endoftext|> (eos and pad, special), ids 1..256 the byte alphabet, the rest words " a", " b", ...
    " zz", ... each made by one merge from its prefix, so " xyz" is one token and a prompt of n such words is n
    tokens. The normalizer, pre-tokenizer and decoder are Qwen2's: transformers 5 rebuilds any qwen2 model
    directory's tokenizer as its Qwen2Tokenizer from the vocabulary and merges (ignoring tokenizer.json's pipeline),
    and r1lab reads tokenizer.json as it is; with the same pipeline both give the same ids (check_prompt_tokens).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = word_tokens(vocab_size - 1 - BYTE_TOKENS)
    vocab = {common.EOS_TOKEN: 0, **{c: 1 + i for i, c in enumerate(alphabet)},
             **{w: 1 + BYTE_TOKENS + i for i, w in enumerate(words)}}
    merges = [(w[:-1], w[-1]) for w in words]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # already id 0: this marks it special
    tok.add_special_tokens([AddedToken(common.EOS_TOKEN, special=True, normalized=False)])
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size(with_added_tokens=True)} entries, wanted {vocab_size}")
    common.save_tokenizer(tok, out_dir)
    return vocab[common.EOS_TOKEN]


def build_model_dir(model_dir: Path, w: Workload) -> dict:
    """Build (or reuse) the random-init model directory of workload w. Returns what was built."""
    wanted = {"shape": w.shape, "vocab_size": w.vocab_size, "dtype": w.dtype}
    info = common.cached_model_info(model_dir, lambda old: {k: old.get(k) for k in wanted} == wanted,
                                    "another model ({info}); delete it or use another --workdir")
    if info:
        return info
    print(f"building {model_dir} (random init, {w.dtype}) ...", flush=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    eos_id = build_tokenizer(model_dir, w.vocab_size)
    params = common.save_random_qwen2(model_dir, w.vocab_size, eos_id, w.shape, w.dtype)
    check_model_config(model_dir, w)
    return common.write_model_info(model_dir, {**wanted, "params": params, "eos_id": eos_id})


def check_model_config(model_dir: Path, w: Workload) -> None:
    """The saved config.json must read back as the shape asked for, in r1lab's reading of it (rope_theta included:
    transformers 5 moves it into rope_parameters)."""
    from r1lab.model.architecture import ModelConfig

    cfg = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    got = {k: getattr(cfg, k) for k in w.shape} | {"vocab_size": cfg.vocab_size}
    want = dict(w.shape, vocab_size=w.vocab_size)
    if got != want:
        raise RuntimeError(f"{model_dir}/config.json reads back as {got}, not {want}")


def make_prompt_rows(n: int, prompt_tokens: int, vocab_size: int, seed: int) -> list[dict]:
    """n prompts of exactly prompt_tokens random words (= tokens: " kqz mfa ..."), each with a one-digit answer that
    a random model's completion will not give (every reward is zero)."""
    rng = random.Random(seed)
    words = [w.replace("\u0120", " ") for w in word_tokens(vocab_size - 1 - BYTE_TOKENS)]
    return [{"prompt": "".join(rng.choices(words, k=prompt_tokens)), "answer": str(rng.randrange(10))}
            for _ in range(n)]


def check_prompt_tokens(model_dir: Path, rows: list[dict], prompt_tokens: int) -> None:
    """Both sides must see the same prompt_tokens ids per prompt: TRL through AutoTokenizer, r1lab through its own
    loader (`--template none` encodes the prompt text as it is)."""
    from transformers import AutoTokenizer

    from r1lab.model.tokenizer import load_tokenizer

    hf, ours = AutoTokenizer.from_pretrained(model_dir), load_tokenizer(model_dir)
    for row in rows:
        hf_ids = hf(row["prompt"], add_special_tokens=True)["input_ids"]
        if len(hf_ids) != prompt_tokens or ours.encode(row["prompt"]) != hf_ids:
            raise RuntimeError(f"prompt {row['prompt'][:40]!r}... is {len(hf_ids)} tokens for transformers and "
                               f"{len(ours.encode(row['prompt']))} for r1lab; wanted {prompt_tokens} for both")


# ----------------------------------------------------------------------------------------------
# Children: each runs in a fresh interpreter (`grpo_gpu.py --_child KIND --_spec SPEC.json`) and writes
# its figures plus its own peak device memory to spec["result"]
# ----------------------------------------------------------------------------------------------


def child_main(kind: str, spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    figures = CHILDREN[kind](spec)
    figures.setdefault("memory", peak_memory(spec["device"]))
    Path(spec["result"]).write_text(json.dumps(figures, indent=2, default=str))


def peak_memory(device: str) -> dict:
    """This process's peak device memory, as torch's caching allocator counts it (None on the CPU)."""
    if device != "cuda":
        return {"device_name": platform.processor() or platform.machine(), "max_allocated": None, "max_reserved": None}
    import torch

    return {"device_name": torch.cuda.get_device_name(), "max_allocated": torch.cuda.max_memory_allocated(),
            "max_reserved": torch.cuda.max_memory_reserved()}


def child_r1lab(spec: dict) -> dict:
    """`r1lab grpo` in this process (same code path as `python -m r1lab`), so that peak_memory sees its allocations.
    Its figures are in RUN_DIR/metrics.jsonl, read by the parent."""
    from r1lab.cli import main as r1lab_main
    from r1lab.cpu.process import relaunch_for_large_cpu_model

    argv = spec["argv"]  # as the `r1lab` program would: this child restarts itself under tcmalloc for a large model
    relaunch_for_large_cpu_model("grpo", argv[argv.index("--model") + 1], argv[argv.index("--device") + 1])
    r1lab_main(argv)  # exits non-zero on an error, before any result is written
    return {}


def child_trl(spec: dict) -> dict:
    """The CPU bench's TRL child (sides.trl_child), on this workload's device and precision and in micro-batches."""
    ns = argparse.Namespace(**spec["trl_args"])
    sides.trl_child(ns, device=spec["device"], weights_dtype=spec["weights_dtype"], bf16=spec["bf16"],
                    micro_batch_size=spec["micro_batch_size"])
    return json.loads(Path(ns.result).read_text())


def child_rollout(spec: dict) -> dict:
    """r1lab's Engine.generate alone at the GRPO rollout batch, then the device's copy and matmul rates."""
    import torch

    from r1lab.cpu.process import relaunch_for_large_cpu_model, setup_training_process
    from r1lab.engine.engine import Engine
    from r1lab.model.hf_format import load_model
    from r1lab.model.layers import FAST_PATHS
    from r1lab.model.tokenizer import load_tokenizer

    # set up as `r1lab grpo` sets up its process (malloc, the CPU fast paths, threads): the rollouts users get
    relaunch_for_large_cpu_model("grpo", spec["model"], spec["device"])
    setup_training_process(spec["threads"], spec["model"], spec["device"])
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    model = load_model(spec["model"], device=device, dtype=dtype)
    tokenizer = load_tokenizer(spec["model"])
    tokenizer.add_eos_ids(model.config.eos_token_id)
    rows = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines()][: spec["prompts_per_step"]]
    prompts = [tokenizer.encode(r["prompt"]) for r in rows]
    engine, G, L = Engine(model, tokenizer), spec["samples_per_prompt"], spec["max_new_tokens"]

    def timed_generate(seed: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        samples = engine.generate(prompts, num_samples=G, max_new_tokens=L, temperature=1.0, seed=seed,
                                  suppress_eos=True)
        _sync(device)
        elapsed = time.perf_counter() - t0
        lengths = {len(s.token_ids) for s in samples}
        if len(samples) != len(prompts) * G or lengths != {L}:
            raise RuntimeError(f"generate returned {len(samples)} samples of lengths {sorted(lengths)}, "
                               f"wanted {len(prompts) * G} of {L}")
        return elapsed

    timed_generate(spec["seed"])  # warm-up: kernels, allocator, autotuning
    times = [timed_generate(spec["seed"] + 1 + i) for i in range(spec["rollout_repeats"])]
    memory = peak_memory(spec["device"])  # before the rate measurements below allocate their own buffers
    cfg = model.config
    element = torch.empty((), dtype=dtype).element_size()
    return {
        "generate_s": times,
        "batch": len(prompts) * G,
        "prompts": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "new_tokens": L,
        "params": sum(p.numel() for p in model.parameters()),  # the tied embedding counted once
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "embedding_params": cfg.vocab_size * cfg.hidden_size,
        # keys + values of one row at one position, all layers
        "kv_bytes_per_position": cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * element,
        "num_layers": cfg.num_hidden_layers,
        "num_heads": cfg.num_attention_heads,
        "head_dim": cfg.head_dim,
        "memory": memory,
        "cpu_fast_paths": FAST_PATHS.few_rows_linear is not None,  # the decode products r1lab's commands install
        "copy_bytes_per_s": copy_rate(device, spec["copy_mib"] << 20),
        "matmul_flops_per_s": matmul_rate(device, dtype, spec["matmul_n"]),
    }


CHILDREN = {"r1lab": child_r1lab, "trl": child_trl, "rollout": child_rollout}


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def copy_rate(device, nbytes: int, repeats: int = 10) -> float:
    """Bytes moved per second (read + written) by dst.copy_(src) of an nbytes tensor: the memory bandwidth a
    decode step can hope for."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - t0)


def matmul_rate(device, dtype, n: int, repeats: int = 10) -> float:
    """FLOP/s of an (n x n) @ (n x n) product in dtype."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# The decode floor
# ----------------------------------------------------------------------------------------------


def decode_floors(r: dict) -> dict:
    """Tokens/s that the hardware allows for the rollout child's generate call, from its measured rates.

    Bytes: every forward reads all the weights once (the tied embedding matrix is read whole by the LM head); decode
    step k (k = 1 .. L-1, producing token k) also reads the keys and values of its P + k positions for every row.
    The prefill counts as one weights read. FLOPs (for information): 2 x parameters per token through the matrices
    (the LM head only on the prompt's last position in the prefill) plus attention (4 x heads x head_dim x context).
    The logits and the sampler's traffic are left out, so the floors are slightly optimistic.
    """
    B, n_prompts, L = r["batch"], r["prompts"], r["new_tokens"]
    P = max(r["prompt_tokens"])
    body_params = r["params"] - r["embedding_params"]  # the LM head's matmul is counted apart
    attn_flops_per_key = 4 * r["num_layers"] * r["num_heads"] * r["head_dim"]
    steps = [(r["weights_bytes"], 2 * n_prompts * (P * body_params + r["embedding_params"])
              + n_prompts * attn_flops_per_key * P * (P + 1) // 2)]  # the prefill
    for k in range(1, L):
        context = P + k
        steps.append((r["weights_bytes"] + B * context * r["kv_bytes_per_position"],
                      2 * B * r["params"] + B * attn_flops_per_key * context))
    tokens = B * L
    bw, flops = r["copy_bytes_per_s"], r["matmul_flops_per_s"]
    total_bytes = sum(b for b, _ in steps)
    return {
        "bytes_read": total_bytes,
        "kv_bytes_mean_per_step": (total_bytes - L * r["weights_bytes"]) / (L - 1) if L > 1 else 0.0,
        "bandwidth_floor_tokens_per_s": tokens / (total_bytes / bw),
        "compute_floor_tokens_per_s": tokens / (sum(f for _, f in steps) / flops),
        # per step, whichever of memory and compute takes longer
        "roofline_floor_tokens_per_s": tokens / sum(max(b / bw, f / flops) for b, f in steps),
    }


def step_floors(ro: dict, a: dict) -> dict:
    """Seconds per GRPO step that the hardware allows for each of r1lab's phases (full fine-tuning), from the rollout
    child's measured copy and matmul rates, to set beside the measured phase times.

    rollout: the decode roofline above. forward_backward: the matrix products' FLOPs at the matmul rate, forward
    and backward (3x the forward's 2 x parameters per token): each micro-batch runs its distinct prompts once and
    its completions against them, the LM head only on completion tokens; attention adds 4 x heads x head_dim per
    key (3x again). optimizer: fused AdamW reads weight, gradient and both moments and writes three of them: 28
    bytes per parameter at the copy rate. Scoring and weight sync: none (the engine samples from the weights)."""
    G, P, C, m = a["samples_per_prompt"], a["prompt_tokens"], a["max_new_tokens"], a["micro_batch_size"]
    rows = a["prompts_per_step"] * G
    body = ro["params"] - ro["embedding_params"]
    attn_per_key = 4 * ro["num_layers"] * ro["num_heads"] * ro["head_dim"]
    flops = 0
    for start in range(0, rows, m):
        completions = min(m, rows - start)
        prompts = len({r // G for r in range(start, start + completions)})
        flops += 2 * body * (prompts * P + completions * C) + 2 * ro["embedding_params"] * completions * C
        flops += attn_per_key * (prompts * P * (P + 1) // 2 + completions * sum(P + k for k in range(1, C + 1)))
    rollout = ro["batch"] * ro["new_tokens"] / ro["roofline_floor_tokens_per_s"]
    return {"rollout": rollout, "score": 0.0, "forward_backward": 3 * flops / ro["matmul_flops_per_s"],
            "optimizer": 28 * ro["params"] / ro["copy_bytes_per_s"], "sync": 0.0}


# ----------------------------------------------------------------------------------------------
# Parent: the three measured children
# ----------------------------------------------------------------------------------------------


def run_bench_child(kind: str, spec: dict, a) -> dict:
    """Run child KIND with spec; returns its figures with the process's wall time and peak RSS added."""
    spec_path, result = a.workdir / f"{kind}_spec.json", a.workdir / f"{kind}_result.json"
    spec = {**spec, "result": str(result), "device": a.workload.device}
    spec_path.write_text(json.dumps(spec, indent=2, default=str))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", kind, "--_spec", str(spec_path)]
    # the children see the GPUs the parent sees, and import the working tree's r1lab
    env = common.with_repo_on_path(common.child_env(a.threads, hide_gpus=a.workload.device != "cuda"))
    figures, proc = common.run_for_result(cmd, env, a.workdir / f"{kind}.log", result, f"{kind} child",
                                          cwd=common.REPO_ROOT)
    return {**figures, "process": proc}


def r1lab_argv(a, model_dir: Path, prompts: Path, run_dir: Path) -> list[str]:
    """The CPU bench's `r1lab grpo` flags plus device, micro-batch and dtype. float32 is r1lab's default and is not
    passed, so --tiny works with an r1lab that has no --dtype flag."""
    argv = sides.r1lab_grpo_argv(a, model_dir, prompts, run_dir)
    argv += ["--device", a.workload.device, "--micro-batch-size", str(a.micro_batch_size)]
    if a.workload.dtype != "float32":
        argv += ["--dtype", a.workload.dtype]
    if a.workload.device == "cuda":  # 64 x 256 tokens x 151,936 logits would be 10 GB per kept float32 tensor
        argv += ["--recompute-logits", "true"]
    if a.optimizer_in_backward:  # no clipping by the global norm on either side (TRL: max_grad_norm 0 too)
        argv += ["--optimizer-in-backward", "true", "--max-grad-norm", "0"]
    if a.lora_rank:  # the same adapters as TRL's peft LoraConfig: every linear layer but the head, no dropout
        argv += ["--lora-rank", str(a.lora_rank), "--lora-alpha", str(a.lora_alpha), "--lora-targets", "all-linear"]
    return argv


def run_r1lab_side(a, model_dir: Path, prompts: Path) -> dict:
    run_dir = a.workdir / "r1lab_run"
    metrics = run_dir / "metrics.jsonl"
    shutil.rmtree(run_dir, ignore_errors=True)  # each pair starts afresh: r1lab refuses to mix two runs in one --out
    argv = r1lab_argv(a, model_dir, prompts, run_dir)
    print("r1lab side: python -m r1lab " + " ".join(argv), flush=True)
    child = run_bench_child("r1lab", {"argv": argv}, a)
    r = sides.summarise_r1lab_run(a, metrics, child["process"])
    steps = sorted((json.loads(x) for x in metrics.read_text().splitlines() if x.strip()), key=lambda x: x.get("step", 0))
    measured = [x for x in steps if "step_time_s" in x][a.warmup :]
    rollout_s = [x.get("rollout_time_s") for x in measured]
    r.update(argv=argv, memory=child["memory"], rollout_time_s=rollout_s,
             rollout_tokens_per_s=(r["measured_tokens"] / sum(rollout_s)) if rollout_s and None not in rollout_s else None)
    # where a measured step's time and memory went (means of r1lab's own per-phase metrics)
    r["phase_s"] = {k[5:-2]: sum(x[k] for x in measured) / len(measured)
                    for k in measured[0] if k.startswith("time/")} if measured else {}
    r["phase_peak_gb"] = {k[7:-8]: max(x[k] for x in measured)
                          for k in measured[0] if k.startswith("memory/") and k.endswith("_peak_gb")} if measured else {}
    # what the process holds of weights, gradients and optimizer state, as r1lab counts them (LoRA: adapters' only)
    r["held_mb"] = {k: measured[-1][f"memory/rank_{k}_mb"] for k in ("weights", "gradients", "optimizer")
                    if measured and f"memory/rank_{k}_mb" in measured[-1]}
    if r["phase_peak_gb"] and r["memory"].get("max_allocated") is not None:
        # r1lab's phase clock resets CUDA's peak counter at each phase, so the child's final reading is only the last
        # phase's: the run's peak is the largest phase peak
        r["memory"]["max_allocated"] = max(r["memory"]["max_allocated"], 1e9 * max(r["phase_peak_gb"].values()))
    # sampler vs trainer log-probs of the same tokens on the same weights, per step (r1lab's metrics)
    diffs = [(x["logprob_diff/mean"], x["logprob_diff/max"]) for x in steps if "logprob_diff/max" in x]
    r["logprob_diff"] = {"mean": sum(d[0] for d in diffs) / len(diffs), "max": max(d[1] for d in diffs)} if diffs else None
    sides.check_side("r1lab", r, a)
    return r


def run_trl_side(a, model_dir: Path, prompts: Path) -> dict:
    trl_args = {
        "model": str(model_dir), "prompts": str(prompts), "run_dir": str(a.workdir / "trl_run"),
        "result": str(a.workdir / "trl_figures.json"), "rounds": a.rounds, "warmup": a.warmup,
        "updates": a.updates, "prompts_per_step": a.prompts_per_step, "samples_per_prompt": a.samples_per_prompt,
        "max_new_tokens": a.max_new_tokens, "threads": a.threads, "lr": a.lr, "seed": a.seed,
        "trl_gradient_checkpointing": a.trl_gradient_checkpointing, "lora_rank": a.lora_rank,
        "lora_alpha": a.lora_alpha, "max_grad_norm": 0.0 if a.optimizer_in_backward else 1.0,
    }  # fmt: skip
    # bf16 = TrainingArguments.bf16 (autocast). The weights in fp32 by default: GRPOTrainer(model="DIR")'s own default
    # and r1lab's recipe (fp32 master weights under bf16 autocast); --trl-weights bfloat16 trains bf16 weights
    spec = {"trl_args": trl_args, "weights_dtype": a.trl_weights, "bf16": a.workload.dtype == "bfloat16",
            "micro_batch_size": a.micro_batch_size}
    r = run_bench_child("trl", spec, a)
    r["peak_rss_mb"] = r["process"]["peak_rss_mb"]
    # generation + rewards + advantages (+ TRL's old-log-prob pass when updates > 1), per measured round
    gen_s = sum(r["generate_and_score_s"][a.warmup :])
    r["rollout_tokens_per_s"] = r["measured_tokens"] / gen_s if gen_s else None
    sides.check_side("trl", r, a)
    return r


def run_rollout(a, model_dir: Path, prompts: Path) -> dict:
    spec = {"model": str(model_dir), "prompts": str(prompts), "dtype": a.workload.dtype, "threads": a.threads,
            "prompts_per_step": a.prompts_per_step, "samples_per_prompt": a.samples_per_prompt,
            "max_new_tokens": a.max_new_tokens, "rollout_repeats": a.rollout_repeats, "seed": a.seed,
            "copy_mib": a.workload.copy_mib, "matmul_n": a.workload.matmul_n}
    r = run_bench_child("rollout", spec, a)
    r["tokens_per_s"] = r["batch"] * r["new_tokens"] / common.median(r["generate_s"])
    r.update(decode_floors(r))
    r["share_of_bandwidth_floor"] = r["tokens_per_s"] / r["bandwidth_floor_tokens_per_s"]
    r["share_of_roofline_floor"] = r["tokens_per_s"] / r["roofline_floor_tokens_per_s"]
    return r


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _gib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**30:.2f}"


def print_report(res: dict) -> None:
    a, m = res["args"], res["model"]
    print()
    precision = ("fp32" if a["dtype"] == "float32" else
                 f"bf16 (r1lab --dtype {a['dtype']}; TRL bf16 autocast, weights in {a['trl_weights']})")
    print(f"GRPO throughput on {res['device']}, {precision}: G={a['samples_per_prompt']}, {a['prompts_per_step']} "
          f"prompts/round, {a['prompt_tokens']}-token prompts, {a['max_new_tokens']} tokens/completion (EOS suppressed), "
          f"{a['updates']} update(s)/round, micro-batches of {a['micro_batch_size']}")
    print(f"model: Qwen2 random init, {m['params']:,} parameters, vocab {m['vocab_size']:,} ({res['model_dir']})")
    print(common.versions_line(res["versions"]))
    rows = []
    for side in ("r1lab", "trl"):
        r = res.get(side)
        if r:
            mem = r["memory"]
            rows.append([side, str(r["rounds_measured"]), f"{r['tokens_per_s']:,.1f}",
                         f"{r['median_round_tokens_per_s']:,.1f}",
                         "-" if r.get("rollout_tokens_per_s") is None else f"{r['rollout_tokens_per_s']:,.1f}",
                         _gib(mem["max_allocated"]), _gib(mem["max_reserved"]), f"{r['peak_rss_mb']:,.0f}"])
    if rows:
        common.print_table(["side", "rounds meas.", "compl tok/s", "median round tok/s", "rollout-phase tok/s",
                            "peak alloc GiB", "peak reserved GiB", "peak RSS MB"], rows)
    if res.get("ratio") is not None:
        print(f"ratio r1lab/TRL (completion tokens/s, end to end): {res['ratio']:.2f}x")
    diff = (res.get("r1lab") or {}).get("logprob_diff")
    if diff:
        print(f"r1lab sampler vs trainer log-probs of the sampled tokens: mean abs diff {diff['mean']:.2e}, "
              f"max {diff['max']:.2e}")
    print_breakdown(res)
    ro = res.get("rollout")
    if ro:
        print()
        print(f"rollout only: r1lab Engine.generate, {ro['prompts']} prompts x {a['samples_per_prompt']} samples = "
              f"{ro['batch']} rows, {ro['new_tokens']} new tokens each, EOS suppressed")
        peak = ro["memory"]["max_allocated"]
        print(f"  measured        {ro['tokens_per_s']:>12,.0f} tok/s  (median of {len(ro['generate_s'])} calls: "
              f"{common.median(ro['generate_s']):.3f} s" + (f"; peak alloc {_gib(peak)} GiB)" if peak else ")"))
        print(f"  bandwidth floor {ro['bandwidth_floor_tokens_per_s']:>12,.0f} tok/s  (weights "
              f"{ro['weights_bytes'] / 1e9:.3f} GB + KV cache {ro['kv_bytes_mean_per_step'] / 1e9:.3f} GB mean per "
              f"decode step, at the copy rate {ro['copy_bytes_per_s'] / 1e9:,.0f} GB/s read + write)")
        print(f"  compute floor   {ro['compute_floor_tokens_per_s']:>12,.0f} tok/s  (matmul "
              f"{ro['matmul_flops_per_s'] / 1e12:,.1f} TFLOP/s); roofline (slower of the two, per step) "
              f"{ro['roofline_floor_tokens_per_s']:,.0f} tok/s")
        print(f"  r1lab rollouts at {100 * ro['share_of_bandwidth_floor']:.1f}% of the bandwidth floor, "
              f"{100 * ro['share_of_roofline_floor']:.1f}% of the roofline floor")
    print()


def memory_breakdown(res: dict) -> list[tuple[str, float, str]]:
    """(part, GB, how it is known) of r1lab's peak: the parts the algorithm needs, from the model's size and the
    workload; the remainder is the measured peak less them."""
    a, m, r = res["args"], res["model"], res["r1lab"]
    weights = m["params"] * 4 if a["dtype"] == "float32" else None
    ro = res.get("rollout") or {}
    held = {k: v * 2**20 for k, v in (r.get("held_mb") or {}).items()}
    if len(held) == 3:  # as r1lab counted them (its metrics memory/rank_*_mb): LoRA trains the adapters alone
        parts = [("weights", held["weights"], "r1lab's count of its parameters' bytes"),
                 ("gradients", held["gradients"], "r1lab's count (LoRA: the adapters')"),
                 ("AdamW state", held["optimizer"], "r1lab's count (LoRA: the adapters')")]
    else:
        parts = [("weights (fp32)", weights, "parameters x 4 B"), ("gradients", weights, "parameters x 4 B"),
                 ("AdamW state", 2 * weights if weights else None, "2 x parameters x 4 B")]
    parts.append(("extra copies of the weights", 0 if weights else None,
                  "none in fp32: the engine samples from the trained weights themselves"))
    if ro:
        rows = ro["batch"]
        parts.append(("KV cache (rollout; freed before training)",
                      rows * (max(ro["prompt_tokens"]) + ro["new_tokens"]) * ro["kv_bytes_per_position"],
                      "rows x positions x layers x 2 x KV heads x head dim x 4 B"))
    micro = min(a["micro_batch_size"], a["prompts_per_step"] * a["samples_per_prompt"])
    parts.append(("kept log-softmax (one micro-batch)", micro * a["max_new_tokens"] * m["vocab_size"] * 4,
                  "completion tokens x vocabulary x 4 B"))
    peak = r["peak_rss_mb"] * 2**20
    needed = sum(x for name, x, _ in parts[:3] if x)
    parts.append(("peak RSS (measured)", peak, "the process's maximum resident set"))
    parts.append(("remainder at the peak", peak - needed,
                  "peak - weights - gradients - AdamW: activations, libraries, tokenizer, allocator"))
    return [(name, x / 1e9 if x is not None else None, how) for name, x, how in parts]


def print_breakdown(res: dict) -> None:
    r = res.get("r1lab")
    if not r or not r.get("phase_s"):
        return
    print()
    print("r1lab, per measured step: seconds and peak memory by phase (its metrics time/* and memory/*)")
    floor = r.get("floor_s") or {}
    common.print_table(["phase", "seconds", "share", "peak GB", "floor s", "floor / seconds"],
                       [[k, f"{v:.2f}", f"{100 * v / sum(r['phase_s'].values()):.0f}%",
                         "-" if k not in r["phase_peak_gb"] else f"{r['phase_peak_gb'][k]:.2f}",
                         f"{floor[k]:.2f}" if k in floor else "-",
                         f"{100 * floor[k] / v:.0f}%" if floor.get(k) and v else "-"]
                        for k, v in r["phase_s"].items()])
    if floor:
        tokens = r["measured_tokens"] / r["rounds_measured"]
        trl = res.get("trl")
        print(f"floor of the whole step (rollout roofline, products at the matmul rate, AdamW at the copy rate): "
              f"{sum(floor.values()):.2f} s, {tokens / sum(floor.values()):.1f} completion tokens/s; r1lab's step at "
              f"{100 * sum(floor.values()) / sum(r['phase_s'].values()):.0f}% of it"
              + (f"; TRL's measured rate is {trl['tokens_per_s'] / (tokens / sum(floor.values())):.2f}x the floor's"
                 if trl else ""))
    print()
    print("r1lab memory at the peak")
    common.print_table(["part", "GB", "from"], [[name, "-" if gb is None else f"{gb:.3f}", how]
                                                 for name, gb, how in memory_breakdown(res)])


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true",
                      help="CPU smoke run: 2 layers, hidden 64, vocab 1024, 8 prompts x G=4, 16+16 tokens, 1 update, fp32")
    size.add_argument("--cpu", action="store_true",
                      help="the Qwen2.5-0.5B shape on the CPU in fp32: 2 prompts x G=4, 32+32 tokens, 1 update, "
                           "micro-batches of 8, 3 rounds (1 warm-up); a few minutes per side")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="with --cpu: the same workload under bf16 autocast on both sides (this CPU's bf16 matrix "
                        "units; with --lora-rank, r1lab's frozen base is kept in bf16, and --trl-weights bfloat16 "
                        "does the same for TRL+peft)")
    p.add_argument("--workdir", type=Path, default=None, help="where model, prompts, logs and runs go (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--r1lab-only", action="store_true", help="skip TRL")
    g.add_argument("--trl-only", action="store_true", help="skip r1lab (GRPO and the rollout-only timing)")
    p.add_argument("--no-rollout", action="store_true", help="skip the rollout-only timing of r1lab's engine")
    for name in OVERRIDABLE:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"default: {getattr(GPU_WORKLOAD, name)} ({getattr(CPU_WORKLOAD, name)} with --cpu, "
                            f"{getattr(TINY_WORKLOAD, name)} with --tiny)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads in every child (default: all cores; 1 with --tiny)")
    p.add_argument("--lr", type=float, default=1e-6, help="learning rate, both sides (default: 1e-6)")
    p.add_argument("--seed", type=int, default=common.SEED, help=f"both sides (default: {common.SEED})")
    p.add_argument("--n-prompts", type=int, default=512, help="rows in the prompts file (default: 512)")
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="TRL's own default (gradient checkpointing on); default: off, as in the CPU bench")
    p.add_argument("--trl-weights", choices=("float32", "bfloat16"), default="float32",
                   help="dtype TRL loads the weights in, under bf16 autocast: float32 is TRL's default for a model "
                        "path and r1lab's recipe; bfloat16 is faster and smaller (weights, gradients, AdamW state all "
                        "bf16). Default: float32; --tiny runs fp32 without autocast")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="LoRA on both sides (r1lab --lora-rank, TRL with peft's LoraConfig on all linear layers); "
                        "0: full fine-tuning (default)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA's alpha, both sides (default: 32)")
    p.add_argument("--optimizer-in-backward", action="store_true",
                   help="r1lab updates each parameter in the backward pass (--optimizer-in-backward) and neither side "
                        "clips the gradient norm (both max_grad_norm 0); default: both clip to 1")
    p.add_argument("--_child", dest="child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--_spec", dest="spec", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return a
    a.workload = TINY_WORKLOAD if a.tiny else CPU_WORKLOAD if a.cpu else GPU_WORKLOAD
    if a.cpu_bf16:
        if not a.cpu:
            p.error("--cpu-bf16 goes with --cpu")
        a.workload = replace(CPU_WORKLOAD, name="qwen2.5-0.5b-cpu-bf16", dtype="bfloat16")
    for name in OVERRIDABLE:
        if getattr(a, name) is None:
            setattr(a, name, getattr(a.workload, name))
    if a.workload.dtype == "float32" and a.trl_weights != "float32":
        p.error("--trl-weights bfloat16 is for the bf16 runs (the GPU's, --cpu-bf16); --tiny and --cpu run fp32")
    if a.threads is None:
        # the tiny model's operations are too small to split, and on a shared 2-core machine OpenMP's spin-waiting
        # next to another busy process makes them tens of times slower with 2 threads
        a.threads = 1 if a.tiny else os.cpu_count() or 1
    completions = a.prompts_per_step * a.samples_per_prompt
    a.micro_batch_size = min(a.micro_batch_size, completions)
    common.check_rounds(p, a)
    if completions % a.micro_batch_size:
        p.error(f"--micro-batch-size must divide prompts x G = {completions} (TRL accumulates whole micro-batches)")
    if a.prompt_tokens < 1 or a.max_new_tokens < 2 or a.rollout_repeats < 1:
        p.error("need --prompt-tokens >= 1, --max-new-tokens >= 2, --rollout-repeats >= 1")
    return a


def check_environment(a) -> None:
    """Fail before building anything when the run cannot work here."""
    import torch

    if a.workload.device == "cuda" and not torch.cuda.is_available():
        sys.exit("ERROR: no CUDA device here; this is the GPU benchmark (use --tiny for the CPU smoke run)")
    if not a.trl_only and a.workload.dtype != "float32":
        from r1lab.config import GRPOConfig

        if "dtype" not in GRPOConfig.__dataclass_fields__:
            sys.exit(f"ERROR: this r1lab's `grpo` has no --dtype flag; the GPU bench runs it in {a.workload.dtype}")
    if not a.r1lab_only:
        try:
            import trl  # noqa: F401
        except ImportError:
            sys.exit("ERROR: TRL is not installed (pip install -e .[bench]); or run --r1lab-only")


def device_label(res: dict, w: Workload) -> str:
    """The GPU's name as the children saw it, or the CPU's core count."""
    if w.device != "cuda":
        return f"CPU ({os.cpu_count()} cores)"
    return next((res[s]["memory"]["device_name"] for s in ("r1lab", "trl", "rollout") if s in res), "cuda")


def main(argv=None) -> None:
    common.go_offline()
    a = parse_args(argv)
    if a.child:
        child_main(a.child, a.spec)
        return
    sys.path.insert(0, str(common.REPO_ROOT))  # the parent too reads the working tree's r1lab
    check_environment(a)
    a.workdir = common.make_workdir(a.workdir, "r1lab_bench_gpu_")
    w = a.workload
    model_dir = a.workdir / f"model-{w.name}"
    info = build_model_dir(model_dir, w)
    rows = make_prompt_rows(a.n_prompts, a.prompt_tokens, w.vocab_size, a.seed)
    prompts = a.workdir / f"prompts-{a.prompt_tokens}.jsonl"
    common.write_prompts(prompts, rows)
    check_prompt_tokens(model_dir, rows, a.prompt_tokens)
    print(f"model: {model_dir}  ({info['params']:,} parameters, vocab {info['vocab_size']:,}, {w.dtype})")
    print(f"prompts: {prompts}  ({len(rows)} rows of {a.prompt_tokens} tokens)", flush=True)

    res = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()
                 if k not in ("child", "spec", "workload")} | {"dtype": w.dtype, "device": w.device},
        "workload": asdict(w),
        "model": info,
        "model_dir": str(model_dir),
        "prompts": str(prompts),
        "versions": common.versions(),
    }
    if not a.trl_only:
        res["r1lab"] = run_r1lab_side(a, model_dir, prompts)
    if not a.r1lab_only:
        res["trl"] = run_trl_side(a, model_dir, prompts)
    if not a.trl_only and not a.no_rollout:
        res["rollout"] = run_rollout(a, model_dir, prompts)
    res["ratio"] = res["r1lab"]["tokens_per_s"] / res["trl"]["tokens_per_s"] if "r1lab" in res and "trl" in res else None
    if res.get("rollout") and res.get("r1lab", {}).get("phase_s"):
        res["r1lab"]["floor_s"] = step_floors(res["rollout"], vars(a))
    res["device"] = device_label(res, w)
    print_report(res)
    common.write_figures(a.json, res)


if __name__ == "__main__":
    main()
