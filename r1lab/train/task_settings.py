"""The settings only r1lab.rewards can judge, whose rules this module installs into r1lab.config when imported
(r1lab.config does not import r1lab.rewards). Users' reward functions load only in check_settings: that runs their code.
"""

import dataclasses
import importlib.util
import inspect
import os
from functools import lru_cache

from r1lab.config.fields import CHECKS, RULES
from r1lab.config.sources import type_problem
from r1lab.model.loading import pick_device
from r1lab.model.templates import THINK_CLOSE, resolve_template, response_prefix, template_opens_think
from r1lab.rewards import tasks
from r1lab.rewards.environments.openenv_env import OpenEnvTask, openenv_refusal
from r1lab.rewards.answers import choose_answer_format
from r1lab.rewards.environments import is_environment_spec
from r1lab.rewards.language import TARGETS
from r1lab.rewards.learned import LearnedRewards
from r1lab.rewards.llm_judge import JudgeSettings, load_template
from r1lab.rewards.reward_model import RewardModelSettings, directory_problem, transformers_problem
from r1lab.rewards.sandbox.runner import sandbox_refusal, sandbox_summary, use_sandbox
from r1lab.rewards.tasks import DATA_SUFFIXES, TASKS, get_task, is_data_source
from r1lab.rewards.user_functions import load_reward_function
from r1lab.suggest import did_you_mean
from r1lab.train.trackers import REPORTERS, report_to_problem

RULES["report_to"] = (report_to_problem, f"a comma-separated list of {', '.join(REPORTERS)}, or none")
TASKS_ALLOWED = (f"a built-in task ({', '.join(sorted(TASKS))}), a data file ending in {', '.join(DATA_SUFFIXES)}, "
                 "a datasets directory (save_to_disk's or a dataset repository's), a hub dataset name (owner/name) or "
                 "an environment (verifiers:ENV, openenv:ENV, agent:MODULE:FUNCTION)")
LANGUAGES_ALLOWED = "one of: " + ", ".join(TARGETS)


def task_problem(value: str) -> str | None:
    if value.startswith("openenv:") and (refusal := openenv_refusal()):
        return refusal
    if value in TASKS or is_data_source(value) or is_environment_spec(value):
        return None
    return f"{value!r} is not {TASKS_ALLOWED}{did_you_mean(value, TASKS)}"


def language_problem(value: str) -> str | None:
    if value.lower() in TARGETS:  # r1lab/rewards/language.py reads the name case-insensitively
        return None
    return f"{value!r} is not one of: {', '.join(TARGETS)}{did_you_mean(value.lower(), TARGETS)}"


def task_option_problems(cfg) -> list[str]:
    """Options a built-in task or a data file does not take, or of the wrong type (found before the command runs)."""
    options = getattr(cfg, "task_options", None)
    parameters = None if options is None else _task_parameters(cfg.task, options)
    if parameters is None:
        return []
    problems = []
    for key, value in options.items():
        if key not in parameters:
            problems.append(f"task_options: unknown option {key!r} for task {cfg.task!r}"
                            f"{did_you_mean(key, parameters)}; it takes {', '.join(parameters) or 'none'}")
            continue
        tp = {"int": int, "float": float, "str": str, "str | None": str}.get(str(parameters[key].annotation))
        optional = value is None and str(parameters[key].annotation).endswith("| None")
        if tp and not optional and (problem := type_problem(tp, value)):
            problems.append(f"task_options: {key}: {problem}")
    return problems or _task_constructor_problems(cfg.task, options)


def _task_constructor_problems(task: str, options: dict) -> list[str]:
    """Build a generator task (cheap) so that its own range checks run now; a data file is not read here."""
    if task not in TASKS or "path" in options:
        return []
    try:
        get_task(task, **options)
    except ValueError as err:
        return [f"task_options: {err}"]
    return []


def _task_parameters(task: str, options: dict) -> dict[str, inspect.Parameter] | None:
    """The task constructor's keyword parameters by name; None where this cannot tell."""
    if task.startswith("openenv:"):
        target = OpenEnvTask
    elif is_data_source(task):
        target = tasks.DatasetTask
    elif task == "arithmetic":  # arithmetic_task(**options) passes them on to ArithmeticTask
        target = tasks.ArithmeticTask
    elif task == "code":  # code_task(path=None, **options): a file of problems or the generator
        target = tasks.CodeFileTask if "path" in options else tasks.CodeTask
    elif task in TASKS:
        target = TASKS[task]
    else:
        return None
    parameters = dict(inspect.signature(target).parameters)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    if task == "code":
        parameters["path"] = inspect.Parameter("path", inspect.Parameter.KEYWORD_ONLY)
    elif target in (tasks.DatasetTask, OpenEnvTask):
        parameters.pop(next(iter(parameters)))  # the data file or the environment is the task itself
    return parameters


def environment_problems(cfg) -> list[str]:
    """An environment answers the policy between turns itself: r1lab's tool calls would interleave a second protocol."""
    if getattr(cfg, "tools", "") and is_environment_spec(getattr(cfg, "task", "")):
        return [f"task {cfg.task} is an environment: its turns are the environment's, give no --tools"]
    return []


def sandbox_problems(cfg) -> list[str]:
    """A code task or tool calls run model-written code: only inside an OS boundary, or where the user opted out."""
    if not hasattr(cfg, "sandbox") or not (getattr(cfg, "tools", "") or getattr(cfg, "task", "") == "code"):
        return []
    refusal = sandbox_refusal(cfg.sandbox)
    return [refusal] if refusal else []


def start_sandbox(cfg, log) -> None:
    """Set the process's sandbox choice and say what model-written code runs in (eval, sample, score)."""
    use_sandbox(cfg.sandbox)
    if getattr(cfg, "tools", "") or cfg.task == "code":
        log(f"{cfg.kind}: model-written code runs {sandbox_summary(cfg.sandbox)}")


RULES.update({"task": (task_problem, TASKS_ALLOWED), "language": (language_problem, LANGUAGES_ALLOWED),
              "language or empty": (lambda value: None if value == "" else language_problem(value),
                                    LANGUAGES_ALLOWED + ", ''")})
CHECKS.extend([task_option_problems, sandbox_problems, environment_problems])


def check_settings(cfg) -> None:
    """cfg.check(), then that the user's reward functions load and the judge or reward model can start."""
    cfg.check()
    problems = []
    for spec in getattr(cfg, "reward_functions", {}):
        try:
            load_reward_function(spec)
        except ValueError as err:
            problems.append(str(err))
    problems += model_reward_problems(cfg)
    if problems:
        raise ValueError(f"invalid {cfg.kind} config: " + "; ".join(problems))


@lru_cache(maxsize=8)  # GRPO settles the format every step, on the same task
def task_solutions(task) -> tuple[str, ...]:
    """A data file's reference solutions (for the auto answer format); none for a generator task."""
    if not isinstance(task, tasks.DatasetTask):
        return ()
    return tuple(p.meta.get("solution", "") for p in task.rows)


def settle_answer_format(cfg, tokenizer, task) -> tuple[str, str]:
    """(format, why): cfg.answer_format, or for auto what the chat template or the data implies."""
    if cfg.answer_format != "auto":
        return choose_answer_format(cfg.answer_format)
    template = resolve_template(tokenizer, cfg.template)
    return choose_answer_format("auto", opens_think=template_opens_think(tokenizer, cfg.template),
                                closes_think=template == "chat" and THINK_CLOSE in tokenizer.chat_template,
                                template=template, solutions=task_solutions(task))


def announce_answer_format(cfg, tokenizer, task, log=print) -> str:
    """The answer format a command scores in, said at its start (the settings keep "auto" as given)."""
    chosen, why = settle_answer_format(cfg, tokenizer, task)
    log(f"{cfg.kind.lower()}: answer format {chosen} ({why})")
    return chosen


def with_answer_format(cfg, tokenizer, task, log=print):
    """cfg with its answer format settled and said (for the server)."""
    return dataclasses.replace(cfg, answer_format=announce_answer_format(cfg, tokenizer, task, log))


def scoring_keywords(cfg, tokenizer, task) -> dict:
    """score_completions' answer_format and response_prefix (what the prompts already write) for the settings."""
    return {"answer_format": settle_answer_format(cfg, tokenizer, task)[0],
            "response_prefix": response_prefix(tokenizer, cfg.template, cfg.prefill)}


def model_reward_problems(cfg) -> list[str]:
    """What keeps the judge or the reward model from starting, found before any weights load."""
    problems = []
    if getattr(cfg, "judge_url", ""):
        if importlib.util.find_spec("openai") is None:
            problems.append("judge_url needs the openai client, which is not installed: pip install 'r1lab[judge]'")
        if cfg.judge_api_key_env and not os.environ.get(cfg.judge_api_key_env):
            problems.append(f"judge_api_key_env: the environment variable {cfg.judge_api_key_env} is not set")
        try:
            load_template(cfg.judge_template)
        except ValueError as err:
            problems.append(str(err))
    if getattr(cfg, "reward_model", ""):
        problem = transformers_problem() or directory_problem(cfg.reward_model)
        if problem:
            problems.append(f"reward_model {problem}")
    return problems


def model_rewards(cfg) -> LearnedRewards:
    judge = rm = None
    if cfg.judge_url:
        key = os.environ[cfg.judge_api_key_env] if cfg.judge_api_key_env else "EMPTY"
        judge = JudgeSettings(cfg.judge_url, cfg.judge_model, key, load_template(cfg.judge_template),
                              cfg.judge_concurrency, cfg.judge_timeout_s, cfg.judge_retries, cfg.judge_max_tokens)
    if cfg.reward_model:
        device = str(pick_device(cfg.device))  # under torchrun, "cuda" is this rank's GPU (set by join_world)
        rm = RewardModelSettings(cfg.reward_model, cfg.reward_model_batch_size, cfg.reward_model_normalize, device,
                                 cfg.dtype if device.startswith("cuda") else "float32")
    return LearnedRewards(judge, cfg.judge_weight, rm, cfg.reward_model_weight)
