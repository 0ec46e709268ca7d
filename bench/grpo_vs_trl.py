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

What it shares with the GPU bench (bench/grpo_gpu.py) is in bench/common.py (model saving, child processes, figures)
and bench/sides.py (the TRL child, the ``r1lab grpo`` command line, the metrics reader, the sanity checks).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import sys
from pathlib import Path

# common.py and sides.py sit next to this file: importable whether it runs as a script or is imported
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import sides  # noqa: E402

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


# ----------------------------------------------------------------------------------------------
# Fixtures: prompts, tokenizer, model
# ----------------------------------------------------------------------------------------------


def make_prompts(n: int, seed: int = common.SEED) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.choice((2, 3))
        terms = [rng.randint(0, 9) for _ in range(k)]
        rows.append({"prompt": f"What is {'+'.join(map(str, terms))}? ", "answer": str(sum(terms))})
    return rows


def _tokenizer_corpus(prompts: list[dict], seed: int = common.SEED) -> list[str]:
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

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[common.EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(prompts), trainer=trainer)
    return common.save_tokenizer(tok, out_dir)


def make_model_dir(model_dir: Path, prompts: list[dict], vocab_size: int = DEFAULT_VOCAB, **shape_overrides) -> dict:
    """Build (or reuse) the tiny model dir. Returns {'params', 'vocab_size', 'eos_id', 'shape'}."""
    shape = {**MODEL_SHAPE, **{k: v for k, v in shape_overrides.items() if v is not None}}
    info = common.cached_model_info(
        model_dir,
        lambda old: old.get("requested_vocab", old["vocab_size"]) == vocab_size and old["shape"] == shape,
        "a model of another shape/vocab ({info}); use another --workdir",
    )
    if info:
        return info
    from transformers import AutoTokenizer

    model_dir.mkdir(parents=True, exist_ok=True)
    make_tokenizer(model_dir, prompts, vocab_size)
    tok = AutoTokenizer.from_pretrained(model_dir)  # round-trip check: what both sides will load
    eos_id = tok.convert_tokens_to_ids(common.EOS_TOKEN)
    assert tok.eos_token_id == eos_id and tok.pad_token_id == eos_id, (tok.eos_token_id, tok.pad_token_id)
    vocab = len(tok)
    params = common.save_random_qwen2(model_dir, vocab, eos_id, shape)
    info = {"params": params, "vocab_size": vocab, "requested_vocab": vocab_size, "eos_id": eos_id, "shape": shape}
    return common.write_model_info(model_dir, info)


# ----------------------------------------------------------------------------------------------
# The two sides, each in a child process (TRL: this same file, `--_trl-child`)
# ----------------------------------------------------------------------------------------------


def run_trl(a, model_dir: Path, prompts: Path, workdir: Path) -> dict:
    result = workdir / "trl_result.json"
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
        common.wait_until_quiet(a.wait_quiet)
    res, proc = common.run_for_result(cmd, common.child_env(a.threads), workdir / "trl.log", result, "TRL run")
    res.update(peak_rss_mb=proc["peak_rss_mb"], process=proc)
    return res


def run_r1lab(a, model_dir: Path, prompts: Path, workdir: Path) -> dict:
    run_dir = workdir / "r1lab_run"
    metrics = run_dir / "metrics.jsonl"
    shutil.rmtree(run_dir, ignore_errors=True)  # each pair starts afresh: r1lab refuses to mix two runs in one --out
    cmd = [sys.executable, "-m", "r1lab", *sides.r1lab_grpo_argv(a, model_dir, prompts, run_dir)]
    env = common.with_repo_on_path(common.child_env(a.threads))
    if a.wait_quiet:
        common.wait_until_quiet(a.wait_quiet)
    proc = common.run_child(cmd, env, workdir / "r1lab.log", cwd=common.REPO_ROOT)
    if proc["rc"] != 0:
        sys.exit(
            f"ERROR: the r1lab run failed (exit code {proc['rc']}); see {workdir / 'r1lab.log'}.\n"
            f"The benchmark needs `python -m r1lab grpo` with the flags shown above, writing "
            f"RUN_DIR/metrics.jsonl (keys: step, step_time_s, completion_tokens, tokens_per_s)."
        )
    return sides.summarise_r1lab_run(a, metrics, proc)


def run_side(side: str, a, model_dir: Path, prompts: Path, workdir: Path) -> dict:
    """One measured run of one side, with its sanity checks printed."""
    r = run_trl(a, model_dir, prompts, workdir) if side == "trl" else run_r1lab(a, model_dir, prompts, workdir)
    sides.check_side(side, r, a)
    return r


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def report_rows(res: dict) -> list[list[str]]:
    a = res["args"]
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
    return rows


def print_report(res: dict) -> None:
    a = res["args"]
    print()
    print(f"GRPO throughput, CPU, {a['threads']} threads: G={a['samples_per_prompt']}, "
          f"{a['prompts_per_step']} prompts/round, {a['updates']} update(s)/round, "
          f"{a['max_new_tokens']} tokens/completion (EOS suppressed), fp32")
    m = res["model"]
    print(f"model: Qwen2 random init, {m['params']:,} parameters, vocab {m['vocab_size']} ({res['model_dir']})")
    print(common.versions_line(res["versions"]))
    common.print_table(["side", "compl/round", "tok/compl", "rounds meas.", "compl tok/s", "median round tok/s",
                        "peak RSS MB", "other procs (cores)"], report_rows(res))
    if res.get("ratio") is not None:
        print(f"ratio r1lab/TRL (completion tokens/s): {res['ratio']:.2f}x")
    limit = common.BUSY_CORES
    busy = [s for s in ("r1lab", "trl") if res.get(s) and (res[s]["process"]["foreign_cores"] or 0) > limit]
    if busy:
        print(f"WARNING: other processes used > {limit} cores on average during the {' and '.join(busy)} run(s); "
              "the machine was not quiet and these figures are not reliable. Re-run on an idle machine.")
    print()


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


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
    p.add_argument("--seed", type=int, default=common.SEED)
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
    common.check_rounds(p, a)
    return a



def build_fixtures(a, workdir: Path) -> tuple[dict, Path, Path]:
    """The prompts file and the model directory in workdir; returns (the run's figures so far, model dir, prompts)."""
    prompts_rows = make_prompts(a.n_prompts, a.seed)
    prompts_path = workdir / "prompts.jsonl"
    common.write_prompts(prompts_path, prompts_rows)
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
        "versions": common.versions(),
        "cpu": {"cores": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor()},
    }
    return res, model_dir, prompts_path


def run_pairs(a, res: dict, model_dir: Path, prompts_path: Path, workdir: Path) -> list[dict]:
    pairs = []
    for i in range(a.pairs):
        # The order alternates between pairs, so a machine that speeds up or slows down over the run does not
        # favour one side; each pair's ratio compares two runs made one right after the other.
        order = ["trl", "r1lab"] if i % 2 == 0 else ["r1lab", "trl"]
        pair = {side: run_side(side, a, model_dir, prompts_path, workdir) for side in order
                if not (side == "trl" and a.r1lab_only) and not (side == "r1lab" and a.trl_only)}
        pair["ratio"] = pair["r1lab"]["tokens_per_s"] / pair["trl"]["tokens_per_s"] if len(pair) == 2 else None
        pairs.append(pair)
        if a.pairs > 1:
            print_report({**res, **pair})
    return pairs


def main(argv=None) -> None:
    a = parse_args(argv)
    common.go_offline()
    if a.trl_child:
        sides.trl_child(a)
        return

    # a.workdir stays as given: it is one of the figures' args
    workdir = common.make_workdir(a.workdir, "r1lab_bench_")
    res, model_dir, prompts_path = build_fixtures(a, workdir)
    pairs = run_pairs(a, res, model_dir, prompts_path, workdir)
    res.update(pairs[-1])
    res["pairs"] = pairs
    ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
    res["median_ratio"] = common.median(ratios) if ratios else None
    print_report(res)
    if len(ratios) > 1:
        print(f"ratio r1lab/TRL per pair: {', '.join(f'{r:.2f}x' for r in ratios)}; "
              f"median over {len(ratios)} pairs: {res['median_ratio']:.2f}x")
    common.write_figures(a.json, res)


if __name__ == "__main__":
    main()
