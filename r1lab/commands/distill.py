"""`r1lab distill`: DeepSeek-R1's distillation in miniature: a teacher's verified, readable completions (`r1lab
sample`) are the SFT data of a smaller student. With `compare_grpo` the student base is also trained by GRPO for the
same wall time, to check the paper's finding that distillation beats RL on a small model.
"""

from __future__ import annotations

import json
from pathlib import Path

from r1lab.commands.report import write_comparison_report
from r1lab.commands.sample import sample
from r1lab.commands.stages import (check_models_exist, evaluate_models, model_stage, parameter_count, pretrained_base,
                                   run_stage, tiny_grpo_config)
from r1lab.config import DistillConfig, EvalConfig, PretrainConfig, SampleConfig, SFTConfig
from r1lab.rewards.tasks import get_task
from r1lab.train.grpo import train
from r1lab.train.supervised import sft
from r1lab.train.task_settings import check_settings


def student_base(cfg: DistillConfig, log) -> Path:
    """The given student base, or one of the configured shape pretrained on the built-in corpus (reused if made)."""
    if cfg.student:
        return Path(cfg.student)
    pre = PretrainConfig(out=str(Path(cfg.out) / "student-base"), steps=cfg.student_pretrain_steps,
                         hidden_size=cfg.student_hidden_size, num_layers=cfg.student_num_layers,
                         num_heads=cfg.student_num_heads, num_kv_heads=cfg.student_num_kv_heads,
                         intermediate_size=cfg.student_intermediate_size, task_options=dict(cfg.task_options),
                         seed=cfg.seed, threads=cfg.threads)
    return pretrained_base(pre, log)


def teacher_traces(cfg: DistillConfig, log) -> tuple[Path, float]:
    """Rejection-sampled teacher completions on train prompts, as SFT rows; and the seconds it took."""
    sc = SampleConfig(model=cfg.teacher, task=cfg.task, task_options=dict(cfg.task_options), problems=cfg.problems,
                      samples=cfg.samples, temperature=cfg.temperature, top_p=cfg.top_p,
                      max_new_tokens=cfg.max_new_tokens, template=cfg.template, max_per_prompt=cfg.max_per_prompt,
                      out=str(Path(cfg.out) / "traces" / "sft.jsonl"), seed=cfg.seed, threads=cfg.threads)
    data = Path(sc.out)
    seconds = run_stage("traces from the teacher", sc, data.with_name("sft.config.yaml"), data,
                        lambda: sample(sc, log=log), log)
    if not data.read_text().strip():
        summary = data.with_name("sft.summary.json")
        sampled = json.loads(summary.read_text())["sampled"]  # --problems 0 samples every row: not problems x samples
        raise ValueError(f"{cfg.teacher}: none of its {sampled} completions was verified correct and readable "
                         f"({summary}), so there is nothing to distil")
    return data, seconds


def sft_student(cfg: DistillConfig, base: Path, data: Path, log) -> tuple[Path, float]:
    sc = SFTConfig(model=str(base), data=str(data), out=str(Path(cfg.out) / "student-distilled"), epochs=cfg.epochs,
                   batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps, seed=cfg.seed,
                   threads=cfg.threads)
    return model_stage("SFT of the student on the traces", sc, sft, log)


def grpo_student(cfg: DistillConfig, base: Path, seconds: float, log) -> Path:
    """The same student base trained by R1-Zero GRPO for `seconds` of training wall time."""
    gc = tiny_grpo_config(base, Path(cfg.out) / "student-grpo", steps=100_000, time_limit_s=same_time_limit(seconds),
                          lr=cfg.grpo_lr, max_new_tokens=cfg.max_new_tokens, eval_every=0, save_every=0,
                          task=cfg.task, task_options=dict(cfg.task_options), template=cfg.template, seed=cfg.seed,
                          threads=cfg.threads)
    return model_stage(f"GRPO of the student base for the same {seconds:.0f} s", gc, train, log)[0]


def same_time_limit(seconds: float) -> float:
    """GRPO's time limit for `seconds` of distillation: rounded to a tenth, never 0 (no limit)."""
    return max(round(seconds, 1), 0.1)


def run_distill(cfg: DistillConfig, log=print) -> Path:
    """Distil cfg.teacher into a student; returns the distilled student's model directory (report beside it)."""
    check_settings(cfg)
    check_models_exist(cfg, "teacher", "student")
    out = Path(cfg.out)
    base = student_base(cfg, log)
    data, sample_s = teacher_traces(cfg, log)
    distilled, sft_s = sft_student(cfg, base, data, log)
    models = {"teacher": Path(cfg.teacher), "student base": base, "distilled student": distilled}
    seconds = {"distilled student": sample_s + sft_s}
    if cfg.compare_grpo:
        models["student by GRPO, same time"] = grpo_student(cfg, base, sample_s + sft_s, log)
        seconds["student by GRPO, same time"] = sample_s + sft_s
    protocol = EvalConfig(problems=cfg.eval_problems, samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens,
                          template=cfg.template, seed=cfg.seed)
    results = evaluate_models(models, get_task(cfg.task, **cfg.task_options), protocol, log)
    params = {label: parameter_count(path) for label, path in models.items()}
    extra = {label: {"parameters": params[label], "training_seconds": seconds.get(label)} for label in models}
    teacher_p1 = results["teacher"].pass_at_1
    notes = [f"Student/teacher parameters: {params['distilled student'] / params['teacher']:.2f}x "
             f"({params['distilled student']:,} / {params['teacher']:,}).",
             f"Distilled student held-out pass@1: {results['distilled student'].pass_at_1:.1%}, "
             f"{results['distilled student'].pass_at_1 / max(teacher_p1, 1e-9):.0%} of the teacher's {teacher_p1:.1%}.",
             f"Distillation took {sample_s:.0f} s of teacher sampling and {sft_s:.0f} s of SFT; the data: "
             f"{_kept(data)}."]
    if cfg.compare_grpo:
        notes.append(f"The same student base trained by GRPO for those {sample_s + sft_s:.0f} s: held-out pass@1 "
                     f"{results['student by GRPO, same time'].pass_at_1:.1%}.")
    report = write_comparison_report(out / "report.md", "r1lab distill: a smaller student from a reasoning teacher",
                                     results, extra, notes, examples_of=["teacher", "distilled student"])
    (out / "results.json").write_text(json.dumps({k: {**r.to_dict(), **extra[k]} for k, r in results.items()},
                                                 indent=2) + "\n")
    for note in notes:
        log(note)
    log(f"report: {report}\ndistilled student: {distilled}  (Hugging Face format)")
    return distilled


def _kept(data: Path) -> str:
    summary = json.loads(data.with_name(data.stem + ".summary.json").read_text())
    return (f"{summary['kept']} of {summary['sampled']} teacher completions kept (verified correct, readable, "
            f"distinct) from {summary['prompts_with_kept']} of {summary['prompts']} prompts")
