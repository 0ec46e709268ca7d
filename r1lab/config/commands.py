"""One dataclass of settings per command: its own settings, and the shared ones where they stand in its --help."""

import math

from r1lab.config import groups as shared
from r1lab.config.fields import Settings, setting
from r1lab.model.architecture import attention_shape_problems


class PretrainConfig(Settings, kind="pretrain"):
    """`r1lab pretrain`: a tiny base model from scratch on the synthetic corpus (see r1lab/commands/pretrain.py)."""

    out: str = setting("runs/base", "run directory: the model goes to OUT/model", **shared.NONEMPTY)
    task: str = setting("arithmetic", "the task family the corpus is made of", choices=("arithmetic",))
    task_options: dict = setting({}, "as in every command: none = the demo's task (3-digit sums)")
    documents: int = setting(60_000, "corpus size (documents are drawn from the task's train split)", ge=1)
    steps: int = setting(600, "optimizer steps", ge=1)
    batch_size: int = setting(96, "documents per optimizer step", ge=1)
    micro_batch_size: int = setting(0, "documents per pass, grouped by length to pad less; 0 = the whole batch", ge=0)
    lr: float = setting(3e-3, "peak learning rate (linear warmup, then cosine decay to a tenth)", gt=0)
    warmup_steps: int = setting(30, "steps of linear learning-rate warmup", ge=0)
    weight_decay: float = setting(0.01, "AdamW weight decay", ge=0)
    hidden_size: int = setting(128, "model width: num_heads times an even head size", ge=1)
    num_layers: int = setting(4, "transformer layers", ge=1)
    num_heads: int = setting(4, "attention heads, a multiple of num_kv_heads", ge=1)
    num_kv_heads: int = setting(2, "key/value heads (grouped-query attention)", ge=1)
    intermediate_size: int = setting(384, "MLP width (deepseek-v3: of its dense layers)", ge=1)
    arch: str = setting("dense", "dense (Qwen2: GQA + MLP) or deepseek-v3 (MLA + DeepSeekMoE)", choices=shared.ARCHS)
    kv_lora_rank: int = setting(32, "deepseek-v3: numbers per token in MLA's compressed key/value latent", ge=1)
    experts: int = setting(8, "deepseek-v3: routed experts per MoE layer", ge=1)
    experts_per_token: int = setting(2, "deepseek-v3: routed experts chosen for each token", ge=1)
    shared_experts: int = setting(1, "deepseek-v3: shared experts every token runs", ge=0)
    expert_intermediate_size: int = setting(128, "deepseek-v3: MLP width of each expert", ge=1)
    dense_layers: int = setting(1, "deepseek-v3: the first layers keep a dense MLP (first_k_dense_replace)", ge=0)
    moe_bias_update_speed: float = setting(0.01, "deepseek-v3: routing-bias step toward even load (0 = off)", ge=0)
    balance_loss_weight: float = setting(0.0, "deepseek-v3: sequence-wise balance loss weight; 0 = bias alone", ge=0)
    mtp_depth: int = setting(0, "deepseek-v3: multi-token prediction modules, one token further each; 0 = none", ge=0)
    mtp_loss_weight: float = shared.MTP_LOSS_WEIGHT
    think_share: float = setting(0.3, "share of documents with a worked solution in <think>", ge=0, le=1)
    slip_rate: float = setting(0.2, "share of worked solutions with one wrong column", ge=0, le=1)
    untagged_share: float = setting(0.05, "share of answers without the format (think_share + this <= 1)", ge=0, le=1)
    tools: str = setting("", "python: solutions calling the Python tool as --tools rollouts do", choices=("", "python"))
    _memory = shared.TrainingMemory
    seed: int = shared.SEED
    threads: int = shared.THREADS

    def rules(self) -> list[str]:
        problems = attention_shape_problems(self.hidden_size, self.num_heads, self.num_kv_heads)
        if self.think_share + self.untagged_share > 1:
            problems.append(f"think_share + untagged_share is {self.think_share + self.untagged_share:g}, above 1")
        moe = self.arch == "deepseek-v3"
        if moe and self.activation_checkpointing:
            problems.append("activation_checkpointing is for dense models (an MoE forward counts expert loads)")
        if moe and self.experts_per_token > self.experts:
            problems.append(f"experts_per_token ({self.experts_per_token}) is more than experts ({self.experts})")
        if self.mtp_depth and not moe:
            problems.append(f"mtp_depth {self.mtp_depth}: multi-token prediction is DeepSeek-V3's (--arch deepseek-v3)")
        if moe and self.dense_layers >= self.num_layers:
            problems.append(f"dense_layers ({self.dense_layers}) leaves no MoE layer of num_layers ({self.num_layers})")
        return problems


class GRPOConfig(Settings, kind="GRPO"):
    """`r1lab grpo`: R1-Zero reinforcement learning with group-relative advantages and rule rewards."""

    model: str = setting("runs/base/model", "the policy's model directory (Hugging Face format)", **shared.NONEMPTY)
    task: str = setting("arithmetic", "a built-in task, or a .jsonl/.parquet file of prompts and answers", rule="task")
    task_options: dict = setting({}, "the task's options; arithmetic with none: the demo's task (two 3-digit numbers)")
    out: str = setting("runs/grpo", "run directory: config, metrics, checkpoints, the final model", **shared.NONEMPTY)
    steps: int = setting(100, "optimizer steps (one batch of rollouts each)", ge=1)
    time_limit_s: float = setting(0.0, "stop after the step that reaches this much training time (0 = no limit)", ge=0)
    prompts_per_step: int = setting(16, "distinct prompts per step", ge=1)
    samples_per_prompt: int = setting(8, "G, the group size: advantages compare samples within a group", ge=2)
    micro_batch_size: int = setting(64, "sequences per forward/backward pass", ge=1)
    updates_per_batch: int = setting(1, "mu: gradient steps on one batch of rollouts", ge=1)
    lr: float = setting(1e-6, "learning rate (AdamW; linear warmup, then constant)", gt=0)
    warmup_steps: int = setting(0, "steps of linear learning-rate warmup", ge=0)
    _optimizer = shared.Optimizer
    # the objective's knobs (README: GRPO / Dr. GRPO / DAPO as settings of these)
    clip_low: float = setting(0.2, "PPO clip below: the ratio is kept above 1 - clip_low", ge=0, lt=1)
    clip_high: float = setting(0.2, "PPO clip above: the ratio is kept below 1 + clip_high (DAPO: larger)", ge=0)
    kl_coef: float = setting(0.0, "weight of the KL penalty to the initial model (0 = none, no reference model)", ge=0)
    loss_norm: str = setting("token", "how token losses are averaged (Dr. GRPO: constant)",
                             choices=("token", "sequence", "constant"))
    scale_by_std: bool = setting(True, "divide advantages by the group's reward std (Dr. GRPO: false)")
    policy_loss: str = setting("ppo-clip", "the policy-gradient term: ppo-clip (per-token clipped ratio), cispo (a "
                                           "clipped, detached ratio weighting every token), gspo (sequence-level)",
                               choices=("ppo-clip", "cispo", "gspo"))
    mismatch_correction: str = setting("auto", "sampler/trainer probability gap: tis (weight min(p_trainer / "
                                               "p_sampler, mismatch_cap)), mis (tokens past it dropped); auto: tis "
                                               "with async_steps, else none", choices=("auto", "none", "tis", "mis"))
    mismatch_cap: float = setting(2.0, "the cap of tis / mis", ge=1)
    fp32_lm_head: bool = setting(False, "bfloat16: the LM head in float32, for closer sampler and trainer log-probs")
    drop_uniform_groups: bool = setting(False, "leave out groups whose rewards are all equal (DAPO dynamic sampling)")
    skip_zero_advantage: bool = setting(True, "skip zero-advantage sequences when kl_coef is 0 (their gradient is 0)")
    # rewards
    accuracy_weight: float = setting(1.0, "weight of the verified-answer reward", ge=0)
    format_weight: float = setting(1.0, "weight of the <think>/<answer> format reward", ge=0)
    language_weight: float = setting(0.0, "R1 stage 2: reward the chain of thought's share written in `language`", ge=0)
    language: str = setting("en", "the language of language_weight (r1lab/rewards/language.py)", rule="language")
    reward_functions: dict = setting({}, 'your own rewards: {"module:function": weight} (rewards/user_functions.py)')
    reward_timeout_s: float = shared.SCORING_TIMEOUT
    _model_rewards = shared.ModelRewards
    control: str = setting("none", "random-reward: shuffled (same mean, no signal)", choices=("none", "random-reward"))
    # sampling
    _prompts = shared.Prompts
    temperature: float = setting(1.0, "rollout temperature: GRPO needs different samples within a group", gt=0)
    top_p: float = setting(1.0, "nucleus sampling of rollouts (1 = off)", **shared.TOP_P)
    top_k: int = setting(0, "top-k sampling of rollouts (0 = off)", ge=0)
    max_new_tokens: int = setting(256, "completion length limit, in tokens", ge=1)
    suppress_eos: bool = setting(False, "benchmarking only: every completion runs to max_new_tokens")
    async_steps: int = setting(0, "K: a worker process samples the next K steps' rollouts while this one trains; "
                                  "step s samples the weights after step s - K (0 = sample and train in turn)", ge=0)
    rollout_threads: int = setting(0, "async_steps: CPU threads of the rollout worker, not trainer (0 = half)", ge=0)
    rollout_slots: int = setting(0, "continuous batching: rollouts running at once (0 = all of the step's)", ge=0)
    _tools = shared.Tools
    _speculative = shared.Speculative
    tool_failure_penalty: float = setting(0.0, "tools: reward subtracted per failed call (error, timeout, limit)", ge=0)
    dtype: str = setting("float32", "bfloat16: bf16 rollouts, bf16-autocast training, float32 weights", **shared.DTYPE)
    recompute_logits: bool = shared.RECOMPUTE_LOGITS
    # evaluation on held-out problems during training
    eval_every: int = setting(20, "held-out evaluation every N steps (0 = none)", ge=0)
    eval_problems: int = setting(200, "held-out problems (at least 1 when eval_every > 0)", ge=0)
    eval_samples: int = setting(4, "k, samples per held-out problem (at least 1 when eval_every > 0)", ge=0)
    eval_temperature: float = setting(0.6, "held-out sampling temperature (0 = greedy)", **shared.SAMPLING_TEMPERATURE)
    eval_top_p: float = setting(0.95, "held-out nucleus sampling", **shared.TOP_P)
    save_every: int = setting(50, "checkpoint every N steps (0: only after the last step and at Ctrl-C)", ge=0)
    samples_every: int = setting(10, "write sample completions every N steps (0 = never)", ge=0)
    _trainer_run = shared.TrainerRun

    def rules(self) -> list[str]:
        no_eval = self.eval_every and (self.eval_samples < 1 or self.eval_problems < 1)
        problems = ["eval_samples and eval_problems must be at least 1 when eval_every > 0"] if no_eval else []
        weights = [f"reward function {spec!r}: its weight must be a number, got {weight!r}"
                   for spec, weight in self.reward_functions.items()
                   if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight)]
        return problems + weights + super().rules()  # the functions themselves are found as the run starts


class EvalConfig(Settings, kind="eval"):
    """`r1lab eval`: pass@1 over k samples, cons@k and pass@k on held-out problems (the paper's protocol)."""

    model: str = setting("runs/demo/grpo/model", "the model directory to evaluate", **shared.NONEMPTY)
    adapter: str = shared.ADAPTER
    _task = shared.TaskChoice
    split: str = setting("test", "problems' split (all: every row of a data file)", choices=("test", "train", "all"))
    problems: int = setting(200, "distinct problems, each evaluated once (at most a data file's rows; 0 = all)", ge=0)
    samples: int = setting(8, "k, samples per problem", ge=1)
    _sampling = shared.Sampling
    max_new_tokens: int = setting(128, "completion length limit, in tokens", ge=1)
    prompts_per_chunk: int = setting(64, "prompts per generate call, each with its k samples", ge=1)
    _prompts = shared.Prompts
    language: str = setting("en", "the language whose share of the chain of thought is reported", rule="language")
    reward_timeout_s: float = shared.SCORING_TIMEOUT
    _tools = shared.Tools
    _speculative = shared.Speculative
    out: str = setting("", "JSON results; default RUN/eval.json for a run's RUN/model, else ./eval-MODEL.json")
    seed: int = setting(0, "problems are drawn with seed + 1, samples with seed", **shared.SEED_RANGE)
    _inference = shared.Inference
    dist_timeout_s: float = shared.DIST_TIMEOUT


class SFTConfig(Settings, kind="SFT"):
    """`r1lab sft`: supervised fine-tuning on chat data (rows of `messages`), the loss on assistant turns only."""

    model: str = setting("runs/base/model", "the model directory to fine-tune", **shared.NONEMPTY)
    data: str = setting("runs/sample/sft.jsonl", ".jsonl / .json / .parquet of chat rows (or a datasets source): "
                                                 "messages, prompt/completion (TRL) or ShareGPT", **shared.NONEMPTY)
    data_format: str = setting("auto", "auto: detected from the first row's keys",
                               choices=("auto", "messages", "prompt_completion", "sharegpt"))
    messages_field: str = setting("messages", "the column of {role, content} message lists", **shared.NONEMPTY)
    prompt_field: str = setting("prompt", "prompt-completion rows: the prompt (text or messages)", **shared.NONEMPTY)
    completion_field: str = setting("completion", "prompt-completion rows: the completion column (a string, or the "
                                                  "assistant message(s)); the loss is on it only", **shared.NONEMPTY)
    conversations_field: str = setting("conversations", "ShareGPT: the {from, value} list column", **shared.NONEMPTY)
    role_map: dict = setting({}, "ShareGPT: more `from` values mapped to system, user or assistant (human, gpt known)")
    out: str = setting("runs/sft", "run directory: config, metrics, checkpoints, the final model", **shared.NONEMPTY)
    template: str = setting("auto", "auto: the tokenizer's chat template, else r1zero", **shared.CONVERSATION_TEMPLATES)
    epochs: float = setting(2.0, "passes over the data (R1 stage 3 trains two epochs on rejection-sampled data)", ge=0)
    steps: int = setting(0, "optimizer steps; 0 = as many as `epochs` takes", ge=0)
    batch_size: int = setting(16, "conversations per optimizer step", ge=1)
    micro_batch_size: int = setting(0, "conversations per forward/backward pass; 0 = the whole batch at once", ge=0)
    lr: float = setting(1e-5, "peak learning rate (linear warmup, then cosine decay to a tenth)", gt=0)
    warmup_steps: int = setting(10, "steps of linear learning-rate warmup", ge=0)
    _optimizer = shared.Optimizer
    mtp_loss_weight: float = shared.MTP_LOSS_WEIGHT
    max_len: int = setting(2048, "tokens; longer conversations are dropped and counted, never truncated", ge=2)
    _memory = shared.TrainingMemory
    tool_output_tag: str = setting("", "rows sampled with --tools: the tag of tool output in assistant messages, left "
                                       "out of the loss (e.g. output); \"\" = none", **shared.OPTIONAL_TAG)
    eval_fraction: float = setting(0.0, "share of rows held out for a held-out loss (by a stable hash)", ge=0, lt=1)
    eval_every: int = setting(50, "held-out loss every N steps (when eval_fraction > 0)", ge=1)
    save_every: int = setting(0, "checkpoint every N steps (0: only after the last step and at Ctrl-C)", ge=0)
    _trainer_run = shared.TrainerRun

    def rules(self) -> list[str]:
        steps = ["set steps >= 1, or steps 0 and epochs > 0"] if self.steps == 0 and self.epochs <= 0 else []
        return steps + super().rules()


class SampleConfig(Settings, kind="sample"):
    """`r1lab sample`: rejection sampling; k completions per prompt, the correct and readable ones kept as SFT data."""

    model: str = setting("runs/grpo/model", "the model directory to sample from", **shared.NONEMPTY)
    adapter: str = shared.ADAPTER
    _task = shared.TaskChoice
    split: str = setting("train", "which split the prompts come from", choices=("train", "test"))
    problems: int = setting(200, "prompts (distinct); 0 = every row of a data file's split", ge=0)
    samples: int = setting(16, "k completions per prompt", ge=1)
    _sampling = shared.Sampling
    max_new_tokens: int = setting(256, "completion length limit, in tokens", ge=1)
    prompts_per_chunk: int = setting(32, "prompts per generate call", ge=1)
    _prompts = shared.Prompts
    # readability filters on the verified-correct completions
    min_tokens: int = setting(1, "shortest completion kept, in tokens", ge=0)
    max_tokens: int = setting(0, "longest completion kept; 0 = no limit below max_new_tokens", ge=0)
    language: str = setting("en", 'the language the reasoning must be in; "" = no filter', rule="language or empty")
    min_language_score: float = setting(0.9, "share of <think> words in it: one stray word in ten passes", ge=0, le=1)
    max_per_prompt: int = setting(0, "distinct completions kept per prompt; 0 = every distinct one", ge=0)
    reward_timeout_s: float = shared.SCORING_TIMEOUT
    _tools = shared.Tools
    _speculative = shared.Speculative
    out: str = setting("runs/sample/sft.jsonl", "the SFT dataset (a summary and config beside it)", **shared.NONEMPTY)
    seed: int = shared.SEED
    _inference = shared.Inference
    dist_timeout_s: float = shared.DIST_TIMEOUT

    def rules(self) -> list[str]:
        if self.max_tokens and self.max_tokens < self.min_tokens:
            return [f"max_tokens {self.max_tokens} is below min_tokens {self.min_tokens}"]
        return super().rules()


class ScoreConfig(Settings, kind="score"):
    """`r1lab score`: completions made elsewhere (vLLM, an API, another trainer) scored by the reward's own scorer."""

    _task = shared.TaskChoice
    completions: str = setting("completions.jsonl", "JSONL rows with prompt (a problem's question, or chat messages) "
                                                    "and completion (text, or assistant messages)", **shared.NONEMPTY)
    answer_format: str = shared.ANSWER_FORMAT
    reward_timeout_s: float = shared.SCORING_TIMEOUT
    sandbox: str = shared.SANDBOX
    out: str = setting("", "results JSON (accuracy, format_rate, each row); default: COMPLETIONS.score.json")


class ReportConfig(Settings, kind="report"):
    """`r1lab report RUN_DIR`: curves, the first and last held-out evaluation and sample completions of a run."""

    run: str = setting("runs/grpo", "a grpo, sft or pretrain run directory (it holds metrics.jsonl)", **shared.NONEMPTY)
    title: str = setting("", "the report's title; default: the run directory's name")


class DemoConfig(Settings, kind="demo"):
    """`r1lab demo`: tokenizer -> tiny base -> eval -> R1-Zero GRPO -> eval -> report, on a CPU in minutes."""

    out: str = setting("runs/demo", "run directory; stages already done there are reused", **shared.NONEMPTY)
    control: str = setting("none", "random-reward: the demo with shuffled rewards", choices=("none", "random-reward"))
    arch: str = setting("dense", "dense or deepseek-v3 (MLA + MoE; runs in OUT/*-deepseek-v3)", choices=shared.ARCHS)
    tools: str = setting("", "python: the tool demo (3-digit products, runs in OUT/*-tools)", choices=("", "python"))
    pretrain_steps: int = setting(0, "optimizer steps of the tiny base; 0 = 600 (the tool demo: 1,000)", ge=0)
    grpo_steps: int = setting(60, "GRPO steps", ge=1)
    eval_problems: int = setting(200, "held-out problems of each evaluation", ge=1)
    seed: int = shared.SEED
    threads: int = shared.THREADS


class DistillConfig(Settings, kind="distill"):
    """`r1lab distill`: teacher -> verified, readable traces -> SFT of a smaller student (R1 section 4), beside GRPO."""

    teacher: str = setting("runs/demo/grpo/model", "the teacher's model directory", **shared.NONEMPTY)
    student: str = setting("", 'a student base model directory; "" = pretrain one of the student_* shape')
    student_hidden_size: int = setting(64, "width of a pretrained student", ge=1)
    student_num_layers: int = setting(4, "layers of a pretrained student", ge=1)
    student_num_heads: int = setting(4, "attention heads of a pretrained student", ge=1)
    student_num_kv_heads: int = setting(2, "key/value heads of a pretrained student", ge=1)
    student_intermediate_size: int = setting(176, "MLP width of a pretrained student (0.23x the demo model)", ge=1)
    student_pretrain_steps: int = setting(400, "pretraining steps of the student base", ge=1)
    _task = shared.TaskChoice
    template: str = shared.PROMPT_TEMPLATE
    # traces from the teacher (rejection sampling: verified-correct, readable, distinct)
    problems: int = setting(6000, "train prompts for the teacher (0 = every row of a data file's split)", ge=0)
    samples: int = setting(2, "teacher completions per prompt", ge=1)
    max_per_prompt: int = setting(1, "kept per prompt: a worked solution barely varies (0 = every distinct one)", ge=0)
    _sampling = shared.Sampling  # the teacher's
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
    out: str = setting("runs/distill", "run directory; stages already done there are reused", **shared.NONEMPTY)
    seed: int = shared.SEED
    threads: int = shared.THREADS

    def rules(self) -> list[str]:
        if self.student:
            return []
        if self.task != "arithmetic":
            return [f"pretraining a student base needs the arithmetic task; for task {self.task!r} give a student "
                    f"base model directory with --student"]
        return attention_shape_problems(self.student_hidden_size, self.student_num_heads, self.student_num_kv_heads,
                                        "student_")


class PipelineConfig(Settings, kind="pipeline"):
    """`r1lab pipeline`: DeepSeek-R1's four stages, beside R1-Zero and a distilled student (commands/pipeline.py)."""

    out: str = setting("runs/pipeline", "run directory; stages already done there are reused", **shared.NONEMPTY)
    task: str = setting("arithmetic", "arithmetic, or a .jsonl/.parquet file with prompt, answer columns", rule="task")
    task_options: dict = setting({}, "the task's options (a YAML mapping)")
    base: str = setting("", 'a base model directory; "" = pretrain the demo\'s tiny base (arithmetic only)')
    cold_start_data: str = setting("", 'chat JSONL/Parquet for stage 1; "" = generated solutions (arithmetic only)')
    student: str = setting("", 'the student base for distillation; "" = pretrain the preset one (arithmetic only)')
    template: str = shared.PROMPT_TEMPLATE
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
    seed: int = shared.SEED
    threads: int = shared.THREADS

    def rules(self) -> list[str]:
        given = dict(base=self.base, cold_start_data=self.cold_start_data, student=self.student or not self.distill)
        missing = [name for name, value in given.items() if not value] if self.task != "arithmetic" else []
        return [f"with task {self.task!r} (not the built-in arithmetic task), give {', '.join(missing)}: only the "
                f"built-in task can make them itself"] if missing else []


class MergeConfig(Settings, kind="merge"):
    """`r1lab merge`: a LoRA adapter merged into its base, saved as a plain Hugging Face model directory."""

    model: str = setting("runs/base/model", "the base model directory the adapter was trained on", **shared.NONEMPTY)
    adapter: str = setting("runs/grpo/adapter", "the adapter directory (PEFT format)", **shared.NONEMPTY)
    out: str = setting("runs/merged", "where the merged model directory is written", **shared.NONEMPTY)
    dtype: str = setting("float32", "the merged weights' dtype on disk", **shared.DTYPE)


class ServeConfig(Settings, kind="serve"):
    """`r1lab serve`: an OpenAI-compatible API (reasoning_content split out) and a chat page for a model directory."""

    model: str = setting("runs/demo/grpo/model", "the model directory to serve", **shared.NONEMPTY)
    adapter: str = shared.ADAPTER
    served_model_name: str = setting("", "model id clients send; default: the directory's name (a run's for RUN/model)")
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface)", **shared.NONEMPTY)
    port: int = setting(8000, "TCP port", ge=1, le=65535)
    api_key: str = setting("", "when set, /v1 requests need the header `Authorization: Bearer KEY`")
    template: str = setting("auto", "auto: the tokenizer's chat template, else r1zero", **shared.CONVERSATION_TEMPLATES)
    prefill: str = setting("", 'text after the template, e.g. "<think>": the reply then starts inside the reasoning')
    answer_format: str = shared.ANSWER_FORMAT
    max_batch: int = setting(64, "completions generated together (the continuous batch's slots)", ge=1)
    batch_wait_ms: float = setting(5.0, "an idle server starts once no request came for this long (at most 10x)", ge=0)
    max_pending: int = setting(4096, "completions waiting beyond this get 503", ge=1)
    max_tokens: int = setting(4096, "the most completion tokens a request may ask for", ge=1)
    max_request_tokens: int = setting(262_144, "the most prompts x n x max_tokens in one request", ge=1)
    max_prompts: int = setting(128, "prompts in one /v1/completions request", ge=1)
    max_model_len: int = setting(0, "context length (prompt + completion); 0 = max_position_embeddings", ge=0)
    max_body_bytes: int = setting(1 << 20, "largest request body, in bytes", ge=1)
    body_timeout_s: float = setting(30.0, "a body not in within this gets 408 and its connection closed", gt=0)
    # connections (r1lab/serve/connections.py): what keeps clients that never finish a request from starving the rest
    header_timeout_s: float = setting(10.0, "a connection whose request head (line and headers) is not in within this "
                                            "of its opening, or of the request's first bytes, is closed", gt=0)
    keep_alive_s: float = setting(5.0, "an idle connection is closed this long after its last response", gt=0)
    max_connections: int = setting(8192, "open connections (fewer if the open-file limit is lower); past it the one "
                                         "waiting longest for a request head is closed, or if all are busy, 503", ge=1)
    max_connections_per_client: int = setting(1024, "connections from one address; past it, as max_connections", ge=1)
    max_header_bytes: int = setting(16384, "largest request head; a larger one gets 400", ge=1024)
    _inference = shared.Inference
    _speculative = shared.Speculative
    log_level: str = setting("info", "uvicorn's and the server's log level",
                             choices=("critical", "error", "warning", "info", "debug", "trace"))
    _tools = shared.Tools


class ChatConfig(Settings, kind="chat"):
    """`r1lab chat`: talk to a model directory in the terminal; its reasoning is shown apart from the answer."""

    model: str = setting("runs/demo/grpo/model", "the model directory to talk to", **shared.NONEMPTY)
    adapter: str = shared.ADAPTER
    template: str = setting("auto", "auto: the tokenizer's chat template, else r1zero", **shared.CONVERSATION_TEMPLATES)
    prefill: str = setting("", 'text after the template, e.g. "<think>"')
    system: str = setting("", "a system message opening the conversation")
    _sampling = shared.Sampling
    max_tokens: int = setting(1024, "reply length limit, in tokens", ge=1)
    seed: int = setting(0, "reply i is sampled with seed + i: a piped conversation replays", **shared.SEED_RANGE)
    _tools = shared.Tools
    _inference = shared.Inference
