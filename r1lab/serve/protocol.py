"""The OpenAI request bodies this server accepts, decoded strictly, and its errors in OpenAI's shape. Unknown fields
are refused; those it does not implement are accepted at their neutral values only (docs/serving.md).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP_STRINGS = 16
MAX_JSON_DEPTH = 32  # an OpenAI body nests 4 or 5 levels (messages, a message, its content parts, a part)
_SURROGATE = re.compile("[\ud800-\udfff]")  # a pair written as two escapes decodes to one character: any left is lone


class ApiError(Exception):
    """Raised anywhere in a request; the app turns it into {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN or Infinity: "should be a finite number"


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with the usage of the whole request
    include_obfuscation: bool | None = None  # OpenAI pads chunks against side channels; nothing to pad here


class ResponseFormat(_Strict):
    type: str
    json_schema: dict | None = None


Rule = tuple[str, Callable[[Any], bool], str]  # (field, whether a value is neutral, what to send instead)


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None  # sent back by some clients; not replayed to the model

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class _Sampling(_Strict):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # a client's end-user id: only for OpenAI's abuse monitoring
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # vLLM's extras (sent through the openai client's extra_body)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: every token
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    logit_bias: dict[str, float] | None = None

    def sampling_extras(self) -> dict:
        """The penalties, top-k and min-p as the batcher's SamplingParams takes them (null: the neutral value)."""
        given = lambda value, neutral: neutral if value is None else value  # noqa: E731
        return dict(top_k=max(given(self.top_k, 0), 0), min_p=given(self.min_p, 0.0),
                    repetition_penalty=given(self.repetition_penalty, 1.0),
                    presence_penalty=given(self.presence_penalty, 0.0),
                    frequency_penalty=given(self.frequency_penalty, 0.0))

    def rules(self) -> list[Rule]:
        """The accepted fields this server does not implement, each with its neutral values."""
        return [("logit_bias", lambda v: not v, "this server cannot bias tokens; send {} or leave it out")]

    def check_supported(self) -> None:
        """A 400 naming the first field set to something this server would not honour."""
        for name, neutral, instead in self.rules():
            value = getattr(self, name)
            if value is not None and not neutral(value):
                shown = json.dumps(value.model_dump(exclude_none=True) if isinstance(value, BaseModel) else value)
                raise ApiError(400, f"'{name}': {shown:.200} is not supported: {instead}.", param=name,
                               code="unsupported_value")

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings are supported", param="stop")
        return tuple(s for s in stops if s)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None  # without tools there is nothing to call in parallel
    functions: list[dict] | None = None  # the deprecated form of tools
    function_call: str | dict | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None  # tags for OpenAI's stored completions: nothing to do here
    service_tier: str | None = None
    modalities: list[str] | None = None
    prompt_cache_key: str | None = None  # a hint for OpenAI's prompt cache routing
    safety_identifier: str | None = None  # like user
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: checked by r1lab/model/templates.py

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def rules(self) -> list[Rule]:
        no_tools = ("this server takes no client-side functions to call (its own tool, `r1lab serve --tools python`, "
                    "runs inside the completion); leave it out")
        return super().rules() + [
            ("top_logprobs", lambda v: v == 0, "this server returns the log-prob of each sampled token "
             "(logprobs: true) but not the alternatives; send 0 or leave it out"),
            ("response_format", lambda v: v.type == "text",
             'this server generates free text only; send {"type": "text"} or leave it out'),
            ("tools", lambda v: not v, no_tools), ("functions", lambda v: not v, no_tools),
            ("tool_choice", lambda v: v in ("none", "auto"), no_tools + ', or send "none"'),
            ("function_call", lambda v: v in ("none", "auto"), no_tools + ', or send "none"'),
            ("store", lambda v: not v, "this server stores no completions; send false or leave it out"),
            ("service_tier", lambda v: v in ("auto", "default"), 'there is one tier here; send "auto" or leave it out'),
            ("modalities", lambda v: v in ([], ["text"]), 'this server generates text only; send ["text"]'),
        ]


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def rules(self) -> list[Rule]:
        return super().rules() + [
            ("logprobs", lambda v: False, "log-probs are returned by /v1/chat/completions (logprobs: true), not "
             "by /v1/completions; leave it out"),
            ("echo", lambda v: not v, "the prompt is not echoed; send false or leave it out"),
            ("best_of", lambda v: v == self.n, "completions are not ranked; leave it out (or send n)"),
            ("suffix", lambda v: v == "", "this server does not fill in the middle; leave it out"),
        ]

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        return prompts

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


def parse_request(cls: type[_Sampling], data: dict) -> _Sampling:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the parameter."""
    try:
        request = cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message, code = {"extra_forbidden": (f"Unrecognized request argument supplied: {param}", "unknown_parameter"),
                         "missing": (f"Missing required parameter: '{param}'", "missing_required_parameter")}.get(
            first["type"], (f"Invalid value for '{param}': {first['msg']}", "invalid_value"))
        raise ApiError(400, message, param=param, code=code) from None
    request.check_supported()
    return request


def parse_json_body(body: bytes) -> dict:
    """A request body as a JSON object, or a 400 naming what is wrong with it."""
    try:
        text = body.decode("utf-8")  # JSON text is UTF-8 (RFC 8259); strict decoding also refuses encoded surrogates
    except UnicodeDecodeError as err:
        raise ApiError(400, f"The request body is not valid UTF-8: {err}", code="invalid_json") from None
    try:
        data = json.loads(text)
    except RecursionError:  # json's C scanner guards its recursion: far deeper than any limit we accept
        raise _too_deep() from None
    except ValueError as err:
        raise ApiError(400, f"We could not parse the JSON body of your request: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    _check_tree(data)
    return data


def _check_tree(data: dict) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings (keys too) holding a lone surrogate, which no UTF-8
    encoder accepts. Iterative, so that the check itself cannot run out of stack."""
    stack: list[tuple[object, tuple]] = [(data, ())]  # a value and the keys that lead to it
    while stack:
        value, path = stack.pop()
        if isinstance(value, str) and _SURROGATE.search(value):
            raise _lone_surrogate(path)
        if isinstance(value, (dict, list)):
            if len(path) >= MAX_JSON_DEPTH:
                raise _too_deep()
            for key, item in value.items() if isinstance(value, dict) else enumerate(value):
                if isinstance(key, str) and _SURROGATE.search(key):
                    raise _lone_surrogate((*path, key))
                stack.append((item, (*path, key)))


def _too_deep() -> ApiError:
    return ApiError(400, f"The JSON body is nested too deeply: at most {MAX_JSON_DEPTH} levels are accepted.",
                    code="invalid_json")


def _lone_surrogate(path: tuple) -> ApiError:
    # the field's name may hold the surrogate itself
    param = ".".join(str(key).encode("utf-8", "backslashreplace").decode() for key in path) or None
    return ApiError(400, f"Invalid unicode in '{param}': a lone surrogate (an unpaired \\uD800-\\uDFFF escape) is "
                         "not a character.", param=param, code="invalid_unicode")
