"""One dataclass per command. Defaults live here; a YAML file and then CLI flags override them.

Every field becomes a flag (`prompts_per_step` -> `--prompts-per-step`). The resolved config is saved in the run
directory, so a run can be repeated exactly with `--config RUN/config.yaml`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from r1lab.corpus import DEMO_TASK_OPTIONS


@dataclass
class PretrainConfig:
    """`r1lab pretrain`: a tiny base model from scratch on the synthetic corpus (see r1lab/corpus.py)."""

    out: str = "runs/base"
    task: str = "arithmetic"
    task_options: dict = field(default_factory=lambda: dict(DEMO_TASK_OPTIONS))
    documents: int = 60_000  # corpus size (documents are drawn from the task's train split)
    steps: int = 400
    batch_size: int = 96  # documents per optimizer step
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    think_share: float = 0.3
    slip_rate: float = 0.2
    untagged_share: float = 0.05
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = all cores


@dataclass
class GRPOConfig:
    """`r1lab grpo`: R1-Zero reinforcement learning with group-relative advantages and rule rewards."""

    model: str = "runs/base/model"
    task: str = "arithmetic"  # a built-in task name or a .jsonl/.parquet file with prompt and answer columns
    task_options: dict = field(default_factory=dict)
    out: str = "runs/grpo"
    steps: int = 100
    time_limit_s: float = 0.0  # stop after the step that reaches this much training wall time (0 = no limit)
    # batch sizes, named by unit
    prompts_per_step: int = 16
    samples_per_prompt: int = 8  # G, the group size
    micro_batch_size: int = 64  # sequences per forward/backward pass
    updates_per_batch: int = 1  # mu: gradient steps on one batch of rollouts
    # optimisation
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    # the objective's knobs (README: GRPO / Dr. GRPO / DAPO as settings of these)
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    loss_norm: str = "token"  # token | sequence | constant
    scale_by_std: bool = True
    drop_uniform_groups: bool = False
    # with kl_coef 0, a zero-advantage sequence has zero gradient: skip its forward/backward (same update, faster)
    skip_zero_advantage: bool = True
    # rewards
    accuracy_weight: float = 1.0
    format_weight: float = 1.0
    language_weight: float = 0.0  # R1 stage 2: reward the share of the chain of thought written in `language`
    language: str = "en"  # en/latin, zh, cjk, ja, ko, ru (r1lab/language.py)
    reward_functions: dict = field(default_factory=dict)  # your own: {"module:function": weight} (reward_functions.py)
    reward_timeout_s: float = 5.0
    control: str = "none"  # none | random-reward (rewards shuffled across the batch: same mean, no signal)
    # sampling
    template: str = "r1zero"  # r1zero | chat | none
    prefill: str = ""  # text appended after the template, e.g. "<think>"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    suppress_eos: bool = False  # benchmarking only: every completion runs to max_new_tokens
    # float32, or bfloat16: rollouts from a bf16 copy of the float32 master weights (refreshed after every update),
    # training forward passes under bf16 autocast, the optimizer on the float32 weights
    dtype: str = "float32"
    recompute_logits: bool = False  # backward recomputes the vocabulary projection: far less memory, a bit more time
    # evaluation on held-out problems during training
    eval_every: int = 20
    eval_problems: int = 200
    eval_samples: int = 4  # k
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    # bookkeeping
    save_every: int = 50
    samples_every: int = 10
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    threads: int = 0

    def check(self) -> None:
        """Fail at start, with a sentence, on settings that cannot work."""
        problems = []
        if self.samples_per_prompt < 2:
            problems.append("samples_per_prompt (G) must be at least 2: advantages compare samples within a group")
        if self.prompts_per_step < 1 or self.micro_batch_size < 1:
            problems.append("prompts_per_step and micro_batch_size must be at least 1")
        if self.loss_norm not in ("token", "sequence", "constant"):
            problems.append(f"loss_norm {self.loss_norm!r} is not one of token, sequence, constant")
        if self.control not in ("none", "random-reward"):
            problems.append(f"control {self.control!r} is not one of none, random-reward")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            problems.append("clip_low must be in [0, 1) and clip_high >= 0")
        if self.updates_per_batch < 1 or self.steps < 1 or self.max_new_tokens < 1:
            problems.append("updates_per_batch, steps and max_new_tokens must be at least 1")
        if self.eval_every and (self.eval_samples < 1 or self.eval_problems < 1):
            problems.append("eval_samples and eval_problems must be at least 1 when eval_every > 0")
        if self.temperature <= 0:
            problems.append("temperature must be > 0: GRPO needs different samples within a group")
        if self.dtype not in ("float32", "bfloat16"):
            problems.append(f"dtype {self.dtype!r} is not one of float32, bfloat16")
        problems += _reward_function_problems(self.reward_functions)
        if problems:
            raise ValueError("invalid GRPO config: " + "; ".join(problems))


def _reward_function_problems(functions: dict) -> list[str]:
    from r1lab.reward_functions import load_reward_function

    if not isinstance(functions, dict):
        return ['reward_functions must map "module:function" to a weight']
    problems = []
    for spec, weight in functions.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            problems.append(f"reward function {spec!r}: its weight must be a number, got {weight!r}")
        try:
            load_reward_function(spec)
        except ValueError as err:
            problems.append(str(err))
    return problems


@dataclass
class EvalConfig:
    """`r1lab eval`: pass@1 over k samples, cons@k and pass@k on held-out problems (the paper's protocol)."""

    model: str = "runs/demo/grpo/model"
    task: str = "arithmetic"
    task_options: dict = field(default_factory=dict)
    split: str = "test"
    problems: int = 200
    samples: int = 8  # k
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 128
    template: str = "r1zero"
    prefill: str = ""
    out: str = ""  # JSON results path; default: next to the model
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"  # bfloat16: half the memory and bytes per decode step (on a GPU)
    threads: int = 0


@dataclass
class SFTConfig:
    """`r1lab sft`: supervised fine-tuning on chat data (rows of `messages`), the loss on assistant turns only."""

    model: str = "runs/base/model"
    data: str = "runs/sample/sft.jsonl"  # .jsonl / .json / .parquet, each row {"messages": [{role, content}, ...]}
    out: str = "runs/sft"
    template: str = "auto"  # auto (the tokenizer's chat template if it has one, else r1zero) | chat | r1zero
    epochs: float = 2.0  # R1 stage 3 trains two epochs on the rejection-sampled data
    steps: int = 0  # optimizer steps; 0 = as many as `epochs` takes
    batch_size: int = 16  # conversations per optimizer step
    micro_batch_size: int = 0  # conversations per forward/backward pass; 0 = the whole batch at once
    lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_len: int = 2048  # tokens; longer conversations are dropped and counted, never truncated
    eval_fraction: float = 0.0  # share of conversations held out for a held-out loss (stable hash of the row)
    eval_every: int = 50
    save_every: int = 0  # checkpoint every N steps (0 = none); `--resume` continues from the latest
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    threads: int = 0

    def check(self) -> None:
        """Fail at start, with a sentence, on settings that cannot work."""
        problems = []
        if self.batch_size < 1 or self.micro_batch_size < 0:
            problems.append("batch_size must be at least 1 and micro_batch_size at least 0")
        if self.steps < 0 or (self.steps == 0 and self.epochs <= 0):
            problems.append("set steps >= 1, or steps 0 and epochs > 0")
        if self.max_len < 2:
            problems.append("max_len must be at least 2 tokens")
        if self.template not in ("auto", "chat", "r1zero"):
            problems.append(f"template {self.template!r} is not one of auto, chat, r1zero")
        if not 0 <= self.eval_fraction < 1 or self.eval_every < 1:
            problems.append("eval_fraction must be in [0, 1) and eval_every at least 1")
        if problems:
            raise ValueError("invalid SFT config: " + "; ".join(problems))


@dataclass
class SampleConfig:
    """`r1lab sample`: rejection sampling; k completions per prompt, the correct and readable ones kept as SFT data."""

    model: str = "runs/grpo/model"
    task: str = "arithmetic"
    task_options: dict = field(default_factory=dict)
    split: str = "train"
    problems: int = 200  # prompts (distinct); 0 = every row of a data file's split
    samples: int = 16  # k completions per prompt
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 256
    prompts_per_chunk: int = 32  # prompts per generate call
    template: str = "r1zero"  # r1zero | chat | none
    prefill: str = ""
    # readability filters on the verified-correct completions
    min_tokens: int = 1
    max_tokens: int = 0  # 0 = no limit below max_new_tokens
    language: str = "en"  # language the reasoning must be written in (r1lab/language.py); "" = no language filter
    min_language_score: float = 0.9  # share of the <think> part's words in it: one stray "π" in ten passes
    max_per_prompt: int = 0  # distinct completions kept per prompt; 0 = every distinct one
    reward_timeout_s: float = 5.0
    out: str = "runs/sample/sft.jsonl"  # the SFT dataset; a summary and the config are written beside it
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"  # bfloat16: half the memory and bytes per decode step (on a GPU)
    threads: int = 0

    def check(self) -> None:
        """Fail at start, with a sentence, on settings that cannot work."""
        problems = []
        if self.samples < 1 or self.prompts_per_chunk < 1 or self.max_new_tokens < 1:
            problems.append("samples, prompts_per_chunk and max_new_tokens must be at least 1")
        if self.problems < 0 or self.max_per_prompt < 0 or self.min_tokens < 0 or self.max_tokens < 0:
            problems.append("problems, max_per_prompt, min_tokens and max_tokens cannot be negative")
        if self.max_tokens and self.max_tokens < self.min_tokens:
            problems.append(f"max_tokens {self.max_tokens} is below min_tokens {self.min_tokens}")
        if self.temperature < 0:
            problems.append("temperature cannot be negative")
        if problems:
            raise ValueError("invalid sample config: " + "; ".join(problems))


@dataclass
class DemoConfig:
    """`r1lab demo`: tokenizer -> tiny base -> eval -> R1-Zero GRPO -> eval -> report, on a CPU in minutes."""

    out: str = "runs/demo"
    control: str = "none"  # random-reward runs the same demo with shuffled rewards
    pretrain_steps: int = 400
    grpo_steps: int = 60
    eval_problems: int = 200
    seed: int = 0
    threads: int = 0


@dataclass
class DistillConfig:
    """`r1lab distill`: teacher -> sampled traces -> verified, readable SFT data -> a smaller student (R1 section 4).

    With `compare_grpo`, the same student base is also trained by GRPO for the wall time distillation took, and the
    report puts both beside the teacher (the paper's finding: distillation beats RL on the small model)."""

    teacher: str = "runs/demo/grpo/model"
    student: str = ""  # a student base model directory; "" = pretrain one of the student_* shape on the corpus
    student_hidden_size: int = 64
    student_num_layers: int = 4
    student_num_heads: int = 4
    student_num_kv_heads: int = 2
    student_intermediate_size: int = 176  # with the four above: about 0.23x the demo model's parameters
    student_pretrain_steps: int = 400
    task: str = "arithmetic"
    task_options: dict = field(default_factory=lambda: dict(DEMO_TASK_OPTIONS))
    template: str = "r1zero"
    # traces from the teacher (rejection sampling: verified-correct, readable, distinct)
    problems: int = 6000  # train prompts
    samples: int = 2
    max_per_prompt: int = 1  # a worked solution is nearly deterministic: more copies of it add nothing
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 64
    # SFT of the student on them
    epochs: float = 8.0
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 10
    # the comparison: the same student base trained by GRPO for the same wall time
    compare_grpo: bool = True
    grpo_lr: float = 1e-4
    # held-out evaluation of teacher and students (k samples, temperature 0.6, top-p 0.95)
    eval_problems: int = 200
    eval_samples: int = 8
    out: str = "runs/distill"
    seed: int = 0
    threads: int = 0

    def check(self) -> None:
        if not self.student and self.task != "arithmetic":
            raise ValueError(f"invalid distill config: pretraining a student base needs the arithmetic task; for task "
                             f"{self.task!r} give a student base model directory with --student")


@dataclass
class PipelineConfig:
    """`r1lab pipeline`: DeepSeek-R1's four stages, beside R1-Zero and a distilled student, in one run.

    base -> (R1-Zero: GRPO) and (1 cold-start SFT -> 2 reasoning RL with the language reward -> 3 rejection sampling,
    SFT of the base -> 4 final RL) -> distillation of the final model into a smaller student -> one report.
    On the built-in arithmetic task everything is made here (CPU size); on your own task (a data file) give the base
    model, the cold-start data and, to distil, the student base."""

    out: str = "runs/pipeline"
    task: str = "arithmetic"  # the built-in arithmetic task, or a .jsonl/.parquet file with prompt and answer columns
    task_options: dict = field(default_factory=dict)  # for arithmetic, on top of the demo's (two 3-digit numbers)
    base: str = ""  # a base model directory; "" = pretrain the demo's tiny base (arithmetic only)
    cold_start_data: str = ""  # chat JSONL/Parquet for stage 1; "" = generated worked solutions (arithmetic only)
    student: str = ""  # the student base for distillation; "" = pretrain the preset student (arithmetic only)
    template: str = "r1zero"  # how prompts are rendered for RL, sampling and evaluation: r1zero | chat | none
    max_new_tokens: int = 64
    pretrain_steps: int = 400
    r1zero_steps: int = 60  # R1-Zero from the same base, for comparison (the demo's run)
    cold_start_examples: int = 400  # generated worked solutions, always in the <think>/<answer> format
    cold_start_epochs: float = 2.0
    sft_lr: float = 1e-3
    reasoning_rl_steps: int = 40
    language_weight: float = 0.1  # stages 2 and 4: accuracy + format + this x language consistency
    rejection_problems: int = 1000
    rejection_samples: int = 4
    final_rl_steps: int = 20
    rl_lr: float = 3e-5
    distill: bool = True  # distil the final model into a student
    distill_problems: int = 6000  # teacher prompts for the student's SFT data
    student_pretrain_steps: int = 400
    eval_problems: int = 200
    eval_samples: int = 8
    seed: int = 0
    threads: int = 0

    def options(self) -> dict:
        """The task's options: for arithmetic the demo's, updated by task_options."""
        return {**DEMO_TASK_OPTIONS, **self.task_options} if self.task == "arithmetic" else dict(self.task_options)

    def check(self) -> None:
        if self.task == "arithmetic":
            return
        missing = [name for name, value in (("base", self.base), ("cold_start_data", self.cold_start_data),
                                            ("student", self.student if self.distill else "given")) if not value]
        if missing:
            raise ValueError(f"invalid pipeline config: with task {self.task!r} (not the built-in arithmetic task), "
                             f"give {', '.join(missing)}: only the built-in task can make them itself")


@dataclass
class ServeConfig:
    """`r1lab serve`: an OpenAI-compatible API (reasoning_content split out) and a chat page for a model directory."""

    model: str = "runs/demo/grpo/model"
    served_model_name: str = ""  # the model id clients send; default: the model directory's name
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = ""  # when set, /v1 requests need the header `Authorization: Bearer KEY`
    template: str = "auto"  # auto (the tokenizer's chat template, else r1zero) | chat | r1zero
    prefill: str = ""  # text after the template, e.g. "<think>": the reply then starts inside the reasoning
    max_batch: int = 64  # completions generated together in one batch
    batch_wait_ms: float = 5.0  # a batch starts once no request came for this long (10x this at most)
    max_pending: int = 4096  # requests waiting beyond this get 503
    max_tokens: int = 4096  # the most completion tokens a request may ask for
    max_model_len: int = 0  # context length (prompt + completion); 0: the model's max_position_embeddings
    max_body_bytes: int = 1 << 20
    device: str = "auto"
    dtype: str = "float32"  # bfloat16: half the memory and bytes per decode step (on a GPU)
    threads: int = 0
    log_level: str = "info"

    def check(self) -> None:
        problems = []
        if self.max_batch < 1 or self.max_tokens < 1 or self.max_pending < 1 or self.max_body_bytes < 1:
            problems.append("max_batch, max_tokens, max_pending and max_body_bytes must be at least 1")
        if self.batch_wait_ms < 0:
            problems.append("batch_wait_ms cannot be negative")
        if self.template not in ("auto", "chat", "r1zero"):
            problems.append(f"template {self.template!r} is not one of auto, chat, r1zero")
        if problems:
            raise ValueError("invalid serve config: " + "; ".join(problems))


@dataclass
class ChatConfig:
    """`r1lab chat`: talk to a model directory in the terminal; its reasoning is shown apart from the answer."""

    model: str = "runs/demo/grpo/model"
    template: str = "auto"  # auto (the tokenizer's chat template, else r1zero) | chat | r1zero
    prefill: str = ""
    system: str = ""  # a system message opening the conversation
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 1024
    seed: int = 0  # reply i is sampled with seed + i: a piped conversation replays exactly
    device: str = "auto"
    dtype: str = "float32"  # bfloat16: half the memory and bytes per decode step (on a GPU)
    threads: int = 0


# ----------------------------------------------------------------------------------------------------------------


def _flag_type(tp):
    if tp is bool:
        return lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]
    if tp is dict:
        return lambda s: yaml.safe_load(s) or {}
    return tp


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """A flag per dataclass field, defaulting to None so that only the flags given override the YAML."""
    parser.add_argument("--config", help="YAML file with any of the fields below")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        extra = {"nargs": "?", "const": True} if hints[f.name] is bool else {}  # `--resume` alone means true
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_flag_type(hints[f.name]),
                            default=None, metavar=hints[f.name].__name__.upper(), help=f"(default: {default})", **extra)


def resolve(cls, args: argparse.Namespace | None = None, **overrides):
    """Defaults, then the YAML file named by --config, then flags, then keyword overrides."""
    values: dict = {}
    config_path = getattr(args, "config", None) if args else None
    if config_path:
        loaded = yaml.safe_load(Path(config_path).read_text()) or {}
        unknown = set(loaded) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{config_path}: unknown field(s) {', '.join(sorted(unknown))} for {cls.__name__}")
        values.update(loaded)
    if args:
        values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None})
    values.update(overrides)
    return cls(**values)


def save_config(config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
