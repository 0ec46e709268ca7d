"""Chat data for SFT (messages, prompt-completion, ShareGPT: docs/pipeline.md), read and validated, and each
conversation's tokens with its loss mask: True on the trained assistant turns and the token that closes each.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from r1lab.config import SFTConfig
from r1lab.model.templates import has_generation_blocks, render_conversation, render_with_generation_spans
from r1lab.model.tokenizer import Tokenizer
from r1lab.rewards.tasks import hf_datasets
from r1lab.rewards.tasks.dataset import DatasetError, _rows, in_test_split, raise_row_errors

ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "messages", "prompt_completion", "sharegpt")
# ShareGPT's speaker names as the common dumps spell them; ChatFields.roles adds to (or overrides) these.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class ChatFields:
    """A chat file's format (one of FORMATS; auto: from the first row's keys) and column names."""

    format: str = "auto"
    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    conversations: str = "conversations"
    roles: dict = field(default_factory=dict)  # ShareGPT "from" value -> system | user | assistant

    @classmethod
    def of(cls, cfg: SFTConfig) -> ChatFields:
        return cls(cfg.data_format, cfg.messages_field, cfg.prompt_field, cfg.completion_field,
                   cfg.conversations_field, dict(cfg.role_map or {}))

    def check(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"data_format {self.format!r} is not one of {', '.join(FORMATS)}")
        bad = {k: v for k, v in self.roles.items() if v not in ROLES}
        if bad:
            raise ValueError(f"role_map {bad} maps to roles other than {', '.join(ROLES)}")


class Conversation(NamedTuple):
    """One usable row: its line, its messages, and the first message the loss may cover."""

    line: int
    messages: list[dict]
    train_from: int = 0


def _message_error(name: str, message: Any, expected: str, keys: tuple[str, str], roles: dict) -> str | None:
    role_key, content_key = keys
    if not isinstance(message, dict):
        return f"field {name!r} must be an object with {role_key} and {content_key}, got {type(message).__name__}"
    role, content = message.get(role_key), message.get(content_key)
    if role is None:
        return f"field '{name}.{role_key}' is missing"
    if not isinstance(role, str) or role not in roles:
        hint = "" if role_key == "role" else " (name other speakers with role_map)"  # ShareGPT's from
        return f"field '{name}.{role_key}' is {role!r}, not one of {', '.join(roles)}{hint}"
    if content_key not in message:
        return f"field '{name}.{content_key}' is missing"
    if not isinstance(content, str):
        return f"field '{name}.{content_key}' must be a string, got {type(content).__name__}"
    if roles[role] != expected:
        return (f"field '{name}.{role_key}' is {role!r} where {expected!r} was expected "
                "(an optional system message first, then user and assistant turns in alternation)")
    if roles[role] != "system" and not content.strip():
        return f"field '{name}.{content_key}' is empty"
    return None


def _turns(items: list, names: list[str], keys: tuple[str, str] = ("role", "content"),
           roles: dict | None = None) -> tuple[list[dict], str | None]:
    """items as {role, content} messages (optional system, then user and assistant in turn), or the first problem."""
    roles = roles or {r: r for r in ROLES}
    first = 1 if isinstance(items[0], dict) and roles.get(items[0].get(keys[0])) == "system" else 0
    messages = []
    for i, (item, name) in enumerate(zip(items, names)):
        error = _message_error(name, item, "system" if i < first else ("user", "assistant")[(i - first) % 2], keys,
                               roles)
        if error is not None:
            return [], error
        messages.append({"role": roles[item[keys[0]]], "content": item[keys[1]]})
    return messages, None


def _list_row(row: dict, name: str, keys: tuple[str, str] = ("role", "content"), roles: dict | None = None,
              assistant: str = "assistant") -> tuple[Conversation | None, str | None]:
    """A row whose column `name` holds the whole conversation (messages, ShareGPT)."""
    items = row.get(name)
    if name not in row:
        return None, f"field {name!r} is missing"
    if not isinstance(items, list) or not items:
        return None, f"field {name!r} must be a non-empty list of {{{', '.join(keys)}}} objects, got {items!r:.60}"
    messages, error = _turns(items, [f"{name}[{i}]" for i in range(len(items))], keys, roles)
    if error is None and not any(m["role"] == "assistant" for m in messages):
        error = f"field {name!r} has no {assistant} message: there is nothing to train on"
    return (None, error) if error else (Conversation(0, messages), None)


def _prompt_completion_row(row: dict, fields: ChatFields) -> tuple[Conversation | None, str | None]:
    """Plain (two strings) or conversational (two message lists: the loss is on the completion's only)."""
    p, c = fields.prompt, fields.completion
    for name in (p, c):
        if name not in row:
            return None, f"field {name!r} is missing"
    prompt, completion = row[p], row[c]
    if isinstance(prompt, str):
        for name, text in ((p, prompt), (c, completion)):
            if not isinstance(text, str):
                return None, (f"field {name!r} must be a string like {p!r} (plain prompt-completion), "
                              f"got {type(text).__name__}")
            if not text.strip():
                return None, f"field {name!r} is empty"
        return Conversation(0, [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                            1), None
    for name, value in ((p, prompt), (c, completion)):
        if not isinstance(value, list) or not value:
            return None, (f"field {name!r} must be a string (plain) or a non-empty list of {{role, content}} "
                          f"objects (conversational), got {value!r:.60}")
    names = [f"{p}[{i}]" for i in range(len(prompt))] + [f"{c}[{i}]" for i in range(len(completion))]
    messages, error = _turns(prompt + completion, names)
    if error is None and not any(m["role"] == "assistant" for m in messages[len(prompt):]):
        error = f"field {c!r} has no assistant message: there is nothing to train on"
    return (None, error) if error else (Conversation(0, messages, len(prompt)), None)


_READERS = {"messages": lambda row, fields: _list_row(row, fields.messages),
            "sharegpt": lambda row, fields: _list_row(row, fields.conversations, ("from", "value"),
                                                      {**SHAREGPT_ROLES, **fields.roles}, "assistant ('gpt')"),
            "prompt_completion": _prompt_completion_row}


def detect_format(row: Any, fields: ChatFields) -> str | None:
    keys = {"messages": [fields.messages], "sharegpt": [fields.conversations],
            "prompt_completion": [fields.prompt, fields.completion]}
    return next((f for f, names in keys.items() if isinstance(row, dict) and all(n in row for n in names)), None)


def _no_format(row: Any, fields: ChatFields) -> str:
    found = ", ".join(repr(k) for k in row) if isinstance(row, dict) else f"a {type(row).__name__}, not an object"
    return (f"no chat format matches this row's fields ({found or 'none'}): expected {fields.messages!r} "
            f"(messages), {fields.conversations!r} (ShareGPT) or {fields.prompt!r} and {fields.completion!r} "
            "(prompt-completion); name your columns with messages_field, conversations_field, prompt_field and "
            "completion_field, or the format with data_format")


def read_conversations(path: str | Path, fields: ChatFields | None = None) -> list[Conversation]:
    """Every row of a chat file or a `datasets` source's train split as a Conversation, all validated first (the
    format: fields.format or the first row's); bad rows raise DatasetError, each as file:line."""
    path, fields = Path(path), fields or ChatFields()
    fields.check()
    if hf_datasets.is_datasets_source(str(path)):
        train, _, split, _ = hf_datasets.pick_splits(hf_datasets.load_splits(str(path)), str(path))
        path, source = Path(f"{path}[{split}]"), hf_datasets.dataset_rows(train)
    elif not path.is_file():
        raise DatasetError(f"{path}: file not found")
    else:
        source = _rows(path)
    rows, errors = [], []
    format = None if fields.format == "auto" else fields.format
    for number, row, error in source:
        if error is None and format is None:
            format = detect_format(row, fields)
            if format is None:  # every later row would fail for the same reason: one error says it
                errors.append(f"{path}:{number}: {_no_format(row, fields)}")
                break
        conversation = None
        if error is None and not isinstance(row, dict):
            error = f"row is not a JSON object (got {type(row).__name__})"
        elif error is None:
            conversation, error = _READERS[format](row, fields)
        if error is None:
            rows.append(conversation._replace(line=number))
        else:
            errors.append(f"{path}:{number}: {error}")
    if not rows and not errors:
        errors.append(f"{path}: the file has no rows")
    raise_row_errors(path, errors)
    return rows


class TemplateRewrites(ValueError):
    """The chat template rewrites an assistant message (R1's and Qwen3's drop earlier turns' reasoning)."""


def _prefix_length(tokenizer: Tokenizer, text: str, full: list[int], turn: int, where: str) -> int:
    ids = tokenizer.encode(text)
    if full[: len(ids)] != ids:
        raise TemplateRewrites(f"messages[{turn}]: the conversation up to the {where} of this assistant message does "
                               "not tokenize as a prefix of the whole conversation (the chat template rewrites the "
                               "message, or a token spans its boundary), so its loss mask cannot be placed exactly")
    return len(ids)


def _closes_turn(tokenizer: Tokenizer, token: int) -> bool:
    # an end-of-text id, or a special token (decoding drops those): <|im_end|>, <|eot_id|>
    return token in tokenizer.eos_ids or tokenizer.decode([token]) == ""


def tool_output_spans(content: str, tag: str) -> list[tuple[int, int]]:
    """Character ranges of the <tag>...</tag> (tool output) blocks; an unclosed one runs to the end; none for ""."""
    spans, start, opener, closer = [], 0, f"<{tag}>", f"</{tag}>"
    while tag and (begin := content.find(opener, start)) >= 0:
        end = content.find(closer, begin)
        end = len(content) if end < 0 else end + len(closer)
        spans.append((begin, end))
        start = end
    return spans


def conversation_examples(tokenizer: Tokenizer, messages: list[dict], template: str = "auto", train_from: int = 0,
                          tool_output_tag: str = "") -> list[tuple[list[int], list[bool], set[int]]]:
    """A conversation's training examples: the whole conversation, or where the template rewrites earlier turns,
    one example per trained assistant turn (turn_tokens)."""
    if template in ("auto", "chat") and has_generation_blocks(tokenizer.chat_template):
        return [generation_block_tokens(tokenizer, messages, train_from, tool_output_tag)]
    try:
        return [conversation_tokens(tokenizer, messages, template, train_from, tool_output_tag)]
    except TemplateRewrites:
        return [turn_tokens(tokenizer, messages, i, template, tool_output_tag)
                for i, message in enumerate(messages) if message["role"] == "assistant" and i >= train_from]


def generation_block_tokens(tokenizer: Tokenizer, messages: list[dict], train_from: int = 0,
                            tool_output_tag: str = "") -> tuple[list[int], list[bool], set[int]]:
    """A conversation's tokens masked by its template's {% generation %} blocks, plus each turn's closing token."""
    text, spans = render_with_generation_spans(tokenizer, messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if len(spans) != len(turns):
        raise ValueError(f"the chat template's {{% generation %}} blocks mark {len(spans)} spans for "
                         f"{len(turns)} assistant messages, so its loss mask cannot be placed")
    encoding = tokenizer.backend.encode(text)
    ids, offsets = encoding.ids, encoding.offsets
    mask, closers = [False] * len(ids), set()
    for turn, (begin, end) in zip(turns, spans):
        inside = [j for j, (a, b) in enumerate(offsets) if begin <= a and b <= end and b > a]
        if turn < train_from or not inside:  # not trained, or an empty reply: nothing written, nothing to learn
            continue
        last = inside[-1]
        if not _closes_turn(tokenizer, ids[last]):
            last += 1
            if last >= len(ids) or not _closes_turn(tokenizer, ids[last]):
                raise ValueError(f"messages[{turn}]: the template's generation block is followed by no end-of-text "
                                 "or special token: a model trained on it would never learn to stop")
        mask[inside[0] : last + 1] = [True] * (last + 1 - inside[0])
        for a, b in tool_output_spans(text[begin:end], tool_output_tag):
            for j, (x, y) in enumerate(offsets):
                if begin + a <= x and y <= begin + b:
                    mask[j] = False
        closers.add(ids[last])
    return ids, mask, closers


def turn_tokens(tokenizer: Tokenizer, messages: list[dict], turn: int, template: str = "auto",
                tool_output_tag: str = "") -> tuple[list[int], list[bool], set[int]]:
    """messages[turn] as the completion of the history before it: the template's rendering where the generation
    prompt is a prefix of it (Qwen3), else the content less what the prompt opened (R1's "<think>\\n")."""
    prompt = render_conversation(tokenizer, messages[:turn], template, add_generation_prompt=True)
    whole = render_conversation(tokenizer, messages[: turn + 1], template, add_generation_prompt=False)
    whole_ids, prompt_ids = tokenizer.encode(whole), tokenizer.encode(prompt)
    closer = _last_closer(tokenizer, whole_ids, turn)
    if whole.startswith(prompt) and whole_ids[: len(prompt_ids)] == prompt_ids:
        ids = whole_ids[: max(i for i, t in enumerate(whole_ids) if t == closer) + 1]
        reply = whole[len(prompt):]
        position = lambda x: _prefix_length(tokenizer, prompt + reply[:x], ids, turn, "tool output")  # noqa: E731
    else:
        reply = _after_opened(prompt, whole, messages[turn]["content"])
        ids = prompt_ids + tokenizer.encode(reply) + [closer]
        position = lambda x: len(prompt_ids) + len(tokenizer.encode(reply[:x]))  # noqa: E731
    mask = [False] * len(prompt_ids) + [True] * (len(ids) - len(prompt_ids))
    for a, b in tool_output_spans(reply, tool_output_tag):
        mask[position(a):position(b)] = [False] * (position(b) - position(a))
    return ids, mask, {closer}


def _last_closer(tokenizer: Tokenizer, ids: list[int], turn: int) -> int:
    for token in reversed(ids):
        if _closes_turn(tokenizer, token):
            return token
    raise ValueError(f"messages[{turn}]: the template ends this assistant message with no end-of-text or special "
                     "token: a model trained on it would never learn to stop")


def _after_opened(prompt: str, whole: str, content: str) -> str:
    """content less the opening (e.g. "<think>\\n") the generation prompt already wrote."""
    opened = prompt[len(os.path.commonprefix([prompt, whole])):].strip()
    stripped = content.lstrip()
    if opened and stripped.startswith(opened):
        return stripped[len(opened):].lstrip("\n")
    return content


def conversation_tokens(tokenizer: Tokenizer, messages: list[dict], template: str = "auto",
                        train_from: int = 0, tool_output_tag: str = "") -> tuple[list[int], list[bool], set[int]]:
    """Token ids of a conversation, its loss mask, and the tokens that closed its trained turns. Each boundary must
    tokenize as a prefix of the whole (a merge across it would shift the mask silently)."""
    full = tokenizer.encode(render_conversation(tokenizer, messages, template, add_generation_prompt=False))
    mask = [False] * len(full)
    closers: set[int] = set()
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < train_from:
            continue
        before = render_conversation(tokenizer, messages[:i], template, add_generation_prompt=True)
        start = _prefix_length(tokenizer, before, full, i, "start")
        end = _prefix_length(tokenizer, before + message["content"], full, i, "end")
        if end >= len(full) or not _closes_turn(tokenizer, full[end]):
            after = tokenizer.backend.id_to_token(full[end]) if end < len(full) else "nothing"
            raise ValueError(f"messages[{i}]: the template follows this assistant message with {after!r}, not an "
                             "end-of-text or special token: a model trained on it would never learn to stop")
        mask[start : end + 1] = [True] * (end + 1 - start)
        for a, b in tool_output_spans(message["content"], tool_output_tag):
            span_start = _prefix_length(tokenizer, before + message["content"][:a], full, i, "tool output's start")
            span_end = _prefix_length(tokenizer, before + message["content"][:b], full, i, "tool output's end")
            mask[span_start:span_end] = [False] * (span_end - span_start)
        closers.add(full[end])
    return full, mask, closers


@dataclass
class SFTData:
    """Tokenised conversations with their loss masks, split into training and held-out rows."""

    train_docs: list[list[int]] = field(default_factory=list)
    train_masks: list[list[bool]] = field(default_factory=list)
    eval_docs: list[list[int]] = field(default_factory=list)
    eval_masks: list[list[bool]] = field(default_factory=list)
    closers: set[int] = field(default_factory=set)  # the tokens that closed assistant turns
    rows: int = 0
    dropped_too_long: int = 0

    def summary(self) -> dict:
        return {"rows": self.rows, "train": len(self.train_docs), "heldout": len(self.eval_docs),
                "dropped_too_long": self.dropped_too_long, "tokens": sum(map(len, self.train_docs + self.eval_docs)),
                "target_tokens": sum(sum(m) for m in self.train_masks + self.eval_masks)}


def build_sft_data(tokenizer: Tokenizer, rows: list[Conversation], cfg: SFTConfig) -> SFTData:
    """Tokenise and mask every conversation; those over cfg.max_len are dropped (never truncated: a cut one loses
    its end-of-text). Held-out rows: a stable hash of their messages."""
    if cfg.template == "chat" and not tokenizer.chat_template:
        raise ValueError(f"{cfg.model}: the tokenizer has no chat_template; use --template r1zero or auto")
    data, errors = SFTData(rows=len(rows)), []
    for line, messages, train_from in rows:
        try:
            examples = conversation_examples(tokenizer, messages, cfg.template, train_from, cfg.tool_output_tag)
        except ValueError as err:
            errors.append(f"{cfg.data}:{line}: {err}")
            continue
        heldout = cfg.eval_fraction > 0 and in_test_split(json.dumps(messages, sort_keys=True), cfg.eval_fraction)
        for ids, mask, closers in examples:
            if len(ids) > cfg.max_len:
                data.dropped_too_long += 1
                continue
            data.closers |= closers
            (data.eval_docs if heldout else data.train_docs).append(ids)
            (data.eval_masks if heldout else data.train_masks).append(mask)
    raise_row_errors(Path(cfg.data), errors)
    if not data.train_docs:
        raise DatasetError(f"{cfg.data}: no conversation left to train on ({data.dropped_too_long} of {len(rows)} "
                           f"are longer than max_len {cfg.max_len}, {len(data.eval_docs)} held out)")
    return data
