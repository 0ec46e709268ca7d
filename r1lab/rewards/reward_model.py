"""A reward model as a reward: `r1lab grpo --reward-model DIR`, a one-output Hugging Face sequence-classification
model run with transformers on [user: the problem, assistant: the completion] through its chat template; its output
is the reward (`reward/reward_model`), with normalize="batch" standardised over the step's completions.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch


def transformers_problem() -> str | None:
    """Why a reward model cannot run here, or None."""
    if importlib.util.find_spec("transformers") is None:
        return "needs transformers, which is not installed: pip install 'r1lab[reward-model]' (transformers)"
    return None


def directory_problem(path: str) -> str | None:
    """Why path is not a one-output sequence-classification model directory transformers can read, or None."""
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():  # checked first: transformers would take a missing one for a Hub id
        return f"{path!r} is not a model directory (no config.json)"
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        return f"{path!r} is not a model directory transformers can read ({str(err).splitlines()[0]})"
    if config.num_labels != 1:
        return f"{path!r} has {config.num_labels} outputs (num_labels); a reward model has one"
    return None


@dataclass(frozen=True)
class RewardModelSettings:
    path: str
    batch_size: int = 8
    normalize: str = "none"  # "none" | "batch"
    device: str = "cpu"
    dtype: str = "float32"


class RewardModel:
    """Loaded once; scores texts in batches under torch.inference_mode."""

    def __init__(self, settings: RewardModelSettings) -> None:
        if problem := transformers_problem():
            raise ValueError(f"reward_model {problem}")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.settings = settings
        self.tokenizer = AutoTokenizer.from_pretrained(settings.path)
        self.tokenizer.truncation_side = "left"  # a long text keeps its end: the completion and its answer
        if self.tokenizer.pad_token is None:  # batches need padding; the model finds each row's last real token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(settings.path)
        self.model = self.model.to(settings.device, getattr(torch, settings.dtype)).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = min(self.tokenizer.model_max_length,
                              getattr(self.model.config, "max_position_embeddings", None) or 1 << 30)

    def text(self, prompt: str, completion: str) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False)
        return f"{prompt}\n{completion}"

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[list[float], int]:
        """The rewards, and how many were not finite (given 0 and counted as errors)."""
        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        raw: list[float] = []
        for start in range(0, len(texts), self.settings.batch_size):
            batch = self.tokenizer(texts[start:start + self.settings.batch_size], return_tensors="pt", padding=True,
                                   truncation=True, max_length=self.max_length,
                                   add_special_tokens=not self.tokenizer.chat_template)  # a template writes its own
            logits = self.model(**batch.to(self.settings.device)).logits  # (B, 1)
            raw += logits[:, 0].float().tolist()
        errors = sum(not math.isfinite(x) for x in raw)
        values = [x if math.isfinite(x) else 0.0 for x in raw]
        if self.settings.normalize == "batch":
            values = standardised(values)
        return values, errors


def standardised(values: list[float]) -> list[float]:
    """(x - mean) / std over the batch; only centred when every value is the same."""
    if not values:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    std = t.std(unbiased=False).item()
    return ((t - t.mean()) / (std if std > 0 else 1.0)).tolist()
