"""Distillation and the four-stage pipeline at toy size: every stage runs, reports compare the models on one held-out
set, finished stages are reused, and GRPO's time limit (the same-wall-time comparison) holds."""

import json

import pytest

from r1lab.commands.distill import run_distill, same_time_limit
from r1lab.commands.pipeline import run_pipeline
from r1lab.commands.stages import parameter_count, tiny_grpo_config
from r1lab.config import DistillConfig, PipelineConfig
from r1lab.train.grpo import train

pytestmark = pytest.mark.slow  # end-to-end runs of whole commands: the full suite only (make test)

TOY = dict(task_options={"min_terms": 3, "max_terms": 4})


def test_grpo_stops_at_its_time_limit(tiny_base, tmp_path):
    cfg = tiny_grpo_config(tiny_base, tmp_path, steps=1000, time_limit_s=1e-3, eval_every=0, save_every=0,
                           prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8, **TOY)
    train(cfg, log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "step_time_s" in r]) == 1  # the first step already reached the limit
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_the_same_time_limit_is_never_no_limit():
    assert same_time_limit(0.0495) == 0.1 and same_time_limit(0.26) == 0.3  # 0 would mean: no limit at all


def test_distill_compares_the_student_with_grpo_for_the_same_time(tiny_base, tmp_path):
    cfg = DistillConfig(teacher=str(tiny_base), student=str(tiny_base), problems=16, samples=4, max_new_tokens=48,
                        epochs=1.0, batch_size=4, eval_problems=4, eval_samples=2, out=str(tmp_path), **TOY)
    lines = []
    student = run_distill(cfg, log=lines.append)
    assert (student / "model.safetensors").exists()
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"teacher", "student base", "distilled student", "student by GRPO, same time"}
    same = results["student by GRPO, same time"]["training_seconds"]
    assert same == results["distilled student"]["training_seconds"] > 0
    grpo_config = (tmp_path / "student-grpo" / "config.yaml").read_text()
    assert f"time_limit_s: {same_time_limit(same)}" in grpo_config
    rows = [json.loads(line) for line in (tmp_path / "traces" / "sft.jsonl").read_text().splitlines()]
    assert all(r["accuracy"] == 1.0 and r["source_model"] for r in rows)  # only verified traces, with provenance
    report = (tmp_path / "report.md").read_text()
    assert "distilled student" in report and "language_consistency" in report
    lines.clear()
    run_distill(cfg, log=lines.append)  # everything finished is reused, the same-time figure too
    assert sum("reusing" in line for line in lines) == 3
    assert json.loads((tmp_path / "results.json").read_text())["student by GRPO, same time"]["training_seconds"] == same


# the test base's own task (conftest: 3 or 4 one-digit terms), written out in full over the demo's options
TINY_BASE_TASK = {"min_terms": 3, "max_terms": 4, "min_digits": 1, "max_digits": 1, "ops": "+"}
TOY_STAGES = dict(r1zero_steps=1, cold_start_epochs=1.0, reasoning_rl_steps=1, rejection_problems=16,
                  rejection_samples=4, final_rl_steps=1, distill_problems=128, eval_problems=4, eval_samples=2)


def test_pipeline_runs_every_stage_and_reports_side_by_side(tiny_base, tmp_path):
    # the test base (pretrained for seconds on its own sums) gets a few right, so rejection sampling keeps some
    cfg = PipelineConfig(out=str(tmp_path), base=str(tiny_base), task_options=TINY_BASE_TASK, cold_start_examples=16,
                         student_pretrain_steps=5, **TOY_STAGES)
    report = run_pipeline(cfg, log=lambda *_: None).read_text()
    for label in ("R1-Zero", "stage 1 cold start", "stage 3 rejection SFT", "R1 pipeline (stage 4)",
                  "distilled student", "format_rate", "language_consistency", "mean_length", "cons@2",
                  "](r1zero/report/heldout_accuracy.png)"):
        assert label in report
    assert (tmp_path / "r1zero" / "report" / "heldout_accuracy.png").exists()
    data = [json.loads(line) for line in (tmp_path / "stage1-cold-start" / "data.jsonl").read_text().splitlines()]
    assert len(data) == 16 and all("<think>" in d["messages"][1]["content"] for d in data)
    assert "language_weight: 0.1" in (tmp_path / "stage2-reasoning-rl" / "config.yaml").read_text()
    # stage 3 fine-tunes the base, as R1 fine-tunes DeepSeek-V3-Base, not the RL checkpoint
    assert f"model: {tiny_base}" in (tmp_path / "stage3-sft" / "config.yaml").read_text()
    assert parameter_count(tmp_path / "distill" / "student-base" / "model") > 0


def test_the_default_student_has_at_most_a_quarter_of_the_demo_models_parameters():
    from r1lab.commands.pretrain import tiny_model_config
    from r1lab.config import PretrainConfig
    from r1lab.model.tokenizer import build_tiny_tokenizer
    from r1lab.model.transformer import CausalLM

    d, tok = DistillConfig(), build_tiny_tokenizer()
    student = PretrainConfig(hidden_size=d.student_hidden_size, num_layers=d.student_num_layers,
                             num_heads=d.student_num_heads, num_kv_heads=d.student_num_kv_heads,
                             intermediate_size=d.student_intermediate_size)
    count = lambda cfg: sum(p.numel() for p in CausalLM(tiny_model_config(cfg, tok)).parameters())  # noqa: E731
    assert count(student) <= count(PretrainConfig()) / 4


def test_the_shipped_pipeline_yaml_holds_the_defaults():
    import dataclasses
    from pathlib import Path

    import yaml

    shipped = yaml.safe_load((Path(__file__).parent.parent / "configs" / "pipeline.yaml").read_text())
    assert shipped == dataclasses.asdict(PipelineConfig())


def test_pipeline_on_your_own_data_file_and_models(tiny_base, tmp_path):
    from r1lab.commands.pretrain import cold_start_conversations
    from r1lab.commands.sample import write_jsonl
    from r1lab.rewards.tasks import get_task

    task = get_task("arithmetic", **TINY_BASE_TASK)
    problems = task.problems("train", 150, seed=5) + task.problems("test", 150, seed=5)
    rows = [{"question": p.prompt, "answer": p.answer} for p in problems]
    write_jsonl(tmp_path / "mine.jsonl", rows)
    write_jsonl(tmp_path / "cold.jsonl", cold_start_conversations(task, 12, seed=6))
    with pytest.raises(ValueError, match="give base, cold_start_data, student"):
        run_pipeline(PipelineConfig(out=str(tmp_path / "run"), task=str(tmp_path / "mine.jsonl")))
    cfg = PipelineConfig(out=str(tmp_path / "run"), task=str(tmp_path / "mine.jsonl"), base=str(tiny_base),
                         cold_start_data=str(tmp_path / "cold.jsonl"), student=str(tiny_base), **TOY_STAGES)
    report = run_pipeline(cfg, log=lambda *_: None).read_text()
    assert "R1 pipeline (stage 4)" in report and "distilled student" in report
    assert f"data: {tmp_path / 'cold.jsonl'}" in (tmp_path / "run" / "stage1-cold-start" / "config.yaml").read_text()
    assert not (tmp_path / "run" / "base").exists()  # nothing pretrained: your models were used


def test_a_stage_is_reused_until_its_input_is_remade(tmp_path):
    import os
    from dataclasses import dataclass

    from r1lab.commands.stages import run_stage
    from r1lab.config import save_config

    @dataclass
    class StageConfig:
        model: str
        steps: int = 1

    model = tmp_path / "input-model"
    model.mkdir()
    (model / "model.safetensors").write_text("v1")
    cfg, config_path, output = StageConfig(str(model)), tmp_path / "stage" / "config.yaml", tmp_path / "stage" / "out"
    runs = []

    def stage():
        runs.append(1)
        save_config(cfg, config_path)
        output.write_text("done")

    for _ in range(2):
        run_stage("stage", cfg, config_path, output, stage, log=lambda *_: None)
    assert len(runs) == 1  # the second time it was reused
    later = output.stat().st_mtime + 10
    os.utime(model / "model.safetensors", (later, later))  # the input model was remade after the stage ran
    run_stage("stage", cfg, config_path, output, stage, log=lambda *_: None)
    assert len(runs) == 2


def test_a_stage_killed_when_rerun_with_other_settings_is_not_taken_for_finished(tmp_path):
    from dataclasses import dataclass, replace

    from r1lab.commands.stages import run_stage
    from r1lab.config import save_config

    @dataclass
    class StageConfig:
        steps: int = 1

    config_path, output = tmp_path / "stage" / "config.yaml", tmp_path / "stage" / "out"
    runs = []

    def stage(cfg, killed=False):
        runs.append(cfg.steps)
        save_config(cfg, config_path)  # as grpo, sft, pretrain and sample do: the config first, the output last
        if killed:
            raise KeyboardInterrupt
        output.write_text(f"{cfg.steps} steps")

    first, longer = StageConfig(), StageConfig(steps=2)
    run_stage("stage", first, config_path, output, lambda: stage(first), log=lambda *_: None)
    with pytest.raises(KeyboardInterrupt):  # the longer run is killed before it writes its output
        run_stage("stage", longer, config_path, output, lambda: stage(longer, killed=True), log=lambda *_: None)
    run_stage("stage", replace(longer), config_path, output, lambda: stage(longer), log=lambda *_: None)
    assert runs == [1, 2, 2] and output.read_text() == "2 steps"  # run again, not the 1-step output reused


def test_each_rl_stage_evaluates_with_the_pipelines_eval_settings(tmp_path, monkeypatch):
    import r1lab.commands.pipeline as pipeline

    ran = []
    monkeypatch.setattr(pipeline, "run_stage", lambda label, config, *_: ran.append(config) or 0.0)
    cfg = PipelineConfig(out=str(tmp_path), eval_problems=5, eval_samples=2)
    pipeline.Stages(cfg, log=lambda *_: None).rl("stage 2: reasoning RL", "stage2", tmp_path / "model", steps=3)
    assert [(c.eval_problems, c.eval_samples) for c in ran] == [(5, 2)]  # --eval-samples reached every stage


def test_a_misspelt_teacher_student_or_base_is_refused_before_any_stage(tmp_path, monkeypatch):
    import r1lab.commands.distill as distill
    import r1lab.commands.pipeline as pipeline

    stages = []  # a misspelt --teacher was found only once the student's base had been pretrained
    monkeypatch.setattr(distill, "pretrained_base", lambda *a: stages.append("pretrain") or tmp_path)
    monkeypatch.setattr(pipeline, "pretrained_base", lambda *a: stages.append("pretrain") or tmp_path)
    missing = str(tmp_path / "typo")
    with pytest.raises(ValueError, match=f"teacher: {missing}: no config.json"):
        run_distill(DistillConfig(teacher=missing, out=str(tmp_path / "d")))
    with pytest.raises(ValueError, match=f"student: {missing}: no config.json"):
        run_pipeline(PipelineConfig(student=missing, out=str(tmp_path / "p")))
    with pytest.raises(ValueError, match=f"base: {missing}: no config.json"):
        run_pipeline(PipelineConfig(base=missing, out=str(tmp_path / "p")))
    assert stages == []
def test_the_cold_start_data_follows_the_cold_start_settings(tmp_path, monkeypatch):
    from r1lab.commands import pipeline

    monkeypatch.setattr(pipeline, "run_stage", lambda *_: 0.0)
    data = tmp_path / "stage1-cold-start" / "data.jsonl"
    pipeline.Stages(PipelineConfig(out=str(tmp_path), cold_start_examples=8), log=print).cold_start(tmp_path / "base")
    written = data.stat().st_mtime_ns
    pipeline.Stages(PipelineConfig(out=str(tmp_path), cold_start_examples=8), log=print).cold_start(tmp_path / "base")
    assert data.stat().st_mtime_ns == written  # the same data: not rewritten, so a finished stage 1 is reused
    pipeline.Stages(PipelineConfig(out=str(tmp_path), cold_start_examples=4), log=print).cold_start(tmp_path / "base")
    assert len(data.read_text().splitlines()) == 4  # it kept the 8 rows of the earlier run, and stage 1 with them
