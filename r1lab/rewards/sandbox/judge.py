"""The trusted half of the code sandbox: split assert tests into calls and verdicts, and judge returned values.

A test such as `assert candidate(3, 4) == 7` is split here, in the trainer's process, into the call `candidate(3, 4)`
(a name and literal arguments, sent to the sandbox) and the verdict `_r0 == 7`, kept here and evaluated on the plain
data the sandbox sends back: the sandboxed process holds no expected value, so at most it claims return values.
A test is one `assert EXPR` whose calls to the solution (any name but HELPER_NAMES; `candidate` for the entry point)
take literal arguments, around them literals, comparisons (`==` is strict_equal), boolean operators, arithmetic,
indexing and the helpers; anything else raises UnjudgeableTestError when the problem file is loaded.

    check = split_test("assert abs(candidate(2.0) - 4.0) < 1e-6", entry_point="square")
    check.calls  # (("square", (2.0,), ()),)
    check.judge([4.0])  # None: passed; otherwise the reason it failed
"""

from __future__ import annotations

import ast
import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Sequence

MAX_TEST_CHARS = 20_000
MAX_VALUE_CHARS = 1 << 16  # one test's returned values, as sent by the sandbox
MAX_RESULT_ITEMS = 1 << 20  # a sequence product or power the judge refuses to build
_PLACEHOLDER = "_r{}"
_TYPES = {"bool": bool, "dict": dict, "float": float, "frozenset": frozenset, "int": int, "list": list,
          "set": set, "str": str, "tuple": tuple, "bytes": bytes, "complex": complex}
_FUNCTIONS = {"abs": abs, "all": all, "any": any, "isinstance": isinstance, "len": len, "max": max, "min": min,
              "round": round, "sorted": sorted, "sum": sum}
HELPER_NAMES = frozenset(_TYPES) | frozenset(_FUNCTIONS) | {"strict_equal", "math"}
_NODES = (ast.Expression, ast.Constant, ast.Name, ast.Load, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.Compare,
          ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd, ast.Invert, ast.BinOp, ast.Add,
          ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.LShift, ast.RShift, ast.BitAnd,
          ast.BitOr, ast.BitXor, ast.Subscript, ast.Slice, ast.Call, ast.keyword, ast.Attribute, ast.IfExp,
          ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn, ast.Is, ast.IsNot)


class UnjudgeableTestError(ValueError):
    """A test the judge cannot split into literal calls and a verdict."""


@dataclass(frozen=True)
class SplitTest:
    """One assert test: the calls the sandbox makes, and the verdict this process evaluates on their results."""

    source: str
    calls: tuple[tuple[str, tuple, tuple], ...]  # (function name, positional args, ((keyword, value), ...))
    verdict: Any  # a code object over _r0, _r1, ... and the helpers

    def judge(self, results: Sequence[Any]) -> str | None:
        """None when the test passes on these returned values, else why it fails."""
        if len(results) != len(self.calls):
            return "the sandbox returned the wrong number of values"
        names = dict(_SCOPE)
        names.update((_PLACEHOLDER.format(i), value) for i, value in enumerate(results))
        try:
            ok = eval(self.verdict, {"__builtins__": {}}, names)  # noqa: S307: checked nodes over plain data
        except Exception as e:
            return f"{type(e).__name__}: {e}"[:200]
        if ok:
            return None
        returned = ", ".join(repr(v) for v in results)  # plain data: its repr runs none of the candidate's code
        return f"AssertionError: {self.source[:120]} (returned {returned[:80]})" if results else \
            f"AssertionError: {self.source[:120]}"


@lru_cache(maxsize=65536)
def split_test(source: str, entry_point: str | None = None) -> SplitTest:
    """The calls and the verdict of one assert test; UnjudgeableTestError names what the judge cannot accept."""
    if len(source) > MAX_TEST_CHARS:
        raise UnjudgeableTestError(f"is longer than {MAX_TEST_CHARS} characters")
    try:
        module = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise UnjudgeableTestError(f"does not compile ({type(e).__name__}: {e})") from None
    if len(module.body) != 1 or not isinstance(module.body[0], ast.Assert):
        raise UnjudgeableTestError("must be a single assert statement")
    calls: list[tuple[str, tuple, tuple]] = []
    expression = _Splitter(calls, entry_point).visit(module.body[0].test)
    _check_nodes(expression)
    tree = ast.fix_missing_locations(ast.Expression(body=expression))
    return SplitTest(source, tuple(calls), compile(tree, "<test>", "eval"))


class _Splitter(ast.NodeTransformer):
    """Replaces each candidate call by a placeholder name, and each operation that needs a guard by a helper."""

    def __init__(self, calls: list, entry_point: str | None) -> None:
        self.calls, self.entry_point = calls, entry_point

    def visit_Call(self, node: ast.Call) -> ast.AST:
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name is None or (name in HELPER_NAMES and name != self.entry_point):
            return self.generic_visit(node)  # a helper (checked by _check_nodes), or refused there
        if self.entry_point and name == "candidate":
            name = self.entry_point
        args = tuple(_literal(a, name) for a in node.args)
        if any(k.arg is None for k in node.keywords):
            raise UnjudgeableTestError(f"calls {name}() with **keywords; only literal arguments can be sent")
        keywords = tuple((k.arg, _literal(k.value, name)) for k in node.keywords)
        self.calls.append((name, args, keywords))
        return ast.copy_location(ast.Name(_PLACEHOLDER.format(len(self.calls) - 1), ast.Load()), node)

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        """a == b becomes _eq(a, b) (strict_equal); a chain a < b == c becomes the pairs joined by `and`."""
        self.generic_visit(node)
        operands = [node.left, *node.comparators]
        pairs = [self._pair(op, left, right) for op, left, right in zip(node.ops, operands, operands[1:])]
        return pairs[0] if len(pairs) == 1 else ast.BoolOp(ast.And(), pairs)

    @staticmethod
    def _pair(op: ast.cmpop, left: ast.expr, right: ast.expr) -> ast.expr:
        if isinstance(op, (ast.Eq, ast.NotEq)):
            call = ast.Call(ast.Name("_eq", ast.Load()), [left, right], [])
            return call if isinstance(op, ast.Eq) else ast.UnaryOp(ast.Not(), call)
        return ast.Compare(left, [op], [right])

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        """Operations whose result can be far larger than their operands go through a size check."""
        self.generic_visit(node)
        guarded = {ast.Mult: "_mul", ast.Pow: "_pow", ast.LShift: "_lshift", ast.Mod: "_mod"}.get(type(node.op))
        if guarded is None:
            return node
        return ast.Call(ast.Name(guarded, ast.Load()), [node.left, node.right], [])


def _literal(node: ast.expr, name: str) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise UnjudgeableTestError(f"calls {name}() with an argument that is not a literal: "
                                   f"{ast.unparse(node)[:60]!r}") from None


def _check_nodes(expression: ast.expr) -> None:
    allowed_names = HELPER_NAMES | set(_GUARDS) | {"_eq"}
    for node in ast.walk(expression):
        if not isinstance(node, _NODES):
            raise UnjudgeableTestError(f"uses {type(node).__name__}, which the judge does not evaluate; write "
                                       f"`assert candidate(literal args) == expected`")
        if isinstance(node, ast.Name) and node.id not in allowed_names and not node.id.startswith("_r"):
            raise UnjudgeableTestError(f"uses the name {node.id!r}, which is neither a call to the solution nor "
                                       f"a helper")
        if isinstance(node, ast.Attribute) and not (
                node.attr == "isclose" and isinstance(node.value, ast.Name) and node.value.id == "math"):
            raise UnjudgeableTestError(f"uses the attribute .{node.attr}; only math.isclose is available")
        if isinstance(node, ast.Call) and not isinstance(node.func, (ast.Name, ast.Attribute)):
            raise UnjudgeableTestError("calls something other than a named function")


def strict_equal(actual: Any, expected: Any) -> bool:
    """== that also demands the same types, all the way down (floats within 1e-9 relative): what `==` means in a
    test. Sets and dicts are matched pair by pair, never hashed, so that equal floats need not hash alike."""
    kind = type(expected)
    if type(actual) is not kind:
        return False
    if kind is float:
        return actual == expected or abs(actual - expected) <= 1e-9 * max(1.0, abs(expected))
    if kind is list or kind is tuple:
        return len(actual) == len(expected) and all(map(strict_equal, actual, expected))
    if kind is dict:
        return len(actual) == len(expected) and _unordered_same(list(actual.items()), list(expected.items()))
    if kind is set or kind is frozenset:
        return len(actual) == len(expected) and _unordered_same(list(actual), list(expected))
    return kind in (int, bool, str, bytes, type(None), complex) and actual == expected


def _unordered_same(actual: list, expected: list) -> bool:
    for e in expected:
        match = next((i for i, a in enumerate(actual) if strict_equal(a, e)), None)
        if match is None:
            return False
        actual.pop(match)
    return True


def _sized(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 1


def _mul(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) or isinstance(a, float) or isinstance(b, float):
        return a * b
    count = b if isinstance(b, int) else a if isinstance(a, int) else 1
    if _sized(a) * _sized(b) * max(count, 1) > MAX_RESULT_ITEMS:
        raise ValueError("the judge refuses to build so large a product")
    return a * b


def _pow(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and abs(a) > 1 and b * max(a.bit_length(), 1) > 1 << 20:
        raise ValueError("the judge refuses to compute so large a power")
    return a ** b


def _lshift(a: Any, b: Any) -> Any:
    if isinstance(b, int) and b > 1 << 20:
        raise ValueError("the judge refuses to compute so large a shift")
    return a << b


def _mod(a: Any, b: Any) -> Any:
    if isinstance(a, (str, bytes)):
        raise ValueError("the judge does not format strings with %")  # '%*d' could ask for any width
    return a % b


_GUARDS: dict[str, Callable] = {"_mul": _mul, "_pow": _pow, "_lshift": _lshift, "_mod": _mod}
_SCOPE: dict[str, Any] = {**_TYPES, **_FUNCTIONS, **_GUARDS, "strict_equal": strict_equal, "_eq": strict_equal,
                          "math": type("math", (), {"isclose": math.isclose})}


def parse_values(text: str) -> list:
    """The list of returned values the sandbox encoded (child.make_encoder); ValueError, and no other exception, if
    it is not plain data in that syntax. Nothing here runs code: the text is parsed, then only walked."""
    if len(text) > MAX_VALUE_CHARS:
        raise ValueError("returned values too large")
    try:
        values = _value(ast.parse(text, mode="eval").body)
    except (SyntaxError, TypeError, RecursionError, MemoryError) as e:  # TypeError: an unhashable set item or key
        raise ValueError(f"unreadable returned values ({type(e).__name__})") from None
    if type(values) is not list:
        raise ValueError("returned values are not a list")
    return values


_SPECIAL_FLOATS = {"inf": math.inf, "nan": math.nan}
# A hexadecimal literal escapes Python's limit on decimal digits, and the judge's message could not print such a
# value; the sandbox writes ints in decimal, so every int it can send is below this (fewer than 2 * 10**(limit - 1)).
_DIGITS = sys.get_int_max_str_digits()
_MAX_INT_BITS = int((_DIGITS - 1) * math.log2(10)) + 1 if _DIGITS else math.inf


def _value(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str, bytes, bool, type(None)):
        if type(node.value) is int and node.value.bit_length() > _MAX_INT_BITS:
            raise ValueError("returned values contain an integer too long to judge")
        return node.value
    if isinstance(node, ast.Name) and node.id in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        number = _value(node.operand)
        if type(number) in (int, float):
            return -number
    if isinstance(node, ast.List):
        return [_value(e) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_value(e) for e in node.elts)
    if isinstance(node, ast.Set):
        return {_value(e) for e in node.elts}
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_value(k): _value(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        name, args = node.func.id, [_value(a) for a in node.args]
        if name == "set" and not args:
            return set()
        if name == "frozenset" and len(args) == 1 and type(args[0]) is list:
            return frozenset(args[0])
        if name == "complex" and len(args) == 2 and all(type(a) is float for a in args):
            return complex(*args)
        raise ValueError(f"returned values contain a call to {name}")
    raise ValueError(f"returned values contain {type(node).__name__}")
