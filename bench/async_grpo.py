#!/usr/bin/env python
"""Async GRPO against synchronous GRPO: the demo's run with `--async-steps 0` and `--async-steps 1`, side by side.

The base: the demo's (`runs/demo/base/model`, made by `make demo`), or, where there is none, a base pretrained the
way the demo pretrains it (`r1lab pretrain`, 600 steps, seed 0) into WORKDIR. The runs: for each of `--seeds`, the
demo's GRPO config (`tiny_grpo_config`, as `r1lab demo --seed S` writes it: 60 steps, 16 prompts x 8 samples,
held-out evaluation of 200 problems x 8 samples every 10 steps) run as `r1lab grpo --config CONFIG --async-steps 0`
and `--async-steps 1`, each a fresh process, the two sides' order alternating from seed to seed; then the
random-reward control (`--control random-reward`, synchronous, the first seed). Reported per seed: each side's wall
time (the whole command, start-up and the final evaluation included), async / sync, and the held-out pass@1 at each
evaluation (eval.jsonl); over the seeds, the mean ratio and the mean gap of the final pass@1, against the issue's bar
(at most 0.8x the synchronous wall time, the final pass@1 within 5 points).

    python bench/async_grpo.py --wait-quiet 120 --json runs/async-grpo/figures.json
    python bench/async_grpo.py --smoke        # tiny sizes, a minute or two: checks that the script runs, measures nothing

Run it on an otherwise quiet machine: a neighbour's load moves the wall times (each run's "other procs" is reported).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

r1lab = common.r1lab_command

SIDES = {"sync": 0, "async": 1}  # side -> --async-steps
BAR_RATIO, BAR_POINTS = 0.8, 5.0
SMOKE = dict(pretrain_steps=20, steps=4, eval_every=2, eval_problems=8, seeds=[0])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=common.REPO_ROOT / "runs" / "async-grpo")
    p.add_argument("--base", type=Path, default=common.REPO_ROOT / "runs" / "demo" / "base" / "model",
                   help="the demo's base; built in WORKDIR when missing")
    p.add_argument("--pretrain-steps", type=int, default=600, help="a base built here: its steps (the demo's 600)")
    p.add_argument("--steps", type=int, default=60, help="GRPO steps (the demo's 60)")
    p.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every N steps (the demo's 10)")
    p.add_argument("--eval-problems", type=int, default=200, help="held-out problems (the demo's 200)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    common.add_run_args(p, SMOKE)
    a = p.parse_args(argv)
    if a.smoke:
        vars(a).update(SMOKE)
        a.base = a.workdir / "base" / "model"  # never the demo's own: the smoke pretrains a few steps
    return a


def build_base(a, env: dict) -> Path:
    """The demo's base when it is there, else one pretrained as the demo does, once per workdir and steps."""
    if (a.base / "model.safetensors").exists():
        return a.base
    base = a.workdir / f"base-{a.pretrain_steps}"
    info = {"pretrain_steps": a.pretrain_steps, "seed": common.SEED}
    if common.cached_model_info(base / "model", lambda found: found == info, "{info}, not " + str(info)):
        return base / "model"
    proc = common.run_child(r1lab("pretrain", "--steps", a.pretrain_steps, "--out", base, "--seed", common.SEED,
                                  "--threads", a.threads), env, a.workdir / "pretrain.log")
    if proc["rc"]:
        sys.exit(f"ERROR: pretraining failed; see {a.workdir / 'pretrain.log'}")
    common.write_model_info(base / "model", info)
    return base / "model"


def write_config(a, model: Path, seed: int, control: str = "none") -> Path:
    """The demo's GRPO config for this seed (what `r1lab demo --seed S` trains with), as a YAML file."""
    from r1lab.commands.stages import tiny_grpo_config
    from r1lab.config import save_config

    name = f"grpo-seed{seed}" + ("" if control == "none" else f"-{control}")
    cfg = tiny_grpo_config(model, a.workdir / name, a.steps, eval_problems=a.eval_problems, eval_every=a.eval_every,
                           control=control, seed=seed, threads=a.threads)
    path = a.workdir / f"{name}.yaml"
    save_config(cfg, path)
    return path


def grpo(a, env: dict, config: Path, side: str, run: Path) -> dict:
    """One `r1lab grpo` child on a fresh run directory: its wall time and held-out pass@1 at each evaluation."""
    shutil.rmtree(run, ignore_errors=True)
    if a.wait_quiet:
        common.wait_until_quiet(a.wait_quiet)
    log = run.with_suffix(".log")
    proc = common.run_child(r1lab("grpo", "--config", config, "--async-steps", SIDES[side], "--out", run), env, log)
    if proc["rc"]:
        sys.exit(f"ERROR: the GRPO run ({side}) failed; see {log}")
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines() if line.strip()]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"wall_s": proc["wall_s"], "foreign_cores": proc["foreign_cores"],
            "steps": [e["step"] for e in evals], "pass@1": [e["pass@1"] for e in evals],
            "step_time_s": sum(s["step_time_s"] for s in steps) / len(steps)}


def measure(a, env: dict, model: Path) -> dict:
    seeds = []
    for i, seed in enumerate(a.seeds):
        config, sides = write_config(a, model, seed), {}
        for side in SIDES if i % 2 == 0 else list(SIDES)[::-1]:  # alternating: a drift in load hits both
            sides[side] = grpo(a, env, config, side, a.workdir / f"grpo-seed{seed}-{side}")
        seeds.append({"seed": seed, **sides, "ratio": sides["async"]["wall_s"] / sides["sync"]["wall_s"],
                      "final_gap_points": 100 * (sides["async"]["pass@1"][-1] - sides["sync"]["pass@1"][-1])})
    control = grpo(a, env, write_config(a, model, a.seeds[0], "random-reward"), "sync",
                   a.workdir / f"grpo-seed{a.seeds[0]}-control")
    ratio = sum(s["ratio"] for s in seeds) / len(seeds)
    gap = sum(s["final_gap_points"] for s in seeds) / len(seeds)
    return {"base": str(model), "seeds": seeds, "control": {"seed": a.seeds[0], **control},
            "mean_ratio": ratio, "mean_final_gap_points": gap,
            "bar_met": ratio <= BAR_RATIO and abs(gap) <= BAR_POINTS}


def report(figures: dict) -> None:
    curve = lambda run: " ".join(f"{100 * x:.1f}" for x in run["pass@1"])  # noqa: E731
    rows = [[str(s["seed"]), f"{s['sync']['wall_s']:.1f}", f"{s['async']['wall_s']:.1f}", f"{s['ratio']:.2f}x",
             curve(s["sync"]), curve(s["async"]),
             f"{max(s[side]['foreign_cores'] or 0.0 for side in SIDES):.2f}"] for s in figures["seeds"]]
    common.print_table(["seed", "sync s", "async s", "async/sync", "pass@1 sync (%)", "pass@1 async (%)",
                        "other procs (cores)"], rows)
    c = figures["control"]
    print(f"control (random reward, sync, seed {c['seed']}): {c['wall_s']:.1f} s, pass@1 {curve(c)}")
    print(f"mean async/sync {figures['mean_ratio']:.2f}x, final pass@1 gap {figures['mean_final_gap_points']:+.1f} "
          f"points: bar (<= {BAR_RATIO}x, within {BAR_POINTS:g} points) {'met' if figures['bar_met'] else 'NOT met'}")


def main(argv=None) -> int:
    a = parse_args(argv)
    a.workdir = common.make_workdir(a.workdir, "async-grpo-")
    env = common.with_repo_on_path(common.child_env(a.threads))
    figures = measure(a, env, build_base(a, env))
    report(figures)
    args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items() if k not in ("json", "workdir")}
    common.write_figures(a.json, {"args": args, "versions": common.versions(), **figures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
