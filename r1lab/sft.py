"""Supervised training: `r1lab pretrain` (the tiny base model from scratch) and `r1lab sft` (chat fine-tuning).

One loop (train_lm) serves both: next-token cross-entropy on tokenised documents, restricted to a loss mask per
token. Pretraining puts the loss on every real token; SFT puts it on the assistant turns only (each turn's content
plus the end-of-text token that closes it), never on system/user text or template scaffolding. SFT is R1's cold
start, its stage 3 (on data from `r1lab sample`) and distillation: `r1lab sft --model DIR --data FILE.jsonl`.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from r1lab.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from r1lab.config import PretrainConfig, SFTConfig, save_config
from r1lab.corpus import CorpusMix, arithmetic_corpus
from r1lab.model import CausalLM, ModelConfig, save_model
from r1lab.runtime import setup_training_process
from r1lab.tasks import get_task
from r1lab.tasks.dataset import MAX_REPORTED_ERRORS, DatasetError, _rows, in_test_split
from r1lab.tokenizer import Tokenizer, apply_chat_template, build_tiny_tokenizer, render_prompt

ROLES = ("system", "user", "assistant")
SFT_TEMPLATES = ("auto", "chat", "r1zero")
StepCallback = Callable[[int, dict], None]

# ---------------------------------------------------------------------------------------------------------------
# the training loop, shared by pretraining and SFT


def tokenize_pairs(tokenizer: Tokenizer, pairs: list[tuple[str, str]]) -> list[list[int]]:
    """Prompt + response + end-of-text, as one token list per document."""
    eos = tokenizer.pad_id
    return [tokenizer.encode(prompt) + tokenizer.encode(response, add_special_tokens=False) + [eos]
            for prompt, response in pairs]


def lm_batch(docs: list[list[int]], pad_id: int,
             loss_masks: list[list[bool]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) input ids and the (B, T) mask of the tokens the loss is on.

    mask[b, t] means token t is a target (predicted from position t - 1): every real token when loss_masks is None
    (pretraining), else loss_masks[b] (SFT: the assistant tokens). Padding is never a target.
    """
    T = max(len(d) for d in docs)
    ids = torch.full((len(docs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), T), dtype=torch.bool)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = torch.tensor(d)
        mask[i, : len(d)] = True if loss_masks is None else torch.tensor(loss_masks[i], dtype=torch.bool)
    return ids, mask


def lm_loss(model: CausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens in mask (B, T); pretraining's loss."""
    logits = model(ids)[:, :-1]  # (B, T-1, V); right padding needs no attention mask under causal attention
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


def lm_loss_sum(model: CausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the target tokens in mask (B, T).

    Only positions that predict a target reach the vocabulary projection: in SFT the prompts are often most of the
    tokens, and with a 150k vocabulary their logits would dominate memory for nothing.
    """
    targets = mask[:, 1:]  # (B, T-1)
    hidden = model.hidden_states(ids)[:, :-1][targets]  # (N, D)
    logits = model.lm_head(hidden).float()  # (N, V)
    return F.cross_entropy(logits, ids[:, 1:][targets], reduction="sum")


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class EpochOrder:
    """The documents of each step: a fresh shuffle per epoch, batches running on across epoch boundaries.

    A pure function of (seed, step), so a resumed run trains on exactly the batches an uninterrupted one would.
    """

    def __init__(self, n_docs: int, seed: int):
        self.n = n_docs
        self.rng = random.Random(seed)
        self.epochs: list[list[int]] = []

    def batch(self, step: int, size: int) -> list[int]:
        positions = range(step * size, (step + 1) * size)  # positions in the endless sequence of shuffled epochs
        while len(self.epochs) * self.n < positions.stop:
            self.epochs.append(self.rng.sample(range(self.n), self.n))
        return [self.epochs[p // self.n][p % self.n] for p in positions]


def make_optimizer(model: CausalLM, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)


def lm_step(model: CausalLM, optimizer: torch.optim.Optimizer, docs: list[list[int]],
            loss_masks: list[list[bool]] | None, pad_id: int, micro_batch_size: int = 0,
            max_grad_norm: float = 1.0) -> dict:
    """One optimizer step on a batch; the loss is the mean over all the batch's target tokens, however the batch is
    split into micro-batches. A non-finite gradient skips the step (the weights stay as they were)."""
    device = next(model.parameters()).device
    size = micro_batch_size or len(docs)
    batches = [lm_batch(docs[s : s + size], pad_id, None if loss_masks is None else loss_masks[s : s + size])
               for s in range(0, len(docs), size)]
    n_targets = sum(int(mask[:, 1:].sum()) for _, mask in batches)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for ids, mask in batches:
        ids, mask = ids.to(device), mask.to(device)
        if loss_masks is None and len(batches) == 1:
            loss = lm_loss(model, ids, mask)  # pretraining: the exact computation its published results came from
        else:
            loss = lm_loss_sum(model, ids, mask) / max(1, n_targets)
        loss.backward()
        total += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    skipped = not torch.isfinite(grad_norm)
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    return {"loss": total, "grad_norm": grad_norm.item(), "target_tokens": n_targets, "skipped_nonfinite": int(skipped)}


def train_lm(model: CausalLM, docs: list[list[int]], *, steps: int, batch_size: int, lr: float, warmup: int,
             weight_decay: float, pad_id: int, seed: int, log=print, loss_masks: list[list[bool]] | None = None,
             optimizer: torch.optim.Optimizer | None = None, start_step: int = 0, micro_batch_size: int = 0,
             max_grad_norm: float = 1.0, on_step: StepCallback | None = None, name: str = "pretrain") -> list[float]:
    """AdamW on shuffled documents with a cosine learning rate; returns the loss of each step run.

    loss_masks (a bool per token of each document) restrict the loss; None puts it on every real token.
    on_step(steps_done, metrics) runs after each step: SFT logs, checkpoints and evaluates there.
    """
    order = EpochOrder(len(docs), seed)
    optimizer = optimizer or make_optimizer(model, lr, weight_decay)
    losses = []
    model.train()
    t0 = time.time()
    for step in range(start_step, steps):
        picked, t_step = order.batch(step, batch_size), time.perf_counter()
        for g in optimizer.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup)
        metrics = lm_step(model, optimizer, [docs[i] for i in picked],
                          None if loss_masks is None else [loss_masks[i] for i in picked], pad_id,
                          micro_batch_size, max_grad_norm)
        metrics.update(lr=optimizer.param_groups[0]["lr"], step_time_s=time.perf_counter() - t_step)
        losses.append(metrics["loss"])
        if step % 50 == 0 or step == steps - 1:
            log(f"{name} step {step + 1}/{steps}  loss {metrics['loss']:.4f}  {time.time() - t0:.0f}s")
        if on_step is not None:
            on_step(step + 1, metrics)
    return losses


# ---------------------------------------------------------------------------------------------------------------
# pretraining: `r1lab pretrain`


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


# ---------------------------------------------------------------------------------------------------------------
# chat data: validation, rendering, loss masks


def _message_error(i: int, message: Any, expected: str) -> str | None:
    name = f"messages[{i}]"
    if not isinstance(message, dict):
        return f"field {name!r} must be an object with role and content, got {type(message).__name__}"
    role, content = message.get("role"), message.get("content")
    if role is None:
        return f"field '{name}.role' is missing"
    if role not in ROLES:
        return f"field '{name}.role' is {role!r}, not one of {', '.join(ROLES)}"
    if "content" not in message:
        return f"field '{name}.content' is missing"
    if not isinstance(content, str):
        return f"field '{name}.content' must be a string, got {type(content).__name__}"
    if role != expected:
        return (f"field '{name}.role' is {role!r} where {expected!r} was expected "
                "(an optional system message first, then user and assistant turns in alternation)")
    if role != "system" and not content.strip():
        return f"field '{name}.content' is empty"
    return None


def conversation_error(row: Any) -> str | None:
    """What makes one row of chat data unusable, naming the field; None when it is fine."""
    if not isinstance(row, dict):
        return f"row is not a JSON object (got {type(row).__name__})"
    if "messages" not in row:
        return "field 'messages' is missing"
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return f"field 'messages' must be a non-empty list of {{role, content}} objects, got {messages!r:.60}"
    first = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    for i, message in enumerate(messages):
        expected = "system" if i < first else ("user", "assistant")[(i - first) % 2]
        error = _message_error(i, message, expected)
        if error is not None:
            return error
    if not any(m["role"] == "assistant" for m in messages):
        return "field 'messages' has no assistant message: there is nothing to train on"
    return None


def _raise_row_errors(path: Path, errors: list[str]) -> None:
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise DatasetError(f"{len(errors)} bad row(s) in {path}:\n" + "\n".join(shown) + more)


def read_conversations(path: str | Path) -> list[tuple[int, list[dict]]]:
    """(line, messages) of every row of a chat-format JSONL/JSON/Parquet file, all validated before any is used.

    Bad rows raise DatasetError listing each as file:line: field problem (the first MAX_REPORTED_ERRORS of them).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    rows, errors = [], []
    for number, row, error in _rows(path):
        error = error or conversation_error(row)
        if error is None:
            rows.append((number, row["messages"]))
        else:
            errors.append(f"{path}:{number}: {error}")
    if not rows and not errors:
        errors.append(f"{path}: the file has no rows")
    _raise_row_errors(path, errors)
    return rows


def render_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False,
                template: str = "auto") -> str:
    """A conversation as text in template "chat" (the tokenizer's chat template) or "r1zero"; "auto" picks the chat
    template when the tokenizer has one, else R1-Zero (the built-in tiny tokenizer has none).

    The R1-Zero template has no roles: a system message is written first, followed by a newline; each user turn is
    wrapped in the template (ending in "Assistant:"), and each assistant turn follows verbatim (as `r1lab sample`
    writes it, leading space included) and ends with end-of-text.
    """
    if template == "chat" or (template == "auto" and tokenizer.chat_template):
        return apply_chat_template(tokenizer, messages, add_generation_prompt)
    if template not in ("auto", "r1zero"):
        raise ValueError(f"template {template!r} is not one of {', '.join(SFT_TEMPLATES)}")
    if tokenizer.eos_token is None:
        raise ValueError(f"{tokenizer.name}: no end-of-text token, so assistant turns cannot be closed")
    parts = {"system": lambda c: c + "\n", "user": lambda c: render_prompt(tokenizer, c, "r1zero"),
             "assistant": lambda c: c + tokenizer.eos_token}
    return "".join(parts[m["role"]](m["content"]) for m in messages)


def _prefix_length(tokenizer: Tokenizer, text: str, full: list[int], turn: int, where: str) -> int:
    ids = tokenizer.encode(text)
    if full[: len(ids)] != ids:
        raise ValueError(f"messages[{turn}]: the conversation up to the {where} of this assistant message does not "
                         "tokenize as a prefix of the whole conversation (the chat template rewrites the message, "
                         "or a token spans its boundary), so its loss mask cannot be placed exactly")
    return len(ids)


def _closes_turn(tokenizer: Tokenizer, token: int) -> bool:
    # An end-of-text id, or a special token (decoding drops those): ChatML's <|im_end|>, Llama 3's <|eot_id|>.
    return token in tokenizer.eos_ids or tokenizer.decode([token]) == ""


def conversation_tokens(tokenizer: Tokenizer, messages: list[dict],
                        template: str = "auto") -> tuple[list[int], list[bool], set[int]]:
    """Token ids of a conversation, its loss mask, and the ids of the tokens that closed its assistant turns.

    The mask is True on each assistant message's content tokens and on the end-of-text (or turn-closing special)
    token right after them, nowhere else. Each assistant message is located by tokenizing the conversation up to
    where its content starts (the template's generation prompt) and up to where it ends; both must be token
    prefixes of the whole conversation, since a merge across the boundary would otherwise shift the mask silently.
    """
    full = tokenizer.encode(render_chat(tokenizer, messages, template=template))
    mask = [False] * len(full)
    closers: set[int] = set()
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True, template=template)
        start = _prefix_length(tokenizer, before, full, i, "start")
        end = _prefix_length(tokenizer, before + message["content"], full, i, "end")
        if end >= len(full) or not _closes_turn(tokenizer, full[end]):
            after = tokenizer.backend.id_to_token(full[end]) if end < len(full) else "nothing"
            raise ValueError(f"messages[{i}]: the template follows this assistant message with {after!r}, not an "
                             "end-of-text or special token: a model trained on it would never learn to stop")
        mask[start : end + 1] = [True] * (end + 1 - start)
        closers.add(full[end])
    return full, mask, closers


# ---------------------------------------------------------------------------------------------------------------
# fine-tuning: `r1lab sft`


@dataclass
class SFTData:
    """Tokenised conversations with their loss masks, split into training and held-out rows."""

    train_docs: list[list[int]] = field(default_factory=list)
    train_masks: list[list[bool]] = field(default_factory=list)
    eval_docs: list[list[int]] = field(default_factory=list)
    eval_masks: list[list[bool]] = field(default_factory=list)
    closers: set[int] = field(default_factory=set)  # the tokens that closed assistant turns
    rows: int = 0
    dropped_too_long: int = 0

    def summary(self) -> dict:
        docs = self.train_docs + self.eval_docs
        masks = self.train_masks + self.eval_masks
        return {"rows": self.rows, "train": len(self.train_docs), "heldout": len(self.eval_docs),
                "dropped_too_long": self.dropped_too_long, "tokens": sum(map(len, docs)),
                "target_tokens": sum(sum(m) for m in masks)}


def build_sft_data(tokenizer: Tokenizer, rows: list[tuple[int, list[dict]]], cfg: SFTConfig) -> SFTData:
    """Tokenise and mask every conversation; drop (and count) those longer than cfg.max_len tokens.

    Long rows are dropped, never truncated: a cut conversation loses its answer and the end-of-text that closes it,
    and would teach the model to stop mid-thought. Held-out rows are picked by a stable hash of their messages.
    """
    if cfg.template == "chat" and not tokenizer.chat_template:
        raise ValueError(f"{cfg.model}: the tokenizer has no chat_template; use --template r1zero or auto")
    data, errors = SFTData(rows=len(rows)), []
    for line, messages in rows:
        try:
            ids, mask, closers = conversation_tokens(tokenizer, messages, cfg.template)
        except ValueError as err:
            errors.append(f"{cfg.data}:{line}: {err}")
            continue
        if len(ids) > cfg.max_len:
            data.dropped_too_long += 1
            continue
        data.closers |= closers
        heldout = cfg.eval_fraction > 0 and in_test_split(json.dumps(messages, sort_keys=True), cfg.eval_fraction)
        (data.eval_docs if heldout else data.train_docs).append(ids)
        (data.eval_masks if heldout else data.train_masks).append(mask)
    _raise_row_errors(Path(cfg.data), errors)
    if not data.train_docs:
        raise DatasetError(f"{cfg.data}: no conversation left to train on ({data.dropped_too_long} of {len(rows)} "
                           f"are longer than max_len {cfg.max_len}, {len(data.eval_docs)} held out)")
    return data


@torch.no_grad()
def heldout_loss(model: CausalLM, docs: list[list[int]], masks: list[list[bool]], pad_id: int,
                 batch_size: int) -> float:
    """Mean cross-entropy per target token over held-out conversations."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    total, n = 0.0, 0
    for s in range(0, len(docs), batch_size):
        ids, mask = lm_batch(docs[s : s + batch_size], pad_id, masks[s : s + batch_size])
        total += lm_loss_sum(model, ids.to(device), mask.to(device)).item()
        n += int(mask[:, 1:].sum())
    model.train(was_training)
    return total / max(1, n)


def _log_heldout(logger, step: int, model: CausalLM, data: SFTData, pad_id: int, cfg: SFTConfig) -> None:
    loss = heldout_loss(model, data.eval_docs, data.eval_masks, pad_id, cfg.micro_batch_size or cfg.batch_size)
    logger.log_eval(step, "heldout", {"loss": loss})


def _step_hook(cfg: SFTConfig, steps: int, model: CausalLM, tokenizer: Tokenizer, optimizer, data: SFTData,
               logger, bar) -> StepCallback:
    """What runs after each SFT step: metrics file, progress bar, held-out loss, checkpoints."""

    def on_step(step: int, metrics: dict) -> None:
        logger.log(step, metrics)
        bar.update(step, metrics)
        if data.eval_docs and (step % cfg.eval_every == 0 or step == steps):
            _log_heldout(logger, step, model, data, tokenizer.pad_id, cfg)
        if cfg.save_every and step % cfg.save_every == 0:
            save_checkpoint(Path(cfg.out), step, model, tokenizer, optimizer)

    return on_step


def _save_final(model: CausalLM, tokenizer: Tokenizer, closers: set[int], path: Path, log) -> Path:
    """The model in Hugging Face format; turn-closing tokens that were not stop tokens become ones, since the model
    has just learned to end its answers with them (e.g. ChatML's <|im_end|> on a base model's tokenizer)."""
    extra = sorted(closers - tokenizer.eos_ids)
    if extra:
        current = model.config.eos_token_id
        model.config.eos_token_id = ([current] if isinstance(current, int) else list(current or [])) + extra
        names = ", ".join(repr(tokenizer.backend.id_to_token(i)) for i in extra)
        log(f"sft: assistant turns end with {names}; added to the model's end-of-text ids so generation stops there")
    save_model(model, path)
    tokenizer.save(path)
    return path


def sft(cfg: SFTConfig, log=print) -> Path:
    """`r1lab sft`: fine-tune cfg.model on the chat data in cfg.data; returns the final model directory."""
    from r1lab.grpo import load_policy, pick_device  # the policy loader every command shares
    from r1lab.metrics import MetricsLogger, training_progress

    cfg.check()
    setup_training_process(cfg.threads)
    torch.manual_seed(cfg.seed)
    run = Path(cfg.out)
    rows = read_conversations(cfg.data)  # a malformed row fails here, before any model is loaded
    model, tokenizer = load_policy(cfg.model, pick_device(cfg.device))
    data = build_sft_data(tokenizer, rows, cfg)
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(data.train_docs) / cfg.batch_size))
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    start = 0
    if cfg.resume and (ckpt := latest_checkpoint(run)):
        start = load_checkpoint(ckpt, model, optimizer)
        log(f"resumed from {ckpt} (step {start})")
    save_config(cfg, run / "config.yaml")
    summary = data.summary()
    (run / "data.json").write_text(json.dumps(summary, indent=2) + "\n")
    epochs = steps * cfg.batch_size / len(data.train_docs)
    log(f"sft: {summary['train']} conversations for training, {summary['heldout']} held out, "
        f"{summary['dropped_too_long']} of {summary['rows']} dropped as longer than max_len {cfg.max_len}; "
        f"{summary['target_tokens']} target tokens of {summary['tokens']}; {steps} steps of {cfg.batch_size} "
        f"conversations = {epochs:.2f} epochs")
    with MetricsLogger(run, resume_step=start) as logger, training_progress(steps, start) as bar:
        if data.eval_docs and start == 0:
            _log_heldout(logger, 0, model, data, tokenizer.pad_id, cfg)  # the loss before any training
        train_lm(model, data.train_docs, loss_masks=data.train_masks, steps=steps, batch_size=cfg.batch_size,
                 lr=cfg.lr, warmup=cfg.warmup_steps, weight_decay=cfg.weight_decay, pad_id=tokenizer.pad_id,
                 seed=cfg.seed, log=log, optimizer=optimizer, start_step=start,
                 micro_batch_size=cfg.micro_batch_size, max_grad_norm=cfg.max_grad_norm, name="sft",
                 on_step=_step_hook(cfg, steps, model, tokenizer, optimizer, data, logger, bar))
    return _save_final(model, tokenizer, data.closers, run / "model", log)
