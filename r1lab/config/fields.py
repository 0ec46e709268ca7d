"""How a setting is declared (setting(), its Spec), shared by commands (Group) and judged (Settings)."""

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from r1lab.config.sources import YES_NO, shown, type_problem
from r1lab.suggest import did_you_mean

# Rules named by a field (rule="task") and installed by r1lab/train/task_settings.py: config imports no rewards
RULES: dict[str, tuple[Callable[[Any], str | None], str]] = {}  # name -> (rule, its allowed values)
CHECKS: list[Callable[[Any], list[str]]] = []  # installed checks across fields, run beside each command's rules()


@dataclass(frozen=True)
class Spec:
    """What a field allows besides its type: bounds (ge/gt/le/lt), choices, or a rule for anything else."""

    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    rule: Callable[[Any], str | None] | str | None = None  # value -> what is wrong with it, or None; or a RULES name
    allowed: str = ""  # the rule's allowed values, for --help

    def allowed_text(self) -> str:
        if self.choices is not None:
            return "one of: " + ", ".join(repr(c) if c == "" else str(c) for c in self.choices)
        if self.rule is not None:
            return RULES.get(self.rule, (None, ""))[1] if isinstance(self.rule, str) else self.allowed
        low = f"[{shown(self.ge)}" if self.ge is not None else f"({shown(self.gt)}" if self.gt is not None else ""
        high = f"{shown(self.le)}]" if self.le is not None else f"{shown(self.lt)})" if self.lt is not None else ""
        if low and high:
            return f"{low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        return (("<= " if high[-1] == "]" else "< ") + high[:-1]) if high else ""

    def problem(self, value) -> str | None:
        """What is wrong with a value of the right type, or None."""
        if self.choices is not None and value not in self.choices:
            return f"{shown(value)} is not {self.allowed_text()}{did_you_mean(value, self.choices)}"
        if isinstance(self.rule, str):
            return RULES[self.rule][0](value) if self.rule in RULES else None
        if self.rule is not None:
            return self.rule(value)
        below = (self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
        above = (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt)
        if not (below or above):
            return None
        bounds = self.allowed_text()
        if bounds[:3] in (">= ", "<= "):
            return f"{shown(value)} is {'below the minimum' if bounds[0] == '>' else 'above the maximum'} {bounds[3:]}"
        return f"{shown(value)} {'must be' if bounds[0] in '<>' else 'is not in'} {bounds}"


def setting(default, help: str, **allowed):
    """A config field: its default, a one-line help text and what it allows (see Spec); the type is the annotation."""
    meta = {"r1lab": Spec(help, **allowed)}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


class Group:
    """Settings several commands share; a command's class body names the group where they go (`_tools = Tools`)."""

    problems = staticmethod(lambda cfg: [])  # cfg -> what is wrong across the group's fields


class Settings:
    """Base of the command configs: a flat dataclass of its settings, each group named in its body replaced there
    by the group's fields. Rules across fields run only once every field is valid on its own."""

    kind, groups = "the", ()

    def __post_init__(self) -> None:
        self._spell_yes_no_choices()

    def _spell_yes_no_choices(self) -> None:
        """A yes/no choice beside others (resume: false, true or auto) also takes a boolean and yes, no, 1, 0."""
        for f in dataclasses.fields(self):
            value, spec = getattr(self, f.name), f.metadata.get("r1lab")
            value = YES_NO.get(value.lower(), value) if isinstance(value, str) else value
            if spec and spec.choices and "true" in spec.choices and isinstance(value, bool):
                object.__setattr__(self, f.name, "true" if value else "false")

    def __init_subclass__(cls, kind: str, **kwargs):
        super().__init_subclass__(**kwargs)
        own, annotations, cls.groups = cls.__dict__.get("__annotations__", {}), {}, ()
        for name, value in list(vars(cls).items()):
            if isinstance(value, type) and issubclass(value, Group):
                delattr(cls, name)
                cls.groups += (value,)
                declared = {n: (tp, vars(value)[n]) for n, tp in value.__dict__["__annotations__"].items()}
            else:
                declared = {name: (own[name], value)} if name in own else {}
            for field_name, (tp, declaration) in declared.items():
                annotations[field_name] = tp
                setattr(cls, field_name, copy.copy(declaration))  # a copy: a dataclass owns the fields it is given
        cls.__annotations__, cls.kind = annotations, kind
        dataclass(cls)

    def find_problems(self) -> list[str]:
        self._spell_yes_no_choices()  # a field set after the config was made (cfg.resume = True)
        hints, problems = typing.get_type_hints(type(self)), []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            problem = type_problem(hints[f.name], value) or f.metadata["r1lab"].problem(value)
            problems += [f"{f.name}: {problem}"] if problem else []
        return problems or [p for check in CHECKS for p in check(self)] + self.rules()

    def rules(self) -> list[str]:
        """Checks across fields: its groups' (a command's own come first)."""
        return [problem for group in self.groups for problem in group.problems(self)]

    def check(self) -> None:
        """Fail at start, with a sentence, on settings that cannot work."""
        if problems := self.find_problems():
            raise ValueError(f"invalid {self.kind} config: " + "; ".join(problems))
