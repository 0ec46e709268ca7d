"""Task registry: turns a task spec (a generator name or a data file path) into a Task."""

from __future__ import annotations

from typing import Any, Callable

from r1lab.rewards import environments  # the module, not its names: environments imports tasks.base
from r1lab.rewards.tasks.arithmetic import DEMO_OPTIONS, ArithmeticTask
from r1lab.rewards.tasks.base import Problem, Task
from r1lab.rewards.tasks.code import CodeFileTask, CodeTask, code_task
from r1lab.rewards.tasks.countdown import CountdownTask
from r1lab.rewards.tasks.dataset import DatasetError, DatasetTask
from r1lab.rewards.tasks.hf_datasets import is_datasets_source


def arithmetic_task(**options: Any) -> ArithmeticTask:
    """With no options, the demo's task (two 3-digit numbers to add), else ArithmeticTask(**options)."""
    return ArithmeticTask(**(options or DEMO_OPTIONS))


# "code" takes task option `path` for a file of code problems (see r1lab/rewards/tasks/code.py), else generates them.
TASKS: dict[str, Callable[..., Task]] = {"arithmetic": arithmetic_task, "code": code_task, "countdown": CountdownTask}
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def get_task(spec: str, **options: Any) -> Task:
    """A generator task by name, an environment (KIND:NAME), or a DatasetTask for a data file or dataset."""
    if spec in TASKS:
        return TASKS[spec](**options)
    if environments.is_environment_spec(spec):
        return environments.load_environment(spec, **options)
    if is_data_source(spec):
        return DatasetTask(spec, **options)
    raise ValueError(f"unknown task {spec!r}: use one of {', '.join(sorted(TASKS))}, a data file path ending in "
                     f"{', '.join(DATA_SUFFIXES)}, a datasets directory, a hub dataset name (owner/name) or an "
                     "environment (verifiers:ENV)")


def is_data_source(spec: str) -> bool:
    """A data file's path, a `datasets` directory (save_to_disk's or a repository's), or a hub dataset name."""
    return spec.lower().endswith(DATA_SUFFIXES) or is_datasets_source(spec)


__all__ = ["TASKS", "ArithmeticTask", "is_data_source", "CodeFileTask", "CodeTask", "CountdownTask", "DatasetError",
           "DatasetTask", "Problem", "Task", "get_task"]
