"""The Python API: `r1lab.grpo`, `r1lab.sft` and `r1lab.evaluate` run what `r1lab grpo|sft|eval` run, on settings
given as a config object, a dict or keywords, checked the same way:

    model_dir = r1lab.grpo(model="path/to/model", task="data/train.jsonl", steps=100, rewards=[brevity])

Reward callables are imported by name in r1lab's reward workers (r1lab/rewards/user_functions.py): top-level only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from r1lab.config import EvalConfig, GRPOConfig, SFTConfig
from r1lab.rewards.user_functions import callable_spec
from r1lab.suggest import did_you_mean
from r1lab.train.evaluate import run_eval
from r1lab.train.grpo import train
from r1lab.train.supervised import sft as run_sft

Rewards = Iterable[Callable] | Iterable[tuple[Callable, float]] | Mapping[Callable, float]


def grpo(config: GRPOConfig | Mapping[str, Any] | None = None, *, rewards: Rewards = (), **settings: Any) -> Path:
    """GRPO as `r1lab grpo` runs it, `rewards` (callables, (callable, weight) pairs or {callable: weight}) added to
    config.reward_functions; returns the final model's directory."""
    cfg = _settings(GRPOConfig, config, settings)
    added = {callable_spec(fn): float(weight) for fn, weight in _weighted(rewards)}
    return train(dataclasses.replace(cfg, reward_functions={**cfg.reward_functions, **added}))


def sft(config: SFTConfig | Mapping[str, Any] | None = None, **settings: Any) -> Path:
    """Supervised fine-tuning as `r1lab sft` runs it; returns the final model's directory."""
    return run_sft(_settings(SFTConfig, config, settings))


def evaluate(config: EvalConfig | Mapping[str, Any] | None = None, **settings: Any) -> dict:
    """The evaluation `r1lab eval` runs (printed and saved as it saves it); returns its figures."""
    cfg = _settings(EvalConfig, config, settings)
    path = run_eval(cfg)
    return json.loads(Path(path).read_text())[cfg.split]


def _settings(cls: type, config: Any, settings: dict[str, Any]):
    """cls from a config of that class, a mapping, or nothing, with settings on top; a ValueError names an unknown."""
    if config is not None and not isinstance(config, (cls, Mapping)):
        raise TypeError(f"config must be a {cls.__name__} or a mapping of its settings, got {type(config).__name__}")
    given = {**(dict(config) if isinstance(config, Mapping) else {}), **settings}
    names = {f.name for f in dataclasses.fields(cls)}
    for name in given:
        if name not in names:
            raise ValueError(f"{cls.__name__}: unknown setting {name!r}{did_you_mean(name, names)}")
    return dataclasses.replace(config, **given) if isinstance(config, cls) else cls(**given)


def _weighted(rewards: Rewards) -> list[tuple[Callable, float]]:
    if isinstance(rewards, Mapping):
        return list(rewards.items())
    return [item if isinstance(item, tuple) else (item, 1.0) for item in rewards]
