"""Supervised training: the tiny base model's pretraining from scratch (`r1lab pretrain`).

The same loop (next-token loss on tokenised prompt/response pairs, padding masked out) serves later SFT stages.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from r1lab.config import PretrainConfig, save_config
from r1lab.corpus import CorpusMix, arithmetic_corpus
from r1lab.model import CausalLM, ModelConfig, save_model
from r1lab.runtime import setup_training_process
from r1lab.tasks import get_task
from r1lab.tokenizer import Tokenizer, build_tiny_tokenizer, render_prompt


def tokenize_pairs(tokenizer: Tokenizer, pairs: list[tuple[str, str]]) -> list[list[int]]:
    """Prompt + response + end-of-text, as one token list per document."""
    eos = tokenizer.pad_id
    return [tokenizer.encode(prompt) + tokenizer.encode(response, add_special_tokens=False) + [eos]
            for prompt, response in pairs]


def lm_batch(docs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) input ids and the (B, T) mask of real tokens."""
    T = max(len(d) for d in docs)
    ids = torch.full((len(docs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), T), dtype=torch.bool)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = torch.tensor(d)
        mask[i, : len(d)] = True
    return ids, mask


def lm_loss(model: CausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(ids)[:, :-1]  # (B, T-1, V); right padding needs no attention mask under causal attention
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_lm(model: CausalLM, docs: list[list[int]], *, steps: int, batch_size: int, lr: float, warmup: int,
             weight_decay: float, pad_id: int, seed: int, log=print) -> list[float]:
    """AdamW on shuffled documents; returns the loss per step."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    order: list[int] = []
    losses = []
    model.train()
    t0 = time.time()
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(docs)), len(docs))
        batch, order = [docs[i] for i in order[:batch_size]], order[batch_size:]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup)
        loss = lm_loss(model, *lm_batch(batch, pad_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"pretrain step {step + 1}/{steps}  loss {loss.item():.4f}  {time.time() - t0:.0f}s")
    return losses


def tiny_model_config(cfg: PretrainConfig, tokenizer: Tokenizer) -> ModelConfig:
    eos = sorted(tokenizer.eos_ids)[0]
    return ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                       max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True,
                       eos_token_id=eos)


def pretrain(cfg: PretrainConfig, log=print) -> Path:
    """Build the tokenizer, the corpus and the model; train; save a Hugging Face directory at cfg.out/model."""
    setup_training_process(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    save_config(cfg, out / "config.yaml")
    tokenizer = build_tiny_tokenizer()
    task = get_task(cfg.task, **cfg.task_options)
    if cfg.task != "arithmetic":
        raise ValueError(f"pretrain builds its corpus for the arithmetic task family only, not {cfg.task!r}")
    mix = CorpusMix(cfg.think_share, cfg.slip_rate, cfg.untagged_share)
    pairs = [(render_prompt(tokenizer, p.prompt, "r1zero"), r) for p, r in arithmetic_corpus(task, cfg.documents, cfg.seed, mix)]
    docs = tokenize_pairs(tokenizer, pairs)
    model = CausalLM(tiny_model_config(cfg, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"pretrain: {n_params / 1e6:.2f}M parameters, {len(docs)} documents, "
        f"{sum(map(len, docs)) / len(docs):.0f} tokens each on average")
    train_lm(model, docs, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.warmup_steps,
             weight_decay=cfg.weight_decay, pad_id=tokenizer.pad_id, seed=cfg.seed, log=log)
    save_model(model, out / "model")
    tokenizer.save(out / "model")
    (out / "corpus_sample.txt").write_text("\n\n".join(p + r for p, r in pairs[:20]))
    return out / "model"
