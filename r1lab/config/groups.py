"""What several commands' settings share, declared once: allowed values, settings (`seed: int = SEED`), groups."""

import re

from r1lab.config.fields import Group, setting
from r1lab.config.sources import shown
from r1lab.model.loading import DEVICES, device_problem
from r1lab.model.lora import LORA_TARGETS, lora_targets_problem


def pattern(regex: str, what: str, allowed: str, optional: bool = False) -> dict:
    """A text setting's rule: the whole text matches `regex` (or, optional, is empty), else it is not `what`."""
    def problem(value: str) -> str | None:
        return None if (optional and value == "") or re.fullmatch(regex, value) else f"{shown(value)} is not {what}"
    return dict(rule=problem, allowed=('"" or ' if optional else "") + allowed)


# what settings of several commands allow
SEED_RANGE = dict(ge=0, le=2**32 - 1)  # every seed fits the 32-bit seeders, including the seed + 1 of held-out problems
DTYPE = dict(choices=("float32", "bfloat16"))
ARCHS = ("dense", "deepseek-v3")  # the tiny bases r1lab pretrains
CONVERSATION_TEMPLATES = dict(choices=("auto", "chat", "r1zero"))  # a conversation cannot be sent without one
TOP_P = dict(gt=0, le=1)
SAMPLING_TEMPERATURE = dict(ge=0)  # 0 = greedy (r1lab/engine/engine.py)
NONEMPTY = dict(rule=lambda value: None if value.strip() else "must not be empty", allowed="not empty")
TAG, OPTIONAL_TAG = (pattern(r"[A-Za-z_][A-Za-z0-9_-]*", "a tag name (letters, digits, _ and -, as in <python>)",
                             "a tag name: letters, digits, _ and -", optional) for optional in (False, True))
URL = pattern(r"https?://[^\s/?#]+(/\S*)?", "an http(s)://host[:port][/path] URL", "an http(s)://... URL", True)
ENV_NAME = pattern(r"[A-Za-z_][A-Za-z0-9_]*", "an environment variable name (the variable holds the key, never the key "
                   "itself)", "an environment variable name", True)

SEED = setting(0, "random seed", **SEED_RANGE)
THREADS = setting(0, "torch CPU threads; 0 = all cores", ge=0)
DEVICE = setting("auto", "where to run (auto: cuda when available, else cpu)", rule=device_problem,
                 allowed=f"one of: {DEVICES} (one this machine has)")
ADAPTER = setting("", "a LoRA adapter directory (PEFT format) to apply to the model, merged into it at load")
ANSWER_FORMAT = setting("auto", "how the answer is written and read: tags (<think>...</think> <answer>...</answer>), "
                                "boxed (\\boxed{...} after </think>, as R1-Distill, QwQ, Qwen3), auto (boxed where the "
                                "chat template opens <think> or data uses \\boxed)", choices=("auto", "tags", "boxed"))
SCORING_TIMEOUT = setting(5.0, "seconds a completion's scoring (a code sandbox) may take", gt=0)
DIST_TIMEOUT = setting(600.0, "under torchrun: a rank waiting this long for a hung or dead one ends the job", gt=0)
MTP_LOSS_WEIGHT = setting(0.3, "weight of the MTP modules' loss (DeepSeek-V3; logged as mtp_loss); 0 = off", ge=0)
RECOMPUTE_LOGITS = setting(False, "backward recomputes the vocabulary projection: far less memory, a bit more time")
PROMPT_TEMPLATE = setting("auto", "how prompts are rendered: auto = the model's chat template if it has one, else "
                                  "r1zero; none = a question as it is", choices=("r1zero", "chat", "none", "auto"))
SANDBOXES = ("auto", "bwrap", "landlock", "none")  # r1lab.rewards.sandbox.runner.SANDBOXES
SANDBOX = setting("auto", "the OS boundary of model-written code (code rewards, tool calls): auto (bwrap, else "
                          "landlock), bwrap (bubblewrap), landlock (r1lab's own: namespaces and Landlock), none "
                          "(unconfined, said and logged); where none works, code is refused", choices=SANDBOXES)


class Inference(Group):  # where a model that only generates runs
    device: str = DEVICE
    dtype: str = setting("float32", "bfloat16: half the memory and bytes per decode step (on a GPU)", **DTYPE)
    threads: int = THREADS


class TaskChoice(Group):
    task: str = setting("arithmetic", "a built-in task, a data file, or an environment (verifiers:ENV)", rule="task")
    task_options: dict = setting({}, "the task's options (a YAML mapping)")


class Prompts(Group):
    template: str = PROMPT_TEMPLATE
    prefill: str = setting("", 'text appended after the template, e.g. "<think>"')
    system: str = setting("", "a system message before each prompt (a data row's own system message wins)")
    answer_format: str = ANSWER_FORMAT


class Sampling(Group):
    temperature: float = setting(0.6, "sampling temperature (0 = greedy)", **SAMPLING_TEMPERATURE)
    top_p: float = setting(0.95, "nucleus sampling", **TOP_P)


class Tools(Group):  # tool calls inside rollouts (r1lab/engine/tools.py): the settings of one ToolSpec; and the sandbox
    tools: str = setting("", 'python: code the model closes in a <python>...</python> block runs in the sandbox and '
                             'its output is appended as <output>...</output> ("" = no tools)', choices=("", "python"))
    sandbox: str = SANDBOX
    tool_tag: str = setting("python", "tools: the tag of a tool block, <TAG>code</TAG>", **TAG)
    tool_output_tag: str = setting("output", "tools: the tag around a call's output, <TAG>printed text</TAG>", **TAG)
    max_tool_calls: int = setting(4, "tools: calls per rollout; a block closed past this ends the rollout", ge=1)
    tool_timeout_s: float = setting(2.0, "tools: seconds one call may run", gt=0)
    tool_memory_mb: int = setting(256, "tools: address-space limit of one call, in MB", ge=32)
    tool_output_chars: int = setting(512, "tools: characters of a call's output the model reads (then cut)", ge=16)

    @staticmethod
    def problems(cfg) -> list[str]:
        same = cfg.tools and cfg.tool_tag == cfg.tool_output_tag
        return [f"tool_tag and tool_output_tag are both {cfg.tool_tag!r}: the model could not tell a call from its "
                "output"] if same else []


class Speculative(Group):  # how generation decodes (r1lab/engine/speculative.py: no tool turns, slots or worker)
    speculative: str = setting("none", "mtp: DeepSeek-V3's MTP module drafts tokens the model verifies (the same "
                                       "distribution and log-probs); draft:DIR: a small model of the same tokenizer",
                               rule=lambda v: None if v in ("none", "mtp") or v.startswith("draft:") and v[6:].strip()
                               else f"{shown(v)} is not none, mtp or draft:DIR", allowed="none, mtp or draft:DIR")
    speculative_tokens: int = setting(1, "k drafts a step: from k MTP depths if the model has k (serve: 1)", ge=1, le=8)

    @staticmethod
    def problems(cfg) -> list[str]:
        asked = [f"{name} {shown(getattr(cfg, name))}" for name in ("tools", "rollout_slots", "async_steps",
                                                                    "suppress_eos") if getattr(cfg, name, None)]
        asked += [f"task {cfg.task}"] if str(getattr(cfg, "task", "")).split(":")[0] in ("verifiers", "openenv", "agent") else []
        if cfg.speculative_tokens > 1 and (cfg.speculative == "none" or hasattr(cfg, "port")):  # serve drafts one
            return [f"speculative_tokens {cfg.speculative_tokens} needs speculative mtp or draft:DIR, and not serve"]
        return [f"speculative {cfg.speculative} does not run with {', '.join(asked)}: leave one off"] \
            if asked and cfg.speculative != "none" else []


class TrainingMemory(Group):  # precision and recomputation: what a training step's memory is traded for
    dtype: str = setting("float32", "bfloat16: forwards under bf16 autocast, float32 weights (on a GPU)", **DTYPE)
    recompute_logits: bool = RECOMPUTE_LOGITS
    activation_checkpointing: bool = setting(False, "backward recomputes each layer's forward: one layer's activations "
                                                    "held instead of all, about a third more compute (dense models)")


class TrainerRun(Group):  # what grpo and sft share after their own settings: resuming, where they run, LoRA, torchrun
    resume: str = setting("false", "continue from the newest intact checkpoint in out: true (an error if none), "
                                   "auto (start afresh if none), or false", choices=("false", "true", "auto"))
    report_to: str = setting("tensorboard", "trackers beside metrics.jsonl, comma-separated, or none", rule="report_to")
    allow_config_change: bool = setting(False, "resume with settings that change the run (see config_changes.jsonl)")
    seed: int = SEED
    device: str = DEVICE
    threads: int = THREADS
    lora_rank: int = setting(0, "LoRA: adapters of this rank on lora_targets, base frozen (0 = full fine-tuning)", ge=0)
    lora_alpha: float = setting(16.0, "LoRA: the adapters' output is scaled by lora_alpha / lora_rank", gt=0)
    lora_targets: str = setting("all-linear", "LoRA: the modules adapted, comma-separated Hugging Face names",
                                rule=lora_targets_problem, allowed="all-linear, or some of " + ",".join(LORA_TARGETS))
    shard: bool = setting(False, "FSDP2 under torchrun: each rank holds 1/N of weights and state (1M+ parameters)")
    dist_timeout_s: float = DIST_TIMEOUT


class Optimizer(Group):  # what grpo and sft share after the learning rate and its warmup
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = setting(1.0, "gradients are clipped to this norm (0 = no clipping)", ge=0)
    moe_bias_update_speed: float = setting(0.001, "DeepSeek-V3: routing-bias step toward even load (0 = off)", ge=0)
    optimizer_in_backward: bool = setting(False, "update each parameter in the backward pass once its gradient is "
                                                 "complete, and free it: no step holds every gradient (needs "
                                                 "max_grad_norm 0, one process)")

    @staticmethod
    def problems(cfg) -> list[str]:
        """What optimizer_in_backward cannot honour (every command with this group has TrainerRun's shard)."""
        problems = []
        if cfg.optimizer_in_backward and cfg.max_grad_norm:
            problems.append(f"optimizer_in_backward cannot clip to max_grad_norm {shown(cfg.max_grad_norm)}: it "
                            f"updates each parameter before the others' gradients exist; set max_grad_norm 0")
        if cfg.optimizer_in_backward and cfg.shard:
            problems.append("optimizer_in_backward with shard: FSDP reduces gradients from its own hooks; leave one on")
        return problems


class ModelRewards(Group):  # rewards a model gives: r1lab/rewards/llm_judge.py and reward_model.py
    judge_url: str = setting("", 'LLM judge reward: an OpenAI-compatible URL, e.g. `r1lab serve` ("" = none)', **URL)
    judge_model: str = setting("", "judge: the model name sent to judge_url")
    judge_api_key_env: str = setting("", "judge: the API key's environment variable, e.g. OPENAI_API_KEY", **ENV_NAME)
    judge_template: str = setting("", 'judge: prompt file with {problem}, {reference}, {completion} ("" = built-in)')
    judge_weight: float = setting(1.0, "judge: weight of its score (in [0, 1])", ge=0)
    judge_concurrency: int = setting(8, "judge: requests in flight at once", ge=1)
    judge_timeout_s: float = setting(60.0, "judge: seconds one request may take", gt=0)
    judge_retries: int = setting(2, "judge: retries of a request that timed out, failed to connect, got 429/5xx", ge=0)
    judge_max_tokens: int = setting(512, "judge: the longest reply asked for, in tokens", ge=1)
    reward_model: str = setting("", "a reward model: a Hugging Face sequence-classification directory (num_labels 1)")
    reward_model_batch_size: int = setting(8, "reward model: completions scored in one forward pass", ge=1)
    reward_model_normalize: str = setting("none", "batch: standardise reward-model scores", choices=("none", "batch"))
    reward_model_weight: float = setting(1.0, "reward model: weight of its score", ge=0)

    @staticmethod
    def problems(cfg) -> list[str]:
        if bool(cfg.judge_url) != bool(cfg.judge_model.strip()):
            return ["judge_url and judge_model go together: the endpoint, and the model name it serves"]
        return []
