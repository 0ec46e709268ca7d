"""The run report: PNG training curves and a Markdown summary (tables, example completions) in run_dir/report/.

Plots are drawn from run_dir/metrics.jsonl and run_dir/eval.jsonl, so a report can be rebuilt for any run, finished
or crashed, and control runs can be overlaid.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from r1lab.config import ReportConfig
from r1lab.train.metrics import EVAL_FILE, METRICS_FILE, read_jsonl

REPORT_DIR = "report"
# Reward keys that are statistics of the total rather than components of it.
_REWARD_STATS = {"reward/mean", "reward/std", "reward/min", "reward/max"}
_DIAGNOSTICS = ("accuracy", "zero_variance_groups", "kl", "entropy", "clip_fraction", "loss", "grad_norm",
                "tokens_per_s", "step_time_s", "lr")
_TITLES = {"reward": "Reward", "heldout_accuracy": "Held-out accuracy", "completion_length": "Completion length",
           "tool_use": "Tool use", "diagnostics": "Training diagnostics"}


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if _finite(r.get(key)) and _finite(r.get("step"))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def _line(ax: Any, rows: list[dict], key: str, label: str, **style: Any) -> None:
    steps, values = _series(rows, key)
    if len(values) >= 20:  # noisy per-step metrics: raw values faintly, under a moving average
        (raw,) = ax.plot(steps, values, alpha=0.2, linewidth=0.8, **style)
        ax.plot(steps, _smooth(values, max(2, len(values) // 20)), label=label, color=raw.get_color(), **style)
    elif values:
        ax.plot(steps, values, label=label, marker=".", **style)


def _points(ax: Any, evals: list[dict], split: str, key: str, label: str, **style: Any) -> None:
    steps, values = _series([r for r in evals if r.get("split") == split], key)
    if values:
        ax.plot(steps, values, marker="o", label=label, **style)


def _figure(title: str, ylabel: str, percent: bool = False) -> tuple[Any, Any]:
    # Figure() without pyplot: no global backend switch, safe in notebooks and headless machines alike.
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if percent:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    return fig, ax


def _save(fig: Any, ax: Any, path: Path) -> Path | None:
    """The plot saved to path, or None when it has no lines."""
    if not ax.lines:
        return None
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def _plot_reward(rows: list[dict], extra: dict[str, list[dict]], out: Path) -> Path | None:
    keys = ["reward/mean"] + sorted({k for r in rows for k in r if k.startswith("reward/")} - _REWARD_STATS)
    fig, ax = _figure("Reward", "reward")
    for key in keys:
        _line(ax, rows, key, "total (mean)" if key == "reward/mean" else key.split("/", 1)[1])
    for name, other in extra.items():
        _line(ax, other, "reward/mean", f"{name}: total", linestyle="--")
    return _save(fig, ax, out / "reward.png")


def _plot_heldout(evals: list[dict], extra: dict[str, list[dict]], split: str, out: Path) -> Path | None:
    fig, ax = _figure(f"Accuracy on '{split}'", "accuracy", percent=True)
    cons = sorted({k for r in evals if r.get("split") == split for k in r if k.startswith("cons@")})
    for key in ["pass@1", *cons]:
        _points(ax, evals, split, key, key)
    for name, other in extra.items():
        _points(ax, other, split, "pass@1", f"{name}: pass@1", linestyle="--")
    return _save(fig, ax, out / "heldout_accuracy.png")


def _plot_tool_use(rows: list[dict], evals: list[dict], extra_rows: dict[str, list[dict]],
                   extra_evals: dict[str, list[dict]], split: str, out: Path) -> Path | None:
    """Tool calls per training rollout and per held-out sample (counts: a rollout may call several times)."""
    fig, ax = _figure("Tool use", "calls per completion")
    series = {"": (rows, evals), **{f"{name}: ": (extra_rows[name], extra_evals.get(name, [])) for name in extra_rows}}
    for prefix, (metrics, heldout) in series.items():
        style = {"linestyle": "--"} if prefix else {}
        _line(ax, metrics, "tools/calls_per_rollout", f"{prefix}calls per rollout (training)", **style)
        _points(ax, heldout, split, "tool_calls", f"{prefix}calls per held-out sample", **style)
    return _save(fig, ax, out / "tool_use.png")


def _plot_length(rows: list[dict], out: Path) -> Path | None:
    fig, ax = _figure("Completion length", "tokens")
    _line(ax, rows, "completion_len/mean", "mean", linestyle="-")
    _line(ax, rows, "completion_len/max", "max", linestyle=":")
    return _save(fig, ax, out / "completion_length.png")


def _plot_diagnostics(rows: list[dict], out: Path) -> Path | None:
    """Small multiples of the signals that tell whether RL is learning when the loss sits near zero."""
    from matplotlib.figure import Figure

    keys = [k for k in _DIAGNOSTICS if _series(rows, k)[1]]
    if not keys:
        return None
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(4 * ncols, 2.6 * nrows), layout="constrained")
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        _line(ax, rows, key, key)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    fig.savefig(out / "diagnostics.png", dpi=100)
    return out / "diagnostics.png"


def plot_curves(run_dir: Path, extra_runs: dict[str, Path] | None = None, split: str = "heldout") -> dict[str, Path]:
    """Draw the run's PNG curves whose metrics are present into run_dir/report/ (control runs in `extra_runs`
    dashed); returns name -> path."""
    run_dir = Path(run_dir)
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    rows, evals = read_jsonl(run_dir / METRICS_FILE), read_jsonl(run_dir / EVAL_FILE)
    extra = extra_runs or {}
    extra_rows = {name: read_jsonl(Path(d) / METRICS_FILE) for name, d in extra.items()}
    extra_evals = {name: read_jsonl(Path(d) / EVAL_FILE) for name, d in extra.items()}
    plots = {
        "reward": _plot_reward(rows, extra_rows, out),
        "heldout_accuracy": _plot_heldout(evals, extra_evals, split, out),
        "tool_use": _plot_tool_use(rows, evals, extra_rows, extra_evals, split, out),
        "completion_length": _plot_length(rows, out),
        "diagnostics": _plot_diagnostics(rows, out),
    }
    return {name: path for name, path in plots.items() if path is not None}


def format_value(key: str, value: Any) -> str:
    """A table cell: rates and accuracies as %, counts as integers, other numbers to a sensible precision."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _md_escape(str(value))
    name = key.lower()
    if name.startswith(("pass@", "cons@")) or name.endswith(("rate", "accuracy", "fraction", "consistency")) \
            or name == "acc":
        return f"{100 * value:.1f}%"
    if isinstance(value, int):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: dict[str, dict]) -> str:
    """Markdown table with one column per name and one row per metric key (union, first-seen order)."""
    keys: list[str] = []
    for metrics in columns.values():
        keys += [k for k in metrics if k not in keys and k != "records"]
    lines = [
        "| metric | " + " | ".join(_md_escape(n) for n in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for key in keys:
        cells = [format_value(key, m.get(key)) for m in columns.values()]
        lines.append(f"| {_md_escape(key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _code_block(text: str) -> str:
    # The fence must be longer than any backtick run inside, or a completion writing ``` would end the block.
    fence = "`" * max(3, 1 + max(map(len, re.findall("`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}"


def _example_md(i: int, ex: dict) -> str:
    mark = {True: "correct", False: "wrong"}.get(ex.get("correct"), "unscored")
    head = f"**Example {i}** ({mark}; answer `{ex.get('answer')}`, reference `{ex.get('reference')}`)"
    return "\n\n".join([head, "Prompt:", _code_block(str(ex.get("prompt", ""))),
                        "Completion:", _code_block(str(ex.get("completion", "")))])  # fmt: skip


def _examples_md(examples: dict[str, list[dict]], per_side: int) -> str:
    parts = ["## Example completions"]
    for side, records in examples.items():
        parts.append(f"### {side[:1].upper() + side[1:]}")
        parts += [_example_md(i + 1, ex) for i, ex in enumerate(records[:per_side])] or ["(none)"]
    return "\n\n".join(parts)


def _training_summary(rows: list[dict]) -> str:
    if not rows:
        return "No training metrics were logged (metrics.jsonl missing or empty)."
    steps, rewards = _series(rows, "reward/mean")
    text = f"{len(rows)} steps logged, last step {rows[-1].get('step')}."
    if rewards:
        head, tail = rewards[:10], rewards[-10:]
        text += f" Mean total reward: first 10 steps {sum(head) / len(head):.3f}, last 10 {sum(tail) / len(tail):.3f}."
    return text


def write_report(run_dir: Path, *, title: str, tables: dict[str, dict], examples: dict[str, list[dict]] | None = None,
                 notes: list[str] | None = None, compare_runs: dict[str, Path] | None = None,
                 examples_per_side: int = 3) -> Path:
    """Write run_dir/report/report.md (plots, tables, examples, notes) and return its path."""
    run_dir = Path(run_dir)
    plots = plot_curves(run_dir, compare_runs)
    parts = [f"# {title}", _training_summary(read_jsonl(run_dir / METRICS_FILE))]
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes))
    if compare_runs:
        names = ", ".join(compare_runs)
        parts.append(f"Dashed lines: runs compared with this one ({names}), from the same base model.")
    for name, columns in tables.items():
        parts += [f"## {name}", markdown_table(columns)]
    if plots:
        parts.append("## Training curves")
        parts += [f"![{_TITLES[name]}]({path.name})" for name, path in plots.items()]
    if examples:
        parts.append(_examples_md(examples, examples_per_side))
    path = run_dir / REPORT_DIR / "report.md"
    path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return path


def eval_records(run: Path, which: str) -> tuple[dict, list[dict]]:
    """The first or last held-out evaluation of a GRPO run: its figures and its per-problem records."""
    files = sorted((Path(run) / "eval").glob("step_*.json"))
    data = json.loads(files[0 if which == "first" else -1].read_text())["heldout"]
    return data, data.pop("records", [])


def report_run(cfg: ReportConfig) -> Path:
    """`r1lab report RUN_DIR`: the demo's report for any grpo, sft or pretrain run, finished or not."""
    run = Path(cfg.run)
    if not (run / METRICS_FILE).exists():
        raise ValueError(f"{run}: no {METRICS_FILE}, so not the directory of an r1lab grpo, sft or pretrain run")
    tables, examples, notes = {}, {}, []
    if list((run / "eval").glob("step_*.json")):  # GRPO: held-out evaluations with every completion
        (first, first_records), (last, last_records) = eval_records(run, "first"), eval_records(run, "last")
        tables["Held-out evaluation, first and last"] = {"first": first, "last": last}
        examples = {"first": example_completions(first_records), "last": example_completions(last_records)}
        notes.append(f"Held-out pass@1 {first['pass@1']:.1%} -> {last['pass@1']:.1%} "
                     f"({100 * (last['pass@1'] - first['pass@1']):+.1f} points).")
    heldout = [r for r in read_jsonl(run / EVAL_FILE) if "loss" in r]
    if heldout:  # SFT: the held-out loss
        tables["Held-out loss"] = {f"step {r['step']}": {"loss": r["loss"]} for r in (heldout[0], heldout[-1])}
    return write_report(run, title=cfg.title or f"r1lab run {run.resolve().name}", tables=tables, examples=examples,
                        notes=notes)


def example_completions(records: list[dict], n: int = 3) -> list[dict]:
    """The first sample of each of the first n evaluated problems, as the report's examples show them."""
    return [{"prompt": r["prompt"], "reference": r["reference"], **{k: r["samples"][0][k]
             for k in ("completion", "answer", "correct")}} for r in records[:n]]


def write_comparison_report(path: Path, title: str, results: dict[str, Any], extra: dict[str, dict],
                            notes: list[str], examples_of: list[str] = (), examples_per_model: int = 2,
                            curves: tuple[Path, dict[str, Path]] | None = None) -> Path:
    """A Markdown report of several models' EvalResults on one held-out set: a table, notes, the curves of
    curves = (run, {label: other run}) when given, and completions of the models named in examples_of."""
    columns = {label: {**result.to_dict(), **extra.get(label, {})} for label, result in results.items()}
    first = next(iter(results.values()))
    parts = [f"# {title}", "\n".join(f"- {n}" for n in notes),
             f"## Held-out evaluation ({first.n_problems} problems, k={first.k} samples at temperature 0.6, "
             f"top-p 0.95)", markdown_table(columns)]
    path = Path(path)
    if curves:
        run, others = curves
        plots = plot_curves(run, others)
        if plots:
            parts.append(f"## Training curves\n\nSolid: {Path(run).name}; dashed: {', '.join(others)}.")
            parts += [f"![{_TITLES[name]}]({plot.relative_to(path.parent)})" for name, plot in plots.items()]
    examples = {label: example_completions(results[label].records, examples_per_model) for label in examples_of}
    if examples:
        parts.append(_examples_md(examples, examples_per_model))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return path
