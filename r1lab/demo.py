"""`r1lab demo`: DeepSeek-R1-Zero in miniature on a laptop CPU, with nothing downloaded.

tokenizer -> tiny base model pretrained from scratch -> held-out evaluation -> R1-Zero GRPO (pure RL, rule rewards)
-> held-out evaluation -> report with curves, a before/after table and completions. `--control random-reward` runs
the same RL with shuffled rewards (same mean, no signal), reusing the pretrained base, to show the gain comes from the
verifier.
"""

from __future__ import annotations

from pathlib import Path

from r1lab.config import DemoConfig, PretrainConfig, tiny_grpo_config
from r1lab.grpo import train
from r1lab.report import eval_records, example_completions, write_report
from r1lab.stages import pretrained_base

RUN_NAMES = {"none": "grpo", "random-reward": "grpo-random-reward"}


def run_demo(cfg: DemoConfig, log=print) -> Path:
    # The tiny base is pretrained, or reused when made with the same settings (e.g. for the control run).
    pre = PretrainConfig(out=str(Path(cfg.out) / "base"), steps=cfg.pretrain_steps, seed=cfg.seed, threads=cfg.threads)
    grpo_cfg = tiny_grpo_config(pretrained_base(pre, log), Path(cfg.out) / RUN_NAMES[cfg.control], cfg.grpo_steps,
                                eval_problems=cfg.eval_problems, control=cfg.control, seed=cfg.seed,
                                threads=cfg.threads)
    final_model = train(grpo_cfg, log=log)
    run = Path(grpo_cfg.out)
    before, before_records = eval_records(run, "first")
    after, after_records = eval_records(run, "last")
    is_control = cfg.control != "none"
    columns = {"base (pretrained)": before,
               "after GRPO with shuffled rewards (control)" if is_control else "after R1-Zero GRPO": after}
    other = Path(cfg.out) / RUN_NAMES["none" if is_control else "random-reward"]
    compare = {}
    if (other / "eval").exists():  # the other run of the pair, when it has been run: shown side by side
        other_label = "R1-Zero GRPO (verifier rewards)" if is_control else "random-reward control"
        compare = {other_label: other}
        columns[f"{other_label}, other run"] = eval_records(other, "last")[0]
    gain = after["pass@1"] - before["pass@1"]
    notes = [f"Held-out pass@1 went from {before['pass@1']:.1%} to {after['pass@1']:.1%} ({gain * 100:+.1f} points).",
             f"Rewards: {'shuffled across the batch (control: same mean, no signal)' if cfg.control != 'none' else 'accuracy + format, rule-based'}."]
    report = write_report(run, title="r1lab demo: R1-Zero on a tiny model" + (" (random-reward control)" if cfg.control != "none" else ""),
                          tables={"Held-out evaluation (k=8 samples, temperature 0.6, top-p 0.95)": columns},
                          examples={"before": example_completions(before_records), "after": example_completions(after_records)},
                          notes=notes, compare_runs=compare)
    log(f"\nheld-out pass@1: {before['pass@1']:.1%} -> {after['pass@1']:.1%} ({gain * 100:+.1f} points)")
    log(f"report:      {report}")
    log(f"final model: {final_model}  (Hugging Face format)")
    return report
