"""`r1lab pipeline`: DeepSeek-R1's four stages (docs/pipeline.md) beside R1-Zero and a distilled student, from a tiny
base it pretrains or your own: cold-start SFT, reasoning RL, rejection sampling + SFT of the base, final RL. Every model
is evaluated on one held-out set; a stage finished with the same settings is reused.
"""

from __future__ import annotations

import json
from pathlib import Path

from r1lab.commands.distill import run_distill
from r1lab.commands.pretrain import cold_start_conversations
from r1lab.commands.report import write_comparison_report
from r1lab.commands.sample import sample, write_jsonl
from r1lab.commands.stages import (check_models_exist, evaluate_models, parameter_count, pretrained_base, run_stage,
                                   tiny_grpo_config)
from r1lab.config import DistillConfig, EvalConfig, PipelineConfig, PretrainConfig, SampleConfig, SFTConfig
from r1lab.rewards.tasks import get_task
from r1lab.train.grpo import train
from r1lab.train.supervised import sft
from r1lab.train.task_settings import check_settings


class Stages:
    """Runs the stages of one pipeline under cfg.out, remembering each stage's wall time."""

    def __init__(self, cfg: PipelineConfig, log):
        self.cfg, self.log, self.out, self.seconds = cfg, log, Path(cfg.out), {}

    def rl(self, label: str, name: str, model: Path, steps: int, language_weight: float = 0.0) -> Path:
        cfg = self.cfg
        gc = tiny_grpo_config(model, self.out / name, steps, lr=cfg.rl_lr, language_weight=language_weight,
                              task=cfg.task, task_options=dict(cfg.task_options), template=cfg.template,
                              max_new_tokens=cfg.max_new_tokens, eval_problems=cfg.eval_problems,
                              eval_samples=cfg.eval_samples, seed=cfg.seed, threads=cfg.threads)
        final = Path(gc.out) / "model"
        self.seconds[label] = run_stage(label, gc, Path(gc.out) / "config.yaml", final / "model.safetensors",
                                        lambda: train(gc, log=self.log), self.log)
        return final

    def sft(self, label: str, name: str, model: Path, data: Path, epochs: float) -> Path:
        cfg = self.cfg
        sc = SFTConfig(model=str(model), data=str(data), out=str(self.out / name), epochs=epochs, batch_size=32,
                       lr=cfg.sft_lr, warmup_steps=10, seed=cfg.seed, threads=cfg.threads)
        final = Path(sc.out) / "model"
        self.seconds[label] = run_stage(label, sc, Path(sc.out) / "config.yaml", final / "model.safetensors",
                                        lambda: sft(sc, log=self.log), self.log)
        return final

    def cold_start(self, base: Path) -> Path:
        data = Path(self.cfg.cold_start_data or self.out / "stage1-cold-start" / "data.jsonl")
        if not self.cfg.cold_start_data:  # the built-in task: worked solutions, generated
            task = get_task("arithmetic", **self.cfg.task_options)
            rows = cold_start_conversations(task, self.cfg.cold_start_examples, self.cfg.seed)
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            if not data.exists() or data.read_text(encoding="utf-8") != text:  # rewritten only if other settings
                write_jsonl(data, rows)  # changed it: stage 1 is then run again, as its input is newer
        return self.sft("stage 1: cold-start SFT", "stage1-cold-start", base, data, self.cfg.cold_start_epochs)

    def rejection_sampling(self, model: Path) -> Path:
        cfg = self.cfg
        sc = SampleConfig(model=str(model), task=cfg.task, task_options=dict(cfg.task_options), template=cfg.template,
                          problems=cfg.rejection_problems, samples=cfg.rejection_samples,
                          max_new_tokens=cfg.max_new_tokens,
                          max_per_prompt=2, out=str(self.out / "stage3-rejection-sampling" / "sft.jsonl"),
                          seed=cfg.seed, threads=cfg.threads)
        data = Path(sc.out)
        self.seconds["stage 3a: rejection sampling"] = run_stage(
            "stage 3a: rejection sampling", sc, data.with_name("sft.config.yaml"), data,
            lambda: sample(sc, log=self.log), self.log)
        if not data.read_text().strip():
            raise ValueError(f"{model}: no completion passed rejection sampling ({data.with_name('sft.summary.json')})"
                             f"; train stage 2 longer or sample more (rejection_problems, rejection_samples)")
        return data


def run_pipeline(cfg: PipelineConfig, log=print) -> Path:
    """Run every stage (reusing finished ones), evaluate all models on one held-out set; returns the report path."""
    check_settings(cfg)
    out = Path(cfg.out)
    task = get_task(cfg.task, **cfg.task_options)  # a malformed data file fails here, before any stage runs
    check_models_exist(cfg, "base", "student")
    stages = Stages(cfg, log)
    base = Path(cfg.base) if cfg.base else pretrained_base(
        PretrainConfig(out=str(out / "base"), task_options=dict(cfg.task_options), steps=cfg.pretrain_steps,
                       seed=cfg.seed, threads=cfg.threads), log)
    models = {"base": base, "R1-Zero": stages.rl("R1-Zero: GRPO from the base", "r1zero", base, cfg.r1zero_steps)}
    cold = stages.cold_start(base)
    reasoning = stages.rl("stage 2: reasoning RL", "stage2-reasoning-rl", cold, cfg.reasoning_rl_steps,
                          cfg.language_weight)
    data = stages.rejection_sampling(reasoning)
    resampled = stages.sft("stage 3b: SFT of the base", "stage3-sft", base, data, epochs=2.0)
    final = stages.rl("stage 4: final RL", "stage4-final-rl", resampled, cfg.final_rl_steps, cfg.language_weight)
    models.update({"stage 1 cold start": cold, "stage 2 reasoning RL": reasoning, "stage 3 rejection SFT": resampled,
                   "R1 pipeline (stage 4)": final})
    if cfg.distill:
        dc = DistillConfig(teacher=str(final), out=str(out / "distill"), task=cfg.task,
                           task_options=dict(cfg.task_options), student=cfg.student, template=cfg.template,
                           max_new_tokens=cfg.max_new_tokens, problems=cfg.distill_problems,
                           student_pretrain_steps=cfg.student_pretrain_steps, compare_grpo=False, seed=cfg.seed,
                           threads=cfg.threads, eval_problems=cfg.eval_problems, eval_samples=cfg.eval_samples)
        models["distilled student"] = run_distill(dc, log=log)
    protocol = EvalConfig(problems=cfg.eval_problems, samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens,
                          template=cfg.template, seed=cfg.seed)
    results = evaluate_models(models, task, protocol, log)
    extra = {label: {"parameters": parameter_count(path)} for label, path in models.items()}
    notes = pipeline_notes(results, stages.seconds)
    curves = (out / "r1zero", {"stage 2 reasoning RL": out / "stage2-reasoning-rl",
                               "stage 4 final RL": out / "stage4-final-rl"})
    report = write_comparison_report(out / "report.md", "r1lab pipeline: R1-Zero, the R1 pipeline and distillation",
                                     results, extra, notes, examples_of=["R1-Zero", "R1 pipeline (stage 4)"],
                                     curves=curves)
    figures = {label: {**result.to_dict(), **extra[label]} for label, result in results.items()}
    results_json = {"results": figures, "stage_seconds": stages.seconds}
    (out / "results.json").write_text(json.dumps(results_json, indent=2) + "\n")
    for note in notes:
        log(note)
    log(f"report: {report}")
    return report


def pipeline_notes(results: dict, seconds: dict[str, float]) -> list[str]:
    zero, r1 = results["R1-Zero"], results["R1 pipeline (stage 4)"]
    notes = [f"Held-out pass@1: R1-Zero {zero.pass_at_1:.1%}, R1 pipeline {r1.pass_at_1:.1%} "
             f"({100 * (r1.pass_at_1 - zero.pass_at_1):+.1f} points); format rate {zero.format_rate:.1%} -> "
             f"{r1.format_rate:.1%}; language consistency {zero.language_consistency:.1%} -> "
             f"{r1.language_consistency:.1%}."]
    if "distilled student" in results:
        notes.append(f"Distilled student (a quarter of the parameters or fewer): pass@1 "
                     f"{results['distilled student'].pass_at_1:.1%}.")
    notes.append("Stage wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ".")
    return notes
