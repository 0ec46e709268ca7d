"""Your own reward functions, added to the built-in ones: `r1lab grpo --reward-functions '{"my_rewards:brevity": 0.5}'`.

A reward function is named "module:function" (an importable module) or "path/to/file.py:function", and weighted. It
is called once per completion, as `function(completion, problem)`:
- completion: the response text (with any prefilled text, e.g. "<think>", in front), exactly what the built-in
  rewards see;
- problem: an r1lab Problem, with `.prompt`, `.answer` (the reference) and `.meta` (task data; for a data file, the
  row number);
and returns a number. It runs under the same guard as the built-in scorers: an exception, a NaN or a call running
past `reward_timeout_s` gives 0 and is counted in `scorer_errors` / `scorer_timeouts`, and never stops training. Its
mean is logged per step as `reward/<function name>`.

    # my_rewards.py
    def brevity(completion, problem):
        return 1.0 if len(completion) < 200 else 0.0
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from functools import lru_cache
from pathlib import Path
from typing import Callable

RewardFunction = Callable[[str, object], float]


@lru_cache(maxsize=None)
def load_reward_function(spec: str) -> RewardFunction:
    """The function a "module:function" or "file.py:function" spec names; ValueError saying what is wrong."""
    source, sep, name = str(spec).rpartition(":")
    if not sep or not source or not name.isidentifier():
        raise ValueError(f"reward function {spec!r}: write it as 'module:function' or 'path/to/file.py:function'")
    module = _load_file(spec, Path(source)) if source.endswith(".py") else _import(spec, source)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {source} has no function {name!r}")
    try:
        inspect.signature(fn).bind("completion", None)
    except TypeError:
        raise ValueError(f"reward function {spec!r}: it must accept (completion, problem)") from None
    except ValueError:  # builtins without a signature: let the call decide
        pass
    return fn


def _import(spec: str, module: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"reward function {spec!r}: cannot import {module!r} ({err})") from None


def _load_file(spec: str, path: Path):
    if not path.is_file():
        raise ValueError(f"reward function {spec!r}: no file {path}")
    module_spec = importlib.util.spec_from_file_location(f"r1lab_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        raise ValueError(f"reward function {spec!r}: {path} failed to load ({type(err).__name__}: {err})") from None
    return module


def component_name(spec: str) -> str:
    """The metric name of a function's reward: its function name, e.g. reward/brevity."""
    return str(spec).rpartition(":")[2]
