"""The `r1lab` command: demo, pretrain, grpo, eval. Every config field is a flag; --config reads a YAML file."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from r1lab.config import DemoConfig, EvalConfig, GRPOConfig, PretrainConfig, add_flags, resolve
from r1lab.config import ChatConfig, DistillConfig, PipelineConfig, SampleConfig, ServeConfig, SFTConfig

COMMANDS = {
    "demo": (DemoConfig, "R1-Zero in miniature on a CPU: pretrain a tiny base, GRPO it, evaluate, report"),
    "pretrain": (PretrainConfig, "pretrain the tiny base model from scratch on the synthetic corpus"),
    "grpo": (GRPOConfig, "R1-Zero GRPO on a Hugging Face-format model directory"),
    "eval": (EvalConfig, "pass@1 over k samples, cons@k and pass@k on held-out problems"),
    "sft": (SFTConfig, "supervised fine-tuning on chat data (JSONL/Parquet rows of messages), loss on assistant turns"),
    "sample": (SampleConfig, "rejection sampling: keep the verified-correct, readable completions as SFT data"),
    "distill": (DistillConfig, "distil a teacher's verified reasoning into a smaller student (and compare with GRPO)"),
    "pipeline": (PipelineConfig, "DeepSeek-R1's four stages in CPU size, beside R1-Zero and a distilled student"),
    "serve": (ServeConfig, "OpenAI-compatible API with reasoning_content, and a chat page at /"),
    "chat": (ChatConfig, "chat with a model in the terminal, reasoning shown apart from the answer"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1lab", description="Train reasoning models the DeepSeek-R1 way.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, help_text) in COMMANDS.items():
        add_flags(sub.add_parser(name, help=help_text, description=help_text), cls)
    return parser


def run_eval(cfg: EvalConfig) -> None:
    from r1lab.engine import Engine
    from r1lab.evaluate import evaluate, print_table, save_json
    from r1lab.grpo import encode_prompt, load_policy, pick_device
    from r1lab.tasks import get_task

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    model, tokenizer = load_policy(cfg.model, pick_device(cfg.device), cfg.dtype)
    task = get_task(cfg.task, **cfg.task_options)
    problems = task.problems(cfg.split, cfg.problems, cfg.seed + 1)
    result = evaluate(Engine(model, tokenizer), task, problems,
                      lambda p: encode_prompt(tokenizer, p, cfg.template, cfg.prefill), k=cfg.samples,
                      temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                      response_prefix=cfg.prefill)
    print_table({Path(cfg.model).name or cfg.model: result}, f"{cfg.task} ({cfg.split}, {len(problems)} problems)")
    out = Path(cfg.out) if cfg.out else Path(cfg.model) / "eval.json"
    save_json(out, {cfg.split: result})
    print(f"results: {out}")


# command -> (module, function, what its return value is); imported only when run, so `r1lab --help` stays fast
RUNNERS = {
    "demo": ("r1lab.demo", "run_demo", None),
    "pretrain": ("r1lab.sft", "pretrain", "base model"),
    "grpo": ("r1lab.grpo", "train", "final model"),
    "sft": ("r1lab.sft", "sft", "final model"),
    "sample": ("r1lab.rejection", "sample", "SFT data"),
    "distill": ("r1lab.distill", "run_distill", None),
    "pipeline": ("r1lab.pipeline", "run_pipeline", None),
    "serve": ("r1lab.serve.app", "serve", None),
    "chat": ("r1lab.chat", "run_chat", None),
}


def dispatch(command: str, cfg) -> None:
    if command == "eval":
        run_eval(cfg)
        return
    module_name, function, result = RUNNERS[command]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        if command != "serve":
            raise
        raise ValueError(f"{err}; r1lab serve needs its extra: pip install 'r1lab[serve]'") from None
    value = getattr(module, function)(cfg)
    if result:
        print(f"{result}: {value}")


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve(COMMANDS[args.command][0], args)
        dispatch(args.command, cfg)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("R1LAB_DEBUG"):
            raise
        print(f"r1lab {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
