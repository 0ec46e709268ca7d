"""`r1lab serve` and `r1lab chat`: the OpenAI API through a real uvicorn server, reasoning split, limits, batching.

The model is a real r1lab CausalLM whose weights are set by hand so that it is a bigram machine (each token decides
the next): after the R1-Zero prompt it writes `<think>We sum</think><answer>42</answer>` and stops, and after `z` it
writes `yzyz...` forever. Every request therefore runs the real path (tokenizer, engine, batcher, HTTP) with a
known answer, even when sampled at temperature 1.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from r1lab.model.architecture import ModelConfig
from r1lab.model.hf_format import save_model
from r1lab.model.templates import R1_ZERO_SUFFIX, render_conversation, render_prompt, starts_in_think
from r1lab.model.tokenizer import EOS, build_tiny_tokenizer
from r1lab.model.transformer import CausalLM
from r1lab.serve.reasoning import ReasoningSplitter, split_reasoning
from r1lab.serve.textstream import IncrementalDetokenizer, StopCutter, TextStream

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

KEY = "sk-test"
MODEL_ID = "tiny-r1"
SCRIPT = [R1_ZERO_SUFFIX, "<think>", "W", "e", " ", "s", "u", "m", "</think>", "<answer>", "4", "2", "</answer>", EOS]
REASONING, ANSWER = "We sum", "42"
ANSWER_TOKENS = len(SCRIPT) - 1  # the tokens after the prompt's last one, end-of-text included
THINK_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|><think>{% endif %}")


def bigram_model(V: int, following: dict[int, list[int]], eos_id: int, context: int = 1024) -> CausalLM:
    """A one-layer model whose next token depends only on the current one: each token in following[current] gets
    logit ~45, every other token 0 (p(other) < 1e-15 even at temperature 2), so sampling picks among the listed ones."""
    cfg = ModelConfig(vocab_size=V, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      tie_word_embeddings=False, eos_token_id=eos_id)
    assert cfg.hidden_size >= V
    model = CausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :V] = torch.eye(V)  # the residual stream is the current token, one-hot
        for layer in model.model.layers:  # layers compute but add nothing
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for cur, nexts in following.items():
            model.lm_head.weight[nexts, cur] = 4.0
    return model


def scripted_model_dir(path: Path, chat_template: str | None = None, context: int = 2048) -> Path:
    """A model directory whose greedy and sampled outputs are both fixed: SCRIPT after its first token, and
    `z -> y -> z -> ...`; any other token is followed by end-of-text."""
    tok = build_tiny_tokenizer()
    tok.chat_template = chat_template
    V = tok.vocab_size
    ids = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    one = lambda s: ids(s)[0] if len(ids(s)) == 1 else pytest.fail(f"{s!r} is not one token")  # noqa: E731
    following = {t: [one(EOS)] for t in range(V)}
    following.update({one(a): [one(b)] for a, b in zip(SCRIPT, SCRIPT[1:])})
    following.update({one("z"): [one("y")], one("y"): [one("z")]})
    save_model(bigram_model(V, following, one(EOS), context), path)
    tok.save(path)
    return path


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ServerThread:
    """A real uvicorn server on a free port, in a thread of this process (so tests can look at its state), run as
    `r1lab serve` runs it: its connection limits are the app's settings."""

    def __init__(self, app):
        from r1lab.serve.connections import uvicorn_config

        self.app = app
        self.sock = free_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.config = uvicorn_config(app, app.state.server.cfg, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    @property
    def stats(self) -> dict:
        return dict(self.app.state.server.batcher.stats)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return scripted_model_dir(tmp_path_factory.mktemp("scripted"))


@pytest.fixture(scope="module")
def server(model_dir):
    from r1lab.serve.app import create_app

    app = create_app(model_dir, api_key=KEY, served_model_name=MODEL_ID, max_tokens=2000, max_body_bytes=8192,
                     max_request_tokens=4000, max_prompts=8, body_timeout_s=BODY_TIMEOUT_S, device="cpu",
                     log_level="warning")
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture
def api(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


@pytest.fixture
def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


QUESTION = [{"role": "user", "content": "What is 6*7?"}]
BODY_TIMEOUT_S = 1.5


def prompt_tokens(model_dir, messages=QUESTION) -> int:
    from r1lab.model.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    return len(tok.encode(render_conversation(tok, messages)))


# ---------------------------------------------------------------------------------------------------------------
# the official openai client, through a real server


def test_openai_client_chat_gets_reasoning_and_answer(openai_client, model_dir):
    r = openai_client.chat.completions.create(model=MODEL_ID, messages=QUESTION, temperature=1.0, top_p=0.9)
    choice = r.choices[0]
    assert (choice.message.reasoning_content, choice.message.content) == (REASONING, ANSWER)
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert r.model == MODEL_ID and r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.usage.completion_tokens == ANSWER_TOKENS
    assert r.usage.prompt_tokens == prompt_tokens(model_dir)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_client_streams_reasoning_then_answer(openai_client, model_dir):
    stream = openai_client.chat.completions.create(model=MODEL_ID, messages=QUESTION, stream=True, seed=3,
                                                   stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [d.reasoning_content for d in deltas if getattr(d, "reasoning_content", None)]
    content = [d.content for d in deltas if d.content]
    assert len(reasoning) > 1 and "".join(reasoning) == REASONING  # streamed piece by piece
    assert "".join(content) == ANSWER
    first_answer = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not getattr(d, "reasoning_content", None) for d in deltas[first_answer:])
    assert deltas[0].role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ANSWER_TOKENS
    assert chunks[-1].usage.prompt_tokens == prompt_tokens(model_dir)


def test_openai_client_completions_and_models(openai_client):
    r = openai_client.completions.create(model=MODEL_ID, prompt="z", max_tokens=9, temperature=0)
    assert r.choices[0].text == "yzyzyzyzy" and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (1, 9)
    pieces = [c.choices[0].text for c in openai_client.completions.create(model=MODEL_ID, prompt="y", max_tokens=5,
                                                                           stream=True)]
    assert "".join(pieces) == "zyzyz" and len([p for p in pieces if p]) == 5
    assert [m.id for m in openai_client.models.list().data] == [MODEL_ID]


def test_n_stop_and_several_prompts(api):
    body = {"model": MODEL_ID, "messages": QUESTION, "n": 3, "stop": ["m", "never"], "seed": 1}
    r = api.post("/v1/chat/completions", json=body).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    for c in r["choices"]:  # cut before the stop string, which is not returned
        assert (c["message"]["reasoning_content"], c["message"]["content"], c["finish_reason"]) == ("We su", "", "stop")
    assert r["usage"]["completion_tokens"] == 3 * 7  # <think> W e ' ' s u m: the row ends as m is sampled
    r = api.post("/v1/completions", json={"model": MODEL_ID, "prompt": ["z", "y"], "n": 2, "max_tokens": 4}).json()
    assert [(c["index"], c["text"]) for c in r["choices"]] == [(0, "yzyz"), (1, "yzyz"), (2, "zyzy"), (3, "zyzy")]
    assert r["usage"] == {"prompt_tokens": 2, "completion_tokens": 16, "total_tokens": 18}


def test_stop_string_split_across_tokens_in_a_stream(api):
    body = {"model": MODEL_ID, "prompt": "z", "max_tokens": 50, "stop": "zyz", "stream": True}
    with api.stream("POST", "/v1/completions", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == "y"  # "y" then "zyz" completes: cut before it
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_health_needs_no_key(server):
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model"] == MODEL_ID


# ---------------------------------------------------------------------------------------------------------------
# bad requests: each a 4xx with an OpenAI-style error body, and the server keeps serving


def assert_error(r, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param
    if code:
        assert error["code"] == code
    return error


def test_missing_or_wrong_api_key_gets_401(server):
    body = {"model": MODEL_ID, "messages": QUESTION}
    assert_error(httpx.post(f"{server.url}/v1/chat/completions", json=body), 401, code="missing_api_key")
    wrong = {"Authorization": "Bearer sk-wrong"}
    assert_error(httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=wrong), 401, code="invalid_api_key")
    assert_error(httpx.get(f"{server.url}/v1/models", headers=wrong), 401)


def test_body_over_the_limit_gets_413(api):
    big = {"model": MODEL_ID, "messages": [{"role": "user", "content": "x" * 10_000}]}
    assert_error(api.post("/v1/chat/completions", json=big), 413, code="request_too_large")

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "tiny-r1", "prompt": "'
        for _ in range(20):
            yield b"x" * 1000
        yield b'"}'

    assert_error(api.post("/v1/completions", content=chunked()), 413)


def test_malformed_json_gets_400(api):
    for body in [b'{"model": "tiny-r1", "messages": [', b"not json", b"\xff\xfe", b"[1, 2]"]:
        assert_error(api.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}),
                     400, code="invalid_json")


def test_unknown_or_invalid_fields_get_400(api):
    base = {"model": MODEL_ID, "messages": QUESTION}
    error = assert_error(api.post("/v1/chat/completions", json={**base, "reasoning_effort": "high"}), 400,
                         param="reasoning_effort", code="unknown_parameter")
    assert "reasoning_effort" in error["message"]
    assert_error(api.post("/v1/chat/completions", json={"model": MODEL_ID}), 400, param="messages")
    assert_error(api.post("/v1/chat/completions", json={**base, "temperature": 5}), 400, param="temperature")
    for field, value in (("temperature", "NaN"), ("top_p", "Infinity"), ("repetition_penalty", "-Infinity")):
        body = '{"model": "%s", "messages": %s, "%s": %s}' % (MODEL_ID, json.dumps(QUESTION), field, value)
        error = assert_error(api.post("/v1/chat/completions", content=body,
                                      headers={"Content-Type": "application/json"}), 400, param=field)
        assert "finite number" in error["message"], error  # not a range it may seem to be within
    assert_error(api.post("/v1/chat/completions", json={**base, "messages": [{"role": "robot", "content": "hi"}]}),
                 400)
    assert_error(api.post("/v1/completions", json={"model": MODEL_ID, "prompt": ""}), 400, param="prompt")


def test_unknown_model_gets_404(api):
    assert_error(api.post("/v1/chat/completions", json={"model": "gpt-9", "messages": QUESTION}), 404,
                 param="model", code="model_not_found")
    assert_error(api.get("/v1/models/gpt-9"), 404)
    assert_error(api.get("/v1/no-such-route"), 404)


def test_max_tokens_over_the_limit_gets_400(api):
    body = {"model": MODEL_ID, "messages": QUESTION, "max_tokens": 2001}
    assert_error(api.post("/v1/chat/completions", json=body), 400, param="max_tokens")
    assert_error(api.post("/v1/completions", json={"model": MODEL_ID, "prompt": "z", "max_tokens": 5000}), 400,
                 param="max_tokens")


def test_context_overflow_gets_400(api):
    long_prompt = "y" * 2100  # the model has 2048 positions
    assert_error(api.post("/v1/completions", json={"model": MODEL_ID, "prompt": long_prompt, "max_tokens": 1}), 400,
                 code="context_length_exceeded")
    body = {"model": MODEL_ID, "prompt": "y" * 1500, "max_tokens": 1000}  # each fits, together they do not
    assert_error(api.post("/v1/completions", json=body), 400, code="context_length_exceeded")
    r = api.post("/v1/completions", json={**body, "max_tokens": 20})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20


def test_server_still_serves_after_bad_requests(api):
    r = api.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": QUESTION})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ANSWER


def test_deeply_nested_json_gets_400_and_the_server_still_serves(api):
    for depth in (40, 3000):  # over the limit; far over Python's recursion limit (a RecursionError: was a 500)
        body = '{"model": "tiny-r1", "prompt": ' + "[" * depth + "]" * depth + "}"
        error = assert_error(api.post("/v1/completions", content=body), 400, code="invalid_json")
        assert "nested too deeply" in error["message"]
    r = api.post("/v1/completions", json={"model": MODEL_ID, "prompt": "z", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "yzy"


def test_lone_surrogates_get_400(api):
    escaped = '{"model": "tiny-r1", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    assert_error(api.post("/v1/chat/completions", content=escaped), 400, param="messages.0.content",
                 code="invalid_unicode")
    in_a_key = '{"model": "tiny-r1", "messages": [], "\\udc00": 1}'
    assert_error(api.post("/v1/chat/completions", content=in_a_key), 400, code="invalid_unicode")
    encoded = b'{"model": "tiny-r1", "prompt": "\xed\xa0\x80"}'  # U+D800 written as UTF-8 bytes: not UTF-8
    assert_error(api.post("/v1/completions", content=encoded), 400, code="invalid_json")
    pair = '{"model": "tiny-r1", "prompt": "z\\ud83d\\ude00", "max_tokens": 1}'  # a valid pair: one character
    assert api.post("/v1/completions", content=pair).status_code == 200


def test_token_budget_and_prompt_count_over_the_limit_get_400(api):
    # the server allows 4000 completion tokens per request and 8 prompts
    error = assert_error(api.post("/v1/completions", json={"model": MODEL_ID, "prompt": ["z"] * 3, "max_tokens": 2000}),
                         400, param="max_tokens", code="request_too_large")
    assert "6000" in error["message"] and "4000" in error["message"]
    body = {"model": MODEL_ID, "messages": QUESTION, "n": 3, "max_tokens": 1500}
    assert_error(api.post("/v1/chat/completions", json=body), 400, code="request_too_large")
    assert_error(api.post("/v1/completions", json={"model": MODEL_ID, "prompt": ["z"] * 9, "max_tokens": 1}), 400,
                 param="prompt")
    r = api.post("/v1/completions", json={"model": MODEL_ID, "prompt": ["z"] * 8, "max_tokens": 4})
    assert r.status_code == 200 and len(r.json()["choices"]) == 8
    # no max_tokens: the default is cut to fit the budget (4000 / 8 rows) instead of refused
    r = api.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": QUESTION, "n": 8})
    assert r.status_code == 200 and all(c["message"]["content"] == ANSWER for c in r.json()["choices"])


def raw_request(server, body: bytes, content_length: int) -> socket.socket:
    """A connection that sent a request's headers and `body`, maybe less than Content-Length says."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n".encode() + body)
    return sock


@pytest.mark.slow
def test_stalled_body_gets_408_and_the_connection_is_closed(server):
    t0 = time.monotonic()
    with raw_request(server, b'{"model": "tiny-r1", "pro', content_length=100) as sock:
        sock.settimeout(BODY_TIMEOUT_S + 20)
        reply = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            reply += chunk
    elapsed = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b'"code":"request_timeout"' in reply and b"connection: close" in reply.lower()
    assert BODY_TIMEOUT_S * 0.9 < elapsed < BODY_TIMEOUT_S + 10


@pytest.mark.slow
def test_client_gone_mid_body_is_one_log_line(server, caplog):
    uvicorn_log = logging.getLogger("uvicorn.error")  # where an ASGI traceback would go (it does not propagate)
    uvicorn_log.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="r1lab.serve")
    try:
        with raw_request(server, b'{"model": "tiny-r1", "pro', content_length=100):
            time.sleep(0.2)  # the server is reading the body when the client leaves
        deadline = time.monotonic() + 10
        while not any("went away" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.05)
        time.sleep(0.3)  # anything logged after it (a traceback) would be here by now
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    lines = [r for r in caplog.records if r.name.startswith(("r1lab", "uvicorn"))]
    assert len(lines) == 1 and lines[0].exc_info is None, [r.getMessage() for r in lines]
    assert "\n" not in lines[0].getMessage() and "127.0.0.1" in lines[0].getMessage()


def test_requests_are_shared_by_remote_address(server):
    from r1lab.serve.batcher import Batcher

    batcher = server.app.state.server.batcher
    clients = []
    original = Batcher.submit
    batcher.submit = lambda job: (clients.append(job.client), original(batcher, job))
    try:
        for address in ("127.0.0.1", "127.0.0.2"):  # the whole 127/8 is this machine: two "hosts"
            transport = httpx.HTTPTransport(local_address=address)
            with httpx.Client(transport=transport, base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                              timeout=60) as client:
                r = client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "z", "max_tokens": 2})
                assert r.status_code == 200
    finally:
        del batcher.submit
    assert clients == ["127.0.0.1", "127.0.0.2"]


# ---------------------------------------------------------------------------------------------------------------
# the OpenAI fields clients send: neutral values accepted, the rest refused by name; logprobs; usage chunks


NEUTRAL_CHAT = {"frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": False, "top_logprobs": 0,
                "response_format": {"type": "text"}, "logit_bias": {}, "user": "user-1", "tools": [],
                "tool_choice": "none", "parallel_tool_calls": True, "store": False, "metadata": {"run": "1"},
                "service_tier": "auto", "modalities": ["text"], "stream_options": {"include_usage": False},
                "prompt_cache_key": "k", "safety_identifier": "s", "function_call": "none", "functions": []}
NEUTRAL_COMPLETIONS = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "user": "u", "echo": False,
                       "best_of": 1, "suffix": "", "logprobs": None}


@pytest.mark.parametrize("field, value", NEUTRAL_CHAT.items())
def test_each_neutral_chat_field_is_accepted(api, field, value):
    r = api.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": QUESTION, field: value})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == ANSWER


@pytest.mark.parametrize("field, value", NEUTRAL_COMPLETIONS.items())
def test_each_neutral_completions_field_is_accepted(api, field, value):
    r = api.post("/v1/completions", json={"model": MODEL_ID, "prompt": "z", "max_tokens": 3, field: value})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "yzy"


def test_the_openai_client_sends_every_neutral_field_at_once(openai_client):
    fields = {k: v for k, v in NEUTRAL_CHAT.items() if k not in ("functions", "function_call", "stream_options")}
    r = openai_client.chat.completions.create(model=MODEL_ID, messages=QUESTION, **fields)
    assert r.choices[0].message.content == ANSWER and r.choices[0].logprobs is None


@pytest.mark.parametrize("path, field, value", [
    ("chat", "logit_bias", {"5": 10}),
    ("chat", "top_logprobs", 3), ("chat", "response_format", {"type": "json_object"}),
    ("chat", "response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("chat", "tools", [{"type": "function", "function": {"name": "f"}}]), ("chat", "tool_choice", "required"),
    ("chat", "functions", [{"name": "f"}]), ("chat", "store", True), ("chat", "modalities", ["text", "audio"]),
    ("chat", "service_tier", "flex"),
    ("completions", "logit_bias", {"5": 10}), ("completions", "logprobs", 2), ("completions", "logprobs", 0),
    ("completions", "echo", True), ("completions", "best_of", 3), ("completions", "suffix", "}"),
])
def test_a_non_neutral_field_gets_400_naming_it(api, path, field, value):
    body = {"model": MODEL_ID, **({"messages": QUESTION} if path == "chat" else {"prompt": "z"}), field: value}
    url = "/v1/chat/completions" if path == "chat" else "/v1/completions"
    error = assert_error(api.post(url, json=body), 400, param=field, code="unsupported_value")
    assert error["message"].startswith(f"'{field}'") and "not supported" in error["message"]


def test_the_openai_client_sees_the_refusal(openai_client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model=MODEL_ID, messages=QUESTION, logit_bias={"5": 10})
    assert info.value.status_code == 400 and info.value.body["param"] == "logit_bias"


VLLM_EXTRAS = {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.5}


def test_the_openai_client_sends_vllms_sampling_extras(openai_client):
    # The script's next token has logit ~45 and every other 0: these settings keep it, so the answer is unchanged...
    r = openai_client.chat.completions.create(model=MODEL_ID, messages=QUESTION, seed=1, extra_body=VLLM_EXTRAS)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == (REASONING, ANSWER)
    # ... while penalties strong enough are honoured: after "z" comes "y", then "z" again unless it is penalised
    ask = dict(model=MODEL_ID, prompt="z", max_tokens=40, seed=5)
    assert openai_client.completions.create(**ask).choices[0].text == "yz" * 20
    repeated = openai_client.completions.create(**ask, extra_body={"repetition_penalty": 100}).choices[0].text
    assert repeated.startswith("y") and not repeated.startswith("yz")  # z (in the prompt) drops from 45 to 0.45
    worn = openai_client.completions.create(**{**ask, "max_tokens": 60}, presence_penalty=2, frequency_penalty=2)
    assert worn.choices[0].text.startswith("yzyzyz") and worn.choices[0].text != "yz" * 30  # -2 a repeat: 45 -> < 0
    every = openai_client.completions.create(**ask, extra_body={"top_k": -1, "min_p": 0}).choices[0].text
    assert every == "yz" * 20  # vLLM's "no top-k" and min-p 0 change nothing


@pytest.mark.parametrize("field, value", [("top_k", -2), ("min_p", 1.5), ("min_p", -0.1), ("repetition_penalty", 0),
                                          ("presence_penalty", 2.5), ("frequency_penalty", -3), ("top_k", 0.5)])
def test_out_of_range_sampling_extras_get_400(api, field, value):
    body = {"model": MODEL_ID, "prompt": "z", "max_tokens": 2, field: value}
    assert_error(api.post("/v1/completions", json=body), 400, param=field, code="invalid_value")


THINKING_SWITCH = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}"
                   "<|assistant|>{% if enable_thinking is defined and enable_thinking is false %}</think>"
                   "{% else %}<think>{% endif %}{% endif %}")  # Qwen3's switch, reduced to its tags


def test_chat_template_kwargs_reach_the_chat_template(tmp_path):
    openai = pytest.importorskip("openai")
    from r1lab.serve.app import create_app

    model = scripted_model_dir(tmp_path / "qwen3-like", chat_template=THINKING_SWITCH)
    # the scripted model answers in <answer> tags; auto would read a Qwen3-like template's model as a boxed one
    with ServerThread(create_app(model, device="cpu", log_level="warning", answer_format="tags")) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=60)
        ask = dict(model="qwen3-like", messages=QUESTION)
        thinking = client.chat.completions.create(**ask).choices[0].message
        no_thinking = {"chat_template_kwargs": {"enable_thinking": False}}
        quick = client.chat.completions.create(**ask, extra_body=no_thinking).choices[0].message
        assert (thinking.reasoning_content, thinking.content) == (REASONING, ANSWER)
        assert (quick.reasoning_content, quick.content) == (None, ANSWER)  # the template closed the thinking
        for kwargs, words in [({"messages": []}, "set by the renderer"),
                              ({"add_generation_prompt": False}, "set by the renderer"),
                              ({"enable_thinking": {"a": 1}}, "not an object"), ({"enable_thinking": [1]}, "an array"),
                              ({"enable_reasoning": False}, "does not read 'enable_reasoning'")]:
            r = httpx.post(f"{srv.url}/v1/chat/completions", json={**ask, "chat_template_kwargs": kwargs}, timeout=30)
            assert words in assert_error(r, 400, param="chat_template_kwargs")["message"], kwargs


def test_chat_template_kwargs_without_a_chat_template_get_400(api):
    body = {"model": MODEL_ID, "messages": QUESTION, "chat_template_kwargs": {"enable_thinking": False}}
    error = assert_error(api.post("/v1/chat/completions", json=body), 400, param="chat_template_kwargs")
    assert "'r1zero' template reads no variables" in error["message"]
    assert api.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {}}).status_code == 200


def test_logprobs_of_the_scripted_answer(openai_client):
    r = openai_client.chat.completions.create(model=MODEL_ID, messages=QUESTION, logprobs=True, top_logprobs=0)
    content = r.choices[0].logprobs.content
    assert [t.token for t in content] == SCRIPT[1:]  # every completion token, reasoning and end-of-text included
    assert len(content) == r.usage.completion_tokens
    assert all(-1e-3 < t.logprob <= 0 and t.top_logprobs == [] and bytes(t.bytes) == t.token.encode()
               for t in content)
    stream = openai_client.chat.completions.create(model=MODEL_ID, messages=QUESTION, logprobs=True, stream=True)
    streamed = [t.token for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == SCRIPT[1:]


def random_model_dir(path: Path) -> Path:
    """A small model with random weights: sampling from it has log-probs far from 0."""
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      eos_token_id=tok.pad_id)
    save_model(CausalLM(cfg), path)
    tok.save(path)
    return path


def test_logprobs_are_the_engines_sampling_logprobs(tmp_path):
    from r1lab.engine.engine import Engine
    from r1lab.model.hf_format import load_model
    from r1lab.model.tokenizer import load_tokenizer
    from r1lab.serve.app import create_app, token_bytes

    openai = pytest.importorskip("openai")
    model = random_model_dir(tmp_path / "random")
    tok = load_tokenizer(model)
    prompt = tok.encode(render_conversation(tok, QUESTION))
    expected = Engine(load_model(model), tok).generate([prompt], max_new_tokens=[24], temperature=[0.7], top_p=[0.9],
                                                        seed=[11])[0]
    assert min(expected.logprobs) < -0.5  # a test that could tell them apart
    with ServerThread(create_app(model, served_model_name="random", device="cpu", log_level="warning")) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=60)
        ask = dict(model="random", messages=QUESTION, max_tokens=24, temperature=0.7, top_p=0.9, seed=11,
                   logprobs=True)
        whole = client.chat.completions.create(**ask).choices[0].logprobs.content
        chunks = [c.choices[0].logprobs for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    streamed = [t for lp in chunks if lp for t in lp.content]
    for got in (whole, streamed):
        assert [bytes(t.bytes) for t in got] == [token_bytes(tok, i) for i in expected.token_ids]
        assert [t.logprob for t in got] == pytest.approx(expected.logprobs, abs=1e-6)


def test_include_usage_adds_a_last_chunk_and_null_usage_before_it(api):
    body = {"model": MODEL_ID, "prompt": "z", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with api.stream("POST", "/v1/completions", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 4,
                                                                    "total_tokens": 5}
    assert len(events) > 2 and all("usage" in e and e["usage"] is None for e in events[:-1])
    with api.stream("POST", "/v1/completions", json={**body, "stream_options": None}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[-1]["choices"] and not any("usage" in e for e in events)


def test_startup_message_names_the_base_url_and_model(server, model_dir):
    import dataclasses

    from r1lab.serve.app import create_app, startup_message

    state = server.app.state.server
    text = startup_message(state)
    assert 'base_url="http://127.0.0.1:8000/v1", model="tiny-r1", api_key="YOUR_API_KEY"' in text
    everywhere = dataclasses.replace(state, cfg=dataclasses.replace(state.cfg, host="0.0.0.0", port=9000, api_key=""))
    text = startup_message(everywhere)
    assert 'base_url="http://127.0.0.1:9000/v1"' in text and "all interfaces" in text and 'api_key="none"' in text
    # without --served-model-name the id is the model directory's name: what /v1/models lists and requests name
    assert create_app(model_dir, device="cpu").state.server.model_id == model_dir.name


def test_a_runs_model_is_served_under_the_runs_name(tmp_path, model_dir):
    import shutil

    from fastapi.testclient import TestClient

    from r1lab.serve.app import create_app, default_served_name

    run = tmp_path / "runs" / "my-run"
    shutil.copytree(model_dir, run / "model")
    assert default_served_name(str(run / "model")) == "model"  # no config.yaml beside it: a directory named model
    (run / "config.yaml").write_text("steps: 1\n")
    with TestClient(create_app(run / "model", device="cpu")) as client:
        listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
        ok = client.post("/v1/completions", json={"model": "my-run", "prompt": "z", "max_tokens": 2})
        old = client.post("/v1/completions", json={"model": "model", "prompt": "z", "max_tokens": 2})
    assert listed == ["my-run"] and ok.json()["model"] == "my-run"
    assert_error(old, 404, param="model", code="model_not_found")  # the old name "model" is not an alias


# ---------------------------------------------------------------------------------------------------------------
# sharing the engine


def test_client_leaving_mid_stream_frees_its_row(server, api):
    before = server.stats
    body = {"model": MODEL_ID, "prompt": "z", "max_tokens": 2000, "stream": True}
    with api.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
    # the connection is closed mid-stream: the batcher must end that row long before its 2000 tokens
    deadline = time.monotonic() + 20
    while server.stats["aborted_rows"] == before["aborted_rows"]:
        assert time.monotonic() < deadline, "the row of a client that left was never aborted"
        time.sleep(0.02)
    assert server.stats["completion_tokens"] - before["completion_tokens"] < 2000
    r = api.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": QUESTION})
    assert r.json()["choices"][0]["message"]["content"] == ANSWER


def test_concurrent_requests_are_batched(server, api):
    before = server.stats
    results, barrier = [None] * 8, threading.Barrier(8)

    def client(i: int) -> None:
        barrier.wait()
        body = {"model": MODEL_ID, "prompt": "z" if i % 2 else "y", "max_tokens": 40 + i}
        results[i] = api.post("/v1/completions", json=body).json()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = server.stats
    for i, r in enumerate(results):  # each got its own row's text, not a neighbour's
        assert r["choices"][0]["text"] == (("yz" if i % 2 else "zy") * 50)[: 40 + i]
        assert r["usage"]["completion_tokens"] == 40 + i
    assert after["rows"] - before["rows"] == 8
    assert after["batches"] - before["batches"] < 8  # at least two requests shared a generate call
    assert after["max_batch_rows"] > 1


@pytest.mark.slow
def test_a_flood_shares_the_batch_with_a_later_client(model_dir):
    """Client A queues 8 long completions (twice the 4 slots); client B's two short ones, sent while A holds every
    slot, start at the very next decode step and finish before any of A's: two of A's rows are parked (B's share is
    2 of the 4 slots) and resume later. A's rows must come out as if never parked."""
    from r1lab.engine.engine import Engine
    from r1lab.model.hf_format import load_model
    from r1lab.model.tokenizer import load_tokenizer
    from r1lab.serve.batcher import Batcher, Done, Job, SamplingParams

    tok = load_tokenizer(model_dir)
    batcher = Batcher(Engine(load_model(model_dir), tok), max_batch=4, batch_wait_s=0)
    done, all_done, b_steps = [], threading.Event(), []

    def recorder(client: str):
        def deliver(events):  # the worker thread, right after a decode step
            if client == "A" and not b_sent and batcher.stats["steps"] >= 7:  # mid-run: A holds all 4 slots
                b_sent.append(batcher.stats["steps"])
                for job in b_jobs:
                    batcher.submit(job)
            if client == "B":
                b_steps.append(batcher.stats["steps"])
            done.extend((client, e) for e in events if isinstance(e, Done))
            if len(done) == 10:
                all_done.set()
        return deliver

    b_sent = []
    b_jobs = [Job(tok.encode("y"), SamplingParams(max_tokens=5), recorder("B"), stream=True, client="B"),
              Job(tok.encode("y"), SamplingParams(max_tokens=11), recorder("B"), stream=True, client="B")]
    try:
        for _ in range(8):
            batcher.submit(Job(tok.encode("z"), SamplingParams(max_tokens=301), recorder("A"), stream=True, client="A"))
        assert all_done.wait(120), f"{len(done)} of 10 completions done"
    finally:
        batcher.close()
    assert b_steps[0] == b_sent[0] + 1  # B's first tokens came out of the step right after it arrived
    assert [(who, d.text) for who, d in done[:2]] == [("B", "zyzyz"), ("B", ("zy" * 6)[:11])]
    a_done = [d for who, d in done if who == "A"]
    assert len(a_done) == 8
    for d in a_done:
        assert d.text == ("yz" * 151)[:301] and d.completion_tokens == 301 and d.finish_reason == "length"
    assert batcher.stats["parked_rows"] == 2 and batcher.stats["max_batch_rows"] == 4


@pytest.mark.slow
def test_seeded_completions_are_the_same_whoever_shares_the_engine(tmp_path):
    """A heavy client's six seeded completions in four slots and a light client's one, arriving mid-run: the light
    one takes a slot at once (one of the heavy rows parked), the heavy rows move to their own lane and back; every
    completion's text is what the engine samples for that request alone."""
    from r1lab.engine.engine import Engine
    from r1lab.model.hf_format import load_model
    from r1lab.model.tokenizer import load_tokenizer
    from r1lab.serve.batcher import Batcher, Done, Job, SamplingParams

    model_dir = random_model_dir(tmp_path / "random")
    tok = load_tokenizer(model_dir)
    engine = Engine(load_model(model_dir), tok)
    tok.eos_ids = set()  # every completion runs to its max_tokens, so the rows overlap for long
    batcher = Batcher(engine, max_batch=4, batch_wait_s=0)
    done, all_done = {}, threading.Event()
    asks = {f"A{i}": ("z" * (i + 1), SamplingParams(max_tokens=60 + 7 * i, temperature=0.8, top_p=0.9, seed=i))
            for i in range(6)}
    asks["B"] = ("y", SamplingParams(max_tokens=12, temperature=1.0, seed=99))

    def deliver(name: str):
        def on_events(events):  # the worker thread
            if name == "A0" and "B" not in submitted and batcher.stats["steps"] >= 10:
                submitted.add("B")
                batcher.submit(Job(tok.encode(asks["B"][0]), asks["B"][1], deliver("B"), client="B"))
            for e in events:
                if isinstance(e, Done):
                    done[name] = e
                    order.append(name)
            if len(done) == len(asks):
                all_done.set()
        return on_events

    submitted, order = set(), []
    try:
        for name in [n for n in asks if n.startswith("A")]:
            batcher.submit(Job(tok.encode(asks[name][0]), asks[name][1], deliver(name), stream=True, client="A"))
        assert all_done.wait(120), f"{len(done)} of {len(asks)} done"
    finally:
        batcher.close()
    assert batcher.stats["parked_rows"] >= 1 and batcher.stats["moved_rows"] >= 1 and batcher.stats["light_steps"]
    assert order[0] == "B"  # it arrived at step 10, when A's first four had 50 to 95 tokens to go
    for name, (prompt, p) in asks.items():
        alone = engine.generate([tok.encode(prompt)], max_new_tokens=[p.max_tokens], temperature=[p.temperature],
                                top_p=[p.top_p], seed=[p.seed])[0]
        assert (done[name].text, done[name].completion_tokens) == (alone.text, p.max_tokens), name


# ---------------------------------------------------------------------------------------------------------------
# the pieces, without a server


@pytest.mark.parametrize("text,in_think,expected", [
    ("<think> add 2 and 2 </think> <answer> 4 </answer>", False, ("add 2 and 2", "4")),
    (" add them\n step two</think><answer>4</answer>", True, ("add them\n step two", "4")),
    ("The answer is <answer>4</answer>.", False, ("", "The answer is 4.")),
    ("<think>unfinished thought", False, ("unfinished thought", "")),
    ("no tags at all", False, ("", "no tags at all")),
    ("a </think> b <think>c<think>d</think> e", False, ("cd", "a  b  e")),  # stray tags dropped, spaces kept
    ("<think>x</think>2 < 3 and <answ", False, ("x", "2 < 3 and <answ")),
])
def test_reasoning_split_whole_and_in_every_cut(text, in_think, expected):
    got = split_reasoning(text, in_think)
    assert got == expected
    for cut in range(len(text) + 1):  # two chunks, the cut anywhere (inside tags too)
        s = ReasoningSplitter(in_think)
        parts = [s.feed(text[:cut]), s.feed(text[cut:]), s.finish()]
        assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == got
    s = ReasoningSplitter(in_think)  # one character at a time
    parts = [s.feed(ch) for ch in text] + [s.finish()]
    assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == got


def test_reasoning_streams_before_the_closing_tag():
    s = ReasoningSplitter()
    assert s.feed("<think>first ") == ("first", "")
    assert s.feed("idea</thi") == (" idea", "")
    assert s.feed("nk> <answer>4") == ("", "4")


def byte_level_tokenizer():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from r1lab.model.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["hello world, héllo wörld"] * 20, trainer)
    return Tokenizer(backend, EOS)


def test_incremental_detokenizer_never_emits_half_a_character():
    tok = byte_level_tokenizer()
    text = "héllo 日本語 wörld 🙂!"
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2  # the CJK and emoji characters are split across byte tokens
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_cutter_holds_back_a_possible_stop_start():
    cut = StopCutter(["STOP", "xyz"])
    assert cut.push("abc S") == "abc "
    assert cut.push("T") == ""
    assert cut.push("ay") == "STay"  # it was not a stop after all
    assert cut.push(" xy") == " "
    assert cut.push("zzz") == "" and cut.hit and cut.text == "abc STay "
    nothing = StopCutter(["</s>"])
    assert nothing.push("a</") == "a" and nothing.flush() == "</"


def test_text_stream_cuts_at_stop_strings():
    tok = build_tiny_tokenizer()
    stream = TextStream(tok, ["+2"])
    out = "".join(stream.push(i) for i in tok.encode("1+1+2+3")) + stream.flush()
    assert out == "1+1" and stream.stopped


def test_prompt_templates():
    tok = build_tiny_tokenizer()
    assert render_conversation(tok, QUESTION) == render_prompt(tok, "What is 6*7?", "r1zero")
    tok.chat_template = THINK_TEMPLATE
    text = render_conversation(tok, QUESTION)
    assert text == "<|user|>What is 6*7?\n<|assistant|><think>" and starts_in_think(text)
    assert not starts_in_think(render_conversation(tok, QUESTION, template="r1zero"))
    assert starts_in_think(render_prompt(tok, "What is 6*7?", template="r1zero", prefill="<think>\n"))


# ---------------------------------------------------------------------------------------------------------------
# r1lab chat, the terminal client


def test_terminal_chat_streams_reasoning_and_answer(tmp_path):
    from rich.console import Console

    from r1lab.config import ChatConfig
    from r1lab.serve.chat import run_chat

    model = scripted_model_dir(tmp_path / "m", chat_template=THINK_TEMPLATE)  # the prompt ends inside <think>
    out = io.StringIO()
    run_chat(ChatConfig(model=str(model), device="cpu"), io.StringIO("What is 6*7?\n\n/reset\nAgain?\n/quit\nnot read\n"),
             Console(file=out, width=120, color_system=None))
    text = out.getvalue()
    assert text.count(f"thinking: {REASONING}\nanswer: {ANSWER}\n") == 2
    assert "you> What is 6*7?" in text and "(conversation cleared)" in text and "not read" not in text


def test_terminal_chat_shows_an_empty_reply_as_such(tmp_path):
    from rich.console import Console

    from r1lab.config import ChatConfig
    from r1lab.serve.chat import run_chat

    # after the prompt's last token ("i") the scripted model writes end-of-text at once
    model = scripted_model_dir(tmp_path / "m", chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    out = io.StringIO()
    run_chat(ChatConfig(model=str(model), device="cpu"), io.StringIO("Hi\nHi\n"),
             Console(file=out, width=120, color_system=None))
    assert out.getvalue().count("you> Hi\n(empty reply)\n") == 2


@pytest.mark.slow
def test_chat_and_serve_commands(model_dir):
    from r1lab.cli import build_parser
    from r1lab.config import ServeConfig, resolve

    args = build_parser().parse_args(["serve", "--model", "m", "--api-key", "k", "--max-batch", "8", "--port", "9"])
    cfg = resolve(ServeConfig, args)
    assert (cfg.model, cfg.api_key, cfg.max_batch, cfg.port) == ("m", "k", 8, 9)
    code = ("import sys, r1lab.serve.chat, r1lab.serve.batcher, r1lab.model.templates, r1lab.cli; "
            "assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules; r1lab.cli.main()")
    r = subprocess.run([sys.executable, "-c", code, "chat", "--model", str(model_dir), "--device", "cpu"],
                       input="What is 6*7?\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"thinking: {REASONING}" in r.stdout and f"answer: {ANSWER}" in r.stdout


def test_a_port_in_use_is_refused_before_the_model_loads(model_dir, monkeypatch, capsys):
    from r1lab.cli import main
    from r1lab.serve import app as app_module

    monkeypatch.setattr(app_module, "load_engine", lambda cfg: pytest.fail("the model loaded"))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(SystemExit) as info:
            main(["serve", "--model", str(model_dir), "--port", str(port)])
    assert info.value.code == 2
    assert f"r1lab serve: error: cannot listen on 127.0.0.1:{port} (Address already in use)" in capsys.readouterr().err
