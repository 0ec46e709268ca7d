"""Per-token log-probs from hidden states, chunked so that N x V logits never exist at once; bf16 autocast."""

from __future__ import annotations

import contextlib

import torch

from r1lab.model.loading import DTYPES
from r1lab.train.backward_step import add_product, deferred_products

# Large enough that each chunk's three products with the (V, D) head are efficient matrix products (docs/performance.md)
LOGITS_CHUNK_BYTES = 256 << 20


def training_precision(dtype: str, device: torch.device):
    """bf16 autocast for the training forward passes when dtype is bfloat16 (the weights stay float32)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   recompute: bool = False, with_entropy: bool = False, chunk_bytes: int = LOGITS_CHUNK_BYTES,
                   head_dtype: torch.dtype | None = None):
    """Log-probs (N,) of targets under softmax(lm_head(hidden) / temperature), in chunks of at most chunk_bytes of
    logits; with_entropy: the first chunk's entropies; head_dtype overrides the projection's dtype."""
    weight = model.lm_head.weight
    if model.lm_head.bias is not None:
        raise ValueError("token_logprobs expects an LM head without a bias")
    rows = max(1, chunk_bytes // (4 * weight.shape[0]))
    device = hidden.device.type
    compute_dtype = head_dtype or (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                                   else weight.dtype)
    logp, entropy = _HeadLogprobs.apply(hidden, weight, targets, temperature, rows, not recompute, compute_dtype,
                                        with_entropy, model.config.tie_word_embeddings)
    return logp, entropy if with_entropy else None


class _HeadLogprobs(torch.autograd.Function):
    """Target log-probs through the LM head, chunk by chunk; the hand-written backward adds every chunk into one
    (V, D) gradient in place. A tied head's gradient goes straight into weight.grad (autograd would add a copy)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, rows, keep, compute_dtype, with_entropy, tied):
        logps, kept, entropy = [], [], hidden.new_zeros(0, dtype=torch.float32)
        weight_c = weight.to(compute_dtype)  # cast once, not per chunk
        for start in range(0, len(targets), rows):
            logp_all = _chunk_log_softmax(hidden[start : start + rows], weight_c, temperature, compute_dtype)
            logps.append(logp_all.gather(-1, targets[start : start + rows, None]).squeeze(-1))
            if with_entropy and not len(entropy):
                entropy = -logp_all.exp().mul_(logp_all).sum(-1)  # one (n, V) temporary, not two
            if keep:
                kept.append(logp_all)
        ctx.save_for_backward(hidden, weight, targets, *kept)
        ctx.temperature, ctx.rows, ctx.compute_dtype, ctx.tied = temperature, rows, compute_dtype, tied
        ctx.mark_non_differentiable(entropy)
        return (torch.cat(logps) if logps else hidden.new_zeros(0, dtype=torch.float32)), entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, targets, *kept = ctx.saved_tensors
        T, rows, dtype = ctx.temperature, ctx.rows, ctx.compute_dtype
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = None
        # with the optimizer in the backward pass, a tied head's weight product waits for the end of the backward
        # (the embedding's rows come last anyway): the (V, D) gradient then never coexists with the activations
        deferred = deferred_products(weight) if ctx.tied and kept else None
        if want_weight and deferred is None:
            if ctx.tied and weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            grad_weight = weight.grad if ctx.tied else torch.zeros_like(weight)
        weight_c = weight.to(dtype)
        with _no_autocast(hidden.device.type):
            for i, start in enumerate(range(0, len(targets), rows)):
                h = hidden[start : start + rows]
                logp_all = kept[i] if kept else _chunk_log_softmax(h, weight_c, T, dtype)
                g = grad_logp[start : start + rows, None].float() / T  # (n, 1)
                # in place: the kept (or recomputed) chunk is read only here, and a (n, V) copy would add to the
                # backward's peak, when every activation is still alive
                grad_logits = logp_all.exp_().mul_(-g)
                grad_logits.scatter_add_(-1, targets[start : start + rows, None], g)
                grad_logits = grad_logits.to(dtype)
                if want_hidden:
                    grad_hidden[start : start + rows] = grad_logits @ weight_c
                if want_weight and deferred is not None:
                    deferred.append((grad_logits, h.to(dtype)))  # the kept chunk itself, turned gradient in place
                elif want_weight:
                    add_product(grad_weight, grad_logits, h.to(dtype))
        return grad_hidden, None if ctx.tied else grad_weight, None, None, None, None, None, None, None


def idle_pass(model, completions: bool = False) -> None:
    """A pass adding nothing to any gradient: an FSDP rank with fewer micro-batches keeps step with the others."""
    device = model.lm_head.weight.device
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    if completions:
        real = torch.ones(1, 1, dtype=torch.bool, device=device)
        hidden = model.completion_hidden_states(token, real, token[0], token, real)[0]
    else:
        hidden = model.hidden_states(token)[0]
    logp, _ = token_logprobs(model, hidden, token[0])
    (logp.sum() * 0.0).backward()


def _chunk_log_softmax(hidden, weight_c, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """(n, V) float32 log-softmax of the chunk's logits / temperature."""
    with _no_autocast(hidden.device.type):
        logits = (hidden.to(dtype) @ weight_c.t()).float()
    return torch.log_softmax(logits / temperature if temperature != 1.0 else logits, -1)


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)
