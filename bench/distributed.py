"""torchrun on this machine's CPUs (gloo): does N processes' GRPO end where one process's does, and what does each
rank hold? `python bench/distributed.py [--ranks 2] [--steps 3] [--json OUT]`.

One base model (pretrained here, a few million parameters, so that FSDP has something to shard and GRPO gets
rewards from step one), then GRPO with the same global batch and seed:
  one process | N ranks, replicated (gradients summed) | N ranks, FSDP2 (--shard)
Printed side by side: wall time, the largest weight difference from the one-process run, and rank 0's bytes of
weights, gradients and AdamW state (from the run's metrics). Then a checkpoint of the N-rank run, resumed in one
process, against the N-rank run continued; and the held-out evaluation, sharded and not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK = ["--task-options", '{"min_terms": 3, "max_terms": 4}']
BASE = ["--documents", "4000", "--steps", "150", "--batch-size", "32", "--lr", "3e-3", "--warmup-steps", "10",
        "--hidden-size", "256", "--num-layers", "4", "--num-heads", "4", "--num-kv-heads", "2",
        "--intermediate-size", "512", *TASK]


def r1lab(args: list, ranks: int = 1) -> float:
    """Run `python -m r1lab ARGS` (under torchrun with `ranks` processes); its wall time in seconds."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--standalone"]
    command = (launcher if ranks > 1 else [sys.executable]) + ["-m", "r1lab", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks)), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max((x[k] - y[k]).abs().max().item() for k in x)


def last_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="r1lab-dist-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    r1lab(["pretrain", "--out", work / "base", *BASE])
    base = work / "base" / "model"
    grpo = ["grpo", "--model", base, *TASK, "--steps", a.steps, "--prompts-per-step", 8, "--samples-per-prompt", 8,
            "--micro-batch-size", 8, "--max-new-tokens", 48, "--lr", "1e-4", "--eval-every", 0, "--save-every",
            a.steps - 1, "--samples-every", 0]
    sides = {"one process": ([], 1), f"{a.ranks} ranks": ([], a.ranks), f"{a.ranks} ranks, FSDP": (["--shard"], a.ranks)}
    figures = {}
    for name, (extra, ranks) in sides.items():
        run = work / name.replace(" ", "-").replace(",", "")
        seconds = r1lab([*grpo, *extra, "--out", run], ranks)
        m = last_metrics(run)
        figures[name] = {"ranks": ranks, "seconds": seconds, "run": str(run),
                         **{k: m[f"memory/rank_{k}_mb"] for k in ("weights", "gradients", "optimizer")}}
    one = Path(figures["one process"]["run"]) / "model"
    for f in figures.values():
        f["max_abs_diff"] = max_difference(one, Path(f["run"]) / "model")
    # a checkpoint of the N-rank run, resumed in one process, against the N-rank run continued
    ranked = Path(figures[f"{a.ranks} ranks"]["run"])
    resumed = work / "resumed-in-one"
    shutil.copytree(ranked, resumed)
    shutil.rmtree(resumed / "model")
    r1lab([*grpo, "--out", resumed, "--resume"])
    resume_diff = max_difference(ranked / "model", resumed / "model")
    evals = {}
    for ranks in (1, a.ranks):
        out = work / f"eval-{ranks}.json"
        r1lab(["eval", "--model", one, *TASK, "--problems", 25, "--samples", 4, "--max-new-tokens", 48, "--out", out],
              ranks)
        evals[ranks] = json.loads(out.read_text())["test"]
    result = {"sides": figures, "resume_in_one_max_abs_diff": resume_diff, "parameters": parameters(base),
              "eval_equal": evals[1] == evals[a.ranks], "eval_pass@1": evals[1]["pass@1"], "steps": a.steps,
              "ranks": a.ranks}
    print_table(result)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


def parameters(model_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())


def print_table(r: dict) -> None:
    print(f"GRPO, {r['steps']} steps of 8 prompts x 8 samples, a {r['parameters']:,}-parameter model, gloo on CPU")
    print(f"{'':22}{'wall s':>8}{'max |dw| vs one':>17}{'weights MB':>12}{'grads MB':>10}{'AdamW MB':>10}  (rank 0)")
    for name, f in r["sides"].items():
        print(f"{name:22}{f['seconds']:8.1f}{f['max_abs_diff']:17.2e}{f['weights']:12.2f}{f['gradients']:10.2f}"
              f"{f['optimizer']:10.2f}")
    print(f"{r['ranks']}-rank checkpoint resumed in one process vs continued: max |dw| {r['resume_in_one_max_abs_diff']:.2e}")
    print(f"held-out eval sharded over {r['ranks']} ranks equals one process: {r['eval_equal']} "
          f"(pass@1 {100 * r['eval_pass@1']:.1f}%)")


if __name__ == "__main__":
    main()
