"""r1lab: train reasoning language models the DeepSeek-R1 way (GRPO with rule rewards), from a laptop CPU up."""

__version__ = "0.1.0"
