"""Async GRPO (--async-steps): a worker process samples ahead from a fixed, timing-free schedule of policy versions;
a killed and resumed run equals the uninterrupted one; the worker never outlives the trainer."""

import json
import multiprocessing
import shutil
import time

import pytest
import torch

import r1lab.train.checkpoint as checkpoint
import r1lab.train.grpo as grpo
from r1lab.engine.engine import Engine
from r1lab.train.async_rollouts import AsyncRollouts, ChunkedEngine, check_async, thread_split
from r1lab.train.distributed import World
from test_grpo import small_config, weights


EVAL = {"eval_every": 2, "eval_problems": 12, "eval_samples": 2}  # evaluations between steps, in 2 chunks of 8


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def no_worker_left():
    return not [p for p in multiprocessing.active_children() if p.name == "r1lab-rollouts"]


@pytest.mark.slow
def test_killed_and_resumed_async_run_equals_the_uninterrupted_one(tiny_base, tmp_path, monkeypatch):
    straight = grpo.train(small_config(tiny_base, tmp_path / "a", steps=5, save_every=2, async_steps=1, **EVAL),
                          log=lambda *_: None)
    rows = metrics(tmp_path / "a")
    assert [r["async/staleness"] for r in rows] == [0, 1, 1, 1, 1]  # step s samples version max(s - 1, 0)
    assert all("importance_ratio/mean" in r for r in rows if r["zero_variance_groups"] < 1)  # some tokens trained
    assert any(r["zero_variance_groups"] < 1 for r in rows)
    assert no_worker_left()

    real_step = grpo.grpo_step

    def crash_at_step_3(step, *args, **kw):
        if step == 3:
            raise RuntimeError("killed")
        return real_step(step, *args, **kw)

    cfg = small_config(tiny_base, tmp_path / "b", steps=5, save_every=2, async_steps=1, **EVAL)
    monkeypatch.setattr(grpo, "grpo_step", crash_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        grpo.train(cfg, log=lambda *_: None)
    assert no_worker_left()  # ended with the trainer's error
    monkeypatch.setattr(grpo, "grpo_step", real_step)
    cfg.resume = True
    resumed = grpo.train(cfg, log=lambda *_: None)
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_b = metrics(tmp_path / "b")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5]
    assert [r["reward/mean"] for r in rows_b] == [r["reward/mean"] for r in rows]  # the same prompts and samples
    assert evaluations(tmp_path / "b") == evaluations(tmp_path / "a")  # each step's held-out evaluation, once


@pytest.mark.slow
def test_an_async_run_killed_during_a_save_resumes_from_the_checkpoint_before_it_exactly(tiny_base, tmp_path,
                                                                                       monkeypatch):
    straight = grpo.train(small_config(tiny_base, tmp_path / "a", steps=5, save_every=2, async_steps=1),
                          log=lambda *_: None)
    real_manifest = checkpoint.write_manifest

    def killed_writing_step_4(directory, *args, **kw):  # the last file of a checkpoint, before its rename
        if directory.name == "step_000004.tmp":
            shutil.copytree(directory, tmp_path / "left")  # what a kill here leaves on disk
            raise RuntimeError("killed")
        return real_manifest(directory, *args, **kw)

    cfg = small_config(tiny_base, tmp_path / "b", steps=5, save_every=2, async_steps=1)
    monkeypatch.setattr(checkpoint, "write_manifest", killed_writing_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        grpo.train(cfg, log=lambda *_: None)
    assert no_worker_left()
    monkeypatch.setattr(checkpoint, "write_manifest", real_manifest)
    shutil.move(tmp_path / "left", tmp_path / "b" / "checkpoints" / "step_000004.tmp")
    cfg.resume = True
    resumed = grpo.train(cfg, log=lambda *_: None)  # from step 2's checkpoint, with its batches in flight
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["reward/mean"] for r in metrics(tmp_path / "b")][-3:] == [r["reward/mean"] for r in
                                                                         metrics(tmp_path / "a")][-3:]


def evaluations(run):
    """step -> the held-out figures logged, but for the throughput (a timing)."""
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert len({r["step"] for r in rows}) == len(rows)
    return {r["step"]: {k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows}


@pytest.mark.slow
def test_the_workers_held_out_evaluations_are_of_the_weights_of_their_step(tiny_base, tmp_path):
    """The worker evaluates version v, logged at step v: the figures and completions of those weights evaluated
    in the worker's chunks on its threads; the last evaluation is the final model's."""
    cfg = small_config(tiny_base, tmp_path, steps=4, save_every=2, async_steps=1, **EVAL)
    final = grpo.train(cfg, log=lambda *_: None)
    logged = evaluations(tmp_path)
    assert sorted(logged) == [0, 2, 4]
    task = grpo.get_task(cfg.task, **cfg.task_options)
    problems = grpo.heldout_problems(task, "test", cfg.eval_problems, cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(thread_split(threads, cfg.rollout_threads)[0])
    chunks = []
    try:
        for step, weights_dir in [(0, tiny_base), (2, tmp_path / "checkpoints" / "step_000002"), (4, final)]:
            model, tok = grpo.load_policy(str(weights_dir), torch.device("cpu"))
            engine = ChunkedEngine(Engine(model.eval(), tok), 8, lambda step=step: chunks.append(step))
            result = grpo.evaluate_policy(engine, task, grpo.heldout_config(cfg), problems)
            saved = json.loads((tmp_path / "eval" / f"step_{step:06d}.json").read_text())["heldout"]
            assert saved["records"] == result.to_dict(include_records=True)["records"]
            assert engine.tokens == sum(s["length"] for r in result.records for s in r["samples"]) > 0
            assert logged[step] == {"step": step, "split": "heldout",
                                    **{k: v for k, v in result.to_dict().items() if k != "tokens_per_s"}}
    finally:
        torch.set_num_threads(threads)
    assert chunks == [0, 0, 2, 2, 4, 4]
    assert no_worker_left()


@pytest.mark.slow
def test_async_run_differs_from_the_synchronous_one_and_corrects_by_default(tiny_base, tmp_path):
    sync = grpo.train(small_config(tiny_base, tmp_path / "s", steps=2), log=lambda *_: None)
    run = grpo.train(small_config(tiny_base, tmp_path / "x", steps=2, async_steps=1), log=lambda *_: None)
    # step 1 (0-based) samples the initial weights again instead of the updated ones
    assert metrics(tmp_path / "s")[0]["reward/mean"] == metrics(tmp_path / "x")[0]["reward/mean"]
    a, b = weights(sync), weights(run)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    saved = (tmp_path / "x" / "config.yaml").read_text()
    assert "mismatch_correction: tis" in saved and "mismatch_correction: none" in (tmp_path / "s" / "config.yaml").read_text()


def worker(tiny_base, tmp_path, sample, settings=None, **evaluations) -> tuple:
    """The policy and an AsyncRollouts over the tiny base's arithmetic prompts (sample None: the run's own)."""
    cfg = small_config(tiny_base, tmp_path, **{"steps": 2, "async_steps": 1, **(settings or {})})
    model, tok = grpo.load_policy(str(tiny_base), torch.device("cpu"))
    stream = grpo.PromptStream(grpo.get_task("arithmetic"), cfg)
    sample = sample or grpo.functools.partial(grpo.sample_rollouts, task=stream.task)
    return model, AsyncRollouts(model, tok, cfg, sample, grpo.sync_rollout_policy,
                                lambda step: (stream.batch(step), [0] * cfg.prompts_per_step), log=lambda *_: None,
                                **evaluations)


@pytest.mark.slow
def test_the_trainer_decodes_evaluation_chunks_while_it_waits_with_the_workers_samples(tiny_base, tmp_path):
    settings = {**EVAL, "eval_problems": 48}  # 6 chunks of 8 prompts: the trainer is offered some while it waits
    cfg = small_config(tiny_base, tmp_path, **settings)
    task = grpo.get_task("arithmetic")
    problems = grpo.heldout_problems(task, "test", cfg.eval_problems, cfg.seed)
    evaluate = grpo.functools.partial(grpo.evaluate_policy, task=task, ec=grpo.heldout_config(cfg), problems=problems)
    reports = {}
    model, source = worker(tiny_base, tmp_path, None, settings, evaluate=evaluate,
                           report=lambda step, result: reports.update({step: result}))
    with source:
        source.start(0, model, None)
        source.evaluate(0, model)
        source.report_evaluations()  # waiting: the trainer decodes chunks too
        assert source.taken["chunks"] > 0
    threads = torch.get_num_threads()
    torch.set_num_threads(source.worker_threads)
    try:
        alone = evaluate(ChunkedEngine(Engine(model.eval(), source.tokenizer), 8, lambda: None))
    finally:
        torch.set_num_threads(threads)
    assert reports[0].to_dict(include_records=True)["records"] == alone.to_dict(include_records=True)["records"]


@pytest.mark.slow
def test_the_trainer_samples_a_batch_the_worker_has_not_begun_the_same_as_the_worker(tiny_base, tmp_path):
    model, source = worker(tiny_base, tmp_path, None, {"steps": 3})
    with source:
        source.start(0, model, None)
        batches = [source.take(0)]  # the worker is still starting: the trainer samples this batch itself
        assert source.taken["rollouts"] == 1
        for step in (1, 2):  # the same weights published again: versions 1 and 2 sample as version 0 did
            source.after_update(step - 1, model)
            batches.append(source.take(step))
    assert [b.versions[0] for b in batches] == [0, 0, 1]
    threads = torch.get_num_threads()
    torch.set_num_threads(source.worker_threads)
    try:
        engine = Engine(model.eval(), source.tokenizer)
        alone = [source.sample(engine, source.batch_of(step)[0], source.cfg, source.batch_of(step)[1])
                 for step in range(3)]
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(batches, alone):
        assert got.completion_ids == want.completion_ids and got.old_logprobs == want.old_logprobs


def failing_sample(engine, problems, cfg, seeds):
    raise ValueError("no room left for the rollouts")


@pytest.mark.slow
def test_a_worker_failure_is_reported_and_the_worker_ends(tiny_base, tmp_path):
    model, source = worker(tiny_base, tmp_path, failing_sample)
    assert torch.get_num_threads() == thread_split(source.previous_threads, 0)[1]
    with pytest.raises(RuntimeError, match="failed at step 1: ValueError: no room left"), source:
        source.start(0, model, None)
        deadline = time.monotonic() + 120
        while source.claims.shared[3] < 0 and time.monotonic() < deadline:  # the worker, not the trainer, samples it
            time.sleep(0.01)
        source.take(0)
    assert no_worker_left()


def failing_evaluation(engine):
    raise ValueError("no scorer")


@pytest.mark.slow
def test_a_failed_evaluation_in_the_worker_is_reported(tiny_base, tmp_path):
    model, source = worker(tiny_base, tmp_path, None, evaluate=failing_evaluation, report=None)
    with pytest.raises(RuntimeError, match="failed at the held-out evaluation at step 0: ValueError: no scorer"), \
            source:
        source.start(0, model, None)
        source.evaluate(0, model)
        source.report_evaluations()
    assert no_worker_left()


@pytest.mark.parametrize("change, why", [(dict(tools="python"), "tool calls"), (dict(shard=True), "unsharded"),
                                         (dict(lora_rank=4), "LoRA"), (dict(task="agent:my_agent:run"), "agents")])
def test_what_the_worker_cannot_do_is_refused_in_one_line(tiny_base, tmp_path, change, why):
    cfg = small_config(tiny_base, tmp_path, async_steps=1, **change)
    with pytest.raises(ValueError, match=why):
        check_async(cfg, World(), torch.device("cpu"))
    with pytest.raises(ValueError, match="CPU"):
        check_async(small_config(tiny_base, tmp_path, async_steps=1), World(), torch.device("cuda"))
    check_async(small_config(tiny_base, tmp_path, async_steps=0, **change), World(), torch.device("cuda"))


def test_threads_are_split_between_worker_and_trainer():
    assert thread_split(2, 0) == (1, 1)
    assert thread_split(1, 0) == (1, 1)
    assert thread_split(16, 0) == (8, 8)
    assert thread_split(16, 4) == (4, 12)
