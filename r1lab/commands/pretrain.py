"""`r1lab pretrain`: the tiny base model from scratch, on a synthetic corpus that makes it a model that can reason
but does not reliably choose to: pass@8 high, pass@1 low, where RL with a verifier helps.

Each document is an R1-Zero prompt for an addition problem and a response: worked ("think" share), one
"digit+digit+carry=two-digit sum" step per column from the right (347+285 -> "7+5+0=12,4+8+1=13,3+2+1=06", 632), a
share of them slipping once; guessed, the value of a look-alike problem; or untagged, a guess without the format.
Column steps read digits at fixed offsets from the prompt, which a model of under a million parameters learns in a few
CPU minutes. With `--tools python` the worked style is a call of the Python tool, a share of them miscopying a digit.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from r1lab.config import PretrainConfig, save_config
from r1lab.cpu.process import setup_training_process
from r1lab.engine.tools import ToolSpec, output_text
from r1lab.model import moe
from r1lab.model.architecture import ModelConfig
from r1lab.model.facts import architecture_facts
from r1lab.model.templates import render_prompt
from r1lab.model.tokenizer import Tokenizer, build_tiny_tokenizer
from r1lab.model.transformer import CausalLM
from r1lab.rewards.sandbox.runner import ProgramResult
from r1lab.rewards.tasks import get_task
from r1lab.rewards.tasks.arithmetic import ArithmeticTask, evaluate, render
from r1lab.rewards.tasks.base import Problem
from r1lab.train.memory_budget import check_supervised_memory
from r1lab.train.metrics import LOSS_KEYS, MetricsLogger, training_progress
from r1lab.train.optimizer import make_optimizer
from r1lab.train.resume import save_final
from r1lab.train.supervised import SUPERVISED_BETA2, lm_batch, train_lm

GUESS_THOUGHT = "Easy."
ARCHITECTURE_FILE = "architecture.json"  # beside the model: parameters, KV-cache bytes per token, expert load
LOAD_DOCUMENTS = 512  # documents of the expert-load measurement after pretraining


@dataclass
class CorpusMix:
    think_share: float = 0.3  # worked solutions
    slip_rate: float = 0.2  # worked solutions with one wrong column
    untagged_share: float = 0.05  # answers given without the format


def column_steps(terms: list[int], rng: random.Random | None = None, slip: bool = False) -> tuple[list[str], int]:
    """Column-addition steps (units first) and the answer they lead to; one column may slip when asked."""
    width = max(len(str(t)) for t in terms)
    digits = [str(t).zfill(width) for t in terms]
    slip_at = rng.randrange(width) if slip and rng else -1
    steps, carry, answer_digits = [], 0, []
    for col in range(width - 1, -1, -1):
        column = [int(d[col]) for d in digits]
        total = sum(column) + carry
        if width - 1 - col == slip_at:
            total = max(0, total + rng.choice([-1, 1]))
        steps.append("+".join(map(str, column)) + f"+{carry}={total:02d}")
        carry, answer_digits = total // 10, [total % 10, *answer_digits]
    return steps, int("".join(map(str, [carry, *answer_digits])))


def response(problem: Problem, rng: random.Random, mix: CorpusMix, spec: ToolSpec | None = None) -> str:
    """One response in the corpus style, right after the prompt's "Assistant:": a guess, or a worked solution (with
    spec, a call of the Python tool, its output block as a rollout appends it) of which a share slips."""
    terms, ops = problem.meta["terms"], problem.meta["ops"]
    if spec is None and set(ops) != {"+"}:
        raise ValueError("the worked-solution corpus covers addition only (ops '+')")
    u = rng.random()
    if u >= mix.think_share:
        return guessed(terms, ops, rng, untagged=u < mix.think_share + mix.untagged_share)
    slip = rng.random() < mix.slip_rate
    if spec is None:
        return worked_solution(problem, rng, slip)
    terms = miscopied(terms, rng) if slip else terms
    value = evaluate(terms, ops)
    block = output_text(ProgramResult(f"{value}\n", True), spec)
    return f" <think>{spec.open}print({render(terms, ops)}){spec.close}{block}</think> <answer>{value}</answer>"


def guessed(terms: list[int], ops: list[str], rng: random.Random, untagged: bool) -> str:
    """The value of a look-alike problem (terms of the same lengths), as a guess in the format or in plain text."""
    look_alike = [rng.randint(10 ** (len(str(t)) - 1), 10 ** len(str(t)) - 1) for t in terms]
    guess = evaluate(look_alike, ops)
    if untagged:
        return f" The answer is {guess}."
    return f" <think>{GUESS_THOUGHT}</think> <answer>{guess}</answer>"


def miscopied(terms: list[int], rng: random.Random) -> list[int]:
    """terms with one digit of one term changed (never into a leading zero)."""
    i = rng.randrange(len(terms))
    digits = list(str(terms[i]))
    at = rng.randrange(len(digits))
    digits[at] = rng.choice([d for d in "0123456789" if d != digits[at] and (at or d != "0")])
    return [*terms[:i], int("".join(digits)), *terms[i + 1 :]]


def worked_solution(problem: Problem, rng: random.Random | None = None, slip: bool = False) -> str:
    """The corpus's worked style; without slips, what R1's cold-start data is: readable and in the format."""
    steps, answer = column_steps(problem.meta["terms"], rng, slip)
    return f" <think>{','.join(steps)}</think> <answer>{answer}</answer>"


def cold_start_conversations(task: ArithmeticTask, n: int, seed: int) -> list[dict]:
    """n chat rows (`r1lab sft` format) of train-split problems with their worked solutions."""
    return [{"messages": [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": worked_solution(p)}]}
            for p in task.problems("train", n, seed)]


def arithmetic_corpus(task: ArithmeticTask, n: int, seed: int, mix: CorpusMix | None = None,
                      tools: str = "") -> list[tuple[Problem, str]]:
    """n (problem, response) pairs drawn from the train split; tools="python": the tool corpus."""
    mix, rng, spec = mix or CorpusMix(), random.Random(seed), ToolSpec() if tools else None
    return [(p, response(p, rng, mix, spec)) for p in task.problems("train", n, seed)]


def corpus_pairs(cfg: PretrainConfig, tokenizer: Tokenizer) -> list[tuple[str, str]]:
    """The pretraining documents of cfg, as (rendered prompt, response) pairs."""
    task = get_task(cfg.task, **cfg.task_options)
    mix = CorpusMix(cfg.think_share, cfg.slip_rate, cfg.untagged_share)
    return [(render_prompt(tokenizer, p.prompt, "r1zero"), r)
            for p, r in arithmetic_corpus(task, cfg.documents, cfg.seed, mix, cfg.tools)]


def pretrain(cfg: PretrainConfig, log=print) -> Path:
    """Build the tokenizer, the corpus and the model; train; save a Hugging Face directory at cfg.out/model."""
    setup_training_process(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    save_config(cfg, out / "config.yaml")
    if cfg.task != "arithmetic":
        raise ValueError(f"pretrain builds its corpus for the arithmetic task family only, not {cfg.task!r}")
    tokenizer = build_tiny_tokenizer()
    pairs = corpus_pairs(cfg, tokenizer)
    docs = tokenize_pairs(tokenizer, pairs)
    model = CausalLM(tiny_model_config(cfg, tokenizer))
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    check_supervised_memory(cfg, model, docs, torch.device("cpu"))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"pretrain: {n_params / 1e6:.2f}M parameters, {len(docs)} documents, "
        f"{sum(map(len, docs)) / len(docs):.0f} tokens each on average")
    with MetricsLogger(out, tensorboard=False, resume_step=0) as logger, \
            training_progress(cfg.steps, keys=LOSS_KEYS) as bar:
        def on_step(step: int, metrics: dict) -> None:
            logger.log(step, metrics)
            bar.update(step, metrics)

        train_lm(model, docs, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.warmup_steps,
                 pad_id=tokenizer.pad_id, seed=cfg.seed, dtype=cfg.dtype, recompute_logits=cfg.recompute_logits,
                 micro_batch_size=cfg.micro_batch_size,
                 optimizer=make_optimizer(model, cfg.lr, cfg.weight_decay, SUPERVISED_BETA2),
                 moe_bias_update_speed=cfg.moe_bias_update_speed, balance_loss_weight=cfg.balance_loss_weight,
                 mtp_loss_weight=cfg.mtp_loss_weight, on_step=on_step)
    save_final(model, tokenizer, out, adapter_base=None)
    (out / "corpus_sample.txt").write_text("\n\n".join(p + r for p, r in pairs[:20]))
    facts = {**architecture_facts(model), **expert_load(model, docs[:LOAD_DOCUMENTS], tokenizer.pad_id)}
    (out / ARCHITECTURE_FILE).write_text(json.dumps(facts, indent=2) + "\n")
    log("pretrain: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in facts.items()))
    return out / "model"


@torch.no_grad()
def expert_load(model: CausalLM, docs: list[list[int]], pad_id: int) -> dict:
    """An MoE model's expert load metrics over docs in one forward pass; {} for a dense model."""
    if not moe.moe_layers(model):
        return {}
    model.eval()
    ids, _ = lm_batch(docs, pad_id, None)
    with moe.count_loads(model) as loads:
        moe.mark_real_lengths(model, [len(d) for d in docs], ids.shape[1])
        model(ids.to(next(model.parameters()).device))
    return moe.load_metrics(loads)


def tiny_model_config(cfg: PretrainConfig, tokenizer: Tokenizer) -> ModelConfig:
    hf = {"vocab_size": tokenizer.vocab_size, "hidden_size": cfg.hidden_size,
          "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
          "max_position_embeddings": 512, "rope_theta": 10000.0, "tie_word_embeddings": True,
          "eos_token_id": sorted(tokenizer.eos_ids)[0], "architectures": ["Qwen2ForCausalLM"]}
    if cfg.arch == "deepseek-v3":
        hf.update(tiny_deepseek_v3(cfg))
    return ModelConfig.from_hf(hf, source=f"the tiny {cfg.arch} base")


def tiny_deepseek_v3(cfg: PretrainConfig) -> dict:
    """DeepSeek-V3's config.json keys at the tiny base's width: MLA without a query bottleneck, a rotary part as wide
    as a dense head (column steps are read at fixed offsets), DeepSeekMoE with one expert group."""
    head = cfg.hidden_size // cfg.num_heads
    return {"architectures": ["DeepseekV3ForCausalLM"], "num_key_value_heads": cfg.num_heads,
            "q_lora_rank": None, "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": head // 2,
            "qk_rope_head_dim": head, "v_head_dim": head, "rope_interleave": True, "attention_bias": False,
            "n_routed_experts": cfg.experts, "num_experts_per_tok": cfg.experts_per_token,
            "n_shared_experts": cfg.shared_experts, "moe_intermediate_size": cfg.expert_intermediate_size,
            "first_k_dense_replace": cfg.dense_layers, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
            "routed_scaling_factor": 1.0, "num_nextn_predict_layers": cfg.mtp_depth}


def tokenize_pairs(tokenizer: Tokenizer, pairs: list[tuple[str, str]]) -> list[list[int]]:
    """Prompt + response + end-of-text, as one token list per document."""
    eos = tokenizer.pad_id
    return [tokenizer.encode(prompt) + tokenizer.encode(response, add_special_tokens=False) + [eos]
            for prompt, response in pairs]
