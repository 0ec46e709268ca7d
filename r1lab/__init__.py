"""r1lab: train reasoning language models the DeepSeek-R1 way (GRPO with rule rewards), from a laptop CPU up.
The Python API (r1lab/commands/api.py) is loaded on first use, so that `import r1lab` stays light.
"""

__version__ = "0.1.0"
API = ("grpo", "sft", "evaluate")


def __getattr__(name: str):
    if name in API:
        from r1lab.commands import api

        return getattr(api, name)
    raise AttributeError(f"module 'r1lab' has no attribute {name!r}")
