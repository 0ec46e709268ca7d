"""How tokens are sampled: the batched engine with its KV cache, continuous batching, static decode, and tool calls
inside generation.
"""
