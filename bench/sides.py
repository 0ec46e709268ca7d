"""The two GRPO sides as both benchmarks run them (bench/grpo_vs_trl.py on the CPU, bench/grpo_gpu.py on a GPU), so
that the two benches measure the same way:

* TRL: ``trl_child``, TRL's GRPOTrainer on the bench workload in the calling (child) process, timed round by round by
  its callbacks; it writes its figures to ``a.result``;
* r1lab: ``r1lab_grpo_argv``, the ``r1lab grpo`` command line of the workload, and ``summarise_r1lab_run``, its
  figures read back from RUN_DIR/metrics.jsonl;
* ``check_side``: the warnings printed when a side did not run the workload asked for.

``a`` is an argparse.Namespace (or one built from a dict) with the workload's fields: rounds, warmup, updates,
prompts_per_step, samples_per_prompt, max_new_tokens, threads, lr, seed, plus model, prompts, run_dir, result and
trl_gradient_checkpointing for the TRL child. TRL is a bench-only dependency: it is imported inside trl_child only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import median

# ----------------------------------------------------------------------------------------------
# TRL side (runs in a child process)
# ----------------------------------------------------------------------------------------------


def trl_child(a: argparse.Namespace, device: str = "cpu", weights_dtype: str = "float32", bf16: bool = False,
              micro_batch_size: int = 0) -> None:
    """TRL's GRPOTrainer on the bench workload; writes its figures to a.result.

    The defaults are the CPU bench's: CPU, fp32, one micro-batch per round. bench/grpo_gpu.py runs the same child
    on "cuda" with bf16 (TrainingArguments.bf16: autocast), the weights loaded in weights_dtype, and micro-batches
    of micro_batch_size completions (gradient accumulation over them gives one optimizer step per update, as
    r1lab's micro-batches do).
    """
    import torch

    torch.set_num_threads(a.threads)
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    micro, accumulation = _micro_batches(a, micro_batch_size)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, weights_dtype))
    ds = load_dataset("json", data_files=str(a.prompts), split="train")

    def reward_len_mod3(completions, **kwargs):  # trivial and cheap on purpose
        return [float(len(c) % 3) for c in completions]

    config, ckpt_field = trl_config(a, micro, accumulation, tok.eos_token_id, device, bf16)
    stats = {"round_tokens": [], "round_lengths": [], "gen_score_s": [], "logs": []}
    timer = _round_timer(a.updates, stats)
    trainer = _counting_trainer_class(stats)(
        model=model,
        reward_funcs=reward_len_mod3,
        args=config,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[timer],
        peft_config=_lora_config(a),
    )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    res = trl_figures(a, stats, timer, total, micro * accumulation)
    res.update(optimizer_steps=trainer.state.global_step, threads=torch.get_num_threads(),
               peak_rss_mb_self=_peak_rss_mb_self(), trl_config=_trl_config_figures(config, ckpt_field))
    Path(a.result).write_text(json.dumps(res, indent=2, default=str))
    w, meas_time = a.warmup, res["measured_time_s"]
    print(
        f"[trl] rounds={a.rounds} measured={a.rounds - w} tokens={res['measured_tokens']} time={meas_time:.2f}s "
        f"-> {res['tokens_per_s']:.1f} completion tok/s (lengths {res['completion_len_min']}..{res['completion_len_max']}; "
        f"generate+score {sum(stats['gen_score_s'][w:]):.2f}s of {meas_time:.2f}s)",
        flush=True,
    )


def _lora_config(a):
    """peft's LoraConfig for --lora-rank (every linear layer but the head, no dropout), or None: full fine-tuning."""
    if not getattr(a, "lora_rank", 0):
        return None
    from peft import LoraConfig

    return LoraConfig(r=a.lora_rank, lora_alpha=a.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def _micro_batches(a, micro_batch_size: int) -> tuple[int, int]:
    """(completions per micro-batch, micro-batches per round); 0 means the whole round in one micro-batch."""
    completions_per_round = a.prompts_per_step * a.samples_per_prompt
    micro = micro_batch_size or completions_per_round
    if completions_per_round % micro:
        raise ValueError(f"{completions_per_round} completions per round do not split into micro-batches of {micro}")
    return micro, completions_per_round // micro


def trl_config(a, micro: int, accumulation: int, eos_id: int, device: str, bf16: bool):
    """TRL's GRPOConfig for the workload, and the name of its gradient checkpointing field."""
    from trl import GRPOConfig

    ckpt_field = (
        "activation_checkpointing"
        if "activation_checkpointing" in GRPOConfig.__dataclass_fields__
        else "gradient_checkpointing"
    )
    config = GRPOConfig(
        output_dir=str(a.run_dir),
        # one generation round = prompts_per_step * G completions, all in ONE optimizer step
        # (on the CPU one micro-batch; on the GPU `accumulation` micro-batches accumulated):
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation,  # => generation_batch_size = completions_per_round
        num_generations=a.samples_per_prompt,
        num_iterations=a.updates,  # each round's batch is reused for `updates` optimizer steps
        max_steps=a.rounds * a.updates,
        max_completion_length=a.max_new_tokens,
        generation_kwargs={"suppress_tokens": [eos_id]},  # end-of-text never sampled -> fixed length
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=a.lr,
        max_grad_norm=getattr(a, "max_grad_norm", 1.0),  # 0: no clipping (the optimizer-in-backward comparison)
        beta=0.0,
        loss_type="dapo",
        use_vllm=False,
        use_cpu=device == "cpu",
        bf16=bf16,
        fp16=False,
        seed=a.seed,
        data_seed=a.seed,
        report_to="none",
        logging_steps=1,  # metrics are accumulated anyway; printing is removed in trl_child
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
        remove_unused_columns=False,
        # TRL's default is gradient checkpointing ON; off is faster on this tiny model (fairer to TRL).
        # transformers 5 renamed it activation_checkpointing (gradient_checkpointing is a deprecated alias).
        **{ckpt_field: a.trl_gradient_checkpointing},
    )
    return config, ckpt_field


def _counting_trainer_class(stats: dict):
    """GRPOTrainer that records, per generation round, its time and the completion tokens it generated (built in a
    function: trl is imported only in the child)."""
    from trl import GRPOTrainer

    class CountingGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            stats["gen_score_s"].append(time.perf_counter() - t)
            lengths = out["completion_mask"].sum(dim=1)
            stats["round_tokens"].append(int(lengths.sum()))
            stats["round_lengths"].append((int(lengths.min()), int(lengths.max()), int(lengths.numel())))
            return out

    return CountingGRPOTrainer


def _round_timer(updates: int, stats: dict):
    """A callback timing each round, and keeping TRL's logs in stats["logs"]."""
    from transformers import TrainerCallback

    class RoundTimer(TrainerCallback):
        """A round = `updates` optimizer steps on one generated batch; time it from its first step's begin
        to its last step's end (generation happens inside the first step's training_step)."""

        def __init__(self):
            self.t_begin = None
            self.round_times = []
            self.round_bounds = []

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step % updates == 0:
                self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % updates == 0:
                t = time.perf_counter()
                self.round_times.append(t - self.t_begin)
                self.round_bounds.append((self.t_begin, t))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                stats["logs"].append({"step": state.global_step, **logs})

    return RoundTimer()


def trl_figures(a, stats: dict, timer, total: float, completions_per_round: int) -> dict:
    """The TRL side's figures, from the per-round records of _counting_trainer_class and _round_timer."""
    n = len(timer.round_times)
    assert n == a.rounds, f"expected {a.rounds} rounds, timed {n}"
    assert len(stats["round_tokens"]) == a.rounds, f"expected {a.rounds} generations, saw {stats['round_tokens']}"
    w = a.warmup
    meas_tokens = sum(stats["round_tokens"][w:])
    meas_time = sum(timer.round_times[w:])
    # wall clock from the end of the last warm-up round to the end of the last round (includes the
    # dataloader and callbacks between rounds); for information
    wall_between = timer.round_bounds[-1][1] - timer.round_bounds[w - 1][1] if w > 0 else None
    lengths = stats["round_lengths"]
    return {
        "side": "trl",
        "rounds": a.rounds,
        "warmup_rounds": w,
        "rounds_measured": a.rounds - w,
        "completions_per_round": completions_per_round,
        "completion_tokens_per_round": stats["round_tokens"],
        "completion_len_min": min(x[0] for x in lengths),
        "completion_len_max": max(x[1] for x in lengths),
        "completions_seen_per_round": [x[2] for x in lengths],
        "round_time_s": timer.round_times,
        "generate_and_score_s": stats["gen_score_s"],  # part of round_time_s: generation + rewards + advantages
        "trl_mean_length": [x.get("completions/mean_length") for x in stats["logs"] if "completions/mean_length" in x],
        "measured_tokens": meas_tokens,
        "measured_time_s": meas_time,
        "tokens_per_s": meas_tokens / meas_time,
        "median_round_tokens_per_s": median(
            [t / s for t, s in zip(stats["round_tokens"][w:], timer.round_times[w:], strict=True)]
        ),
        "tokens_per_s_wallclock": (meas_tokens / wall_between) if wall_between else None,
        "train_total_s": total,
    }


def _peak_rss_mb_self() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trl_config_figures(config, ckpt_field: str) -> dict:
    """The GRPOConfig fields that define the workload, as TRL resolved them (generation_batch_size included)."""
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
            "generation_batch_size", "num_generations", "num_iterations", "max_steps", "max_completion_length",
            "generation_kwargs", "temperature", "top_p", "top_k", "learning_rate", "beta", "loss_type",
            "scale_rewards", ckpt_field, "use_vllm", "use_cpu", "bf16", "fp16", "seed")
    return {k: getattr(config, k) for k in keys}


# ----------------------------------------------------------------------------------------------
# r1lab side
# ----------------------------------------------------------------------------------------------


def r1lab_grpo_argv(a, model_dir: Path, prompts: Path, run_dir: Path) -> list[str]:
    """Arguments of `r1lab` (after `python -m r1lab`) for the bench workload."""
    return [
        "grpo",
        "--model", str(model_dir), "--task", str(prompts), "--template", "none",
        "--steps", str(a.rounds), "--prompts-per-step", str(a.prompts_per_step),
        "--samples-per-prompt", str(a.samples_per_prompt), "--updates-per-batch", str(a.updates),
        "--max-new-tokens", str(a.max_new_tokens), "--suppress-eos", "true",
        # TRL trains every completion; so must r1lab (its rewards here are all zero: it would skip every sequence)
        "--skip-zero-advantage", "false",
        "--eval-every", "0", "--save-every", "0", "--out", str(run_dir),
        "--seed", str(a.seed), "--lr", str(a.lr),
    ]  # fmt: skip


def _r1lab_steps(a, metrics: Path) -> list[dict]:
    """The step lines of RUN_DIR/metrics.jsonl, in step order; exits with a message when they are missing."""
    if not metrics.exists():
        sys.exit(f"ERROR: r1lab exited 0 but wrote no {metrics}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "step_time_s" in r and "completion_tokens" in r]
    if len(steps) != a.rounds:
        sys.exit(
            f"ERROR: expected {a.rounds} step lines with step_time_s and completion_tokens in {metrics}, "
            f"found {len(steps)} (of {len(rows)} lines)"
        )
    steps.sort(key=lambda r: r.get("step", 0))
    return steps


def summarise_r1lab_run(a, metrics: Path, proc: dict) -> dict:
    """The figures of a finished r1lab run from its RUN_DIR/metrics.jsonl; exits with a message when they are missing."""
    steps = _r1lab_steps(a, metrics)
    meas = steps[a.warmup :]
    tokens = [int(r["completion_tokens"]) for r in steps]
    expected = a.prompts_per_step * a.samples_per_prompt * a.max_new_tokens
    meas_tokens = sum(int(r["completion_tokens"]) for r in meas)
    meas_time = sum(float(r["step_time_s"]) for r in meas)
    return {
        "side": "r1lab",
        "rounds": a.rounds,
        "warmup_rounds": a.warmup,
        "rounds_measured": len(meas),
        "completions_per_round": a.prompts_per_step * a.samples_per_prompt,
        "completion_tokens_per_round": tokens,
        "tokens_ok": all(t == expected for t in tokens),
        # the task's reward on a random model is uniform within every group (all zero); r1lab must still run its
        # updates then (drop_uniform_groups off, skip_zero_advantage off), or it would skip the training half of a round
        "zero_variance_groups": [r.get("zero_variance_groups") for r in steps],
        "round_time_s": [float(r["step_time_s"]) for r in steps],
        "measured_tokens": meas_tokens,
        "measured_time_s": meas_time,
        "tokens_per_s": meas_tokens / meas_time,
        "median_round_tokens_per_s": median(
            [int(r["completion_tokens"]) / float(r["step_time_s"]) for r in meas]
        ),
        "peak_rss_mb": proc["peak_rss_mb"],
        "process": proc,
    }


# ----------------------------------------------------------------------------------------------
# Both sides
# ----------------------------------------------------------------------------------------------


def check_side(side: str, r: dict, a) -> None:
    """Print a warning when a side's run was not the workload asked for (lengths, tokens per round)."""
    if side == "trl":
        if r["completion_len_min"] != a.max_new_tokens or r["completion_len_max"] != a.max_new_tokens:
            print(f"WARNING: TRL completion lengths {r['completion_len_min']}..{r['completion_len_max']}"
                  f" != {a.max_new_tokens}: EOS suppression did not hold")
        return
    zv = [x for x in r["zero_variance_groups"][a.warmup :] if x is not None]
    if zv and min(zv) >= 1.0:
        print("NOTE: every r1lab group had a uniform reward (expected with a random model); this is like-for-like "
              "only because r1lab still runs its updates then (drop_uniform_groups and skip_zero_advantage off).")
    if not r["tokens_ok"]:
        print(f"WARNING: r1lab completion_tokens per step {r['completion_tokens_per_round']} != "
              f"{a.prompts_per_step * a.samples_per_prompt * a.max_new_tokens}")
