"""`r1lab demo`: DeepSeek-R1-Zero in miniature on a laptop CPU, with nothing downloaded: a tiny base pretrained from
scratch, R1-Zero GRPO with held-out evaluations, and a report. `--control random-reward` runs the same RL with shuffled
rewards, to show the gain comes from the verifier; `--tools python` is the tool demo (products of 3-digit numbers).
"""

from __future__ import annotations

import json
from pathlib import Path

from r1lab.commands.pretrain import ARCHITECTURE_FILE
from r1lab.commands.report import eval_records, example_completions, write_report
from r1lab.commands.stages import model_stage, pretrained_base, tiny_grpo_config
from r1lab.config import DemoConfig, PretrainConfig
from r1lab.config.groups import ARCHS
from r1lab.rewards.tasks.arithmetic import TOOL_DEMO_OPTIONS
from r1lab.train.grpo import train


def run_name(stage: str, arch: str, control: str = "none", tools: str = "") -> str:
    """A demo stage's directory under OUT (e.g. grpo-tools-deepseek-v3-random-reward): every demo shares an OUT."""
    return (stage + ("-tools" if tools else "") + ("" if arch == "dense" else f"-{arch}")
            + ("" if control == "none" else f"-{control}"))


def base_settings(cfg: DemoConfig) -> dict:
    """The demo's pretraining: 600 steps. The tool demo's base must copy six digits into its calls and the product
    into the answer, a skill that forms late (loss plateau, then a drop): more calls, fewer slips, more steps."""
    tools = dict(think_share=0.45, slip_rate=0.1, steps=1000, micro_batch_size=48) if cfg.tools else {}
    return {"steps": 600, **tools, **({"steps": cfg.pretrain_steps} if cfg.pretrain_steps else {})}


def run_demo(cfg: DemoConfig, log=print) -> Path:
    # The tiny base is pretrained, or reused when made with the same settings (e.g. for the control run).
    out = Path(cfg.out)
    # the tool demo's GRPO: room for a call, its output and the answer (about 70 tokens), a faster lr, and fewer
    # held-out evaluations (each call is a sandboxed process)
    tool_settings = dict(task_options=dict(TOOL_DEMO_OPTIONS), tools="python", max_new_tokens=96, max_tool_calls=2,
                         lr=1e-4, eval_every=20) if cfg.tools else {}
    pre = PretrainConfig(**base_settings(cfg), out=str(out / run_name("base", cfg.arch, tools=cfg.tools)),
                         seed=cfg.seed, threads=cfg.threads, arch=cfg.arch, tools=cfg.tools,
                         task_options=tool_settings.get("task_options", {}))
    grpo_cfg = tiny_grpo_config(pretrained_base(pre, log), out / run_name("grpo", cfg.arch, cfg.control, cfg.tools),
                                cfg.grpo_steps, eval_problems=cfg.eval_problems, control=cfg.control, seed=cfg.seed,
                                threads=cfg.threads, **tool_settings)
    final_model = model_stage("R1-Zero GRPO", grpo_cfg, train, log)[0]
    run = final_model.parent
    before, before_records = eval_records(run, "first")
    after, after_records = eval_records(run, "last")
    is_control = cfg.control != "none"
    columns = {"base (pretrained)": before,
               "after GRPO with shuffled rewards (control)" if is_control else "after R1-Zero GRPO": after}
    other = out / run_name("grpo", cfg.arch, "none" if is_control else "random-reward", cfg.tools)
    compare = {}
    if (other / "eval").exists():  # the other run of the pair, when it has been run: shown side by side
        other_label = "R1-Zero GRPO (verifier rewards)" if is_control else "random-reward control"
        compare = {other_label: other}
        columns[f"{other_label}, other run"] = eval_records(other, "last")[0]
    gain = after["pass@1"] - before["pass@1"]
    notes = [f"Held-out pass@1 went from {before['pass@1']:.1%} to {after['pass@1']:.1%} ({gain * 100:+.1f} points).",
             *([f"Tool calls per held-out sample went from {before['tool_calls']:.2f} to {after['tool_calls']:.2f}."]
               if cfg.tools else []),
             "Rewards: " + ("shuffled across the batch (control: same mean, no signal)." if is_control
                            else "accuracy + format, rule-based.")]
    title = "r1lab demo: R1-Zero " + ("with a Python tool " if cfg.tools else "") + "on a tiny model"
    report = write_report(run, title=title + (" (random-reward control)" if is_control else ""),
                          tables={"Held-out evaluation (k=8 samples, temperature 0.6, top-p 0.95)": columns,
                                  "Tiny bases (from each base's architecture.json and its R1-Zero run)":
                                      architecture_table(out, cfg)},
                          examples={"before": example_completions(before_records),
                                    "after": example_completions(after_records)},
                          notes=notes, compare_runs=compare)
    log(f"\nheld-out pass@1: {before['pass@1']:.1%} -> {after['pass@1']:.1%} ({gain * 100:+.1f} points)")
    if cfg.tools:
        log(f"tool calls per held-out sample: {before['tool_calls']:.2f} -> {after['tool_calls']:.2f}")
    log(f"report:      {report}")
    log(f"final model: {final_model}  (Hugging Face format)")
    return report


def architecture_table(out: Path, cfg: DemoConfig) -> dict[str, dict]:
    """One column per architecture whose base is under OUT (cfg's, and another's when it has been run): its
    architecture.json figures and the pass@1 before and after its R1-Zero run, when that was made."""
    columns = {}
    for arch in ARCHS:
        facts_file = out / run_name("base", arch, tools=cfg.tools) / ARCHITECTURE_FILE
        if arch != cfg.arch and not facts_file.exists():
            continue
        facts = json.loads(facts_file.read_text()) if facts_file.exists() else {}
        column = {"parameters": facts.get("parameters"), "active parameters per token": facts.get("active_parameters"),
                  "KV-cache bytes per token (bf16)": facts.get("kv_cache_bytes_per_token_bf16"),
                  "same for multi-head attention": facts.get("multi_head_kv_cache_bytes_per_token_bf16"),
                  "expert load max/mean (end of pretraining)": facts.get("moe/load_max_over_mean")}
        run = out / run_name("grpo", arch, tools=cfg.tools)
        if (run / "eval").exists():
            column["pass@1 before GRPO"] = eval_records(run, "first")[0]["pass@1"]
            column["pass@1 after GRPO"] = eval_records(run, "last")[0]["pass@1"]
        columns[arch] = column
    return columns
