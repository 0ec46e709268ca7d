"""Settings from defaults, a YAML file and flags, read into each field's type, checked strictly, put together."""

import argparse
import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from r1lab.suggest import did_you_mean


class YAMLLoader(yaml.SafeLoader):
    """YAML 1.1 with 1e-5 read as a number, not text, and a key given twice an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        keys = [(self.construct_object(key_node, deep=True), key_node.start_mark) for key_node, _ in node.value]
        for i, (key, mark) in enumerate(keys):
            if first := next((m for k, m in keys[:i] if k == key), None):
                raise yaml.constructor.ConstructorError(
                    problem=f"{key!r} is given twice (first on line {first.line + 1})", problem_mark=mark)
        return super().construct_mapping(node, deep)


YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))

# Names other trainers (transformers, TRL) use for these settings: a user coming from them gets pointed here.
ALIASES = {"learning_rate": "lr", "max_steps": "steps", "num_train_epochs": "epochs", "output_dir": "out",
           "model_name_or_path": "model", "per_device_train_batch_size": "batch_size", "warmup": "warmup_steps",
           "num_generations": "samples_per_prompt", "group_size": "samples_per_prompt", "beta": "kl_coef",
           "epsilon": "clip_low", "epsilon_high": "clip_high", "max_completion_length": "max_new_tokens",
           "gradient_clipping": "max_grad_norm", "clip_grad_norm": "max_grad_norm", "bf16": "dtype",
           "torch_dtype": "dtype", "num_iterations": "updates_per_batch"}
YES_NO = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "text", dict: "a mapping {key: value}"}


class Unparsed(typing.NamedTuple):  # flag text not of its field's type: kept, to be reported with every bad field
    text: str
    expected: str


def from_text(tp: type) -> Callable[[str], Any]:
    """Flag text -> the field's type; text that does not convert is kept (Unparsed), to report with every bad field."""
    def convert(text: str):
        try:
            if tp is bool:
                return YES_NO[text.lower()]
            if tp is dict:
                loaded = yaml.load(text, Loader=YAMLLoader)
                return {} if loaded is None else loaded
            return tp(text)
        except (KeyError, ValueError, yaml.YAMLError):
            expected = {bool: "one of true, false, yes, no, 1, 0", dict: "a YAML mapping such as '{key: value}'"}
            return Unparsed(text, expected.get(tp, EXPECTED[tp]))
    return convert


def type_problem(tp: type, value) -> str | None:
    """Strict types: int refuses 2.5 and "3", float takes ints but not text or NaN, bool only booleans."""
    if isinstance(value, Unparsed):
        return f"{value.text!r} is not {value.expected}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: number and isinstance(value, int), float: number,
          str: isinstance(value, str), dict: isinstance(value, dict)}[tp]
    if ok and tp is float and not math.isfinite(value):
        return f"{shown(value)} is not a finite number"
    if ok:
        return None
    if isinstance(value, str) and not isinstance(from_text(tp)(value), Unparsed):  # YAML quotes made it text
        return f"{value!r} is not {EXPECTED[tp]} (it is quoted: write it without quotes)"
    if tp is str and isinstance(value, bool):  # YAML 1.1 reads unquoted yes/no/on/off as booleans
        return f"{shown(value)} is not text (YAML read it as a boolean: put it in quotes)"
    return f"{shown(value)} is not {EXPECTED[tp]}"


def shown(value) -> str:
    """A value as the user wrote it: 0 rather than 0.0, text quoted."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value) if isinstance(value, str) else str(value)


def read_yaml_config(path: str) -> dict:
    """The mapping of a --config file; a missing file, malformed YAML or another shape is one line naming the file."""
    try:
        loaded = yaml.load(Path(path).read_bytes().decode("utf-8"), Loader=YAMLLoader)
    except OSError as err:
        raise ValueError(f"--config {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:  # the message alone names neither the file nor the line
        line, byte = err.object.count(b"\n", 0, err.start) + 1, err.object[err.start]
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte 0x{byte:02x}; save the file as UTF-8)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ValueError(f"{where}: malformed YAML: {getattr(err, 'problem', None) or err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ValueError(f"{path}: must be a mapping of field: value, not {type(loaded).__name__}")
    return loaded or {}


def resolve(cls, args: argparse.Namespace | None = None, **overrides):
    """Defaults, then --config's YAML, flags and keyword overrides; every bad field reported in one ValueError."""
    names, config_path = [f.name for f in dataclasses.fields(cls)], getattr(args, "config", None)
    values = read_yaml_config(config_path) if config_path else {}
    problems = [f"{config_path}: unknown field {str(key)!r}{did_you_mean(str(key), names, aliases=ALIASES)}"
                for key in values if key not in names]
    values = {key: value for key, value in values.items() if key in names}
    values.update({n: getattr(args, n) for n in names if getattr(args, n, None) is not None})
    cfg = cls(**{**values, **overrides})
    problems += cfg.find_problems()
    if problems:
        raise ValueError("invalid settings:\n  " + "\n  ".join(problems))
    hints = typing.get_type_hints(cls)
    return dataclasses.replace(cfg, **{n: float(getattr(cfg, n)) for n in names if hints[n] is float})


def save_config(config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
