"""Decode steps with fixed shapes, replayed as one CUDA graph on a GPU (launching a small model's kernels one by one
from Python sets the pace): the same buffers every step, keys written at a position held in a (1,) tensor, the whole
cache attended under a mask that gains a column per step. Elsewhere the step runs eagerly.
"""

from __future__ import annotations

import torch

from r1lab.model.transformer import CausalLM, KVCache

WARMUP_STEPS = 2  # eager runs on a side stream before capture, as CUDA graph capture requires


class StaticDecoder:
    def __init__(self, model: CausalLM, cache: KVCache, key_mask: torch.Tensor, use_graph: bool):
        """cache: B rows whose first P = key_mask.shape[1] positions are filled; the next step writes at P."""
        self.model, self.cache = model, cache
        B, P = key_mask.shape
        L = cache.layers[0][0].shape[2]
        device = key_mask.device
        self.mask = torch.zeros(B, 1, 1, L, dtype=torch.bool, device=device)
        self.mask[:, 0, 0, :P] = key_mask  # the prompts' real keys; each step adds its own column
        self.prompt_len = P
        self.write_pos = torch.full((1,), P, dtype=torch.long, device=device)
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.graph = self._capture() if use_graph else None

    def _run(self) -> torch.Tensor:
        self.mask.index_fill_(3, self.write_pos, True)  # the new key: seen by itself and every later query
        logits = self.model.decode_step(self.tokens, self.positions, self.cache, self.write_pos, self.mask)
        self.write_pos.add_(1)
        return logits

    def _capture(self) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self._rewind()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._run()
        self._rewind()  # the first real step writes at P
        return graph

    def _rewind(self) -> None:
        # the warm-up steps' cache entries are overwritten before they are ever attended
        self.write_pos.fill_(self.prompt_len)
        self.mask[..., self.prompt_len :] = False

    def select(self, keep: torch.Tensor) -> StaticDecoder:
        """A decoder for the rows in keep only, continuing where this one is (a smaller batch, captured anew)."""
        filled = int(self.write_pos)
        self.cache.select(keep)
        return StaticDecoder(self.model, self.cache, self.mask[keep, 0, 0, :filled], self.graph is not None)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after feeding tokens (B,) at positions (B,), in a tensor the next step reuses."""
        self.tokens.copy_(tokens[:, None])
        self.positions.copy_(positions[:, None])
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits
