#!/usr/bin/env python
"""Continuous batching against batch-at-a-time: completion tokens/s of GRPO-like rollouts whose lengths vary widely.

The workload: a tiny random-init r1lab model built here (no download), P prompts x G samples at temperature 1 with
per-prompt seeds (as GRPO draws them), each prompt with its own max_new_tokens drawn from a wide range, and
end-of-text sampled now and then (a random model's nearly flat distribution), so lengths differ within a group too.

* batch-at-a-time: the sequences run in batches of S rows (S / G prompts per generate call); a batch lasts as long
  as its longest sequence (its finished rows are compacted away, as the engine's dynamic mode does);
* continuous: one generate call with max_rows=S; a finished sequence's row goes to the next waiting one at once.

* all at once: today's GRPO default, one generate call with a row per sequence (no bound on the KV cache).

All three sample the same tokens (checked; a difference exits 1). The sides alternate, `--repeats` times each, and the
median of each is reported.

    OMP_NUM_THREADS=1 python bench/continuous_batching.py --threads 1

Run it on an otherwise quiet machine: a neighbour's load moves the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from r1lab.cpu.process import setup_training_process
from r1lab.engine.engine import Engine, Sample
from r1lab.model.architecture import ModelConfig
from r1lab.model.tokenizer import build_tiny_tokenizer
from r1lab.model.transformer import CausalLM


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="prompts (P)")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt (G)")
    parser.add_argument("--slots", type=int, default=16, help="rows run at once (S), on both sides")
    parser.add_argument("--min-new", type=int, default=16, help="smallest per-prompt max_new_tokens")
    parser.add_argument("--max-new", type=int, default=256, help="largest per-prompt max_new_tokens")
    parser.add_argument("--eos-tokens", type=int, default=1, help="how many token ids end a completion (more: "
                                                                  "shorter completions)")
    parser.add_argument("--hidden", type=int, default=256, help="model width")
    parser.add_argument("--layers", type=int, default=4, help="model depth")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (alternating)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="workload and model seed")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args()


def build_engine(args: argparse.Namespace) -> Engine:
    torch.manual_seed(args.seed)
    tok = build_tiny_tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2)
    # The first ids after the special ones are ordinary characters: these end a completion, as end-of-text would.
    tok.eos_ids = set(range(1, 1 + args.eos_tokens))
    return Engine(CausalLM(cfg).eval(), tok, decode="dynamic")


def workload(args: argparse.Namespace, tok) -> tuple[list[list[int]], list[int]]:
    """Prompts of varied length (arithmetic questions) and a max_new_tokens for each."""
    rng = random.Random(args.seed)
    prompts = []
    for _ in range(args.prompts):
        terms = " + ".join(str(rng.randint(1, 999)) for _ in range(rng.randint(2, 8)))
        prompts.append(tok.encode(f"What is {terms}? Think step by step."))
    limits = [rng.randint(args.min_new, args.max_new) for _ in range(args.prompts)]
    return prompts, limits


def batch_at_a_time(engine: Engine, prompts, limits, args) -> list[Sample]:
    per_batch = args.slots // args.samples  # prompts per batch: S rows of G samples each
    out = []
    for k in range(0, len(prompts), per_batch):
        chunk = slice(k, k + per_batch)
        samples = engine.generate(prompts[chunk], num_samples=args.samples, max_new_tokens=limits[chunk],
                                  temperature=1.0, seed=list(range(len(prompts)))[chunk])
        out += [Sample(s.prompt_index + k, s.token_ids, s.text, s.logprobs, s.finish_reason) for s in samples]
    return out


def continuous(engine: Engine, prompts, limits, args) -> list[Sample]:
    return engine.generate(prompts, num_samples=args.samples, max_new_tokens=limits, temperature=1.0,
                           seed=list(range(len(prompts))), max_rows=args.slots)


def all_at_once(engine: Engine, prompts, limits, args) -> list[Sample]:
    """Today's GRPO default (rollout_slots 0): every sequence in one batch, as many rows as sequences."""
    return engine.generate(prompts, num_samples=args.samples, max_new_tokens=limits, temperature=1.0,
                           seed=list(range(len(prompts))))


def timed(side, *args) -> tuple[float, list[Sample]]:
    start = time.perf_counter()
    samples = side(*args)
    return time.perf_counter() - start, samples


def main() -> int:
    args = parse_args()
    if args.slots % args.samples:
        sys.exit("--slots must be a multiple of --samples: batch-at-a-time runs whole groups of G samples")
    setup_training_process(args.threads)  # threads, malloc and the CPU fast paths, as r1lab's commands set them
    engine = build_engine(args)
    prompts, limits = workload(args, engine.tokenizer)
    sides = {"batch-at-a-time": batch_at_a_time, "continuous": continuous, "all at once": all_at_once}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    tokens: dict[str, list[list[int]]] = {}
    continuous(engine, prompts[:2], [8, 8], args)  # warm-up: first-call allocations out of the figures
    for _ in range(args.repeats):
        for name, side in sides.items():
            elapsed, samples = timed(side, engine, prompts, limits, args)
            seconds[name].append(elapsed)
            tokens[name] = [s.token_ids for s in samples]
    if not tokens["continuous"] == tokens["batch-at-a-time"] == tokens["all at once"]:
        print("FAIL: the sides sampled different tokens", file=sys.stderr)
        return 1
    lengths = [len(t) for t in tokens["continuous"]]
    n_tokens = sum(lengths)
    print(f"{args.prompts} prompts x {args.samples} samples, {args.slots} slots, {args.threads} thread(s); "
          f"completion lengths {min(lengths)}..{max(lengths)} (mean {n_tokens / len(lengths):.0f}), "
          f"{n_tokens} tokens; the same tokens on every side")
    rates = {}
    for name, times in seconds.items():
        rates[name] = n_tokens / statistics.median(times)
        print(f"  {name:16s} {rates[name]:8.0f} completion tokens/s  (median of {len(times)}: "
              + ", ".join(f"{t:.2f}" for t in times) + " s)")
    speedup = rates["continuous"] / rates["batch-at-a-time"]
    print(f"  continuous / batch-at-a-time: {speedup:.2f}x (all at once, {len(lengths)} rows and no slot limit: "
          f"{rates['all at once'] / rates['batch-at-a-time']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                         "tokens": n_tokens, "min_length": min(lengths), "max_length": max(lengths),
                                         "seconds": seconds, "tokens_per_s": rates, "speedup": speedup}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
