"""Score completions produced elsewhere (vLLM, an API, another trainer) with the reward's own scorer:
`r1lab score --task NAME_OR_FILE --completions FILE.jsonl [--answer-format F] --out OUT.json`.

Each row of FILE.jsonl holds `prompt` (a string, or chat messages whose last user message is the question), matched
to a task problem, and `completion` (a string, or assistant messages), scored as GRPO rewards it. A prompt ending with
`<think>`, or a completion closing `</think>` without opening it (R1-Distill and QwQ templates open it in the prompt),
is scored as `<think>` + completion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from r1lab.config import ScoreConfig
from r1lab.model.templates import THINK_CLOSE, THINK_OPEN, starts_in_think
from r1lab.rewards.answers import choose_answer_format
from r1lab.rewards.rules import score_completions
from r1lab.rewards.tasks import DatasetTask, Problem, Task, get_task
from r1lab.rewards.tasks.dataset import _jsonl_rows, raise_row_errors
from r1lab.train.task_settings import check_settings, start_sandbox, task_solutions


@dataclass
class Row:
    line: int
    problem: Problem
    completion: str
    think_in_prompt: bool

    @property
    def response(self) -> str:
        """What the scorer reads: the completion, behind the `<think>` its prompt opened."""
        return (THINK_OPEN if self.think_in_prompt else "") + self.completion


def problem_lookup(task: Task, name: str) -> Callable[[str], Problem | None]:
    """prompt -> the task's problem with that question, or None."""
    if isinstance(task, DatasetTask):
        by_prompt: dict[str, Problem] = {}
        for problem in task.rows + (task.eval_rows or []):
            by_prompt.setdefault(problem.prompt.strip(), problem)
        longest_first = sorted(by_prompt, key=len, reverse=True)

        def lookup(prompt: str) -> Problem | None:
            # else the longest question inside a rendered prompt: "What is 1 + 10?" is not "What is 1 + 1"
            found = by_prompt.get(prompt.strip())
            return found or next((by_prompt[q] for q in longest_first if q in prompt), None)

        return lookup
    if hasattr(task, "problem_for"):
        return task.problem_for
    raise ValueError(f"task {name!r} generates problems that a prompt does not identify (their tests are drawn, not "
                     f"written in the prompt): score against a file of its problems, --task-options '{{path: FILE}}'")


def _message_text(value: Any, role: str) -> str | None:
    """A string; of chat messages, the last user message's content or the assistant contents joined; else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
        return None
    picked = [m["content"] for m in value if m.get("role") == role]
    if not picked:
        return None
    return picked[-1] if role == "user" else "".join(picked)


def _row(number: int, obj: Any, lookup: Callable[[str], Problem | None],
         task_name: str) -> tuple[Row | None, str | None]:
    if not isinstance(obj, dict):
        return None, f"row is not a JSON object (got {type(obj).__name__})"
    for name in ("prompt", "completion"):
        if name not in obj:
            return None, f"field {name!r} is missing"
    prompt, completion = _message_text(obj["prompt"], "user"), _message_text(obj["completion"], "assistant")
    if prompt is None:
        return None, "field 'prompt' must be a string or chat messages with a user message"
    if completion is None:
        return None, "field 'completion' must be a string or assistant messages"
    opened = isinstance(obj["prompt"], str) and starts_in_think(prompt)
    question = prompt.rstrip()[: -len(THINK_OPEN)] if opened else prompt
    problem = lookup(question)
    if problem is None:
        return None, f"prompt {question.strip()[:60]!r} matches no problem of task {task_name!r}"
    head = completion.split(THINK_CLOSE, 1)[0]
    opened = opened or (THINK_CLOSE in completion and THINK_OPEN not in head)
    return Row(number, problem, completion, opened), None


def read_rows(path: Path, task: Task, task_name: str) -> list[Row]:
    """Every row of the completions file, matched to its problem; a DatasetError naming each bad row's line."""
    if not path.is_file():
        raise ValueError(f"completions: {path}: file not found")
    lookup = problem_lookup(task, task_name)
    rows, errors = [], []
    for number, obj, error in _jsonl_rows(path):
        if error is None:
            row, error = _row(number, obj, lookup, task_name)
        if error is None:
            rows.append(row)
        else:
            errors.append(f"{path}:{number}: {error}")
    if not rows and not errors:
        errors.append(f"{path}: the file has no rows")
    raise_row_errors(path, errors)
    return rows


def score_rows(task: Task, rows: list[Row], answer_format: str, timeout_s: float) -> dict:
    """The figures and per-row results of score_completions over the rows."""
    result = score_completions(task, [r.problem for r in rows], [r.response for r in rows], timeout_s=timeout_s,
                               answer_format=answer_format)
    accuracy, fmt = result.components["accuracy"], result.components["format"]
    n = len(rows)
    per_row = [{"line": r.line, "prompt": r.problem.prompt, "reference": r.problem.answer, "answer": result.answers[i],
                "accuracy": accuracy[i], "correct": result.correct[i], "format": fmt[i], "reward": result.total[i],
                "think_in_prompt": r.think_in_prompt} for i, r in enumerate(rows)]
    return {"rows": n, "accuracy": sum(accuracy) / n, "correct_rate": sum(result.correct) / n,
            "format_rate": sum(f >= 1.0 for f in fmt) / n, "reward": sum(result.total) / n,
            "scorer_errors": result.errors, "scorer_timeouts": result.timeouts, "results": per_row}


def score(cfg: ScoreConfig, log=print) -> Path:
    """`r1lab score`: OUT.json with accuracy, format_rate and every row's result; returns its path."""
    check_settings(cfg)
    start_sandbox(cfg, log)  # a code task's programs run only inside an OS boundary (or --sandbox none, said)
    task = get_task(cfg.task, **cfg.task_options)
    path = Path(cfg.completions)
    rows = read_rows(path, task, cfg.task)
    answer_format, why = choose_answer_format(cfg.answer_format, solutions=task_solutions(task),
                                              completions=[r.completion for r in rows])
    log(f"score: answer format {answer_format} ({why})")
    figures = score_rows(task, rows, answer_format, cfg.reward_timeout_s)
    out = Path(cfg.out) if cfg.out else path.with_name(path.stem + ".score.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"task": cfg.task, "completions": str(path), "answer_format": answer_format, **figures}
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"score: {figures['rows']} completions: accuracy {figures['accuracy']:.1%}, format {figures['format_rate']:.1%}"
        f", scorer errors {figures['scorer_errors']}, timeouts {figures['scorer_timeouts']}")
    return out
