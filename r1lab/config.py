"""One dataclass per command. Defaults live here; a YAML file and then CLI flags override them.

Every field becomes a flag (`prompts_per_step` -> `--prompts-per-step`). Each field is declared with `setting()`:
its default, a one-line help text, and the values it allows (a range, choices or a rule); its type is the annotation.
From that one declaration come the `--help` lines and the validation that `resolve()` runs on flags and YAML alike,
before anything is loaded, reporting every bad field in one message. The resolved config is saved in the run
directory, so a run can be repeated exactly with `--config RUN/config.yaml --out NEW` (r1lab refuses to write a
second run into an occupied run directory; see r1lab/cli.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from r1lab.model.architecture import attention_shape_problems
from r1lab.model.lora import LORA_TARGETS, lora_target_names
from r1lab.rewards import tasks
from r1lab.rewards.language import TARGETS
from r1lab.rewards.tasks import DATA_SUFFIXES, TASKS, get_task
from r1lab.rewards.user_functions import load_reward_function
from r1lab.suggest import did_you_mean


@dataclass(frozen=True)
class Spec:
    """What a field allows besides its type: bounds (ge/gt/le/lt), choices, or a rule for anything else."""

    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    rule: Callable[[Any], str | None] | None = None  # value -> what is wrong with it, or None
    allowed: str | Callable[[], str] = ""  # the rule's allowed values, for --help (a callable defers an import)

    def allowed_text(self) -> str:
        if self.choices is not None:
            return "one of: " + ", ".join(repr(c) if c == "" else str(c) for c in self.choices)
        if self.rule is not None:
            return self.allowed() if callable(self.allowed) else self.allowed
        low = (f"[{_show(self.ge)}" if self.ge is not None else f"({_show(self.gt)}" if self.gt is not None else None)
        high = (f"{_show(self.le)}]" if self.le is not None else f"{_show(self.lt)})" if self.lt is not None else None)
        if low and high:
            return f"{low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        if high:
            return ("<= " if high[-1] == "]" else "< ") + high[:-1]
        return ""

    def problem(self, value) -> str | None:
        """What is wrong with a value of the right type, or None."""
        if self.choices is not None and value not in self.choices:
            return f"{_show(value)} is not {self.allowed_text()}{did_you_mean(value, self.choices)}"
        if self.rule is not None:
            return self.rule(value)
        below = (self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
        above = (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt)
        if not (below or above):
            return None
        bounds = self.allowed_text()
        if bounds[:3] in (">= ", "<= "):
            return f"{_show(value)} is {'below the minimum' if bounds[0] == '>' else 'above the maximum'} {bounds[3:]}"
        return f"{_show(value)} {'must be' if bounds[0] in '<>' else 'is not in'} {bounds}"


def setting(default, help: str, **allowed):
    """A config field: its default, a one-line help text and what it allows (see Spec); the type is the annotation."""
    meta = {"r1lab": Spec(help, **allowed)}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def _show(value) -> str:
    """A value as the user wrote it: 0 rather than 0.0, text quoted."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value) if isinstance(value, str) else str(value)


# Names other trainers (transformers, TRL) use for these settings: a user coming from them gets pointed here.
ALIASES = {"learning_rate": "lr", "max_steps": "steps", "num_train_epochs": "epochs", "output_dir": "out",
           "model_name_or_path": "model", "per_device_train_batch_size": "batch_size", "warmup": "warmup_steps",
           "num_generations": "samples_per_prompt", "group_size": "samples_per_prompt", "beta": "kl_coef",
           "epsilon": "clip_low", "epsilon_high": "clip_high", "max_completion_length": "max_new_tokens",
           "gradient_clipping": "max_grad_norm", "clip_grad_norm": "max_grad_norm", "bf16": "dtype",
           "torch_dtype": "dtype", "num_iterations": "updates_per_batch"}


# ----------------------------------------------------------------------------------------------------------------
# rules: fields whose allowed values are not a range or a fixed list


def _task_problem(value: str) -> str | None:
    if value in TASKS or value.lower().endswith(DATA_SUFFIXES):
        return None
    return f"{value!r} is not {_task_allowed()}{did_you_mean(value, TASKS)}"


def _task_allowed() -> str:
    return f"a built-in task ({', '.join(sorted(TASKS))}) or a data file ending in {', '.join(DATA_SUFFIXES)}"


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICES = "auto, cpu, cuda, cuda:N, mps"


def _device_problem(value: str) -> str | None:
    """The device must exist on this machine: found here, before any weights load, rather than 30 lines deep."""
    if not DEVICE_PATTERN.fullmatch(value):
        return f"{value!r} is not one of {DEVICES}{did_you_mean(value, ('auto', 'cpu', 'cuda', 'mps'))}"
    if value in ("auto", "cpu"):
        return None
    import torch  # only here: `r1lab --help` should not wait for torch to load

    if value == "mps":
        return None if torch.backends.mps.is_available() else "'mps' is not available on this machine; use auto or cpu"
    if not torch.cuda.is_available():
        return f"{value!r} but CUDA is not available on this machine (torch {torch.__version__}); use auto or cpu"
    index, count = int(value.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        return f"{value!r} but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
    return None


def _language_problem(value: str) -> str | None:
    if value.lower() in TARGETS:  # r1lab/rewards/language.py reads the name case-insensitively
        return None
    return f"{value!r} is not one of: {', '.join(TARGETS)}{did_you_mean(value.lower(), TARGETS)}"


# what the settings shared by several commands allow
SEED = dict(ge=0, le=2**32 - 1)  # every seed fits the 32-bit seeders, including the seed + 1 of held-out problems
THREADS = dict(ge=0)
DTYPE = dict(choices=("float32", "bfloat16"))
ARCHS = ("dense", "deepseek-v3")  # the tiny bases r1lab pretrains
DEVICE = dict(rule=_device_problem, allowed=f"one of: {DEVICES} (one this machine has)")
TASK = dict(rule=_task_problem, allowed=_task_allowed)
PROMPT_TEMPLATES = dict(choices=("r1zero", "chat", "none", "auto"))  # "none": a single question sent as it is
CONVERSATION_TEMPLATES = dict(choices=("auto", "chat", "r1zero"))  # a conversation cannot be sent without one
LANGUAGE = dict(rule=_language_problem, allowed="one of: " + ", ".join(TARGETS))
TOP_P = dict(gt=0, le=1)
SAMPLING_TEMPERATURE = dict(ge=0)  # 0 = greedy (r1lab/engine/engine.py)
NONEMPTY = dict(rule=lambda value: None if value.strip() else "must not be empty", allowed="not empty")


def _lora_targets_problem(value: str) -> str | None:
    names = lora_target_names(value)
    if not names:
        return "names no module"
    unknown = [n for n in names if n not in LORA_TARGETS]
    return f"{unknown[0]!r} is not a module LoRA can adapt{did_you_mean(unknown[0], LORA_TARGETS)}" if unknown else None


LORA_TARGET_SETTING = dict(rule=_lora_targets_problem, allowed="all-linear, or some of " + ",".join(LORA_TARGETS))


# Settings that GRPO and SFT (and, for the timeout, eval and sample) declare alike: one declaration each, made fresh
# for every class (a dataclass field belongs to the class that declares it).
def activation_checkpointing_setting():
    return setting(False, "backward recomputes each layer's forward instead of keeping its activations: memory of "
                          "one layer's activations instead of all, about a third more compute (dense models)")


def lora_rank_setting():
    return setting(0, "LoRA: adapters of this rank on lora_targets, the base frozen (0 = full fine-tuning)", ge=0)


def lora_alpha_setting():
    return setting(16.0, "LoRA: the adapters' output is scaled by lora_alpha / lora_rank", gt=0)


def lora_targets_setting():
    return setting("all-linear", "LoRA: the modules adapted, comma-separated Hugging Face names", **LORA_TARGET_SETTING)


def optimizer_in_backward_setting():
    return setting(False, "update each parameter in the backward pass as soon as its gradient is complete, and free "
                          "it: all gradients never exist at once (needs max_grad_norm 0, one process)")


def optimizer_in_backward_problems(cfg) -> list[str]:
    """What optimizer_in_backward cannot honour (r1lab/train/backward_step.py); torchrun: refused once the world is known."""
    if not cfg.optimizer_in_backward:
        return []
    problems = []
    if cfg.max_grad_norm:
        problems.append(f"optimizer_in_backward cannot clip to max_grad_norm {_show(cfg.max_grad_norm)}: it updates "
                        f"each parameter before the others' gradients exist; set max_grad_norm 0")
    if cfg.shard:
        problems.append("optimizer_in_backward with shard: FSDP reduces gradients from its own hooks; leave one on")
    return problems


def shard_setting():
    return setting(False, "under torchrun: FSDP2, each rank holds 1/N of the weights, gradients and optimizer state "
                          "(models of 1M parameters and more)")


def dist_timeout_setting():
    return setting(600.0, "under torchrun: a rank that waits this long for another (hung or dead) ends the job with "
                          "an error", gt=0)


def _tag_problem(value: str) -> str | None:
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", value):
        return None
    return f"{_show(value)} is not a tag name (letters, digits, _ and -, as in <python>)"


TAG = dict(rule=_tag_problem, allowed="a tag name: letters, digits, _ and -")


def _optional_tag_problem(value: str) -> str | None:
    return None if value == "" else _tag_problem(value)


OPTIONAL_TAG = dict(rule=_optional_tag_problem, allowed='"" or a tag name: letters, digits, _ and -')


# Tool calls inside rollouts (r1lab/engine/tools.py), declared alike by grpo, eval, sample, serve and chat (one ToolSpec's
# settings).
def tools_setting():
    return setting("", 'python: code the model closes in a <python>...</python> block runs in the sandbox and its '
                       'output is appended as <output>...</output> ("" = no tools)', choices=("", "python"))


def tool_tag_setting():
    return setting("python", "tools: the tag of a tool block, <TAG>code</TAG>", **TAG)


def tool_output_tag_setting():
    return setting("output", "tools: the tag around a call's output, <TAG>printed text</TAG>", **TAG)


def max_tool_calls_setting():
    return setting(4, "tools: calls per rollout; a block closed past this ends the rollout", ge=1)


def tool_timeout_setting():
    return setting(2.0, "tools: seconds one call may run", gt=0)


def tool_memory_setting():
    return setting(256, "tools: address-space limit of one call, in MB", ge=32)


def tool_output_chars_setting():
    return setting(512, "tools: characters of a call's output the model reads; the rest is cut, with a marker",
                   ge=16)


# ----------------------------------------------------------------------------------------------------------------
# validation: types, then each field's Spec, then each command's rules across fields


@dataclass(frozen=True)
class Unparsed:
    """Flag text that does not convert to its field's type: kept, so that it is reported with every other bad field."""

    text: str
    expected: str


EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "text", dict: "a mapping {key: value}"}


def type_problem(tp: type, value) -> str | None:
    """Strict types: an int field refuses 2.5 and "3", a float field takes ints but not text, NaN or infinity, a bool
    field takes only booleans (a quoted YAML 'no' is text, refused rather than read as true)."""
    if isinstance(value, Unparsed):
        return f"{value.text!r} is not {value.expected}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: number and isinstance(value, int), float: number,
          str: isinstance(value, str), dict: isinstance(value, dict)}[tp]
    if ok and tp is float and not math.isfinite(value):
        return f"{_show(value)} is not a finite number"
    if ok:
        return None
    if isinstance(value, str) and not isinstance(_flag_type(tp)(value), Unparsed):  # YAML quotes made it text
        return f"{value!r} is not {EXPECTED[tp]} (it is quoted: write it without quotes)"
    if tp is str and isinstance(value, bool):  # YAML 1.1 reads unquoted yes/no/on/off as booleans
        return f"{_show(value)} is not text (YAML read it as a boolean: put it in quotes)"
    return f"{_show(value)} is not {EXPECTED[tp]}"


def field_problems(cfg) -> list[str]:
    """'name: what is wrong' for each field of a config whose value has the wrong type or is not allowed."""
    hints = typing.get_type_hints(type(cfg))
    problems = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        problem = type_problem(hints[f.name], value)
        spec = f.metadata.get("r1lab")
        if problem is None and spec is not None:
            problem = spec.problem(value)
        if problem:
            problems.append(f"{f.name}: {problem}")
    return problems


class Settings:
    """Base of the command configs: check() validates every field against its declaration, then the command's rules
    across fields (rules() of each config), which run only once every field is valid on its own."""

    kind = "the"  # the config's name in check()'s message, e.g. "GRPO"

    def find_problems(self) -> list[str]:
        problems = field_problems(self)
        if problems:
            return problems
        if hasattr(self, "task_options"):
            problems += task_option_problems(self.task, self.task_options)
        return problems + self.rules()

    def rules(self) -> list[str]:
        return []

    def check(self) -> None:
        """Fail at start, with a sentence, on settings that cannot work (the commands call this themselves)."""
        problems = self.find_problems()
        if problems:
            raise ValueError(f"invalid {self.kind} config: " + "; ".join(problems))


def task_option_problems(task: str, options: dict) -> list[str]:
    """Options a built-in task or a data file does not take, or of the wrong type: the task constructors would raise
    a TypeError with a traceback only once the command is running."""
    parameters = _task_parameters(task, options)
    if parameters is None:
        return []
    problems = []
    for key, value in options.items():
        if key not in parameters:
            problems.append(f"task_options: unknown option {key!r} for task {task!r}"
                            f"{did_you_mean(key, parameters)}; it takes {', '.join(parameters) or 'none'}")
            continue
        tp = {"int": int, "float": float, "str": str, "str | None": str}.get(str(parameters[key].annotation))
        optional = value is None and str(parameters[key].annotation).endswith("| None")
        if tp and not optional and (problem := type_problem(tp, value)):
            problems.append(f"task_options: {key}: {problem}")
    return problems or _task_constructor_problems(task, options)


def _task_constructor_problems(task: str, options: dict) -> list[str]:
    """A generator task checks its options' ranges itself (min_terms <= max_terms, ...) and is built in microseconds:
    build it here, so that those mistakes too are found before anything runs. A data file is not read here."""
    if task not in TASKS or "path" in options:
        return []
    try:
        get_task(task, **options)
    except ValueError as err:
        return [f"task_options: {err}"]
    return []


def _task_parameters(task: str, options: dict) -> dict[str, inspect.Parameter] | None:
    """The keyword parameters the task's constructor takes, by name; None for a task this cannot tell."""
    if task.lower().endswith(tasks.DATA_SUFFIXES):
        target = tasks.DatasetTask
    elif task == "arithmetic":  # arithmetic_task(**options) passes them on to ArithmeticTask
        target = tasks.ArithmeticTask
    elif task == "code":  # code_task(path=None, **options): a file of problems or the generator
        target = tasks.CodeFileTask if "path" in options else tasks.CodeTask
    elif task in tasks.TASKS:
        target = tasks.TASKS[task]
    else:
        return None
    parameters = dict(inspect.signature(target).parameters)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    if task == "code":
        parameters["path"] = inspect.Parameter("path", inspect.Parameter.KEYWORD_ONLY)
    elif target is tasks.DatasetTask:
        parameters.pop("path")  # the data file is the task itself
    return parameters


@dataclass
class PretrainConfig(Settings):
    """`r1lab pretrain`: a tiny base model from scratch on the synthetic corpus (see r1lab/commands/pretrain.py)."""

    kind = "pretrain"

    out: str = setting("runs/base", "run directory: the model goes to OUT/model", **NONEMPTY)
    task: str = setting("arithmetic", "the task family the corpus is made of", choices=("arithmetic",))
    task_options: dict = setting({}, "as in every command: none = the demo's task (3-digit sums)")
    documents: int = setting(60_000, "corpus size (documents are drawn from the task's train split)", ge=1)
    steps: int = setting(600, "optimizer steps", ge=1)
    batch_size: int = setting(96, "documents per optimizer step", ge=1)
    micro_batch_size: int = setting(0, "documents per forward/backward pass, grouped by length so that they pad "
                                       "less; 0 = the whole batch at once", ge=0)
    lr: float = setting(3e-3, "peak learning rate (linear warmup, then cosine decay to a tenth)", gt=0)
    warmup_steps: int = setting(30, "steps of linear learning-rate warmup", ge=0)
    weight_decay: float = setting(0.01, "AdamW weight decay", ge=0)
    hidden_size: int = setting(128, "model width: num_heads times an even head size", ge=1)
    num_layers: int = setting(4, "transformer layers", ge=1)
    num_heads: int = setting(4, "attention heads, a multiple of num_kv_heads", ge=1)
    num_kv_heads: int = setting(2, "key/value heads (grouped-query attention)", ge=1)
    intermediate_size: int = setting(384, "MLP width (deepseek-v3: of its dense layers)", ge=1)
    arch: str = setting("dense", "dense: grouped-query attention and an MLP in every layer (Qwen2 format); "
                                 "deepseek-v3: multi-head latent attention and DeepSeekMoE (DeepseekV3ForCausalLM)",
                        choices=ARCHS)
    kv_lora_rank: int = setting(32, "deepseek-v3: numbers per token in MLA's compressed key/value latent", ge=1)
    experts: int = setting(8, "deepseek-v3: routed experts per MoE layer", ge=1)
    experts_per_token: int = setting(2, "deepseek-v3: routed experts chosen for each token", ge=1)
    shared_experts: int = setting(1, "deepseek-v3: shared experts every token runs", ge=0)
    expert_intermediate_size: int = setting(128, "deepseek-v3: MLP width of each expert", ge=1)
    dense_layers: int = setting(1, "deepseek-v3: the first layers keep a dense MLP (first_k_dense_replace)", ge=0)
    moe_bias_update_speed: float = setting(0.01, "deepseek-v3: after each step every expert's routing bias moves this "
                                                 "much toward an even load (auxiliary-loss-free balancing); 0 = off",
                                           ge=0)
    balance_loss_weight: float = setting(0.0, "deepseek-v3: weight of V3's sequence-wise balance loss (the paper: "
                                              "0.0001); 0 = off, the routing bias alone balances", ge=0)
    think_share: float = setting(0.3, "share of documents with a worked solution in <think>", ge=0, le=1)
    slip_rate: float = setting(0.2, "share of worked solutions with one wrong column", ge=0, le=1)
    untagged_share: float = setting(0.05, "share of answers given without the format (with think_share at most 1)",
                                    ge=0, le=1)
    tools: str = setting("", "python: the tool corpus, whose worked solutions call the Python tool as rollouts with "
                             "--tools python do (any arithmetic task; the tool demo's: products)",
                         choices=("", "python"))
    dtype: str = setting("float32", "bfloat16: forward passes under bf16 autocast over float32 weights (on a GPU)",
                         **DTYPE)
    recompute_logits: bool = setting(False, "backward recomputes the vocabulary projection: far less memory, a bit "
                                            "more time")
    activation_checkpointing: bool = activation_checkpointing_setting()
    seed: int = setting(0, "random seed", **SEED)
    threads: int = setting(0, "torch CPU threads; 0 = all cores", **THREADS)

    def rules(self) -> list[str]:
        return attention_shape_problems(self.hidden_size, self.num_heads, self.num_kv_heads) + (
            [f"think_share + untagged_share is {self.think_share + self.untagged_share:g}, above 1"]
            if self.think_share + self.untagged_share > 1 else []) + (
            self._moe_problems() if self.arch == "deepseek-v3" else [])

    def _moe_problems(self) -> list[str]:
        problems = ["activation_checkpointing is for dense models (an MoE forward counts expert loads)"] \
            if self.activation_checkpointing else []
        if self.experts_per_token > self.experts:
            problems.append(f"experts_per_token ({self.experts_per_token}) is more than experts ({self.experts})")
        if self.dense_layers >= self.num_layers:
            problems.append(f"dense_layers ({self.dense_layers}) leaves no MoE layer of num_layers "
                            f"({self.num_layers})")
        return problems


@dataclass
class GRPOConfig(Settings):
    """`r1lab grpo`: R1-Zero reinforcement learning with group-relative advantages and rule rewards."""

    kind = "GRPO"

    model: str = setting("runs/base/model", "the policy's model directory (Hugging Face format)", **NONEMPTY)
    task: str = setting("arithmetic", "a built-in task name or a .jsonl/.parquet file with prompt and answer columns",
                        **TASK)
    task_options: dict = setting({}, "the task's options; arithmetic with none: the demo's task (two 3-digit numbers)")
    out: str = setting("runs/grpo", "run directory: config, metrics, checkpoints, the final model", **NONEMPTY)
    steps: int = setting(100, "optimizer steps (one batch of rollouts each)", ge=1)
    time_limit_s: float = setting(0.0, "stop after the step that reaches this much training wall time (0 = no "
                                       "limit)", ge=0)
    # batch sizes, named by unit
    prompts_per_step: int = setting(16, "distinct prompts per step", ge=1)
    samples_per_prompt: int = setting(8, "G, the group size: advantages compare samples within a group", ge=2)
    micro_batch_size: int = setting(64, "sequences per forward/backward pass", ge=1)
    updates_per_batch: int = setting(1, "mu: gradient steps on one batch of rollouts", ge=1)
    # optimisation
    lr: float = setting(1e-6, "learning rate (AdamW; linear warmup, then constant)", gt=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    warmup_steps: int = setting(0, "steps of linear learning-rate warmup", ge=0)
    max_grad_norm: float = setting(1.0, "gradients are clipped to this norm (0 = no clipping)", ge=0)
    moe_bias_update_speed: float = setting(0.001, "DeepSeek-V3 MoE: after each optimizer step every expert's routing "
                                                  "bias moves this much toward an even load (0 = off)", ge=0)
    optimizer_in_backward: bool = optimizer_in_backward_setting()
    # the objective's knobs (README: GRPO / Dr. GRPO / DAPO as settings of these)
    clip_low: float = setting(0.2, "PPO clip below: the ratio is kept above 1 - clip_low", ge=0, lt=1)
    clip_high: float = setting(0.2, "PPO clip above: the ratio is kept below 1 + clip_high (DAPO: larger)", ge=0)
    kl_coef: float = setting(0.0, "weight of the KL penalty to the initial model (0 = none, no reference model)", ge=0)
    loss_norm: str = setting("token", "how token losses are averaged (Dr. GRPO: constant)",
                             choices=("token", "sequence", "constant"))
    scale_by_std: bool = setting(True, "divide advantages by the group's reward std (Dr. GRPO: false)")
    policy_loss: str = setting("ppo-clip", "the policy-gradient term: ppo-clip (per-token clipped ratio), cispo (a "
                                           "clipped, detached ratio weighting every token), gspo (sequence-level "
                                           "ratio and clip)", choices=("ppo-clip", "cispo", "gspo"))
    mismatch_correction: str = setting("none", "sampler/trainer probability gap: tis (weight min(p_trainer / "
                                               "p_sampler, mismatch_cap)), mis (tokens past the cap dropped)",
                                       choices=("none", "tis", "mis"))
    mismatch_cap: float = setting(2.0, "the cap of tis / mis", ge=1)
    fp32_lm_head: bool = setting(False, "with dtype bfloat16: the LM head's projection in float32 (closer sampler "
                                        "and trainer log-probs)")
    drop_uniform_groups: bool = setting(False, "leave out groups whose rewards are all equal (DAPO dynamic sampling)")
    skip_zero_advantage: bool = setting(True, "with kl_coef 0, a zero-advantage sequence has zero gradient: skip its "
                                              "forward/backward (same update, faster)")
    # rewards
    accuracy_weight: float = setting(1.0, "weight of the verified-answer reward", ge=0)
    format_weight: float = setting(1.0, "weight of the <think>/<answer> format reward", ge=0)
    language_weight: float = setting(0.0, "R1 stage 2: reward the share of the chain of thought written in "
                                          "`language`", ge=0)
    language: str = setting("en", "the language of language_weight (r1lab/rewards/language.py)", **LANGUAGE)
    reward_functions: dict = setting({}, 'your own rewards: {"module:function": weight} (r1lab/rewards/user_functions.py)')
    reward_timeout_s: float = setting(5.0, "seconds a completion's reward (a code sandbox) may take", gt=0)
    control: str = setting("none", "random-reward: rewards shuffled across the batch (same mean, no signal)",
                           choices=("none", "random-reward"))
    # sampling
    template: str = setting("r1zero", "how prompts are rendered (r1lab/model/templates.py)", **PROMPT_TEMPLATES)
    prefill: str = setting("", 'text appended after the template, e.g. "<think>"')
    temperature: float = setting(1.0, "rollout temperature: GRPO needs different samples within a group", gt=0)
    top_p: float = setting(1.0, "nucleus sampling of rollouts (1 = off)", **TOP_P)
    top_k: int = setting(0, "top-k sampling of rollouts (0 = off)", ge=0)
    max_new_tokens: int = setting(256, "completion length limit, in tokens", ge=1)
    suppress_eos: bool = setting(False, "benchmarking only: every completion runs to max_new_tokens")
    rollout_slots: int = setting(0, "continuous batching: at most this many rollouts run at once, a finished one's "
                                    "KV-cache row going to the next (0 = all of the step's rollouts at once)", ge=0)
    tools: str = tools_setting()
    tool_tag: str = tool_tag_setting()
    tool_output_tag: str = tool_output_tag_setting()
    max_tool_calls: int = max_tool_calls_setting()
    tool_timeout_s: float = tool_timeout_setting()
    tool_memory_mb: int = tool_memory_setting()
    tool_output_chars: int = tool_output_chars_setting()
    tool_failure_penalty: float = setting(0.0, "tools: subtracted from the reward for each failed call (an error, a "
                                               "timeout, a limit)", ge=0)
    dtype: str = setting("float32", "bfloat16: rollouts from a bf16 copy of the float32 master weights (refreshed "
                                    "after every update), training under bf16 autocast", **DTYPE)
    recompute_logits: bool = setting(False, "backward recomputes the vocabulary projection: far less memory, a bit "
                                            "more time")
    # evaluation on held-out problems during training
    eval_every: int = setting(20, "held-out evaluation every N steps (0 = none)", ge=0)
    eval_problems: int = setting(200, "held-out problems (at least 1 when eval_every > 0)", ge=0)
    eval_samples: int = setting(4, "k, samples per held-out problem (at least 1 when eval_every > 0)", ge=0)
    eval_temperature: float = setting(0.6, "held-out sampling temperature (0 = greedy)", **SAMPLING_TEMPERATURE)
    eval_top_p: float = setting(0.95, "held-out nucleus sampling", **TOP_P)
    # bookkeeping
    save_every: int = setting(50, "checkpoint every N steps (0 = none; the final model is always saved)", ge=0)
    samples_every: int = setting(10, "write sample completions every N steps (0 = never)", ge=0)
    resume: bool = setting(False, "continue from the newest intact checkpoint in out")
    allow_config_change: bool = setting(False, "resume with settings that change the run (recorded in "
                                               "config_changes.jsonl)")
    seed: int = setting(0, "random seed", **SEED)
    device: str = setting("auto", "where to run (auto: cuda when available, else cpu)", **DEVICE)
    threads: int = setting(0, "torch CPU threads; 0 = all cores", **THREADS)
    lora_rank: int = lora_rank_setting()
    lora_alpha: float = lora_alpha_setting()
    lora_targets: str = lora_targets_setting()
    shard: bool = shard_setting()
    dist_timeout_s: float = dist_timeout_setting()

    def eval_config(self) -> EvalConfig:
        """The held-out evaluation during training: the protocol of `r1lab eval` with the eval_* settings."""
        return EvalConfig(model=self.model, task=self.task, task_options=dict(self.task_options),
                          problems=self.eval_problems, samples=self.eval_samples, temperature=self.eval_temperature,
                          top_p=self.eval_top_p, max_new_tokens=self.max_new_tokens, template=self.template,
                          prefill=self.prefill, language=self.language, reward_timeout_s=self.reward_timeout_s,
                          seed=self.seed, **{f: getattr(self, f) for f in TOOL_FIELDS})

    def rules(self) -> list[str]:
        problems = []
        if self.eval_every and (self.eval_samples < 1 or self.eval_problems < 1):
            problems.append("eval_samples and eval_problems must be at least 1 when eval_every > 0")
        return (problems + optimizer_in_backward_problems(self) + _reward_function_problems(self.reward_functions)
                + tool_problems(self))


def tool_problems(cfg) -> list[str]:
    if cfg.tools and cfg.tool_tag == cfg.tool_output_tag:
        return [f"tool_tag and tool_output_tag are both {cfg.tool_tag!r}: the model could not tell a call from its "
                f"output"]
    return []


TOOL_FIELDS = ("tools", "tool_tag", "tool_output_tag", "max_tool_calls", "tool_timeout_s", "tool_memory_mb",
               "tool_output_chars")


def _reward_function_problems(functions: dict) -> list[str]:
    problems = []
    for spec, weight in functions.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            problems.append(f"reward function {spec!r}: its weight must be a number, got {weight!r}")
        try:
            load_reward_function(spec)
        except ValueError as err:
            problems.append(str(err))
    return problems


@dataclass
class EvalConfig(Settings):
    """`r1lab eval`: pass@1 over k samples, cons@k and pass@k on held-out problems (the paper's protocol)."""

    kind = "eval"

    model: str = setting("runs/demo/grpo/model", "the model directory to evaluate", **NONEMPTY)
    adapter: str = setting("", "a LoRA adapter directory (PEFT format) to apply to the model, merged into it at load")
    task: str = setting("arithmetic", "a built-in task name or a data file", **TASK)
    task_options: dict = setting({}, "the task's options (a YAML mapping)")
    split: str = setting("test", "which split the problems come from", choices=("test", "train"))
    problems: int = setting(200, "problems evaluated", ge=1)
    samples: int = setting(8, "k, samples per problem", ge=1)
    temperature: float = setting(0.6, "sampling temperature (0 = greedy)", **SAMPLING_TEMPERATURE)
    top_p: float = setting(0.95, "nucleus sampling", **TOP_P)
    max_new_tokens: int = setting(128, "completion length limit, in tokens", ge=1)
    template: str = setting("r1zero", "how prompts are rendered (r1lab/model/templates.py)", **PROMPT_TEMPLATES)
    prefill: str = setting("", 'text appended after the template, e.g. "<think>"')
    language: str = setting("en", "the language whose share of the chain of thought is reported", **LANGUAGE)
    reward_timeout_s: float = setting(5.0, "seconds a completion's scoring (a code sandbox) may take", gt=0)
    tools: str = tools_setting()
    tool_tag: str = tool_tag_setting()
    tool_output_tag: str = tool_output_tag_setting()
    max_tool_calls: int = max_tool_calls_setting()
    tool_timeout_s: float = tool_timeout_setting()
    tool_memory_mb: int = tool_memory_setting()
    tool_output_chars: int = tool_output_chars_setting()
    out: str = setting("", "JSON results path; default: next to the model")
    seed: int = setting(0, "the held-out problems are drawn with seed + 1, the samples with seed", **SEED)
    device: str = setting("auto", "where to run (auto: cuda when available, else cpu)", **DEVICE)
    dtype: str = setting("float32", "bfloat16: half the memory and bytes per decode step (on a GPU)", **DTYPE)
    threads: int = setting(0, "torch CPU threads; 0 = all cores", **THREADS)
    dist_timeout_s: float = dist_timeout_setting()

    def rules(self) -> list[str]:
        return tool_problems(self)


@dataclass
class SFTConfig(Settings):
    """`r1lab sft`: supervised fine-tuning on chat data (rows of `messages`), the loss on assistant turns only."""

    kind = "SFT"

    model: str = setting("runs/base/model", "the model directory to fine-tune", **NONEMPTY)
    data: str = setting("runs/sample/sft.jsonl", ".jsonl / .json / .parquet of chat rows: messages, prompt/completion "
                                                 "(TRL) or ShareGPT conversations", **NONEMPTY)
    data_format: str = setting("auto", "auto: detected from the first row's keys",
                               choices=("auto", "messages", "prompt_completion", "sharegpt"))
    messages_field: str = setting("messages", "the column holding a list of {role, content} messages", **NONEMPTY)
    prompt_field: str = setting("prompt", "prompt-completion rows: the prompt column (a string, or a list of "
                                          "messages)", **NONEMPTY)
    completion_field: str = setting("completion", "prompt-completion rows: the completion column (a string, or the "
                                                  "assistant message(s)); the loss is on it only", **NONEMPTY)
    conversations_field: str = setting("conversations", "ShareGPT rows: the column holding a list of {from, value}",
                                       **NONEMPTY)
    role_map: dict = setting({}, "ShareGPT: more `from` values mapped to system, user or assistant (human, gpt, "
                                 "system are known)")
    out: str = setting("runs/sft", "run directory: config, metrics, checkpoints, the final model", **NONEMPTY)
    template: str = setting("auto", "auto: the tokenizer's chat template if it has one, else r1zero",
                            **CONVERSATION_TEMPLATES)
    epochs: float = setting(2.0, "passes over the data (R1 stage 3 trains two epochs on rejection-sampled data)", ge=0)
    steps: int = setting(0, "optimizer steps; 0 = as many as `epochs` takes", ge=0)
    batch_size: int = setting(16, "conversations per optimizer step", ge=1)
    micro_batch_size: int = setting(0, "conversations per forward/backward pass; 0 = the whole batch at once", ge=0)
    lr: float = setting(1e-5, "peak learning rate (linear warmup, then cosine decay to a tenth)", gt=0)
    warmup_steps: int = setting(10, "steps of linear learning-rate warmup", ge=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = setting(1.0, "gradients are clipped to this norm (0 = no clipping)", ge=0)
    optimizer_in_backward: bool = optimizer_in_backward_setting()
    moe_bias_update_speed: float = setting(0.001, "DeepSeek-V3 MoE: after each optimizer step every expert's routing "
                                                  "bias moves this much toward an even load (0 = off)", ge=0)
    max_len: int = setting(2048, "tokens; longer conversations are dropped and counted, never truncated", ge=2)
    dtype: str = setting("float32", "bfloat16: forward passes under bf16 autocast over float32 weights (on a GPU)",
                         **DTYPE)
    recompute_logits: bool = setting(False, "backward recomputes the vocabulary projection: far less memory, a bit "
                                            "more time")
    activation_checkpointing: bool = activation_checkpointing_setting()
    tool_output_tag: str = setting("", "rows sampled with tools (sample --tools): the tag whose blocks in assistant "
                                       "messages are tool output, left out of the loss (e.g. output); \"\" = none",
                                   **OPTIONAL_TAG)
    eval_fraction: float = setting(0.0, "share of conversations held out for a held-out loss (stable hash of the "
                                        "row)", ge=0, lt=1)
    eval_every: int = setting(50, "held-out loss every N steps (when eval_fraction > 0)", ge=1)
    save_every: int = setting(0, "checkpoint every N steps (0 = none); `--resume` continues from the latest", ge=0)
    resume: bool = setting(False, "continue from the newest intact checkpoint in out")
    allow_config_change: bool = setting(False, "resume with settings that change the run (recorded in "
                                               "config_changes.jsonl)")
    seed: int = setting(0, "random seed", **SEED)
    device: str = setting("auto", "where to run (auto: cuda when available, else cpu)", **DEVICE)
    threads: int = setting(0, "torch CPU threads; 0 = all cores", **THREADS)
    lora_rank: int = lora_rank_setting()
    lora_alpha: float = lora_alpha_setting()
    lora_targets: str = lora_targets_setting()
    shard: bool = shard_setting()
    dist_timeout_s: float = dist_timeout_setting()

    def rules(self) -> list[str]:
        steps = ["set steps >= 1, or steps 0 and epochs > 0"] if self.steps == 0 and self.epochs <= 0 else []
        return steps + optimizer_in_backward_problems(self)


@dataclass
class SampleConfig(Settings):
    """`r1lab sample`: rejection sampling; k completions per prompt, the correct and readable ones kept as SFT data."""

    kind = "sample"

    model: str = setting("runs/grpo/model", "the model directory to sample from", **NONEMPTY)
    adapter: str = setting("", "a LoRA adapter directory (PEFT format) to apply to the model, merged into it at load")
    task: str = setting("arithmetic", "a built-in task name or a data file", **TASK)
    task_options: dict = setting({}, "the task's options (a YAML mapping)")
    split: str = setting("train", "which split the prompts come from", choices=("train", "test"))
    problems: int = setting(200, "prompts (distinct); 0 = every row of a data file's split", ge=0)
    samples: int = setting(16, "k completions per prompt", ge=1)
    temperature: float = setting(0.6, "sampling temperature (0 = greedy)", **SAMPLING_TEMPERATURE)
    top_p: float = setting(0.95, "nucleus sampling", **TOP_P)
    max_new_tokens: int = setting(256, "completion length limit, in tokens", ge=1)
    prompts_per_chunk: int = setting(32, "prompts per generate call", ge=1)
    template: str = setting("r1zero", "how prompts are rendered (r1lab/model/templates.py)", **PROMPT_TEMPLATES)
    prefill: str = setting("", 'text appended after the template, e.g. "<think>"')
    # readability filters on the verified-correct completions
    min_tokens: int = setting(1, "shortest completion kept, in tokens", ge=0)
    max_tokens: int = setting(0, "longest completion kept; 0 = no limit below max_new_tokens", ge=0)
    language: str = setting("en", 'language the reasoning must be written in (r1lab/rewards/language.py); "" = no language '
                                  "filter", rule=lambda v: None if v == "" else _language_problem(v),
                            allowed="one of: " + ", ".join(TARGETS) + ", ''")
    min_language_score: float = setting(0.9, "share of the <think> part's words in it: one stray \"π\" in ten passes",
                                        ge=0, le=1)
    max_per_prompt: int = setting(0, "distinct completions kept per prompt; 0 = every distinct one", ge=0)
    reward_timeout_s: float = setting(5.0, "seconds a completion's scoring (a code sandbox) may take", gt=0)
    tools: str = tools_setting()
    tool_tag: str = tool_tag_setting()
    tool_output_tag: str = tool_output_tag_setting()
    max_tool_calls: int = max_tool_calls_setting()
    tool_timeout_s: float = tool_timeout_setting()
    tool_memory_mb: int = tool_memory_setting()
    tool_output_chars: int = tool_output_chars_setting()
    out: str = setting("runs/sample/sft.jsonl", "the SFT dataset; a summary and the config are written beside it",
                       **NONEMPTY)
    seed: int = setting(0, "random seed", **SEED)
    device: str = setting("auto", "where to run (auto: cuda when available, else cpu)", **DEVICE)
    dtype: str = setting("float32", "bfloat16: half the memory and bytes per decode step (on a GPU)", **DTYPE)
    threads: int = setting(0, "torch CPU threads; 0 = all cores", **THREADS)
    dist_timeout_s: float = dist_timeout_setting()

    def rules(self) -> list[str]:
        if self.max_tokens and self.max_tokens < self.min_tokens:
            return [f"max_tokens {self.max_tokens} is below min_tokens {self.min_tokens}"]
        return tool_problems(self)


@dataclass
class ReportConfig(Settings):
    """`r1lab report RUN_DIR`: curves, the first and last held-out evaluation and sample completions of a run."""

    kind = "report"

    run: str = setting("runs/grpo", "a run directory of r1lab grpo, sft or pretrain (it holds metrics.jsonl)",
                       **NONEMPTY)
    title: str = setting("", "the report's title; default: the run directory's name")


@dataclass
class DemoConfig(Settings):
    """`r1lab demo`: tokenizer -> tiny base -> eval -> R1-Zero GRPO -> eval -> report, on a CPU in minutes."""

    kind = "demo"

    out: str = setting("runs/demo", "run directory; stages already done there are reused", **NONEMPTY)
    control: str = setting("none", "random-reward runs the same demo with shuffled rewards",
                           choices=("none", "random-reward"))
    arch: str = setting("dense", "the tiny base's architecture: dense (Qwen2 format) or deepseek-v3 (MLA + MoE; its "
                                 "runs go to OUT/*-deepseek-v3)", choices=ARCHS)
    tools: str = setting("", "python: the tool demo, on products of two 3-digit numbers that a tiny model cannot "
                             "compute in its head, with a base that calls the Python tool now and then (its runs go "
                             "to OUT/*-tools)", choices=("", "python"))
    pretrain_steps: int = setting(0, "optimizer steps of the tiny base; 0 = 600 (1,000 for the tool demo: see "
                                     "tool_demo_pretrain_settings)", ge=0)
    grpo_steps: int = setting(60, "GRPO steps", ge=1)
    eval_problems: int = setting(200, "held-out problems of each evaluation", ge=1)
    seed: int = setting(0, "random seed", **SEED)
    threads: int = setting(0, "torch CPU threads; 0 = all cores", **THREADS)


@dataclass
class DistillConfig(Settings):
    """`r1lab distill`: teacher -> sampled traces -> verified, readable SFT data -> a smaller student (R1 section 4).

    With `compare_grpo`, the same student base is also trained by GRPO for the wall time distillation took, and the
    report puts both beside the teacher (the paper's finding: distillation beats RL on the small model)."""

    kind = "distill"

    teacher: str = setting("runs/demo/grpo/model", "the teacher's model directory", **NONEMPTY)
    student: str = setting("", 'a student base model directory; "" = pretrain one of the student_* shape on the '
                               "corpus")
    student_hidden_size: int = setting(64, "width of a pretrained student", ge=1)
    student_num_layers: int = setting(4, "layers of a pretrained student", ge=1)
    student_num_heads: int = setting(4, "attention heads of a pretrained student", ge=1)
    student_num_kv_heads: int = setting(2, "key/value heads of a pretrained student", ge=1)
    student_intermediate_size: int = setting(176, "with the four above: about 0.23x the demo model's parameters",
                                             ge=1)
    student_pretrain_steps: int = setting(400, "pretraining steps of the student base", ge=1)
    task: str = setting("arithmetic", "a built-in task name or a data file", **TASK)
    task_options: dict = setting({}, "the task's options (a YAML mapping)")
    template: str = setting("r1zero", "how prompts are rendered (r1lab/model/templates.py)", **PROMPT_TEMPLATES)
    # traces from the teacher (rejection sampling: verified-correct, readable, distinct)
    problems: int = setting(6000, "train prompts for the teacher (0 = every row of a data file's split)", ge=0)
    samples: int = setting(2, "teacher completions per prompt", ge=1)
    max_per_prompt: int = setting(1, "a worked solution is nearly deterministic: more copies of it add nothing (0 = "
                                     "every distinct one)", ge=0)
    temperature: float = setting(0.6, "the teacher's sampling temperature (0 = greedy)", **SAMPLING_TEMPERATURE)
    top_p: float = setting(0.95, "the teacher's nucleus sampling", **TOP_P)
    max_new_tokens: int = setting(64, "completion length limit, in tokens", ge=1)
    # SFT of the student on them
    epochs: float = setting(8.0, "SFT epochs of the student", gt=0)
    batch_size: int = setting(64, "conversations per SFT step", ge=1)
    lr: float = setting(2e-3, "the student's SFT learning rate", gt=0)
    warmup_steps: int = setting(10, "steps of linear learning-rate warmup", ge=0)
    # the comparison: the same student base trained by GRPO for the same wall time
    compare_grpo: bool = setting(True, "also train the student base by GRPO for the same wall time")
    grpo_lr: float = setting(1e-4, "that GRPO run's learning rate", gt=0)
    # held-out evaluation of teacher and students (k samples, temperature 0.6, top-p 0.95)
    eval_problems: int = setting(200, "held-out problems", ge=1)
    eval_samples: int = setting(8, "k, samples per held-out problem", ge=1)
    out: str = setting("runs/distill", "run directory; stages already done there are reused", **NONEMPTY)
    seed: int = setting(0, "random seed", **SEED)
    threads: int = setting(0, "torch CPU threads; 0 = all cores", **THREADS)

    def rules(self) -> list[str]:
        if self.student:
            return []
        if self.task != "arithmetic":
            return [f"pretraining a student base needs the arithmetic task; for task {self.task!r} give a student "
                    f"base model directory with --student"]
        return attention_shape_problems(self.student_hidden_size, self.student_num_heads, self.student_num_kv_heads,
                                        "student_")


@dataclass
class PipelineConfig(Settings):
    """`r1lab pipeline`: DeepSeek-R1's four stages, beside R1-Zero and a distilled student, in one run.

    base -> (R1-Zero: GRPO) and (1 cold-start SFT -> 2 reasoning RL with the language reward -> 3 rejection sampling,
    SFT of the base -> 4 final RL) -> distillation of the final model into a smaller student -> one report.
    On the built-in arithmetic task everything is made here (CPU size); on your own task (a data file) give the base
    model, the cold-start data and, to distil, the student base."""

    kind = "pipeline"

    out: str = setting("runs/pipeline", "run directory; stages already done there are reused", **NONEMPTY)
    task: str = setting("arithmetic", "the built-in arithmetic task, or a .jsonl/.parquet file with prompt and answer "
                                      "columns", **TASK)
    task_options: dict = setting({}, "the task's options (a YAML mapping)")
    base: str = setting("", 'a base model directory; "" = pretrain the demo\'s tiny base (arithmetic only)')
    cold_start_data: str = setting("", 'chat JSONL/Parquet for stage 1; "" = generated worked solutions (arithmetic '
                                       "only)")
    student: str = setting("", 'the student base for distillation; "" = pretrain the preset student (arithmetic '
                               "only)")
    template: str = setting("r1zero", "how prompts are rendered for RL, sampling and evaluation", **PROMPT_TEMPLATES)
    max_new_tokens: int = setting(64, "completion length limit, in tokens", ge=1)
    pretrain_steps: int = setting(600, "pretraining steps of the tiny base", ge=1)
    r1zero_steps: int = setting(60, "R1-Zero from the same base, for comparison (the demo's run)", ge=1)
    cold_start_examples: int = setting(400, "generated worked solutions, always in the <think>/<answer> format", ge=1)
    cold_start_epochs: float = setting(2.0, "SFT epochs of stage 1", gt=0)
    sft_lr: float = setting(1e-3, "SFT learning rate (stages 1 and 3)", gt=0)
    reasoning_rl_steps: int = setting(40, "GRPO steps of stage 2", ge=1)
    language_weight: float = setting(0.1, "stages 2 and 4: accuracy + format + this x language consistency", ge=0)
    rejection_problems: int = setting(1000, "stage 3 prompts (0 = every row of a data file's split)", ge=0)
    rejection_samples: int = setting(4, "stage 3 completions per prompt", ge=1)
    final_rl_steps: int = setting(20, "GRPO steps of stage 4", ge=1)
    rl_lr: float = setting(3e-5, "GRPO learning rate (stages 2 and 4)", gt=0)
    distill: bool = setting(True, "distil the final model into a student")
    distill_problems: int = setting(6000, "teacher prompts for the student's SFT data", ge=0)
    student_pretrain_steps: int = setting(400, "pretraining steps of the preset student", ge=1)
    eval_problems: int = setting(200, "held-out problems", ge=1)
    eval_samples: int = setting(8, "k, samples per held-out problem", ge=1)
    seed: int = setting(0, "random seed", **SEED)
    threads: int = setting(0, "torch CPU threads; 0 = all cores", **THREADS)

    def rules(self) -> list[str]:
        if self.task == "arithmetic":
            return []
        missing = [name for name, value in (("base", self.base), ("cold_start_data", self.cold_start_data),
                                            ("student", self.student if self.distill else "given")) if not value]
        if missing:
            return [f"with task {self.task!r} (not the built-in arithmetic task), give {', '.join(missing)}: only the "
                    f"built-in task can make them itself"]
        return []


@dataclass
class MergeConfig(Settings):
    """`r1lab merge`: a LoRA adapter merged into its base, saved as a plain Hugging Face model directory."""

    kind = "merge"

    model: str = setting("runs/base/model", "the base model directory the adapter was trained on", **NONEMPTY)
    adapter: str = setting("runs/grpo/adapter", "the adapter directory (adapter_config.json, adapter_model.safetensors)",
                           **NONEMPTY)
    out: str = setting("runs/merged", "where the merged model directory is written", **NONEMPTY)
    dtype: str = setting("float32", "the merged weights' dtype on disk", **DTYPE)


@dataclass
class ServeConfig(Settings):
    """`r1lab serve`: an OpenAI-compatible API (reasoning_content split out) and a chat page for a model directory."""

    kind = "serve"

    model: str = setting("runs/demo/grpo/model", "the model directory to serve", **NONEMPTY)
    adapter: str = setting("", "a LoRA adapter directory (PEFT format) to apply to the model, merged into it at load")
    served_model_name: str = setting("", "the model id clients send; default: the model directory's name")
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface)", **NONEMPTY)
    port: int = setting(8000, "TCP port", ge=1, le=65535)
    api_key: str = setting("", "when set, /v1 requests need the header `Authorization: Bearer KEY`")
    template: str = setting("auto", "auto: the tokenizer's chat template, else r1zero", **CONVERSATION_TEMPLATES)
    prefill: str = setting("", 'text after the template, e.g. "<think>": the reply then starts inside the reasoning')
    max_batch: int = setting(64, "completions generated together (the continuous batch's slots)", ge=1)
    batch_wait_ms: float = setting(5.0, "an idle server starts once no request came for this long (10x this at most)",
                                   ge=0)
    max_pending: int = setting(4096, "completions waiting beyond this get 503", ge=1)
    max_tokens: int = setting(4096, "the most completion tokens a request may ask for", ge=1)
    max_request_tokens: int = setting(262_144, "prompts x n x max_tokens of one request (a full batch of max_tokens "
                                               "rows)", ge=1)
    max_prompts: int = setting(128, "prompts in one /v1/completions request", ge=1)
    max_model_len: int = setting(0, "context length (prompt + completion); 0: the model's max_position_embeddings",
                                 ge=0)
    max_body_bytes: int = setting(1 << 20, "largest request body, in bytes", ge=1)
    body_timeout_s: float = setting(30.0, "a request body not received in full within this gets 408 and its "
                                          "connection closed", gt=0)
    device: str = setting("auto", "where to run (auto: cuda when available, else cpu)", **DEVICE)
    dtype: str = setting("float32", "bfloat16: half the memory and bytes per decode step (on a GPU)", **DTYPE)
    threads: int = setting(0, "torch CPU threads; 0 = all cores", **THREADS)
    log_level: str = setting("info", "uvicorn's and the server's log level",
                             choices=("critical", "error", "warning", "info", "debug", "trace"))
    tools: str = tools_setting()
    tool_tag: str = tool_tag_setting()
    tool_output_tag: str = tool_output_tag_setting()
    max_tool_calls: int = max_tool_calls_setting()
    tool_timeout_s: float = tool_timeout_setting()
    tool_memory_mb: int = tool_memory_setting()
    tool_output_chars: int = tool_output_chars_setting()

    def rules(self) -> list[str]:
        return tool_problems(self)


@dataclass
class ChatConfig(Settings):
    """`r1lab chat`: talk to a model directory in the terminal; its reasoning is shown apart from the answer."""

    kind = "chat"

    model: str = setting("runs/demo/grpo/model", "the model directory to talk to", **NONEMPTY)
    adapter: str = setting("", "a LoRA adapter directory (PEFT format) to apply to the model, merged into it at load")
    template: str = setting("auto", "auto: the tokenizer's chat template, else r1zero", **CONVERSATION_TEMPLATES)
    prefill: str = setting("", 'text after the template, e.g. "<think>"')
    system: str = setting("", "a system message opening the conversation")
    temperature: float = setting(0.6, "sampling temperature (0 = greedy)", **SAMPLING_TEMPERATURE)
    top_p: float = setting(0.95, "nucleus sampling", **TOP_P)
    max_tokens: int = setting(1024, "reply length limit, in tokens", ge=1)
    seed: int = setting(0, "reply i is sampled with seed + i: a piped conversation replays exactly", **SEED)
    tools: str = tools_setting()
    tool_tag: str = tool_tag_setting()
    tool_output_tag: str = tool_output_tag_setting()
    max_tool_calls: int = max_tool_calls_setting()
    tool_timeout_s: float = tool_timeout_setting()
    tool_memory_mb: int = tool_memory_setting()
    tool_output_chars: int = tool_output_chars_setting()
    device: str = setting("auto", "where to run (auto: cuda when available, else cpu)", **DEVICE)
    dtype: str = setting("float32", "bfloat16: half the memory and bytes per decode step (on a GPU)", **DTYPE)
    threads: int = setting(0, "torch CPU threads; 0 = all cores", **THREADS)

    def rules(self) -> list[str]:
        return tool_problems(self)


# ----------------------------------------------------------------------------------------------------------------
# YAML, flags and resolve()


class YAMLLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, which reads 1e-5 (no decimal point) as text; who writes lr: 1e-5 means a number."""


YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


def read_yaml_config(path: str) -> dict:
    """The mapping of a --config file; a missing file, malformed YAML or another shape is one line naming the file."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ValueError(f"--config {path}: {err.strerror or err}") from None
    try:
        loaded = yaml.load(text, Loader=YAMLLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ValueError(f"{where}: malformed YAML: {getattr(err, 'problem', None) or err}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: must be a mapping of field: value, not {type(loaded).__name__}")
    return loaded


def _flag_type(tp: type) -> Callable[[str], Any]:
    """Flag text -> the field's type; text that does not convert is kept (Unparsed) for resolve() to report with the
    other bad fields, instead of argparse stopping at the first."""
    def convert(text: str):
        try:
            if tp is bool:
                return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.lower()]
            if tp is dict:
                loaded = yaml.load(text, Loader=YAMLLoader)
                return {} if loaded is None else loaded
            return tp(text)
        except (KeyError, ValueError, yaml.YAMLError):
            expected = {bool: "one of true, false, yes, no, 1, 0", dict: "a YAML mapping such as '{key: value}'"}
            return Unparsed(text, expected.get(tp, EXPECTED[tp]))
    return convert


def help_line(spec: Spec | None, tp: type, default) -> str:
    """'description [allowed values] (default: ...)' for --help, from the field's declaration."""
    allowed = (spec.allowed_text() if spec else "") or {bool: "true/false", dict: "a YAML mapping"}.get(tp, "")
    if allowed and not allowed.startswith("one of"):
        allowed = "allowed: " + allowed
    shown = str(default).lower() if isinstance(default, bool) else repr(default)
    text = (spec.help if spec else "") + f" ({allowed + '; ' if allowed else ''}default: {shown})"
    return text.strip().replace("%", "%%")  # argparse %-formats help strings


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """A flag per dataclass field, defaulting to None so that only the flags given override the YAML."""
    parser.add_argument("--config", help="YAML file with any of the fields below")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        extra = {"nargs": "?", "const": True} if hints[f.name] is bool else {}  # `--resume` alone means true
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_flag_type(hints[f.name]),
                            default=None, metavar=hints[f.name].__name__.upper(),
                            help=help_line(f.metadata.get("r1lab"), hints[f.name], default), **extra)


def resolve(cls, args: argparse.Namespace | None = None, **overrides):
    """Defaults, then the YAML file named by --config, then flags, then keyword overrides; then every field is
    validated (types, ranges, choices, the command's rules), all bad fields reported in one ValueError."""
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict = {}
    problems = []
    config_path = getattr(args, "config", None) if args else None
    if config_path:
        for key, value in read_yaml_config(config_path).items():
            if key in names:
                values[key] = value
            else:
                suggestion = did_you_mean(str(key), names, aliases=ALIASES)
                problems.append(f"{config_path}: unknown field {str(key)!r}{suggestion}")
    if args:
        values.update({n: getattr(args, n) for n in names if getattr(args, n, None) is not None})
    values.update(overrides)
    cfg = cls(**values)
    problems += cfg.find_problems()
    if problems:
        raise ValueError("invalid settings:\n  " + "\n  ".join(problems))
    hints = typing.get_type_hints(cls)
    return dataclasses.replace(cfg, **{n: float(getattr(cfg, n)) for n in names if hints[n] is float})


def save_config(config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
