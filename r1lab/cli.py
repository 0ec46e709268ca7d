"""The `r1lab` command: demo, pretrain, grpo, eval, ... Every config field is a flag; --config reads a YAML file.

Every user mistake (a bad setting, a misspelt flag, malformed YAML, an occupied --out) ends as one
`r1lab COMMAND: error: ...` message with exit status 2, before anything is loaded; R1LAB_DEBUG=1 re-raises instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import importlib.metadata
import itertools
import os
import re
import signal
import sys
import threading
import typing
from dataclasses import dataclass
from pathlib import Path

from r1lab import __version__
from r1lab.config import (ChatConfig, DemoConfig, DistillConfig, EvalConfig, GRPOConfig, MergeConfig, PipelineConfig,
                          PretrainConfig, ReportConfig, SampleConfig, ScoreConfig, ServeConfig, SFTConfig, resolve)
from r1lab.config.sources import ALIASES, from_text
from r1lab.suggest import did_you_mean
from r1lab.train import task_settings  # noqa: F401  (installs the rules of --task and --language before any --help)
from r1lab.train.stopping import EXIT_INTERRUPTED, RunStopped, exit_now


@dataclass(frozen=True)
class Command:
    """An `r1lab` command; its runner is imported only when it runs, so that `r1lab --help` stays fast."""

    name: str
    settings: type
    help: str
    runner: str  # "module:function", called with the resolved settings
    result: str | None = None  # what the runner returns, printed as "result: value"
    torchrun: bool = False  # divides its work across the ranks of a torchrun job
    # --out is one run, which a second would mix with (demo, distill and pipeline reuse the stages found done there)
    run_directory: bool = False
    results_file: bool = False  # --out is one file it writes once the work is done: checked before the work starts
    extra: str = ""  # the pip extra its runner needs


COMMANDS = {command.name: command for command in (
    Command("demo", DemoConfig, "R1-Zero in miniature on a CPU: pretrain a tiny base, GRPO it, evaluate, report",
            "r1lab.commands.demo:run_demo"),
    Command("pretrain", PretrainConfig, "pretrain the tiny base model from scratch on the synthetic corpus",
            "r1lab.commands.pretrain:pretrain", "base model", run_directory=True),
    Command("grpo", GRPOConfig, "R1-Zero GRPO on a Hugging Face-format model directory",
            "r1lab.train.grpo:train", "final model", torchrun=True, run_directory=True),
    Command("eval", EvalConfig, "pass@1 over k samples, cons@k and pass@k on held-out problems",
            "r1lab.train.evaluate:run_eval", "results", torchrun=True, results_file=True),
    Command("sft", SFTConfig, "supervised fine-tuning on chat data (JSONL/Parquet rows of messages), loss on "
            "assistant turns", "r1lab.train.supervised:sft", "final model", torchrun=True, run_directory=True),
    Command("sample", SampleConfig, "rejection sampling: keep the verified-correct, readable completions as SFT data",
            "r1lab.commands.sample:sample", "SFT data", torchrun=True, results_file=True),
    Command("score", ScoreConfig, "score completions made elsewhere (vLLM, an API, another trainer) with the "
            "reward's own scorer", "r1lab.commands.score:score", "results", results_file=True),
    Command("distill", DistillConfig, "distil a teacher's verified reasoning into a smaller student (and compare with "
            "GRPO)", "r1lab.commands.distill:run_distill"),
    Command("pipeline", PipelineConfig, "DeepSeek-R1's four stages in CPU size, beside R1-Zero and a distilled student",
            "r1lab.commands.pipeline:run_pipeline"),
    Command("serve", ServeConfig, "OpenAI-compatible API with reasoning_content, and a chat page at /",
            "r1lab.serve.app:serve", extra="serve"),
    Command("chat", ChatConfig, "chat with a model in the terminal, reasoning shown apart from the answer",
            "r1lab.serve.chat:run_chat"),
    Command("merge", MergeConfig, "merge a LoRA adapter (PEFT format) into its base: a plain Hugging Face model "
            "directory", "r1lab.commands.merge:merge", "merged model", run_directory=True),
    Command("report", ReportConfig, "write RUN/report/report.md for a grpo, sft or pretrain run: curves, tables, "
            "completions", "r1lab.commands.report:report_run", "report"),
)}
TORCHRUN_COMMANDS = tuple(name for name, command in COMMANDS.items() if command.torchrun)


class Parser(argparse.ArgumentParser):
    """argparse, suggesting the flag or command that a misspelt one was probably meant to be."""

    def parse_args(self, args=None, namespace=None):
        known, extras = self.parse_known_args(args, namespace)
        if extras:  # the subcommand's parser passes unknown flags up to here; it knows the flags to suggest
            parser = getattr(self, "commands", {}).get(getattr(known, "command", None), self)
            parser.error(unrecognized(extras, parser))
        return known

    def error(self, message: str):
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            message += did_you_mean(choice[1], re.findall(r"'([^']*)'", choice[2]))
        super().error(message)


def unrecognized(extras: list[str], parser: argparse.ArgumentParser) -> str:
    flags = [s for action in parser._actions for s in action.option_strings]
    hints = [did_you_mean(a.split("=")[0], flags, quote="", aliases=ALIASES).strip()
             for a in extras if a.startswith("--")]
    return f"unrecognized arguments: {' '.join(extras)}" + "".join(f" {h}" for h in hints if h)


def version() -> str:
    try:
        return importlib.metadata.version("r1lab")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return __version__


def help_line(spec, tp: type, default) -> str:
    """'description [allowed values] (default: ...)' for --help, from the field's declaration."""
    allowed = (spec.allowed_text() if spec else "") or {bool: "true/false", dict: "a YAML mapping"}.get(tp, "")
    if allowed and not allowed.startswith("one of"):
        allowed = "allowed: " + allowed
    shown = str(default).lower() if isinstance(default, bool) else repr(default)
    text = (spec.help if spec else "") + f" ({allowed + '; ' if allowed else ''}default: {shown})"
    return text.strip().replace("%", "%%")  # argparse %-formats help strings


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """A flag per field of a command's settings, defaulting to None so that only the flags given override the YAML."""
    parser.add_argument("--config", help="YAML file with any of the fields below")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        spec = f.metadata.get("r1lab")
        yes_no = hints[f.name] is bool or (spec is not None and spec.choices and "true" in spec.choices)
        extra = {"nargs": "?", "const": True} if yes_no else {}  # `--resume` alone means true
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=from_text(hints[f.name]),
                            default=None, metavar=hints[f.name].__name__.upper(),
                            help=help_line(spec, hints[f.name], default), **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="r1lab", description="Train reasoning models the DeepSeek-R1 way. "
                                              "`r1lab COMMAND --help` lists a command's settings.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = {}
    for name, command in COMMANDS.items():
        flags = parser.commands[name] = sub.add_parser(  # a short usage line: errors stay readable
            name, help=command.help, description=command.help,
            usage="%(prog)s [-h] [--config FILE] [--FIELD VALUE ...]")
        add_flags(flags, command.settings)
        if name == "report":  # `r1lab report RUN_DIR`, the run directory as the one positional argument
            flags.add_argument("run_dir", nargs="?", help="the run directory (same as --run)")
        if command.run_directory:
            flags.add_argument("--overwrite", action="store_true",
                               help="start afresh although --out holds files: they are moved aside to OUT.old-N "
                                    "first (nothing is deleted)")
    return parser


def check_out(cfg, overwrite: bool) -> Path | None:
    """Refuses a run directory that already holds files unless the run resumes there or --overwrite; returns the
    directory to move aside for --overwrite, if any."""
    out, resume = Path(cfg.out), getattr(cfg, "resume", "false") != "false"
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts afresh: give one of them")
    check_out_is_no_file(out)
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not held or resume:
        return None
    read = [f"{name} {value}" for name in ("model", "adapter")
            if (value := getattr(cfg, name, "")) and Path(value).resolve().is_relative_to(out.resolve())]
    if read:  # writing there (or moving it aside) would overwrite or hide what the command reads
        raise ValueError(f"out: {out} holds the {' and '.join(read)} that this command reads; choose another --out")
    if overwrite:
        if Path.cwd().resolve().is_relative_to(out.resolve()):
            raise ValueError(f"out: {out} holds the current directory, so --overwrite cannot move it aside")
        return out
    shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    how = "continue that run with --resume, " if hasattr(cfg, "resume") else ""
    raise ValueError(f"out: {out} already holds files ({shown}); {how}start afresh with --overwrite (they are moved "
                     f"aside to {out}.old-N, nothing is deleted), or choose another --out")


def check_out_is_no_file(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} is a file, not a run directory")


def check_results_file(cfg) -> None:
    """Refuses a results file --out that is a directory or would write over what the command reads."""
    if not cfg.out:  # the default results file, beside the run or the completions
        return
    out = Path(cfg.out)
    if out.is_dir():
        raise ValueError(f"out: {out} is a directory; --out names the file to write (e.g. {out / 'results.json'})")
    for name in ("model", "adapter", "task", "completions"):
        read = Path(value) if (value := getattr(cfg, name, "")) else None
        if read and read.exists() and out.resolve().is_relative_to(read.resolve()):
            raise ValueError(f"out: {out} would write over the {name} {value} that this command reads; "
                             f"choose another --out")


def move_aside(out: Path) -> Path:
    """OUT -> OUT.old-N, the first N free."""
    out = out.resolve()
    n = next(n for n in itertools.count(1) if not out.with_name(f"{out.name}.old-{n}").exists())
    return out.rename(out.with_name(f"{out.name}.old-{n}"))


def dispatch(name: str, cfg) -> None:
    command = COMMANDS[name]
    if rank_and_size()[1] > 1 and not command.torchrun:
        raise ValueError(f"r1lab {name} runs in one process, not under torchrun; torchrun runs "
                         f"{', '.join(TORCHRUN_COMMANDS)} (distill's and pipeline's stages are these commands)")
    module_name, function = command.runner.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        if not command.extra:
            raise
        raise ValueError(f"{err}; r1lab {name} needs its extra: pip install 'r1lab[{command.extra}]'") from None
    value = getattr(module, function)(cfg)
    if command.result and rank_and_size()[0] == 0:  # under torchrun, rank 0 alone says where the result is
        print(f"{command.result}: {value}")


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threading.excepthook = _thread_excepthook
    args = build_parser().parse_args(argv)
    if getattr(args, "run_dir", None):
        args.run = args.run or args.run_dir
    try:
        cfg = resolve(COMMANDS[args.command].settings, args)
        if argv is None:  # the program itself, not a caller in Python: its malloc can still be chosen
            from r1lab.cpu.process import relaunch_for_large_cpu_model  # imports torch: not for --help

            relaunch_for_large_cpu_model(args.command, getattr(cfg, "model", None), getattr(cfg, "device", "cpu"))
        if COMMANDS[args.command].run_directory and (old := check_out(cfg, args.overwrite)):
            print(f"r1lab {args.command}: --overwrite: moved {old} aside to {move_aside(old)}", file=sys.stderr)
        if COMMANDS[args.command].results_file:
            check_results_file(cfg)
        elif hasattr(cfg, "out"):  # demo, distill, pipeline: their stages' directories would fail with a traceback
            check_out_is_no_file(Path(cfg.out))
        dispatch(args.command, cfg)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("R1LAB_DEBUG"):
            raise
        print(f"r1lab {args.command}: {rank_label()}error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # a full or read-only disk outside a checkpoint's save (which says more: DiskFullError)
        if err.errno not in UNWRITABLE or os.environ.get("R1LAB_DEBUG"):
            raise
        where = err.filename or getattr(args, "out", None) or "the output"
        print(f"r1lab {args.command}: {rank_label()}error: cannot write {where}: {err.strerror}; free some space (or "
              f"make it writable) and run the command again (grpo and sft: --resume true goes on from the last "
              f"checkpoint)", file=sys.stderr)
        sys.exit(2)
    except RunStopped as stopped:  # the first Ctrl-C or SIGTERM: the step finished and was checkpointed
        signal.signal(signal.SIGINT, exit_now)  # another Ctrl-C while the process ends: no traceback
        if rank_and_size()[0] == 0:
            print(f"r1lab {args.command}: {stopped}", file=sys.stderr)
        sys.exit(stopped.status)
    except KeyboardInterrupt:  # a Ctrl-C outside a training loop
        signal.signal(signal.SIGINT, exit_now)
        print(f"\nr1lab {args.command}: {rank_label()}interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:  # under torchrun: one line naming the rank before the traceback, and the job ends
        if rank_and_size()[1] == 1:
            raise
        print(f"r1lab {args.command}: {rank_label()}{type(err).__name__}: {explain(err)}", file=sys.stderr)
        raise
    finally:
        if "r1lab.train.distributed" in sys.modules:  # imported by the commands that run under torchrun
            sys.modules["r1lab.train.distributed"].leave_world()


UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # OSErrors said in one line: what to do is plain


def _thread_excepthook(args) -> None:
    """A writer thread (TensorBoard's) that meets a full disk dies quietly: the main thread meets it too and says so."""
    if not (isinstance(args.exc_value, OSError) and args.exc_value.errno in UNWRITABLE):
        threading.__excepthook__(args)


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the job's size, from torchrun's environment (not r1lab.train.distributed: torch)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank_label() -> str:
    rank, size = rank_and_size()
    return f"rank {rank} of {size}: " if size > 1 else ""


def explain(err: BaseException) -> str:
    """The exception's first line; for a collective that timed out, what that means under torchrun."""
    text = (str(err).strip().splitlines() or [""])[0]
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (f"{text}: another rank stopped answering for dist_timeout_s (it hung or died); the job ends "
                f"here, and torchrun's summary names the ranks")
    return text


if __name__ == "__main__":
    main()
