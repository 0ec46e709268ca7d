"""The judge's reading of the values a sandboxed program sends back (r1lab/rewards/sandbox/judge.py): the candidate
writes that text, so whatever it writes, parsing ends in a list of plain data or a ValueError (which the runner
turns into the test's failure), and judging those values ends in a verdict, never an exception."""

import random
import sys

import pytest

from r1lab.rewards.sandbox.child import make_encoder
from r1lab.rewards.sandbox.judge import MAX_VALUE_CHARS, parse_values, split_test

# the candidate's invalid escapes make the parser warn, as Python's does
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::SyntaxWarning")

CRAFTED = [
    "[{[1]: 2}]", "[{[1], 2}]", "[{{}: 1}]", "[{set(): 1}]", "[frozenset([[1]])]", "[frozenset([{1: 2}])]",
    "[{(1, [2]): 3}]", "[{frozenset([1]): {1: [2]}}]",  # unhashable keys and set items: TypeError inside
    "[" + "0x" + "f" * 60_000 + "]", "[-0x" + "f" * 20_000 + "]",  # past the decimal digit limit, in hexadecimal
    "[" + "1" * 5000 + "]",  # a decimal literal past the limit: the parser refuses it
    "[" * 99 + "]" * 99, "[" + "(" * 250 + ")" * 250 + "]", "[" + "-" * 10_000 + "1]",
    "[complex(inf, nan)]", "[complex(1, 2)]", "[frozenset()]", "[set([1])]", "[nan, -inf, -nan]", "[-True]",
    "[1e999, -1e999, 1e-999]", "[b'\\xff' 'x']", "['\\N{BOGUS}']", "['\\ud800']", "[1_000]", "[0b1, 0o7]",
    "[1j]", "[...]", "[None, True, False]", "\x00", "[\x00]", "", " ", "[", "]", "[1,,]", "[*x]", "[**{}]",
    "[{**{}}]", "[(yield)]", "[await x]", "[x := 1]", "[f'{1}']", "[lambda: 1][0]", "[1][0]", "[1] + [2]",
    "[set(*[1])]", "[frozenset(x=1)]", "[().__class__]", "[__import__]", "[{1: 2}.keys()]",
    "[" + "'a'," * 20_000 + "]", "[" * 1000,
]


def judged(values: list) -> str | None:
    return split_test("assert f(1) == [1, 2]").judge(values)


@pytest.mark.parametrize("text", CRAFTED)
def test_crafted_output_is_a_list_or_a_value_error(text):
    try:
        values = parse_values(text)
    except ValueError:
        return
    assert type(values) is list
    verdict = judged(values[:1] if values else [None])
    assert verdict is None or isinstance(verdict, str)


def test_an_integer_the_judge_could_not_print_is_refused_but_every_one_the_sandbox_sends_is_read():
    largest = int("9" * (sys.get_int_max_str_digits() - 1))  # as long as the sandbox's own repr can write
    assert parse_values(make_encoder()([largest, -largest])) == [largest, -largest]
    with pytest.raises(ValueError, match="too long"):
        parse_values("[0x" + "f" * 20_000 + "]")


def test_random_mutations_of_encoded_values_never_raise_anything_else():
    """Values the sandbox really writes, cut, spliced and sprinkled with tokens, a few thousand times."""
    rng = random.Random(31)
    encode = make_encoder()
    seeds = [encode(v) for v in ([1, -2.5, "x", b"y", None, True], [(1,), {1: [2, {3}]}, frozenset([4]), set()],
                                 [float("nan"), float("inf"), complex(1.0, -0.0)], [[[[[]]]]], [{"a": (1, 2)}])]
    tokens = ["[", "]", "{", "}", "(", ")", ",", ":", "-", "set(", "frozenset([", "complex(", "inf", "nan", "0x",
              "'", '"', "b'", "\\", "1", "9" * 50, "1e999", "[1]", "{}", "x", ".", "*", "\x00", "\ud800", "é"]
    outcomes = {"parsed": 0, "refused": 0}
    for _ in range(4000):
        text = rng.choice(seeds)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(text) + 1)
            cut = rng.randrange(0, 4)
            text = text[:at] + (rng.choice(tokens) if rng.random() < 0.8 else "") + text[at + cut:]
        try:
            values = parse_values(text[:MAX_VALUE_CHARS])
        except ValueError:
            outcomes["refused"] += 1
            continue
        outcomes["parsed"] += 1
        assert type(values) is list
        verdict = judged(values[:1] or [None])
        assert verdict is None or isinstance(verdict, str)
    assert outcomes["parsed"] > 100 and outcomes["refused"] > 100  # both sides were exercised
