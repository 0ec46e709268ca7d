"""Regenerate the measured results at HEAD: `python bench/readme_results.py [--demo] [--bench] [--tests]`.

Each part runs its commands, writes its figures with the date, commit and machine to bench/results/NAME.json, and
then every block between `<!-- results:NAME -->` and `<!-- /results:NAME -->` is rewritten from those files in the
page PAGES names for it: README.md for the headline figures (demo, bench, gpu), docs/benchmarks.md for the rest
(`--render` alone rewrites the blocks from the saved files without running anything). Nothing in those blocks is
edited by hand.

- demo:  `r1lab demo` and its random-reward control for each of --seeds (each seed pretrains its own base), held-out
         pass@1 / cons@8 / pass@8 / format / length before and after: mean and range over the seeds; wall times.
- demo_v3: the same with `--arch deepseek-v3` (MLA + MoE tiny base), with both tiny bases' parameters, active
         parameters, KV-cache bytes per token, and the expert load after pretraining.
- bench: `bench/grpo_vs_trl.py --pairs 3 --wait-quiet 120` (r1lab vs TRL on the same tiny model, CPU).
- realshape: `bench/grpo_gpu.py --cpu` (r1lab vs TRL at the Qwen2.5-0.5B shape on the CPU, fp32; rollout roofline).
- realshape_lora: the same with `--lora-rank 16` on both sides (TRL with peft), without the rollout-only timing.
- realshape_lora_bf16: the same LoRA run under bf16 autocast with each side's frozen base in bf16 (`--cpu-bf16
         --trl-weights bfloat16`: this CPU's bf16 matrix units; adapters, gradients and AdamW state in fp32).
- realshape_in_backward: `bench/grpo_gpu.py --cpu --optimizer-in-backward --no-rollout` (full fine-tuning, r1lab
         updating each parameter in the backward pass; neither side clips the gradient norm).
- lora_demo: the demo's GRPO (seed 0) with full fine-tuning and with LoRA (--lora-rank/--lora-alpha/--lora-lr) from
         the same base: held-out gains side by side.
- continuous: `bench/continuous_batching.py` (continuous batching against batch-at-a-time, same rows, one thread).
- speculative: `bench/speculative.py --wait-quiet 120` (the tiny V3 base with its MTP module: eval and GRPO rollout
         tokens/s with and without MTP drafts, acceptance, greedy completions compared); `--speculative-smoke` runs it
         at tiny sizes, a check that files no figures.
- async_grpo: `bench/async_grpo.py --wait-quiet 120` (the demo's GRPO with `--async-steps 0` and `1` over 3 seeds,
         sides alternating, and the random-reward control: wall times, their ratio, held-out pass@1 curves);
         `--async-grpo-smoke` runs it at tiny sizes, a check that files no figures.
- distill, pipeline: `r1lab distill` (from the seed-0 demo model) and `r1lab pipeline`, their results.json tables.
- serve: `bench/serve_load.py` (64 clients x 10 requests) and `bench/serve_load.py --flood`.
- distributed: `bench/distributed.py` (torchrun, 2 gloo ranks on the CPU: equal weights, FSDP memory per rank).
- gpu, gpu_lora: `bench/grpo_gpu.py` run on a lent GPU (no GPU here), full fine-tuning or `--lora-rank`:
       `--gpu FIGURES.json --gpu-commit C` files that run's figures with their date, commit and device.
- tests: wall time of the fast tier (`make test-fast`'s markers) and of the whole suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README, BENCHMARKS = Path("README.md"), Path("docs/benchmarks.md")
# the page each block lives on (from the repository's root): the README's headline results, every other figure in
# docs/benchmarks.md; a block is on its page once and on no other page (README.md, docs/*.md)
PAGES = {"demo": README, "bench": README, "gpu": README,
         **{name: BENCHMARKS for name in ("demo_v3", "demo_tools", "realshape", "realshape_in_backward",
                                          "realshape_lora", "realshape_lora_bf16", "gpu_lora", "lora_demo",
                                          "continuous", "speculative", "speculative_deep", "speculative_depths", "async_grpo", "distill", "pipeline", "serve", "distributed",
                                          "tests")}}
FIGURES = ("pass@1", "cons@8", "pass@8", "format_rate", "mean_length")


def machine() -> dict:
    """What the figures were measured on: they move with the CPU (see docs/benchmarks.md)."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def stamp() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    # what the figures depend on: the package, its configs and dependencies (not the docs or these scripts)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "r1lab", "configs",
                            "pyproject.toml"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"date": datetime.date.today().isoformat(), "commit": commit.stdout.strip() + ("+dirty" if dirty else ""),
            "machine": machine()}


def timed(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as out:
        subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------
# the parts


def run_demo(seeds: list[int], workdir: Path, arch: str = "dense", tools: str = "") -> dict:
    from r1lab.commands.demo import run_name

    runs, flags = [], ([] if arch == "dense" else ["--arch", arch]) + (["--tools", tools] if tools else [])
    for seed in seeds:
        out = workdir / f"demo-seed{seed}"
        shutil.rmtree(out, ignore_errors=True)  # demo reuses the stages it finds done: the wall time is a whole run's
        r1lab = [sys.executable, "-m", "r1lab", "demo", "--out", str(out), "--seed", str(seed), *flags]
        demo_s = timed(r1lab, workdir / f"{run_name('demo', arch, tools=tools)}-seed{seed}.log")
        control_s = timed(r1lab + ["--control", "random-reward"],
                          workdir / f"{run_name('control', arch, tools=tools)}-seed{seed}.log")
        grpo, control = out / run_name("grpo", arch, tools=tools), out / run_name("grpo", arch, "random-reward", tools)
        runs.append({"seed": seed, "demo_s": demo_s, "control_s": control_s,
                     "base": heldout(grpo, 0), "grpo": heldout(grpo, -1), "control": heldout(control, -1),
                     "curve": [e["pass@1"] for e in read_evals(grpo)],
                     "architecture": json.loads((out / run_name("base", arch, tools=tools) / "architecture.json").read_text())})
        print(f"seed {seed}: pass@1 {runs[-1]['base']['pass@1']:.1%} -> {runs[-1]['grpo']['pass@1']:.1%} "
              f"(control {runs[-1]['control']['pass@1']:.1%}), {demo_s:.0f} s + {control_s:.0f} s", flush=True)
    command = f"r1lab demo{' '.join([''] + flags)} --seed S; the same with --control random-reward"
    return {**stamp(), "command": command, "arch": arch, "tools": tools, "runs": runs,
            "dense_architecture": dense_facts()}


def run_lora_demo(workdir: Path, rank: int, alpha: float, lr: float) -> dict:
    """The demo's R1-Zero GRPO (seed 0) with full fine-tuning, and the same run from the same base with LoRA."""
    from r1lab.commands.stages import tiny_grpo_config
    from r1lab.config import save_config

    out = workdir / "lora-demo"
    demo = [sys.executable, "-m", "r1lab", "demo", "--out", str(out), "--seed", "0"]
    full_s = timed(demo, workdir / "lora-demo-full.log")
    lora_run = out / f"grpo-lora-r{rank}"
    lora_cfg = tiny_grpo_config(out / "base" / "model", lora_run, 60, seed=0, lr=lr, lora_rank=rank, lora_alpha=alpha)
    save_config(lora_cfg, workdir / "lora-demo.yaml")
    lora_s = timed([sys.executable, "-m", "r1lab", "grpo", "--config", str(workdir / "lora-demo.yaml")],
                   workdir / "lora-demo-lora.log")
    return {**stamp(), "command": f"r1lab demo --seed 0; r1lab grpo (the demo's preset) --lora-rank {rank} "
                                  f"--lora-alpha {alpha:g} --lr {lr:g} from the same base",
            "rank": rank, "alpha": alpha, "lr": lr, "full_lr": tiny_grpo_config("", "", 1).lr,
            "base": heldout(out / "grpo", 0), "full": heldout(out / "grpo", -1), "lora": heldout(lora_run, -1),
            "full_curve": [e["pass@1"] for e in read_evals(out / "grpo")],
            "lora_curve": [e["pass@1"] for e in read_evals(lora_run)], "full_s": full_s, "lora_s": lora_s}


def run_continuous(workdir: Path) -> dict:
    out = workdir / "continuous_batching.json"
    cmd = [sys.executable, "bench/continuous_batching.py", "--threads", "1", "--repeats", "3", "--json", str(out)]
    timed(cmd, workdir / "continuous_batching.log")
    return {**stamp(), "command": " ".join(["python"] + cmd[1:-2]), "figures": json.loads(out.read_text())}


def run_quiet_bench(workdir: Path, script: str, name: str, smoke: bool, extra: tuple = ()) -> dict:
    """bench/SCRIPT.py measured on a quiet CPU (--wait-quiet 120), or at its tiny sizes (--smoke), in workdir/NAME,
    with the extra arguments."""
    out = workdir / f"{name}.json"
    argv = [f"bench/{script}.py", *(["--smoke"] if smoke else ["--wait-quiet", "120"]), *extra]
    timed([sys.executable, *argv, "--workdir", str(workdir / name), "--json", str(out)], workdir / f"{script}.log")
    return {**stamp(), "command": "python " + " ".join(argv), "figures": json.loads(out.read_text())}


def render_async_grpo(d: dict) -> str:
    f, a = d["figures"], d["figures"]["args"]
    if a["smoke"]:  # tiny sizes: whether the bench runs, not a figure
        return (f"Not measured yet: `{d['command']}` ran on {d['date']} at commit `{d['commit']}` at tiny sizes "
                f"(a check that it runs, no figures); `python bench/readme_results.py --async-grpo` measures.")
    curve = lambda run: " / ".join(f"{100 * x:.1f}" for x in run["pass@1"])  # noqa: E731
    rows = [f"| {s['seed']} | {s['sync']['wall_s']:.1f} | {s['async']['wall_s']:.1f} | **{s['ratio']:.2f}x** | "
            f"{curve(s['sync'])} | {curve(s['async'])} |" for s in f["seeds"]]
    c = f["control"]
    return "\n".join([
        f"{measured(d)}, by `{d['command']}`: the demo's GRPO ({a['steps']} steps, held-out evaluation of "
        f"{a['eval_problems']} problems x 8 samples every {a['eval_every']} steps, {a['threads']} threads) with "
        "`--async-steps 0` and `1`, each a fresh process, the sides' order alternating; wall time of the whole "
        "command; held-out pass@1 (%) at each evaluation:", "",
        "| seed | sync (s) | async (s) | async / sync | held-out pass@1, sync | held-out pass@1, async |",
        "|---|---:|---:|---:|---|---|", *rows, "",
        f"Mean async / sync **{f['mean_ratio']:.2f}x**, final pass@1 async minus sync "
        f"{f['mean_final_gap_points']:+.1f} points (the bar: at most 0.8x, within 5 points: "
        f"{'met' if f['bar_met'] else '**not met**'}). The random-reward control (synchronous, seed {c['seed']}): "
        f"{c['wall_s']:.1f} s, held-out pass@1 {curve(c)}."])


SPECULATIVE_DEEP = ("--num-layers", "12", "--speculative-tokens", "1", "2", "--modes", "greedy", "greedy-8", "greedy-1",
                    "--grpo-steps", "0", "--serve-requests", "0", "--repeats", "5")  # the MTP layer 1/12 of the model, not 1/4
SPECULATIVE_DEPTHS = ("--mtp-depth", "2", *SPECULATIVE_DEEP)  # the second draft from the second depth
SPECULATIVE_MODES = {"greedy": "greedy, one sample", "greedy-8": "greedy, 8 prompts per generate call",
                     "greedy-1": "greedy, 1 prompt per generate call", "sampled": "sampled: temperature 0.6, top-p 0.95",
                     "rollout": "GRPO's sampling: temperature 1"}


def spread(mode: dict, side: str, median: float) -> str:
    """A side's median tokens/s and, where its runs were saved, their range: on a 2-core VM one process's decode
    speed differs from the next one's by up to a third, so a median of a few runs can mislead without it."""
    runs = mode.get("runs_tokens_per_s", {}).get(side)
    return f"{median:,.0f}" + (f" ({min(runs):,.0f}-{max(runs):,.0f})" if runs else "")


def render_speculative(d: dict) -> str:
    f, a = d["figures"], d["figures"]["args"]
    if a["smoke"]:  # tiny sizes: whether the bench runs, not a figure
        return (f"Not measured yet: `{d['command']}` ran on {d['date']} at commit `{d['commit']}` at tiny sizes "
                f"(a check that it runs, no figures); `python bench/readme_results.py --speculative` measures.")
    k = f", k = {a['samples']}"
    rate = lambda m, side: spread(f[m], side, f[m]["tokens_per_s"][side])  # noqa: E731
    rows = [f"| {label}{'' if m.startswith('greedy') else k} | {rate(m, 'none')} | {rate(m, 'mtp')} | "
            f"**{f[m]['speedup']:.2f}x** | {100 * f[m]['acceptance']:.1f}% | "
            f"{100 * f[m]['pass@1']['none']:.1f}% / {100 * f[m]['pass@1']['mtp']:.1f}% |"
            for m, label in SPECULATIVE_MODES.items() if m in f]
    same = "identical" if all(f[m]["same_completions"] for m in f if m.startswith("greedy")) else "**different**"
    drafts = a.get("speculative_tokens", [1])
    depth = a.get("mtp_depth", 1)
    more = [f"| {label}, {k} drafts a step{' (from the depths)' if int(k) <= depth else ''} | | "
            f"{spread(f[m], f'mtp-k{k}', x['tokens_per_s'])} | **{x['speedup']:.2f}x** | "
            f"{100 * x['acceptance']:.1f}% | |" for m, label in SPECULATIVE_MODES.items() if m in f
            for k, x in f[m].get("more_k", {}).items()]
    layers = a.get("num_layers", 4)
    lines = [f"{measured(d)}, by `{d['command']}`: the tiny DeepSeek-V3 base "
             f"({layers} layers{'' if layers == 4 else ', the demo base has 4'}) pretrained {a['pretrain_steps']} "
             f"steps with `--mtp-depth {depth}`, {drafts[0]} drafted token{'s' if drafts[0] > 1 else ''} a step, "
             f"`r1lab eval` on {a['problems']} held-out problems ({a['max_new_tokens']} tokens at "
             f"most; 64 prompts per generate call unless said), each side a fresh process, the median of "
             f"{a['repeats']} alternating runs (their range in brackets); generation tokens/s as eval's JSON reports "
             "it:", "",
             "| eval | tokens/s | with MTP drafts | speedup | acceptance | held-out pass@1 without / with |",
             "|---|---:|---:|---:|---:|---:|", *rows, *more, "",
             f"Greedy completions with and without MTP drafts: {same} ({a['problems']} compared in each run)."]
    if "grpo" in f:
        g = f["grpo"]
        lines.append(f"`r1lab grpo` from that base with the demo's preset, {a['grpo_steps']} steps: rollout "
                     f"{g['none']['rollout_tokens_per_s']:,.0f} tokens/s without drafts, "
                     f"{g['mtp']['rollout_tokens_per_s']:,.0f} with (**{g['speedup']:.2f}x**); acceptance per step "
                     + " / ".join(f"{100 * x:.0f}" for x in g["mtp"]["acceptance"]) + " (%; GRPO does not train "
                     "the module)." + ("" if "heldout" not in g["none"] else " Held-out pass@1 at steps " + " / ".join(
                         str(step) for step, _ in g["none"]["heldout"]) + ": " + "; ".join(
                         f"{'without' if side == 'none' else 'with'} drafts " + " / ".join(
                             f"{100 * p:.1f}%" for _, p in g[side]["heldout"]) for side in ("none", "mtp")) + "."))
    if "serve" in f:
        phases = f["serve"]["phases"]
        lines.append(f"`r1lab serve --speculative mtp` against `none` from that base, {a['serve_requests']} greedy chat "
                     "completions of held-out questions per phase: " + "; ".join(
                         f"{name}, {p['tokens_per_s']['none']:,.0f} -> {p['tokens_per_s']['mtp']:,.0f} tokens/s "
                         f"(**{p['tokens_per_s']['mtp'] / p['tokens_per_s']['none']:.2f}x**)"
                         for name, p in phases.items()) + f"; acceptance {100 * f['serve']['acceptance']:.1f}%; "
                     "completions " + ("identical" if all(p["same_completions"] for p in phases.values())
                                       else "**different**") + " with and without drafts.")
    return "\n".join(lines)


def render_continuous(d: dict) -> str:
    f, a = d["figures"], d["figures"]["args"]
    rate = f["tokens_per_s"]
    return (f"{measured(d)}, by `{d['command']}`: {a['prompts']} prompts x {a['samples']} samples on a "
            f"{a['hidden']}-wide, {a['layers']}-layer model, per-prompt limits {a['min_new']}-{a['max_new']} tokens "
            f"(completions of {f['min_length']}-{f['max_length']} tokens, {f['tokens']:,} in all), {a['slots']} rows "
            f"on both sides, one thread: batch-at-a-time {rate['batch-at-a-time']:,.0f} completion tokens/s, continuous "
            f"batching {rate['continuous']:,.0f} (**{f['speedup']:.2f}x**), the same tokens; all {a['prompts'] * a['samples']} "
            f"at once, without a bound on the cache: {rate['all at once']:,.0f}.")


def render_lora_demo(d: dict) -> str:
    base, full, lora = (d[k]["pass@1"] for k in ("base", "full", "lora"))
    return (f"{measured(d)}, by `python bench/readme_results.py --lora-demo` (`{d['command']}`): held-out pass@1 "
            f"{100 * base:.1f}% -> {100 * full:.1f}% with full fine-tuning (lr {d['full_lr']:g}), -> "
            f"**{100 * lora:.1f}%** with LoRA rank {d['rank']}, alpha {d['alpha']:g}, lr {d['lr']:g}: "
            f"{(lora - base) / (full - base):.0%} of full fine-tuning's gain in the same 60 steps. Held-out pass@1 "
            f"every 10 steps, full: {' / '.join(f'{100 * p:.0f}' for p in d['full_curve'])}; LoRA: "
            f"{' / '.join(f'{100 * p:.0f}' for p in d['lora_curve'])} (%).")


def dense_facts() -> dict:
    """The dense tiny base's parameters and cache bytes, from its default settings (nothing trained)."""
    from r1lab.commands.pretrain import tiny_model_config
    from r1lab.config import PretrainConfig
    from r1lab.model.facts import architecture_facts
    from r1lab.model.tokenizer import build_tiny_tokenizer
    from r1lab.model.transformer import CausalLM

    return architecture_facts(CausalLM(tiny_model_config(PretrainConfig(), build_tiny_tokenizer())))


def read_evals(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["split"] == "heldout"]


def heldout(run: Path, which: int) -> dict:
    files = sorted((run / "eval").glob("step_*.json"))
    figures = json.loads(files[which].read_text())["heldout"]
    return {k: figures[k] for k in FIGURES + ("tool_calls",) if k in figures}


def run_bench(workdir: Path) -> dict:
    out = workdir / "grpo_vs_trl.json"
    cmd = [sys.executable, "bench/grpo_vs_trl.py", "--pairs", "3", "--wait-quiet", "120", "--json", str(out)]
    seconds = timed(cmd, workdir / "grpo_vs_trl.log")
    return {**stamp(), "command": "python bench/grpo_vs_trl.py --pairs 3 --wait-quiet 120", "seconds": seconds,
            "figures": json.loads(out.read_text())}


def run_realshape(workdir: Path) -> dict:
    out = workdir / "grpo_realshape.json"
    cmd = [sys.executable, "bench/grpo_gpu.py", "--cpu", "--workdir", str(workdir / "realshape"), "--json", str(out)]
    seconds = timed(cmd, workdir / "grpo_realshape.log")
    return {**stamp(), "command": "python bench/grpo_gpu.py --cpu", "seconds": seconds,
            "figures": json.loads(out.read_text())}


REALSHAPE_LORA = ["bench/grpo_gpu.py", "--cpu", "--lora-rank", "16", "--lora-alpha", "32", "--no-rollout"]


REALSHAPE_LORA_BF16 = [*REALSHAPE_LORA, "--cpu-bf16", "--trl-weights", "bfloat16"]


REALSHAPE_IN_BACKWARD = ["bench/grpo_gpu.py", "--cpu", "--optimizer-in-backward", "--no-rollout"]


def run_realshape_lora(workdir: Path, argv: list[str] = REALSHAPE_LORA, name: str = "grpo_realshape_lora") -> dict:
    """A run of bench/grpo_gpu.py with argv (LoRA by default; the optimizer-in-backward part too)."""
    out = workdir / f"{name}.json"
    cmd = [sys.executable, *argv, "--workdir", str(workdir / "realshape"), "--json", str(out)]
    seconds = timed(cmd, workdir / f"{name}.log")
    return {**stamp(), "command": "python " + " ".join(argv), "seconds": seconds,
            "figures": json.loads(out.read_text())}


def render_pair(d: dict, setup: str, trl_name: str, after: str = "") -> str:
    """Both sides' completion tokens/s and peak RSS from one bench/grpo_gpu.py run, with its setup and r1lab's
    phases (the LoRA and optimizer-in-backward parts)."""
    f = d["figures"]
    r1, trl = f["r1lab"], f["trl"]
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in r1["phase_s"].items() if v >= 0.05)
    return "\n".join([
        f"{measured(d)}, by `{d['command']}` ({setup}):",
        "", f"| | r1lab | {trl_name} | r1lab / TRL |", "|---|---:|---:|---:|",
        f"| completion tokens/s, end to end | {r1['tokens_per_s']:.1f} | {trl['tokens_per_s']:.1f} | "
        f"**{f['ratio']:.2f}x** |",
        f"| peak RSS (MB) | {r1['peak_rss_mb']:,.0f} | {trl['peak_rss_mb']:,.0f} | "
        f"**{r1['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x** |", "",
        f"r1lab's step: {phases}{after}."])


def render_realshape_lora(d: dict) -> str:
    bf16 = ("; bf16 autocast, each side's frozen base in bf16, adapters and their optimizer in fp32"
            if "--cpu-bf16" in d["command"] else "")
    return render_pair(d, "LoRA rank 16 on every linear layer but the head; TRL with peft" + bf16, "TRL + peft")


def render_realshape_in_backward(d: dict) -> str:
    return render_pair(d, "full fine-tuning, fp32; r1lab `--optimizer-in-backward true --max-grad-norm 0`, TRL "
                          "`max_grad_norm=0`: neither side clips", "TRL",
                       " (the optimizer's work is inside the backward pass)")


def run_distill(workdir: Path) -> dict:
    teacher = workdir / "demo-seed0" / "grpo" / "model"
    if not teacher.exists():
        raise SystemExit(f"{teacher} is missing: run --demo (seed 0) first")
    out = workdir / "distill"
    seconds = timed([sys.executable, "-m", "r1lab", "distill", "--teacher", str(teacher), "--out", str(out)],
                    workdir / "distill.log")
    return {**stamp(), "command": "r1lab distill --teacher DEMO_SEED0/grpo/model", "seconds": seconds,
            "results": json.loads((out / "results.json").read_text())}


def run_pipeline(workdir: Path) -> dict:
    out = workdir / "pipeline"
    seconds = timed([sys.executable, "-m", "r1lab", "pipeline", "--out", str(out)], workdir / "pipeline.log")
    return {**stamp(), "command": "r1lab pipeline", "seconds": seconds,
            **json.loads((out / "results.json").read_text())}


def run_serve(workdir: Path) -> dict:
    figures = {}
    for name, extra in (("load", []), ("flood", ["--flood"]), ("mixed", ["--mixed"])):
        out = workdir / f"serve-{name}.json"
        timed([sys.executable, "bench/serve_load.py", "--json", str(out), *extra], workdir / f"serve-{name}.log")
        figures[name] = json.loads(out.read_text())
    return {**stamp(), "command": "python bench/serve_load.py; python bench/serve_load.py --flood; "
                                  "python bench/serve_load.py --mixed", **figures}


def run_distributed(workdir: Path) -> dict:
    out = workdir / "distributed.json"
    cmd = [sys.executable, "bench/distributed.py", "--workdir", str(workdir / "distributed"), "--json", str(out)]
    seconds = timed(cmd, workdir / "distributed.log")
    return {**stamp(), "command": "python bench/distributed.py", "seconds": seconds,
            "figures": json.loads(out.read_text())}


def run_tests(workdir: Path) -> dict:
    # -o addopts= : the project's own -q plus this one would hide the "N passed in S s" line read below
    pytest = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", "tests"]
    fast = timed(pytest + ["-m", make_variable("FAST"), *make_variable("FAST_WORKERS").split()],
                 workdir / "tests-fast.log")
    full = timed(pytest, workdir / "tests-full.log")
    return {**stamp(), "fast_s": fast, "full_s": full, "fast_workers": make_variable("FAST_WORKERS"),
            "fast_summary": last_line(workdir / "tests-fast.log"), "full_summary": last_line(workdir / "tests-full.log")}


def make_variable(name: str) -> str:
    """A variable of `make test-fast` (its markers, its workers), read from the Makefile, so the figure is that
    command's."""
    makefile = (ROOT / "Makefile").read_text()
    return next(line.split(":=", 1)[1].strip() for line in makefile.splitlines() if line.startswith(f"{name} :="))


def last_line(path: Path) -> str:
    return [line for line in path.read_text().splitlines() if line.strip()][-1].strip("= ")


# ---------------------------------------------------------------------------------------------------------------
# rendering


def pct_range(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{100 * mean:.1f}% ({100 * min(values):.1f}–{100 * max(values):.1f})"


def num_range(values: list[float]) -> str:
    return f"{sum(values) / len(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def render_demo_tools(d: dict) -> str:
    """The tool demo: the demo's table and lines, then the tool calls per held-out sample before and after."""
    calls = {part: [r[part].get("tool_calls", 0.0) for r in d["runs"]] for part in ("base", "grpo", "control")}
    return render_demo(d) + ("\n- Tool calls per held-out sample: base " + num_range(calls["base"]) + ", after R1-Zero "
                             "GRPO " + num_range(calls["grpo"]) + ", after the control " + num_range(calls["control"])
                             + ".")


def render_demo_v3(d: dict) -> str:
    """The DeepSeek-V3-style demo: the same table and lines as the dense one, then both tiny bases' costs."""
    facts = [r["architecture"] for r in d["runs"]]
    dense = d["dense_architecture"]
    load = [f["moe/load_max_over_mean"] for f in facts]
    lines = [render_demo(d), "",
             "| tiny base | parameters | active per token | KV-cache bytes per token (bf16) | "
             "expert load max/mean after pretraining |", "|---|---:|---:|---:|---:|",
             f"| dense (Qwen2 format, GQA) | {dense['parameters']:,} | {dense['active_parameters']:,} | "
             f"{dense['kv_cache_bytes_per_token_bf16']:,} | - |",
             f"| deepseek-v3 (MLA + MoE) | {facts[0]['parameters']:,} | {facts[0]['active_parameters']:,} | "
             f"{facts[0]['kv_cache_bytes_per_token_bf16']:,} ({facts[0]['kv_cache_bytes_per_token_bf16'] / facts[0]['multi_head_kv_cache_bytes_per_token_bf16']:.2f}x multi-head's "
             f"{facts[0]['multi_head_kv_cache_bytes_per_token_bf16']:,}) | {num_range(load) if len(load) > 1 else f'{load[0]:.2f}'} |"]
    return "\n".join(lines)


def render_demo(d: dict) -> str:
    runs, m = d["runs"], d["machine"]
    v3 = d.get("arch", "dense") != "dense"
    part = "-v3" if v3 else "-tools" if d.get("tools") else ""
    flags = " --arch deepseek-v3" if v3 else " --tools python" if d.get("tools") else ""
    rows = [("pass@1", "pass@1"), ("cons@8", "cons@8"), ("pass@8", "pass@8"), ("format rate", "format_rate"),
            ("mean completion length (tokens)", "mean_length")]
    lines = [f"Measured on {d['date']} at commit `{d['commit']}` on {m['cpu']} ({m['cores']} cores, torch {m['torch']}, "
             f"kernels {m['aten_cpu_capability']}), by `python bench/readme_results.py --demo{part}`. Seeds "
             f"{', '.join(str(r['seed']) for r in runs)}: mean (min–max).", "",
             "| | base (pretrained) | after R1-Zero GRPO | after GRPO with shuffled rewards (control) |",
             "|---|---:|---:|---:|"]
    for label, key in rows:
        fmt = num_range if key == "mean_length" else pct_range
        lines.append(f"| {label} | " + " | ".join(fmt([r[part][key] for r in runs])
                                                 for part in ("base", "grpo", "control")) + " |")
    gains = [r["grpo"]["pass@1"] - r["base"]["pass@1"] for r in runs]
    control = [r["control"]["pass@1"] - r["base"]["pass@1"] for r in runs]
    lines += ["", f"- Held-out pass@1 gain: {100 * sum(gains) / len(gains):+.1f} points on average "
                  f"({', '.join(f'{100 * g:+.1f}' for g in gains)} per seed); the random-reward control: "
                  f"{100 * sum(control) / len(control):+.1f} ({', '.join(f'{100 * g:+.1f}' for g in control)}).",
              f"- Wall time of `r1lab demo{flags}`: {num_range([r['demo_s'] for r in runs])} s; the control, reusing the "
              f"base: {num_range([r['control_s'] for r in runs])} s.",
              "- Held-out pass@1 at each evaluation (every 10 steps; the tool demo every 20): " + "; ".join(
                  f"seed {r['seed']}: " + " / ".join(f"{100 * p:.0f}" for p in r["curve"]) for r in runs) + " (%)."]
    return "\n".join(lines)


def render_bench(d: dict) -> str:
    pairs = d["figures"]["pairs"]
    r1lab = [p["r1lab"]["tokens_per_s"] for p in pairs]
    trl = [p["trl"]["tokens_per_s"] for p in pairs]
    rss = {side: [p[side]["peak_rss_mb"] / 1000 for p in pairs] for side in ("r1lab", "trl")}
    return (f"{measured(d)}, by `{d['command']}`: r1lab {min(r1lab):,.0f}–{max(r1lab):,.0f} completion tokens/s "
            f"against TRL's {min(trl):,.0f}–{max(trl):,.0f} over {len(pairs)} alternating pairs, per-pair ratios "
            f"{', '.join(format(p['ratio'], '.2f') for p in pairs)}, median **{d['figures']['median_ratio']:.2f}x**; peak "
            f"memory r1lab {min(rss['r1lab']):.2f}–{max(rss['r1lab']):.2f} GB, TRL {min(rss['trl']):.2f}–"
            f"{max(rss['trl']):.2f} GB.")


def render_realshape(d: dict) -> str:
    f = d["figures"]
    r1, trl, ro = f["r1lab"], f["trl"], f["rollout"]
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in r1["phase_s"].items() if v >= 0.05)
    return "\n".join([
        f"{measured(d)}, by `{d['command']}` (both sides in one run):",
        "",
        "| | r1lab | TRL | r1lab / TRL |",
        "|---|---:|---:|---:|",
        f"| completion tokens/s, end to end | {r1['tokens_per_s']:.1f} | {trl['tokens_per_s']:.1f} | "
        f"**{f['ratio']:.2f}x** |",
        f"| rollout phase tokens/s | {r1['rollout_tokens_per_s']:.1f} | {trl['rollout_tokens_per_s']:.1f} | "
        f"{r1['rollout_tokens_per_s'] / trl['rollout_tokens_per_s']:.2f}x |",
        f"| peak RSS (MB) | {r1['peak_rss_mb']:,.0f} | {trl['peak_rss_mb']:,.0f} | "
        f"**{r1['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x** |",
        "",
        f"r1lab's step: {phases}. Its engine alone at that batch: {ro['tokens_per_s']:.0f} tokens/s, "
        f"{100 * ro['share_of_roofline_floor']:.0f}% of the roofline floor the bench derives from the measured copy "
        f"rate ({ro['copy_bytes_per_s'] / 1e9:.0f} GB/s) and matmul rate ({ro['matmul_flops_per_s'] / 1e9:.0f} "
        f"GFLOP/s).{step_floor_sentence(r1)}",
    ])


def step_floor_sentence(r1: dict) -> str:
    """The whole step's floor at the same rates, phase by phase (bench/grpo_gpu.py's step_floors), when measured."""
    floor = r1.get("floor_s")
    if not floor:
        return ""
    seconds = sum(r1["phase_s"].values())
    parts = ", ".join(f"{k} {100 * floor[k] / r1['phase_s'][k]:.0f}%" for k in ("rollout", "forward_backward",
                                                                               "optimizer"))
    drift = any(floor[k] > v for k, v in r1["phase_s"].items() if k in floor)
    return (f" The step's floor at those rates (rollout roofline, forward and backward products at the matmul rate, "
            f"AdamW's 28 bytes per parameter at the copy rate) is {sum(floor.values()):.1f} s; r1lab's step reaches "
            f"{100 * sum(floor.values()) / seconds:.0f}% of it ({parts})"
            + ("; the rates are measured in another child, and a phase past 100% says the machine's speed drifted "
               "between the two." if drift else "."))


def render_distributed(d: dict) -> str:
    f = d["figures"]
    rows = [f"| {name} | {s['seconds']:.1f} | {s['max_abs_diff']:.1e} | {s['weights']:.2f} | {s['gradients']:.2f} | "
            f"{s['optimizer']:.2f} |" for name, s in f["sides"].items()]
    return "\n".join([
        f"{measured(d)}, by `{d['command']}`: GRPO, {f['steps']} steps of 8 prompts x 8 samples on a "
        f"{f['parameters']:,}-parameter model, the same global batch and seed on each side (gloo, one thread a rank):",
        "", "| | wall s | max \\|Δw\\| vs one process | weights MB | gradients MB | AdamW state MB |",
        "|---|---:|---:|---:|---:|---:|", *rows, "",
        f"Memory columns: rank 0's share. A checkpoint of the {f['ranks']}-rank run resumed in one process ends "
        f"{f['resume_in_one_max_abs_diff']:.1e} from the {f['ranks']}-rank run continued; the held-out evaluation "
        f"sharded over {f['ranks']} ranks {'equals' if f['eval_equal'] else 'DIFFERS from'} one process's, figure for "
        f"figure. On 2 cores, 2 ranks of one thread each are slower than one process of two threads: the figures are "
        f"about equality and memory, not speed."])


def import_gpu(figures: Path, commit: str, date: str) -> dict:
    """A GPU run of bench/grpo_gpu.py made elsewhere (the machines here have none), filed with its provenance."""
    f = json.loads(figures.read_text())
    args = f["args"]
    r1 = f["r1lab"]  # runs filed before grpo_gpu.py took r1lab's peak from its phases: the same correction
    if r1.get("phase_peak_gb"):
        peaks = [v for k, v in r1["phase_peak_gb"].items() if not k.startswith("rank_")]
        r1["memory"]["max_allocated"] = max(r1["memory"]["max_allocated"], 1e9 * max(peaks))
    lora = f" --lora-rank {args['lora_rank']} --lora-alpha {args['lora_alpha']:g}" if args.get("lora_rank") else ""
    rollout = " --no-rollout" if args.get("no_rollout") else ""
    return {"date": date, "commit": commit, "device": f["device"], "versions": f["versions"],
            "command": f"python bench/grpo_gpu.py --rounds {args['rounds']}{lora}{rollout}", "figures": f}


def render_gpu(d: dict) -> str:
    f = d["figures"]
    r1, trl, ro, w = f["r1lab"], f["trl"], f.get("rollout"), f["workload"]
    return "\n".join([
        f"Measured on {d['date']} at commit `{d['commit']}` on one {d['device']} (torch {d['versions']['torch']}, "
        f"transformers {d['versions']['transformers']}, TRL {d['versions']['trl']}), by `{d['command']}`: the "
        f"Qwen2.5-0.5B shape ({f['model']['params']:,} parameters, random init), bf16, {w['prompts_per_step']} "
        f"prompts x G = {w['samples_per_prompt']}, {w['prompt_tokens']}-token prompts, {w['max_new_tokens']} "
        f"completion tokens, {f['args']['updates']} updates per round, both sides in one run:",
        "", "| | r1lab | TRL | r1lab / TRL |", "|---|---:|---:|---:|",
        f"| completion tokens/s, end to end | {r1['tokens_per_s']:,.0f} | {trl['tokens_per_s']:,.0f} | "
        f"**{f['ratio']:.2f}x** |",
        f"| rollout phase tokens/s | {r1['rollout_tokens_per_s']:,.0f} | {trl['rollout_tokens_per_s']:,.0f} | "
        f"{r1['rollout_tokens_per_s'] / trl['rollout_tokens_per_s']:.2f}x |",
        f"| peak GPU memory allocated (GiB) | {r1['memory']['max_allocated'] / 2**30:.2f} | "
        f"{trl['memory']['max_allocated'] / 2**30:.2f} | "
        f"**{r1['memory']['max_allocated'] / trl['memory']['max_allocated']:.2f}x** |",
        f"| peak GPU memory reserved (GiB) | {r1['memory']['max_reserved'] / 2**30:.2f} | "
        f"{trl['memory']['max_reserved'] / 2**30:.2f} | "
        f"{r1['memory']['max_reserved'] / trl['memory']['max_reserved']:.2f}x |", "",
        (f"r1lab's engine alone at that batch: {ro['tokens_per_s']:,.0f} tokens/s, "
         f"{100 * ro['share_of_bandwidth_floor']:.1f}% of the bandwidth floor: far from the GPU's limit yet." if ro else
         f"LoRA rank {f['args']['lora_rank']}, alpha {f['args']['lora_alpha']:g}, on every linear layer but the head "
         f"(TRL: peft's LoraConfig). r1lab's peak is its forward and backward pass "
         f"({r1['phase_peak_gb']['forward_backward']:.1f} GB), where it holds "
         f"{r1['held_mb']['weights'] / 1024:.2f} GiB of weights and "
         f"{(r1['held_mb']['gradients'] + r1['held_mb']['optimizer']) / 1024:.2f} GiB of adapter gradients and AdamW "
         f"state: the activations of a {f['args']['micro_batch_size']}-sequence micro-batch are the rest.")])


def render_tests(d: dict) -> str:
    workers = f" (pytest {d['fast_workers']})" if d.get("fast_workers") else ""
    return (f"Measured on {d['date']} at commit `{d['commit']}` on {d['machine']['cpu']} ({d['machine']['cores']} "
            f"cores): `make test-fast` {d['fast_s']:.0f} s{workers} ({d['fast_summary']}); `make test` (the whole suite, what "
            f"CI runs) {d['full_s']:.0f} s ({d['full_summary']}).")


def measured(d: dict) -> str:
    m = d["machine"]
    return f"Measured on {d['date']} at commit `{d['commit']}` on {m['cpu']} ({m['cores']} cores)"


def figure_table(results: dict[str, dict], rows: list[tuple[str, str]]) -> list[str]:
    lines = ["| | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
    for label, key in rows:
        cells = []
        for figures in results.values():
            value = figures.get(key)
            cells.append("-" if value is None else f"{value:,}" if key == "parameters"
                         else f"{value:.1f}" if key == "mean_length" else f"{100 * value:.1f}%")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def render_distill(d: dict) -> str:
    rows = [("parameters", "parameters"), ("pass@1", "pass@1"), ("cons@8", "cons@8"),
            ("mean completion length (tokens)", "mean_length")]
    seconds = {k: v.get("training_seconds") for k, v in d["results"].items() if v.get("training_seconds")}
    return "\n".join([f"{measured(d)}, by `{d['command']}` ({d['seconds']:.0f} s in all):", "",
                      *figure_table(d["results"], rows), "",
                      "Training time of the students: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + "."])


def render_pipeline(d: dict) -> str:
    rows = [("pass@1", "pass@1"), ("cons@8", "cons@8"), ("format rate", "format_rate"),
            ("language consistency", "language_consistency"), ("mean length (tokens)", "mean_length")]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in d["stage_seconds"].items())
    return "\n".join([f"{measured(d)}, by `{d['command']}` ({d['seconds']:.0f} s in all):", "",
                      *figure_table(d["results"], rows), "", f"Stage times: {stages}."])


def render_serve(d: dict) -> str:
    load, flood = d["load"]["phases"], d["flood"]["phases"]
    concurrent, alone = load["concurrent"], load["one at a time"]
    return (f"{measured(d)}, by `{d['command']}`: 64 concurrent clients x 10 chat requests of 64 tokens, "
            f"{concurrent['errors']} errors, p50/p99 latency {1000 * concurrent['p50_latency_s']:,.0f} / "
            f"{1000 * concurrent['p99_latency_s']:,.0f} ms, {concurrent['tokens_per_s']:,.0f} completion tokens/s "
            f"against {alone['tokens_per_s']:,.0f} one request at a time (**{d['load']['ratio']:.1f}x**). Under a "
            f"flood (one client's 128 prompts x 2,000 tokens), another client's small requests took "
            f"{1000 * flood['under flood']['p50_latency_s']:,.0f} ms at the median against "
            f"{1000 * flood['alone']['p50_latency_s']:,.0f} ms alone (**{d['flood']['ratio']:.2f}x**)."
            + (render_serve_mixed(d["mixed"]) if "mixed" in d else ""))


def render_serve_mixed(mixed: dict) -> str:
    idle, busy = mixed["phases"]["idle"], mixed["phases"]["long ones running"]
    return (f" While another client's 16 completions of 1,000 tokens ran, short requests' p50/p99 was "
            f"{1000 * busy['p50_latency_s']:,.0f} / {1000 * busy['p99_latency_s']:,.0f} ms against "
            f"{1000 * idle['p50_latency_s']:,.0f} / {1000 * idle['p99_latency_s']:,.0f} ms on an idle server "
            f"(p99 **{mixed['p99_ratio']:.2f}x**, {mixed['errors']} errors).")


RENDERERS = {"demo": render_demo, "demo_v3": render_demo_v3, "demo_tools": render_demo_tools, "bench": render_bench, "realshape": render_realshape,
             "realshape_lora": render_realshape_lora, "realshape_lora_bf16": render_realshape_lora,
             "realshape_in_backward": render_realshape_in_backward, "lora_demo": render_lora_demo, "continuous": render_continuous,
             "speculative": render_speculative, "speculative_deep": render_speculative,
             "speculative_depths": render_speculative, "async_grpo": render_async_grpo, "distill": render_distill, "pipeline": render_pipeline,
             "serve": render_serve, "distributed": render_distributed, "gpu": render_gpu, "gpu_lora": render_gpu,
             "tests": render_tests}


def block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- results:{name} -->)\n.*?(<!-- /results:{name} -->)", re.S)


def render_pages(root: Path = ROOT, results: Path = RESULTS) -> dict[Path, str]:
    """The text of every page under root (README.md, docs/*.md; paths relative to root) with each block whose
    figures are filed in `results` rewritten on its page (PAGES). A block missing from its page, or also on another
    page, stops it: every figure lives in one place."""
    pages = [README, *sorted(p.relative_to(root) for p in (root / "docs").glob("*.md"))]
    texts = {page: (root / page).read_text() for page in pages if (root / page).exists()}
    for name, render in RENDERERS.items():
        path = results / f"{name}.json"
        if not path.exists():
            continue
        block = block_pattern(name)
        found = {page: len(block.findall(text)) for page, text in texts.items() if block.search(text)}
        if found != {PAGES[name]: 1}:
            raise SystemExit(f"the <!-- results:{name} --> block belongs on {PAGES[name]}, once, and nowhere else; "
                             f"found: {', '.join(f'{page} ({n}x)' for page, n in found.items()) or 'none'}")
        body = render(json.loads(path.read_text()))
        texts[PAGES[name]] = block.sub(lambda m: f"{m.group(1)}\n{body}\n{m.group(2)}", texts[PAGES[name]])
    return texts


def render_readme(root: Path = ROOT, results: Path = RESULTS) -> list[Path]:
    """Rewrite the blocks of README.md and docs/benchmarks.md from bench/results/*.json; the pages changed."""
    changed = []
    for page, text in render_pages(root, results).items():
        if (root / page).read_text() != text:
            (root / page).write_text(text)
            changed.append(page)
    return changed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", action="store_true")
    p.add_argument("--demo-v3", action="store_true")
    p.add_argument("--demo-tools", action="store_true")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--realshape", action="store_true")
    p.add_argument("--realshape-lora", action="store_true")
    p.add_argument("--realshape-lora-bf16", action="store_true")
    p.add_argument("--realshape-in-backward", action="store_true")
    p.add_argument("--lora-demo", action="store_true")
    p.add_argument("--lora-rank", type=int, default=16, help="--lora-demo's adapter rank")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="--lora-demo's alpha")
    p.add_argument("--lora-lr", type=float, default=3e-4, help="--lora-demo's learning rate")
    p.add_argument("--continuous", action="store_true")
    p.add_argument("--speculative", action="store_true")
    p.add_argument("--speculative-smoke", action="store_true", help="--speculative at tiny sizes: a check, no figures")
    p.add_argument("--speculative-deep", action="store_true", help="--speculative's greedy evaluations on a 12-layer "
                   "base, drafting 1 and 2 tokens a step")
    p.add_argument("--speculative-depths", action="store_true", help="--speculative-deep with a base of 2 MTP depths "
                   "(--mtp-depth 2): 2 drafts a step come from the 2 depths")
    p.add_argument("--async-grpo", action="store_true")
    p.add_argument("--async-grpo-smoke", action="store_true", help="--async-grpo at tiny sizes: a check, no figures")
    p.add_argument("--distill", action="store_true")
    p.add_argument("--pipeline", action="store_true")
    p.add_argument("--serve", action="store_true")
    p.add_argument("--distributed", action="store_true")
    p.add_argument("--tests", action="store_true")
    p.add_argument("--render", action="store_true",
                   help="only rewrite the blocks in README.md and docs/benchmarks.md from bench/results/*.json")
    p.add_argument("--gpu", type=Path, help="file the figures.json of a GPU run of bench/grpo_gpu.py")
    p.add_argument("--gpu-commit", help="the commit that GPU run ran at")
    p.add_argument("--gpu-date", default=datetime.date.today().isoformat(), help="the day it ran")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "readme-results")
    a = p.parse_args(argv)
    a.speculative |= a.speculative_smoke
    a.async_grpo |= a.async_grpo_smoke
    a.workdir.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    parts = {"demo": lambda: run_demo(a.seeds, a.workdir),
             "demo_v3": lambda: run_demo(a.seeds, a.workdir, "deepseek-v3"),
             "demo_tools": lambda: run_demo(a.seeds, a.workdir, tools="python"), "bench": lambda: run_bench(a.workdir),
             "realshape": lambda: run_realshape(a.workdir), "realshape_lora": lambda: run_realshape_lora(a.workdir),
             "realshape_lora_bf16": lambda: run_realshape_lora(a.workdir, REALSHAPE_LORA_BF16,
                                                               "grpo_realshape_lora_bf16"),
             "realshape_in_backward": lambda: run_realshape_lora(a.workdir, REALSHAPE_IN_BACKWARD,
                                                                 "grpo_realshape_in_backward"),
             "continuous": lambda: run_continuous(a.workdir),
             "speculative": lambda: run_quiet_bench(a.workdir, "speculative", "speculative", a.speculative_smoke),
             "speculative_deep": lambda: run_quiet_bench(a.workdir, "speculative", "speculative-deep", False, SPECULATIVE_DEEP),
             "speculative_depths": lambda: run_quiet_bench(a.workdir, "speculative", "speculative-depths", False,
                                                           SPECULATIVE_DEPTHS),
             "async_grpo": lambda: run_quiet_bench(a.workdir, "async_grpo", "async-grpo", a.async_grpo_smoke),
             "lora_demo": lambda: run_lora_demo(a.workdir, a.lora_rank, a.lora_alpha, a.lora_lr),
             "distill": lambda: run_distill(a.workdir), "pipeline": lambda: run_pipeline(a.workdir),
             "serve": lambda: run_serve(a.workdir), "distributed": lambda: run_distributed(a.workdir),
             "tests": lambda: run_tests(a.workdir)}
    if a.gpu:
        filed = import_gpu(a.gpu, a.gpu_commit, a.gpu_date)
        name = "gpu_lora" if filed["figures"]["args"].get("lora_rank") else "gpu"
        (RESULTS / f"{name}.json").write_text(json.dumps(filed, indent=2) + "\n")
    for name, run in parts.items():
        if getattr(a, name):
            (RESULTS / f"{name}.json").write_text(json.dumps(run(), indent=2) + "\n")
    changed = render_readme()
    print(f"results blocks in {', '.join(sorted({str(page) for page in PAGES.values()}))} rendered from "
          f"{RESULTS.relative_to(ROOT)}; changed: {', '.join(map(str, changed)) or 'none'}")


if __name__ == "__main__":
    main()
