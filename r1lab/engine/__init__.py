"""How tokens are sampled: the batched engine, continuous batching, static decode, tool calls inside generation."""
