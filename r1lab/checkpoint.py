"""Atomic checkpoints and exact resume.

A checkpoint is a directory run/checkpoints/step_NNNNNN holding the model in Hugging Face format (it loads in
transformers as is) and trainer_state.pt (optimizer, RNG states, step). It is written under a temporary name and
renamed into place, so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

from r1lab.model import CausalLM, load_model, save_model
from r1lab.tokenizer import Tokenizer

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model: CausalLM, tokenizer: Tokenizer,
                    optimizer: torch.optim.Optimizer, keep: int = 2) -> Path:
    final = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    tokenizer.save(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp") and (p / STATE_FILE).exists())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: CausalLM, optimizer: torch.optim.Optimizer) -> int:
    """Restore weights, optimizer and RNG states in place; return the number of steps already done."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    model.load_state_dict(load_model(path, device=device, dtype=dtype).state_dict())
    state = torch.load(Path(path) / STATE_FILE, map_location=device, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return int(state["step"])
