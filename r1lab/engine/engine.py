"""Batched sampling with a KV cache: the one sampler behind RL rollouts, evaluation and chat.

Each prompt is prefilled once for its `num_samples` rows; finished rows are dropped from the batch as they accumulate.
On a GPU the decode step is replayed as a CUDA graph (static_decode.py); outputs stay on the device until the end.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from r1lab.engine.sampling import _RowParams, sample_next
from r1lab.engine.slots import FixedSlots, drop_finished, prefill
from r1lab.engine.speculative import generate_speculative
from r1lab.engine.static_decode import StaticDecoder
from r1lab.model.hf_format import load_model
from r1lab.model.tokenizer import Tokenizer
from r1lab.model.transformer import CausalLM, KVCache


@dataclass
class Sample:
    prompt_index: int
    token_ids: list[int]  # completion tokens, the end-of-text token included when one was sampled
    text: str  # decoded completion, end-of-text dropped, cut right after a stop string
    logprobs: list[float]  # log-prob of each sampled token under softmax(logits / temperature)
    finish_reason: str  # "stop" (end-of-text or stop string) or "length"
    drafted: int = 0  # speculative decoding: this sequence's drafted tokens and the accepted ones
    accepted: int = 0


@dataclass
class _Outputs:
    tokens: torch.Tensor  # (N, max_new) sampled ids, valid up to lengths
    logprobs: torch.Tensor  # (N, max_new)
    lengths: torch.Tensor  # (N,)
    stopped: torch.Tensor  # (N,) ended by end-of-text or a stop string (else by length)
    aborted: torch.Tensor  # (N,) ended by the caller's on_step callback


@dataclass
class _Batch:
    """The rows still being generated, and where each writes its output."""

    rows: torch.Tensor  # (B,) index into the output list
    key_mask: torch.Tensor  # (B, S) real tokens in the cache
    positions: torch.Tensor  # (B,) position id of the next token
    logits: torch.Tensor  # (B, V) next-token logits
    finished: torch.Tensor  # (B,) rows done but not yet dropped from the batch


PerPrompt = float | int | list  # one value for every prompt, or a list with one value per prompt
StepCallback = Callable[..., "Iterable[int] | None"]  # (rows, tokens) or, with step_logprobs, (rows, tokens, logprobs)
DECODE_MODES = ("auto", "dynamic", "static", "graph")
# mtp: DeepSeek-V3's multi-token prediction module drafts; draft:DIR: a small model of the same vocabulary does
SPECULATIVE = ("none", "mtp", "draft:DIR")
FINISHED_CHECK_EVERY = 16  # static decoding: how often the host asks whether every row is done (a device sync)


class Engine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer, decode: str = "auto", speculative: str = "none",
                 speculative_tokens: int = 1):
        """decode: "dynamic" (best on a CPU), "static" (fixed shapes), "graph" (static, as a CUDA graph) or "auto".
        speculative: "mtp" (the model's MTP module drafts) or "draft:DIR" (the model in DIR drafts), speculative_tokens
        drafts a step (a live batch drafts one)."""
        if decode not in DECODE_MODES:
            raise ValueError(f"decode {decode!r} is not one of {', '.join(DECODE_MODES)}")
        self.draft = self._draft_model(model, speculative)
        self.model, self.tokenizer, self.decode, self.speculative = model, tokenizer, decode, speculative
        if not 1 <= speculative_tokens <= 8:
            raise ValueError(f"speculative_tokens {speculative_tokens} is not between 1 and 8")
        self.speculative_tokens = speculative_tokens
        self.speculative_counts = {"drafted": 0, "accepted": 0}  # summed over generate calls and LiveBatch steps

    def acceptance_since(self, counts: dict) -> dict:
        """The drafts made and accepted since speculative_counts were `counts`, for the run's logs."""
        drafted, accepted = (self.speculative_counts[k] - counts[k] for k in ("drafted", "accepted"))
        return {"speculative/drafted": drafted, "speculative/acceptance": accepted / max(drafted, 1)}

    @staticmethod
    def _draft_model(model: CausalLM, speculative: str) -> CausalLM | None:
        """The draft model of draft:DIR (None for none and mtp); what cannot draft is refused."""
        if speculative == "mtp" and not len(model.mtp):
            raise ValueError("speculative decoding with mtp needs a model with a multi-token prediction module "
                             "(DeepSeek-V3's num_nextn_predict_layers)")
        if speculative in ("none", "mtp"):
            return None
        directory = speculative.removeprefix("draft:")
        if directory == speculative or not directory.strip():
            raise ValueError(f"speculative {speculative!r} is not one of {', '.join(SPECULATIVE)}")
        draft = load_model(directory, device=model.lm_head.weight.device, dtype=model.lm_head.weight.dtype).eval()
        if draft.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"the draft model {directory} has a vocabulary of {draft.config.vocab_size} tokens, the "
                             f"model {model.config.vocab_size}: a draft model shares the model's tokenizer")
        return draft

    def _decode_mode(self) -> str:
        # An MoE layer reads its experts' group sizes on the host (moe.py): a CUDA graph cannot capture that
        if self.decode == "auto":
            return "graph" if self.device.type == "cuda" and self.model.config.moe is None else "dynamic"
        return self.decode

    def _static_decoder(self, cache: KVCache, key_mask: torch.Tensor) -> StaticDecoder | None:
        mode = self._decode_mode()
        if mode == "dynamic":
            return None
        try:
            return StaticDecoder(self.model, cache, key_mask, use_graph=mode == "graph")
        except RuntimeError as err:
            if self.decode != "auto":
                raise
            # A model or torch build the capture does not support: decode as on a CPU, and say so once.
            warnings.warn(f"CUDA graph capture failed ({err}); decoding without CUDA graphs", stacklevel=3)
            self.decode = "dynamic"
            return None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]], *, num_samples: int = 1, max_new_tokens: PerPrompt = 128,
                 temperature: PerPrompt = 1.0, top_p: PerPrompt = 1.0, top_k: PerPrompt = 0,
                 stop_strings: tuple[str, ...] = (), seed: PerPrompt | None = None, suppress_eos: bool = False,
                 on_step: StepCallback | None = None, step_logprobs: bool = False, max_rows: int = 0) -> list[Sample]:
        """num_samples completions per prompt, prompt-major: prompt i's j-th sample is at i * num_samples + j.

        max_new_tokens, temperature, top_p, top_k and seed take one value or one per prompt (per-prompt seeds: each
        sample's own generator). on_step(rows, tokens[, logprobs]) is called after every step and may return rows to
        end now ("abort"). max_rows > 0 runs at most that many sequences at once (continuous batching, slots.py).
        """
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("generate needs at least one prompt, each with at least one token")
        was_training = self.model.training
        self.model.eval()
        params = _RowParams.build(len(prompt_ids), num_samples, self.device, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        n_out, steps = len(prompt_ids) * num_samples, params.max_steps
        zeros = lambda *shape, dtype=None: torch.zeros(shape, dtype=dtype, device=self.device)  # noqa: E731
        out = _Outputs(zeros(n_out, steps, dtype=torch.long), zeros(n_out, steps), zeros(n_out, dtype=torch.long),
                       zeros(n_out, dtype=torch.bool), zeros(n_out, dtype=torch.bool))
        eos = torch.tensor(sorted(self.tokenizer.eos_ids), device=self.device, dtype=torch.long)
        if self.speculative != "none":
            asked = [name for name, on in (("stop_strings", stop_strings), ("suppress_eos", suppress_eos),
                                           ("on_step", on_step is not None), ("max_rows", max_rows > 0)) if on]
            if asked:
                raise ValueError(f"speculative decoding does not support {', '.join(asked)}: generate without it")
            prompts = [p for p in prompt_ids for _ in range(num_samples)]
            drafted, accepted = (c.tolist() for c in generate_speculative(
                self.model, prompts, params, eos, self.tokenizer.pad_id, out, self.draft, self.speculative_tokens))
            self.speculative_counts["drafted"] += sum(drafted)
            self.speculative_counts["accepted"] += sum(accepted)
            self.model.train(was_training)
            samples = self._samples(out, num_samples, stop_strings)
            for s, d, a in zip(samples, drafted, accepted):
                s.drafted, s.accepted = d, a
            return samples
        slots = None
        if 0 < max_rows < n_out:  # continuous batching
            batch = slots = FixedSlots(self.model, prompt_ids, num_samples, max_rows, steps, self.tokenizer.pad_id,
                                       self._static_decoder)
            limits = params.limits if params.limits is not None else torch.full_like(out.lengths, steps)
        else:
            batch, cache, start = self._prefill(prompt_ids, num_samples, steps)
            static, limits = self._static_decoder(cache, batch.key_mask), params.limits
        for step in itertools.count():
            if suppress_eos and len(eos):
                batch.logits[:, eos] = float("-inf")
            tokens, logprobs = sample_next(batch.logits, *params.for_rows(batch.rows))
            # In slots each row is at its own step (its length so far; a finished row writes nothing).
            at = step if slots is None else out.lengths[slots.rows].clamp(max=steps - 1)
            live = self._record(batch, at, tokens, logprobs, out, eos, stop_strings, limits)
            if on_step is not None:
                self._call_back(on_step, batch, live, tokens, logprobs if step_logprobs else None, out)
            if slots is not None:
                if slots.done():
                    break
                slots.step(tokens)
                continue
            check = static is None or on_step is not None or (step + 1) % FINISHED_CHECK_EVERY == 0
            if step == steps - 1 or (check and bool(batch.finished.all())):
                break
            if check:
                tokens, static = drop_finished(batch, tokens, cache, static, ("rows", "key_mask", "positions"))
            if static is not None:
                batch.logits = static.step(tokens, batch.positions)
            else:
                batch.key_mask = torch.cat([batch.key_mask, torch.ones_like(batch.key_mask[:, :1])], dim=1)
                batch.logits = self.model.forward_cached(tokens[:, None], batch.positions[:, None], cache,
                                                         start + step, batch.key_mask)
            batch.positions = batch.positions + 1
        self.model.train(was_training)
        return self._samples(out, num_samples, stop_strings)

    def _samples(self, out: _Outputs, num_samples: int, stop_strings) -> list[Sample]:
        lengths, tokens, logprobs = out.lengths.tolist(), out.tokens.tolist(), out.logprobs.tolist()
        samples = []
        for i, (n, aborted, stopped) in enumerate(zip(lengths, out.aborted.tolist(), out.stopped.tolist())):
            text = self.tokenizer.decode([t for t in tokens[i][:n] if t not in self.tokenizer.eos_ids])
            for s in stop_strings:
                if s in text:
                    text = text[: text.index(s) + len(s)]
            reason = "abort" if aborted else "stop" if stopped else "length"
            samples.append(Sample(i // num_samples, tokens[i][:n], text, logprobs[i][:n], reason))
        return samples

    @staticmethod
    def _call_back(on_step: StepCallback, batch: _Batch | FixedSlots, live, tokens, logprobs, out: _Outputs) -> None:
        """Hand this step's tokens (and log-probs, unless None) to the caller; rows it returns end as "abort"."""
        args = (batch.rows[live].tolist(), tokens[live].tolist())
        ended = on_step(*args, logprobs[live].tolist()) if logprobs is not None else on_step(*args)
        if ended:
            ended_rows = torch.tensor(sorted(ended), dtype=torch.long, device=batch.rows.device)
            hit = torch.isin(batch.rows, ended_rows) & ~batch.finished
            out.aborted[batch.rows[hit]] = True
            batch.finished = batch.finished | hit

    def _prefill(self, prompt_ids, num_samples, max_new_tokens):
        device = self.device
        cache, logits, key_mask = prefill(self.model, prompt_ids, self.tokenizer.pad_id, max_new_tokens)  # (N, P)
        rows = torch.arange(len(prompt_ids), device=device).repeat_interleave(num_samples)
        if num_samples > 1:
            cache.select(rows)  # every sample of a prompt starts from the same prefilled cache
        lengths = key_mask.sum(-1)
        batch = _Batch(rows=torch.arange(len(rows), device=device), key_mask=key_mask[rows],
                       positions=lengths[rows], logits=logits[rows],
                       finished=torch.zeros(len(rows), dtype=torch.bool, device=device))
        return batch, cache, key_mask.shape[1]

    def _record(self, batch: _Batch | FixedSlots, step: int | torch.Tensor, tokens, logprobs, out: _Outputs, eos,
                stop_strings, limits) -> torch.Tensor:
        """Write each unfinished row's token at step (one for the batch, or (B,) per row); mark rows that sampled
        end-of-text, completed a stop string or reached their limit. Returns the (B,) mask of rows that wrote."""
        live = ~batch.finished
        rows = batch.rows
        # torch.where over every row, not boolean indexing, which would sync with the device at every token.
        out.tokens[rows, step] = torch.where(live, tokens, out.tokens[rows, step])
        out.logprobs[rows, step] = torch.where(live, logprobs, out.logprobs[rows, step])
        out.lengths[rows] = torch.where(live, step + 1, out.lengths[rows])
        stop = live & torch.isin(tokens, eos) if len(eos) else torch.zeros_like(live)
        if stop_strings:  # needs the text, so a host round trip; only when stop strings are asked for
            for r in live.nonzero().squeeze(-1).tolist():
                row = int(batch.rows[r])
                if self.hits_stop(out.tokens[row, : int(out.lengths[row])].tolist(), stop_strings):
                    stop[r] = True
        out.stopped[rows] = out.stopped[rows] | stop
        batch.finished = batch.finished | stop
        if limits is not None:  # per-prompt max_new_tokens: a row at its limit ends by length
            batch.finished = batch.finished | (limits[batch.rows] <= step + 1)
        return live

    def hits_stop(self, tokens: list[int], stop_strings) -> bool:
        # A stop string of n characters spans at most n tokens, so the tail is enough to see it complete.
        tail = self.tokenizer.decode(tokens[-max(len(s) for s in stop_strings):])
        return any(s in tail for s in stop_strings)
