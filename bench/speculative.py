#!/usr/bin/env python
"""Speculative decoding with DeepSeek-V3's MTP module: the tiny V3 demo base's tokens/s with and without MTP drafts.

The base: `r1lab pretrain --arch deepseek-v3 --mtp-depth 1` (or `--mtp-depth`), the V3 demo's base (600 steps) with
its multi-token prediction module trained beside it (reused from WORKDIR/base when it was built with the same steps). Then, each side
a fresh process, `--speculative none` and `--speculative mtp` alternating, `--repeats` times:

* `r1lab eval` of the base on the same held-out problems in three modes: greedy (temperature 0, one sample; also
  with 8 and 1 prompts per generate call, where decoding waits on latency rather than arithmetic),
  sampled (the demo's evaluation: temperature 0.6, top-p 0.95, k samples) and rollout (GRPO's sampling: temperature
  1, k samples). Reported: eval's generation tokens_per_s (median), its acceptance, and held-out pass@1 of both
  sides (greedy: the same completions, checked, a difference exits 1; sampled: other draws of the same
  distribution);
* `r1lab grpo` from the base with the demo's preset (16 prompts x 8 samples, 64 tokens) for `--grpo-steps` steps:
  rollout tokens/s (completion tokens over the rollout phase's seconds, the first step left out as warm-up), the
  acceptance of each step (GRPO does not train the module: it falls as the policy moves) and held-out pass@1 at the
  first and last step (the same distribution sampled: the same curve up to sampling noise);
* `r1lab serve --speculative none|mtp` from the base: `--serve-requests` greedy chat completions of held-out
  questions, first one at a time (one client: a chat user's latency) and then from `--serve-clients` clients at once,
  each phase's completion tokens/s, the completions of both sides checked to be the same, and the server's
  acceptance (`/health`).

    python bench/speculative.py --wait-quiet 120 --json runs/speculative/figures.json
    python bench/speculative.py --smoke        # tiny sizes, a minute: checks that the script runs, measures nothing
    python bench/speculative.py --num-layers 12 --modes greedy greedy-8 greedy-1 --grpo-steps 0   # a deeper base
    python bench/speculative.py --speculative-tokens 1 2 --modes greedy       # eval sides drafting 1 and 2 tokens
    python bench/speculative.py --mtp-depth 2 --speculative-tokens 1 2 ...    # the second draft from the second depth

Run it on an otherwise quiet machine: a neighbour's load moves the figures (each side's "other procs" is reported).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

r1lab = common.r1lab_command

SIDES = ("none", "mtp")
MODES = {"greedy": dict(temperature=0.0, top_p=1.0, one_sample=True, chunk=64),
         # the same greedy evaluation, fewer prompts per generate call: decoding bound by latency, not arithmetic
         "greedy-8": dict(temperature=0.0, top_p=1.0, one_sample=True, chunk=8),
         "greedy-1": dict(temperature=0.0, top_p=1.0, one_sample=True, chunk=1),
         "sampled": dict(temperature=0.6, top_p=0.95, one_sample=False, chunk=64),
         "rollout": dict(temperature=1.0, top_p=1.0, one_sample=False, chunk=64)}
SMOKE = dict(pretrain_steps=20, problems=4, samples=2, grpo_steps=2, repeats=1, serve_requests=4, serve_clients=2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=common.REPO_ROOT / "runs" / "speculative")
    p.add_argument("--pretrain-steps", type=int, default=600, help="the base's pretraining steps (the demo's 600)")
    p.add_argument("--num-layers", type=int, default=4, help="the base's layers (the demo's 4): the deeper the base, "
                   "the smaller the MTP layer's share of a step")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="the eval modes measured")
    p.add_argument("--mtp-depth", type=int, default=1, help="the base's MTP depths: k drafts come from k depths where "
                   "it has them, else the first depth is chained")
    p.add_argument("--speculative-tokens", type=int, nargs="+", default=[1], help="k, tokens the mtp side drafts a "
                   "step; more values: eval sides with those k too (serve drafts one: a first k > 1 has no serve part)")
    p.add_argument("--problems", type=int, default=200, help="held-out problems per evaluation")
    p.add_argument("--samples", type=int, default=8, help="k, samples per problem (sampled and rollout modes)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion limit (the demo's GRPO and eval: 64)")
    p.add_argument("--grpo-steps", type=int, default=10, help="GRPO steps per side (0: no GRPO part)")
    p.add_argument("--repeats", type=int, default=9,
                   help="evaluations per side and mode, sides alternating (one process's speed can differ from the "
                        "next one's by a third: a median of 3 is not enough)")
    p.add_argument("--serve-requests", type=int, default=48, help="chat completions per serve phase (0: no serve part)")
    p.add_argument("--serve-clients", type=int, default=8, help="clients of the concurrent serve phase")
    common.add_run_args(p, SMOKE)
    a = p.parse_args(argv)
    if a.smoke:
        vars(a).update(SMOKE)
    return a


def build_base(a, env: dict) -> Path:
    """The tiny V3 base with its MTP module, pretrained once per workdir and steps."""
    base = a.workdir / f"base-{a.pretrain_steps}" / ("" if a.num_layers == 4 else f"layers-{a.num_layers}") / \
        ("" if a.mtp_depth == 1 else f"mtp-depth-{a.mtp_depth}")
    info = {"pretrain_steps": a.pretrain_steps, "mtp_depth": a.mtp_depth, **({} if a.num_layers == 4 else
                                                                           {"num_layers": a.num_layers})}
    if common.cached_model_info(base / "model", lambda found: found == info, "{info}, not " + str(info)):
        return base / "model"
    proc = common.run_child(r1lab("pretrain", "--arch", "deepseek-v3", "--mtp-depth", a.mtp_depth,
                                  "--steps", a.pretrain_steps, "--num-layers", a.num_layers, "--out", base,
                                  "--seed", common.SEED, "--threads", a.threads),
                            env, a.workdir / "pretrain.log")
    if proc["rc"]:
        sys.exit(f"ERROR: pretraining failed; see {a.workdir / 'pretrain.log'}")
    common.write_model_info(base / "model", info)
    return base / "model"


def evaluate(a, env: dict, model: Path, mode: str, side: str, repeat: int) -> dict:
    """One `r1lab eval` child: its figures, completions and the child's own measurements."""
    m, out = MODES[mode], a.workdir / f"eval-{mode}-{side}-{repeat}.json"
    cmd = r1lab("eval", "--model", model, "--problems", a.problems, "--samples", 1 if m["one_sample"] else a.samples,
                "--temperature", m["temperature"], "--top-p", m["top_p"], "--max-new-tokens", a.max_new_tokens,
                "--speculative", side.split("-")[0], "--seed", common.SEED, "--threads", a.threads, "--out", out,
                "--prompts-per-chunk", m["chunk"], "--speculative-tokens", drafts(a, side))
    figures, proc = common.run_for_result(cmd, env, out.with_suffix(".log"), out, f"eval ({mode}, {side})")
    test = figures["test"]
    return {"tokens_per_s": test["tokens_per_s"], "acceptance": test.get("acceptance"), "pass@1": test["pass@1"],
            "completions": [s["completion"] for r in test["records"] for s in r["samples"]],
            "foreign_cores": proc["foreign_cores"]}


def grpo(a, env: dict, model: Path, side: str) -> dict:
    """`r1lab grpo` with the demo's preset from the base: rollout tokens/s after the first step, acceptance per step."""
    from r1lab.commands.stages import tiny_grpo_config
    from r1lab.config import save_config

    run = a.workdir / f"grpo-{side}"
    # held-out evaluations at the start and the end: the same distribution sampled, so the same curve up to noise
    cfg = tiny_grpo_config(model, run, a.grpo_steps, eval_every=a.grpo_steps, save_every=0, samples_every=0,
                           eval_problems=a.problems, report_to="none",
                           speculative=side, speculative_tokens=drafts(a, side),
                           seed=common.SEED, threads=a.threads)
    save_config(cfg, run.with_suffix(".yaml"))
    for old in ("metrics.jsonl", "eval.jsonl"):
        (run / old).unlink(missing_ok=True)
    proc = common.run_child(r1lab("grpo", "--config", run.with_suffix(".yaml"), "--overwrite"), env,
                            run.with_suffix(".log"))
    if proc["rc"]:
        sys.exit(f"ERROR: the GRPO run ({side}) failed; see {run.with_suffix('.log')}")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = steps[1:] or steps
    return {"rollout_tokens_per_s": sum(s["completion_tokens"] for s in timed) / sum(s["rollout_time_s"] for s in timed),
            "acceptance": [s.get("speculative/acceptance") for s in steps], "foreign_cores": proc["foreign_cores"],
            "heldout": [[e["step"], e["pass@1"]] for e in map(json.loads,
                                                               (run / "eval.jsonl").read_text().splitlines())]}


def serve(a, env: dict, model: Path, side: str) -> dict:
    """A `r1lab serve` child: greedy chat completions of held-out questions, one client, then serve_clients at once."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import serve_load
    from r1lab.rewards.tasks import get_task
    from r1lab.train.evaluate import heldout_problems

    questions = [p.prompt for p in heldout_problems(get_task("arithmetic"), "test", a.serve_requests, common.SEED)]
    port = serve_load.free_port()
    url, log = f"http://127.0.0.1:{port}", (a.workdir / f"serve-{side}.log").open("w")
    server = subprocess.Popen(r1lab("serve", "--model", model, "--port", port, "--speculative", side, "--threads",
                                    a.threads, "--log-level", "warning"), env=env, stdout=log, stderr=log)
    try:
        serve_load.wait_ready(url, server)
        with httpx.Client(timeout=600) as client:
            served = client.get(f"{url}/health").json()["model"]

            def complete(question: str) -> dict:
                body = {"model": served, "messages": [{"role": "user", "content": question}], "temperature": 0,
                        "max_tokens": a.max_new_tokens}
                return client.post(f"{url}/v1/chat/completions", json=body).raise_for_status().json()

            phases = {}
            for name, clients in (("one client", 1), (f"{a.serve_clients} clients", a.serve_clients)):
                start = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    replies = list(pool.map(complete, questions))
                tokens = sum(r["usage"]["completion_tokens"] for r in replies)
                phases[name] = {"tokens_per_s": tokens / (time.perf_counter() - start),
                                "completions": [r["choices"][0]["message"]["content"] for r in replies]}
            stats = client.get(f"{url}/health").json().get("batcher", {})
    finally:
        server.terminate()
        server.wait()
    drafted = stats.get("drafted", 0)
    return {"phases": phases, "acceptance": stats.get("accepted", 0) / drafted if drafted else None}


def drafts(a, side: str) -> int:
    """The k of a side: none 1, mtp the first --speculative-tokens, mtp-kK K."""
    return 1 if side == "none" else a.speculative_tokens[0] if side == "mtp" else int(side.split("-k")[1])


def measure(a, env: dict, model: Path) -> dict:
    sides_all = SIDES + tuple(f"mtp-k{k}" for k in a.speculative_tokens[1:])  # eval only: more k
    runs = {mode: {side: [] for side in sides_all} for mode in a.modes}
    for repeat in range(a.repeats):
        for mode in a.modes:
            for side in sides_all if repeat % 2 == 0 else sides_all[::-1]:  # alternating: a drift in load hits all
                if a.wait_quiet:
                    common.wait_until_quiet(a.wait_quiet)
                runs[mode][side].append(evaluate(a, env, model, mode, side, repeat))
    figures = {}
    for mode, sides in runs.items():
        rate = {side: common.median([r["tokens_per_s"] for r in sides[side]]) for side in sides_all}
        figures[mode] = {"tokens_per_s": {side: rate[side] for side in SIDES}, "speedup": rate["mtp"] / rate["none"],
                         "acceptance": common.median([r["acceptance"] for r in sides["mtp"]]),
                         "pass@1": {side: sides[side][0]["pass@1"] for side in SIDES},
                         # sampled: other draws of the same distribution, so only greedy's are compared
                         "same_completions": all(r["completions"] == sides["none"][0]["completions"]
                                                 for side in sides_all for r in sides[side])
                         if MODES[mode]["temperature"] == 0 else None,
                         "runs_tokens_per_s": {side: [r["tokens_per_s"] for r in sides[side]] for side in sides_all},
                         "foreign_cores_max": max(r["foreign_cores"] or 0.0 for s in sides_all for r in sides[s]),
                         "more_k": {drafts(a, side): {"tokens_per_s": rate[side], "speedup": rate[side] / rate["none"],
                                                     "acceptance": common.median([r["acceptance"] for r in sides[side]])}
                                    for side in sides_all[len(SIDES):]}}
    if a.grpo_steps:
        figures["grpo"] = {side: grpo(a, env, model, side) for side in SIDES}
        rates = [figures["grpo"][side]["rollout_tokens_per_s"] for side in SIDES]
        figures["grpo"]["speedup"] = rates[1] / rates[0]
    if a.serve_requests and a.speculative_tokens[0] == 1:
        if a.wait_quiet:
            common.wait_until_quiet(a.wait_quiet)
        sides = {side: serve(a, env, model, side) for side in SIDES}
        figures["serve"] = {"acceptance": sides["mtp"]["acceptance"], "phases": {
            name: {"tokens_per_s": {side: sides[side]["phases"][name]["tokens_per_s"] for side in SIDES},
                   "same_completions": sides["mtp"]["phases"][name]["completions"] ==
                   sides["none"]["phases"][name]["completions"]} for name in sides["none"]["phases"]}}
    return figures


def report(figures: dict) -> None:
    rows = [[mode, f"{f['tokens_per_s']['none']:,.0f}", f"{f['tokens_per_s']['mtp']:,.0f}", f"{f['speedup']:.2f}x",
             f"{f['acceptance']:.1%}", f"{f['pass@1']['none']:.1%} / {f['pass@1']['mtp']:.1%}",
             {True: "yes", False: "NO", None: "-"}[f["same_completions"]], f"{f['foreign_cores_max']:.2f}"]
            for mode, f in figures.items() if mode in MODES]
    common.print_table(["eval", "tokens/s none", "tokens/s mtp", "speedup", "acceptance", "pass@1 none / mtp",
                        "same completions", "other procs (cores)"], rows)
    for mode, f in figures.items():
        for k, more in f.get("more_k", {}).items() if mode in MODES else ():
            print(f"{mode}, {k} drafts a step: {more['tokens_per_s']:,.0f} tokens/s ({more['speedup']:.2f}x), "
                  f"acceptance {more['acceptance']:.1%}")
    if "grpo" in figures:
        g = figures["grpo"]
        kept = [f"{x:.0%}" for x in g["mtp"]["acceptance"]]
        print(f"GRPO rollouts: {g['none']['rollout_tokens_per_s']:,.0f} -> {g['mtp']['rollout_tokens_per_s']:,.0f} "
              f"tokens/s ({g['speedup']:.2f}x); acceptance per step: {' '.join(kept)}")
    for name, phase in figures.get("serve", {}).get("phases", {}).items():
        rate = phase["tokens_per_s"]
        print(f"serve, greedy chat, {name}: {rate['none']:,.0f} -> {rate['mtp']:,.0f} tokens/s "
              f"({rate['mtp'] / rate['none']:.2f}x), acceptance {figures['serve']['acceptance']:.1%}, "
              f"same completions: {'yes' if phase['same_completions'] else 'NO'}")


def main(argv=None) -> int:
    a = parse_args(argv)
    a.workdir = common.make_workdir(a.workdir, "speculative-")
    env = common.with_repo_on_path(common.child_env(a.threads))
    model = build_base(a, env)
    figures = measure(a, env, model)
    report(figures)
    args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items() if k not in ("json", "workdir")}
    common.write_figures(a.json, {"args": args, "versions": common.versions(), **figures})
    if not all(f["same_completions"] for mode, f in figures.items() if mode.startswith("greedy")) or \
            not all(p["same_completions"] for p in figures.get("serve", {}).get("phases", {}).values()):
        print("FAIL: greedy decoding with MTP drafts gave other completions than without", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
