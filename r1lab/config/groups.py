"""What several commands' settings share, declared once: allowed values, settings (`seed: int = SEED`), groups."""

import re

import torch

from r1lab.config.fields import Group, setting
from r1lab.config.sources import shown
from r1lab.model.lora import LORA_TARGETS, lora_target_names
from r1lab.suggest import did_you_mean

DEVICES = "auto, cpu, cuda, cuda:N, mps"


def device_problem(value: str) -> str | None:
    """The device must exist on this machine: found here, before any weights load, rather than 30 lines deep."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        return f"{value!r} is not one of {DEVICES}{did_you_mean(value, ('auto', 'cpu', 'cuda', 'mps'))}"
    if value == "mps" and not torch.backends.mps.is_available():
        return "'mps' is not available on this machine; use auto or cpu"
    if not value.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        return f"{value!r} but CUDA is not available on this machine (torch {torch.__version__}); use auto or cpu"
    count = torch.cuda.device_count()
    if int(value.partition(":")[2] or 0) >= count:
        return f"{value!r} but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
    return None


def lora_targets_problem(value: str) -> str | None:
    names = lora_target_names(value)
    if not names:
        return "names no module"
    unknown = [n for n in names if n not in LORA_TARGETS]
    return f"{unknown[0]!r} is not a module LoRA can adapt{did_you_mean(unknown[0], LORA_TARGETS)}" if unknown else None


def tag_problem(value: str) -> str | None:
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", value):
        return None
    return f"{shown(value)} is not a tag name (letters, digits, _ and -, as in <python>)"


# what settings of several commands allow
SEED_RANGE = dict(ge=0, le=2**32 - 1)  # every seed fits the 32-bit seeders, including the seed + 1 of held-out problems
DTYPE = dict(choices=("float32", "bfloat16"))
ARCHS = ("dense", "deepseek-v3")  # the tiny bases r1lab pretrains
PROMPT_TEMPLATES = dict(choices=("r1zero", "chat", "none", "auto"))  # "none": a single question sent as it is
CONVERSATION_TEMPLATES = dict(choices=("auto", "chat", "r1zero"))  # a conversation cannot be sent without one
TOP_P = dict(gt=0, le=1)
SAMPLING_TEMPERATURE = dict(ge=0)  # 0 = greedy (r1lab/engine/engine.py)
NONEMPTY = dict(rule=lambda value: None if value.strip() else "must not be empty", allowed="not empty")
TAG = dict(rule=tag_problem, allowed="a tag name: letters, digits, _ and -")
OPTIONAL_TAG = dict(rule=lambda value: None if value == "" else tag_problem(value),
                    allowed='"" or a tag name: letters, digits, _ and -')

SEED = setting(0, "random seed", **SEED_RANGE)
THREADS = setting(0, "torch CPU threads; 0 = all cores", ge=0)
DEVICE = setting("auto", "where to run (auto: cuda when available, else cpu)", rule=device_problem,
                 allowed=f"one of: {DEVICES} (one this machine has)")
ADAPTER = setting("", "a LoRA adapter directory (PEFT format) to apply to the model, merged into it at load")
ANSWER_FORMAT = setting("auto", "how the final answer is written and read: tags (<think>...</think> "
                                "<answer>...</answer>), boxed (\\boxed{...} after </think>, as R1-Distill, QwQ and "
                                "Qwen3 answer), auto (boxed when the chat template handles <think> blocks or the "
                                "data's solutions use \\boxed, else tags)", choices=("auto", "tags", "boxed"))
SCORING_TIMEOUT = setting(5.0, "seconds a completion's scoring (a code sandbox) may take", gt=0)
DIST_TIMEOUT = setting(600.0, "under torchrun: a rank that waits this long for another (hung or dead) ends the job "
                              "with an error", gt=0)
MOE_BIAS_UPDATE_SPEED = setting(0.001, "DeepSeek-V3 MoE: after each optimizer step every expert's routing bias moves "
                                       "this much toward an even load (0 = off)", ge=0)
OPTIMIZER_IN_BACKWARD = setting(False, "update each parameter in the backward pass as soon as its gradient is "
                                       "complete, and free it: all gradients never exist at once (needs max_grad_norm "
                                       "0, one process)")
MTP_LOSS_WEIGHT = setting(0.3, "DeepSeek-V3 with multi-token prediction modules: their loss joins the next-token "
                                "loss with this weight (the V3 paper: 0.3, later 0.1), logged as mtp_loss; 0 = off",
                          ge=0)
RECOMPUTE_LOGITS = setting(False, "backward recomputes the vocabulary projection: far less memory, a bit more time")


class Inference(Group):  # where a model that only generates runs
    device: str = DEVICE
    dtype: str = setting("float32", "bfloat16: half the memory and bytes per decode step (on a GPU)", **DTYPE)
    threads: int = THREADS


class TaskChoice(Group):
    task: str = setting("arithmetic", "a built-in task name or a data file", rule="task")
    task_options: dict = setting({}, "the task's options (a YAML mapping)")


PROMPT_TEMPLATE = setting("auto", "how prompts are rendered: auto = the model's chat template if it has one, else "
                                  "r1zero (r1lab/model/templates.py)", **PROMPT_TEMPLATES)


class Prompts(Group):
    template: str = PROMPT_TEMPLATE
    prefill: str = setting("", 'text appended after the template, e.g. "<think>"')
    system: str = setting("", "a system message before each prompt (a data row's own system message wins)")
    answer_format: str = ANSWER_FORMAT


class Sampling(Group):
    temperature: float = setting(0.6, "sampling temperature (0 = greedy)", **SAMPLING_TEMPERATURE)
    top_p: float = setting(0.95, "nucleus sampling", **TOP_P)


SANDBOXES = ("auto", "bwrap", "landlock", "none")  # r1lab.rewards.sandbox.runner.SANDBOXES


SANDBOX = setting("auto", "the OS boundary of model-written code (code rewards, tool calls): auto (bwrap where it "
                          "works, else landlock), bwrap (bubblewrap), landlock (r1lab's own: namespaces and Landlock), "
                          "none (unconfined, said at start and logged every step); with none working, a code task or "
                          "tools is refused at start", choices=SANDBOXES)


class Tools(Group):  # tool calls inside rollouts (r1lab/engine/tools.py): the settings of one ToolSpec; and the sandbox
    tools: str = setting("", 'python: code the model closes in a <python>...</python> block runs in the sandbox and '
                             'its output is appended as <output>...</output> ("" = no tools)', choices=("", "python"))
    sandbox: str = SANDBOX
    tool_tag: str = setting("python", "tools: the tag of a tool block, <TAG>code</TAG>", **TAG)
    tool_output_tag: str = setting("output", "tools: the tag around a call's output, <TAG>printed text</TAG>", **TAG)
    max_tool_calls: int = setting(4, "tools: calls per rollout; a block closed past this ends the rollout", ge=1)
    tool_timeout_s: float = setting(2.0, "tools: seconds one call may run", gt=0)
    tool_memory_mb: int = setting(256, "tools: address-space limit of one call, in MB", ge=32)
    tool_output_chars: int = setting(512, "tools: characters of a call's output the model reads; the rest is cut, "
                                          "with a marker", ge=16)

    @staticmethod
    def problems(cfg) -> list[str]:
        if cfg.tools and cfg.tool_tag == cfg.tool_output_tag:
            return [f"tool_tag and tool_output_tag are both {cfg.tool_tag!r}: the model could not tell a call from "
                    f"its output"]
        return []


class Speculative(Group):  # how generation decodes (r1lab/engine/speculative.py)
    speculative: str = setting("none", "mtp: speculative decoding, DeepSeek-V3's multi-token prediction module drafting "
                                       "one token per step that the model verifies (the same distribution; greedy: "
                                       "the same tokens; the log-probs are the model's); draft:DIR: the model in DIR "
                                       "(the same tokenizer, smaller) drafts",
                               rule=lambda v: None if v in ("none", "mtp") or v.startswith("draft:") and v[6:].strip()
                               else f"{shown(v)} is not none, mtp or draft:DIR", allowed="none, mtp or draft:DIR")

    @staticmethod
    def problems(cfg) -> list[str]:
        # what the speculative decoder does not run: tool turns' stop strings, slots, a worker process, no end-of-text
        asked = [f"{name} {shown(getattr(cfg, name))}" for name in ("tools", "rollout_slots", "async_steps",
                                                                    "suppress_eos") if getattr(cfg, name, None)]
        return [f"speculative {cfg.speculative} does not run with {', '.join(asked)}: leave one off"] \
            if asked and cfg.speculative != "none" else []


class TrainingMemory(Group):  # precision and recomputation: what a training step's memory is traded for
    dtype: str = setting("float32", "bfloat16: forward passes under bf16 autocast over float32 weights (on a GPU)",
                         **DTYPE)
    recompute_logits: bool = RECOMPUTE_LOGITS
    activation_checkpointing: bool = setting(False, "backward recomputes each layer's forward instead of keeping its "
                                                    "activations: memory of one layer's activations instead of all, "
                                                    "about a third more compute (dense models)")


class TrainerRun(Group):  # what grpo and sft share after their own settings: resuming, where they run, LoRA, torchrun
    resume: str = setting("false", "continue from the newest intact checkpoint in out: true (an error where there is "
                                   "none), auto (start afresh where there is none), or false",
                          choices=("false", "true", "auto"))
    report_to: str = setting("tensorboard", "experiment trackers besides metrics.jsonl, comma-separated: tensorboard, "
                                            "wandb, trackio, mlflow; or none", rule="report_to")
    allow_config_change: bool = setting(False, "resume with settings that change the run (recorded in "
                                               "config_changes.jsonl)")
    seed: int = SEED
    device: str = DEVICE
    threads: int = THREADS
    lora_rank: int = setting(0, "LoRA: adapters of this rank on lora_targets, the base frozen (0 = full fine-tuning)",
                             ge=0)
    lora_alpha: float = setting(16.0, "LoRA: the adapters' output is scaled by lora_alpha / lora_rank", gt=0)
    lora_targets: str = setting("all-linear", "LoRA: the modules adapted, comma-separated Hugging Face names",
                                rule=lora_targets_problem, allowed="all-linear, or some of " + ",".join(LORA_TARGETS))
    shard: bool = setting(False, "under torchrun: FSDP2, each rank holds 1/N of the weights, gradients and optimizer "
                                 "state (models of 1M parameters and more)")
    dist_timeout_s: float = DIST_TIMEOUT


def optimizer_in_backward_problems(cfg) -> list[str]:
    """What optimizer_in_backward cannot honour (r1lab/train/backward_step.py; under torchrun it checks the world)."""
    problems = []
    if cfg.optimizer_in_backward and cfg.max_grad_norm:
        problems.append(f"optimizer_in_backward cannot clip to max_grad_norm {shown(cfg.max_grad_norm)}: it updates "
                        f"each parameter before the others' gradients exist; set max_grad_norm 0")
    if cfg.optimizer_in_backward and cfg.shard:
        problems.append("optimizer_in_backward with shard: FSDP reduces gradients from its own hooks; leave one on")
    return problems


def url_problem(value: str) -> str | None:
    if value == "" or re.fullmatch(r"https?://[^\s/?#]+(/\S*)?", value):
        return None
    return f"{shown(value)} is not an http(s)://host[:port][/path] URL"


def env_name_problem(value: str) -> str | None:
    if value == "" or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        return None
    return f"{shown(value)} is not an environment variable name (the variable holds the key, never the key itself)"


class ModelRewards(Group):  # rewards a model gives: r1lab/rewards/llm_judge.py and reward_model.py
    judge_url: str = setting("", "an LLM judge as a reward: an OpenAI-compatible endpoint, e.g. "
                                 "http://127.0.0.1:8000/v1 (`r1lab serve` of another model); \"\" = no judge",
                             rule=url_problem, allowed='"" or an http(s)://... URL')
    judge_model: str = setting("", "judge: the model name sent to judge_url")
    judge_api_key_env: str = setting("", "judge: the environment variable holding the API key, e.g. OPENAI_API_KEY "
                                         "(\"\" = none)", rule=env_name_problem,
                                     allowed='"" or an environment variable name')
    judge_template: str = setting("", "judge: a file with the judge prompt, its placeholders {problem}, {reference}, "
                                      "{completion} (\"\" = the built-in one)")
    judge_weight: float = setting(1.0, "judge: weight of its score (in [0, 1])", ge=0)
    judge_concurrency: int = setting(8, "judge: requests in flight at once", ge=1)
    judge_timeout_s: float = setting(60.0, "judge: seconds one request may take", gt=0)
    judge_retries: int = setting(2, "judge: retries of a request that timed out, failed to connect or got a 429/5xx",
                                 ge=0)
    judge_max_tokens: int = setting(512, "judge: the longest reply asked for, in tokens", ge=1)
    reward_model: str = setting("", "a Hugging Face sequence-classification model directory (num_labels 1) as a "
                                    "reward, run with transformers (\"\" = none)")
    reward_model_batch_size: int = setting(8, "reward model: completions scored in one forward pass", ge=1)
    reward_model_normalize: str = setting("none", "reward model: batch = its scores standardised over the step's "
                                                  "completions (mean 0, std 1)", choices=("none", "batch"))
    reward_model_weight: float = setting(1.0, "reward model: weight of its score", ge=0)

    @staticmethod
    def problems(cfg) -> list[str]:
        if bool(cfg.judge_url) != bool(cfg.judge_model.strip()):
            return ["judge_url and judge_model go together: the endpoint, and the model name it serves"]
        return []
