"""Where prompts and conversations become text. Templates: "r1zero" (R1-Zero's), "chat" (the tokenizer's jinja
template, as transformers renders it), "auto" (chat if there is one, else r1zero), "none" (a question as it is)."""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The reasoning format's tags: what a reasoning model writes around its thinking and its answer
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_TAGS = ("<answer>", "</answer>")

# `Tokenizer` in annotations is model/tokenizer.py's, not imported: that module imports this one

R1_ZERO_PREAMBLE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>. User: "
)
R1_ZERO_SUFFIX = ". Assistant:"
TEMPLATES = ("auto", "r1zero", "chat", "none")


def render_prompt(tokenizer: Tokenizer, question: str, template: str = "r1zero", prefill: str = "") -> str:
    """The text the model continues for one question."""
    if template == "none":
        return question + prefill
    return render_conversation(tokenizer, [{"role": "user", "content": question}], template, True) + prefill


def render_conversation(tokenizer: Tokenizer, messages: list[dict], template: str = "auto",
                        add_generation_prompt: bool = True, variables: dict | None = None) -> str:
    """messages: [{"role": ..., "content": str}, ...]; variables: more variables for a chat template."""
    template = resolve_template(tokenizer, template)
    if template == "chat":
        return apply_chat_template(tokenizer, messages, add_generation_prompt, variables)
    if variables:
        raise TemplateVariableError(f"the {template!r} template reads no variables (only a chat template does)")
    if template == "none":
        raise ValueError("template 'none' sends a single question as it is; a conversation needs r1zero or chat")
    return r1zero_conversation(tokenizer, messages)


def resolve_template(tokenizer: Tokenizer, template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r} is not one of {', '.join(TEMPLATES)}")
    if template == "auto":
        return "chat" if tokenizer.chat_template else "r1zero"
    return template


def r1zero_conversation(tokenizer: Tokenizer, messages: list[dict]) -> str:
    """System text and a newline, each user turn in the R1-Zero template, each assistant turn + end-of-text."""
    parts = []
    for m in messages:
        if m["role"] in ("system", "developer"):
            parts.append(m["content"] + "\n")
        elif m["role"] == "user":
            parts.append(f"{R1_ZERO_PREAMBLE}{m['content']}{R1_ZERO_SUFFIX}")
        elif m["role"] == "assistant":
            if tokenizer.eos_token is None:
                raise ValueError(f"{tokenizer.name}: no end-of-text token, so assistant turns cannot be closed")
            parts.append(m["content"] + tokenizer.eos_token)
        else:
            raise ValueError(f"role {m['role']!r} is not one of system, user, assistant")
    return "".join(parts)


def apply_chat_template(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        variables: dict | None = None) -> str:
    """The chat template as transformers' apply_chat_template renders it; variables as its keyword arguments."""
    if not tokenizer.chat_template:
        raise ValueError(f"{tokenizer.name}: no chat template (chat_template.jinja, chat_template.json or "
                         "tokenizer_config.json); use template 'r1zero' or 'none'")
    check_template_variables(tokenizer.chat_template, variables or {})
    return _render(_jinja_environment(), tokenizer, messages, add_generation_prompt, variables or {})


def _render(env, tokenizer, messages: list[dict], add_generation_prompt: bool, variables: dict) -> str:
    return env.from_string(tokenizer.chat_template).render(
        **variables, messages=messages, add_generation_prompt=add_generation_prompt,
        eos_token=tokenizer.eos_token or "", bos_token=getattr(tokenizer, "bos_token", None) or "")


RENDERER_VARIABLES = ("messages", "add_generation_prompt", "eos_token", "bos_token")  # apply_chat_template's own
_JSON_TYPE = {dict: "an object", list: "an array"}


class TemplateVariableError(ValueError):
    """A chat template variable that cannot be passed (the renderer's own, not a JSON scalar, or never read)."""


def check_template_variables(template: str, variables: dict) -> None:
    """Refuse a variable the renderer sets, a value that is not a JSON scalar, and one the template never reads."""
    for name, value in variables.items():
        if name in RENDERER_VARIABLES:
            raise TemplateVariableError(f"{name!r} is set by the renderer itself, not by a template variable")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise TemplateVariableError(f"{name!r} must be a string, number, boolean or null, not "
                                        f"{_JSON_TYPE.get(type(value), type(value).__name__)}")
        if name not in _template_variables(template):
            raise TemplateVariableError(f"this model's chat template does not read {name!r}")


@functools.lru_cache(maxsize=8)
def _template_variables(template: str) -> frozenset[str]:
    return frozenset(meta.find_undeclared_variables(_jinja_environment().parse(template)))


# Private-use characters around each {% generation %} block's output while its spans are tracked
_SPAN_OPEN, _SPAN_CLOSE = "\ue000", "\ue001"


class _GenerationBlocks(jinja2.ext.Extension):
    """transformers' {% generation %} ... {% endgeneration %}: the assistant's text, between markers when tracked."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_block", []), [], [], body).set_lineno(lineno)

    def _block(self, caller) -> str:
        text = caller()
        return f"{_SPAN_OPEN}{text}{_SPAN_CLOSE}" if self.environment.globals.get("_track_generation") else text


def has_generation_blocks(template: str | None) -> bool:
    return bool(template) and "generation" in template and "endgeneration" in template


def render_with_generation_spans(tokenizer: Tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The chat template's text of a whole conversation, and the character spans of its {% generation %} blocks."""
    text = json.dumps(messages, ensure_ascii=False)
    if _SPAN_OPEN in text or _SPAN_CLOSE in text:
        raise ValueError("a message holds one of the private-use characters U+E000/U+E001 that mark the template's "
                         "{% generation %} blocks")
    env = _jinja_environment()
    env.globals["_track_generation"] = True
    marked = _render(env, tokenizer, messages, False, {})
    plain, spans, start, length = [], [], 0, 0
    for part in re.split(f"([{_SPAN_OPEN}{_SPAN_CLOSE}])", marked):
        if part == _SPAN_OPEN:
            start = length
        elif part == _SPAN_CLOSE:
            spans.append((start, length))
        else:
            plain.append(part)
            length += len(part)
    return "".join(plain), spans


def _jinja_environment() -> ImmutableSandboxedEnvironment:
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' own tojson: unlike Jinja's, it does not escape HTML characters
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationBlocks])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def load_chat_template(directory: Path, tokenizer_config: dict) -> str | None:
    """A directory's chat template, where transformers looks: chat_template.jinja, .json, then tokenizer_config.json's
    (named templates: the "default" one)."""
    jinja_file, json_file = Path(directory) / "chat_template.jinja", Path(directory) / "chat_template.json"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if json_file.is_file():
        template = json.loads(json_file.read_text(encoding="utf-8")).get("chat_template", template)
    if isinstance(template, list):
        template = {t["name"]: t["template"] for t in template}
    if isinstance(template, dict):
        return template.get("default")
    return template


def starts_in_think(prompt_text: str) -> bool:
    """Whether the completion begins inside the reasoning: the prompt ends with an open `<think>`."""
    return prompt_text.rstrip().endswith(THINK_OPEN)


def response_prefix(tokenizer: Tokenizer, template: str, prefill: str = "") -> str:
    """The start of the response the prompt writes, which rewards read before each completion: from its last `<think>`
    when it ends inside one, else the prefill."""
    prompt = render_prompt(tokenizer, "?", template, prefill)  # the question does not change how the reply opens
    return prompt[prompt.rfind(THINK_OPEN):] if starts_in_think(prompt) else prefill


def template_opens_think(tokenizer: Tokenizer, template: str) -> bool:
    """Whether the chat template's generation prompt opens `<think>`: the completion starts inside the reasoning."""
    return resolve_template(tokenizer, template) == "chat" and starts_in_think(render_prompt(tokenizer, "?", "chat"))
