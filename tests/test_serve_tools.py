"""`r1lab serve --tools python` and `r1lab chat --tools python`: tool calls through the HTTP API and the terminal.

The model is a real r1lab CausalLM whose weights are set by hand (as in test_serve.py) so that the current token
decides the next one, here among a set: after the R1-Zero prompt it writes `<think><python>print(6*7)</python>` and
stops there (the close tag is a token: the tiny tokenizer with the tool tags added). The server runs the code in the
real sandbox and appends `<output>42\n</output>`; after `</output>` the model writes random letters from LETTERS
(each followed by another letter or `</think>`, evenly), so that the seed matters, then `</think><answer>42</answer>`
and end-of-text. Variants write `1/0` instead (a failing call) or call the tool again after every output (a loop).
"""

from __future__ import annotations

import io
import json
import math
import threading
import time

import pytest
from tokenizers import AddedToken

from r1lab.engine.engine import Engine
from r1lab.engine.tools import run_in_sandbox
from r1lab.model.templates import R1_ZERO_SUFFIX, render_conversation
from r1lab.model.tokenizer import EOS, build_tiny_tokenizer

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from test_serve import ServerThread, bigram_model  # noqa: E402

TOOL_TAGS = ["<python>", "</python>", "<output>", "</output>"]
LETTERS = "abcdefgh"
QUESTION = [{"role": "user", "content": "What is 6*7?"}]
CALL = "<python>print(6*7)</python><output>42\n</output>"


def tool_tokenizer():
    tok = build_tiny_tokenizer()
    tok.backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TAGS])
    return tok


def tool_engine(code: str = "print(6*7)", loop: bool = False) -> Engine:
    """The scripted model above; loop: `</output>` is followed by `<python>` (a call after every call)."""
    tok = tool_tokenizer()
    V = tok.vocab_size
    one = lambda s: tok.encode(s, add_special_tokens=False)[0]  # noqa: E731
    chain = lambda items: {one(a): [one(b)] for a, b in zip(items, items[1:])}  # noqa: E731
    following = {t: [one(EOS)] for t in range(V)}
    following.update(chain([R1_ZERO_SUFFIX, "<think>", "<python>", *code, "</python>"]))
    following.update(chain(["</think>", "<answer>", "4", "2", "</answer>", EOS]))
    random_tail = [one(c) for c in LETTERS] + [one("</think>")]
    following[one("</output>")] = [one("<python>")] if loop else random_tail
    following.update({one(c): random_tail for c in LETTERS})
    following.update(chain(["z", "y", "z"]))
    return Engine(bigram_model(V, following, one(EOS)).eval(), tok)


def tool_server(engine: Engine, runner=run_in_sandbox, **settings) -> ServerThread:
    from r1lab.serve.app import create_app

    settings = {"tools": "python", "served_model_name": "tiny", "device": "cpu", "log_level": "warning",
                "max_tokens": 400, **settings}
    return ServerThread(create_app("tiny-tools", engine, runner=runner, **settings))


@pytest.fixture(scope="module")
def server():
    with tool_server(tool_engine()) as srv:
        yield srv


def chat(url: str, **body) -> dict:
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": QUESTION, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream_chat(url: str, **body) -> tuple[str, str, str, dict]:
    """(reasoning_content, content, finish_reason, usage) of a streamed chat completion, its deltas joined."""
    reasoning, content, finish, usage = [], [], None, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": QUESTION, "stream": True,
                            "stream_options": {"include_usage": True}, **body}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                reasoning.append(choice["delta"].get("reasoning_content") or "")
                content.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
    return "".join(reasoning), "".join(content), finish, usage


def test_the_call_and_its_output_are_in_reasoning_content(server):
    body = chat(server.url, seed=3)
    message, choice = body["choices"][0]["message"], body["choices"][0]
    assert message["reasoning_content"].startswith(CALL), message
    assert message["content"] == "42" and choice["finish_reason"] == "stop"
    letters = message["reasoning_content"][len(CALL):]
    assert set(letters) <= set(LETTERS)
    # every token counts, the tool output's included: <think>, the call, the output, the letters, the answer, eos
    tok = tool_tokenizer()
    whole = f"<think>{message['reasoning_content']}</think><answer>42</answer>"
    assert body["usage"]["completion_tokens"] == len(tok.encode(whole, add_special_tokens=False)) + 1
    assert server.stats["tool_calls"] >= 1


def test_a_stream_joins_to_the_same_reply(server):
    body = chat(server.url, seed=5)
    reasoning, content, finish, usage = stream_chat(server.url, seed=5)
    message = body["choices"][0]["message"]
    assert (reasoning, content, finish) == (message["reasoning_content"], message["content"], "stop")
    assert usage == body["usage"]
    assert reasoning.startswith(CALL)


def test_a_seeded_reply_is_the_same_alone_and_in_a_crowd(server):
    alone = chat(server.url, seed=11)["choices"][0]["message"]["reasoning_content"]
    replies: dict[int, str] = {}

    def ask(seed: int) -> None:
        replies[seed] = chat(server.url, seed=seed, n=2)["choices"][0]["message"]["reasoning_content"]

    threads = [threading.Thread(target=ask, args=(s,)) for s in (11, 12, 13, 14, 15, 16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert replies[11] == alone
    assert len(set(replies.values())) > 1  # the seed decides the letters after the output
    assert all(r.startswith(CALL) for r in replies.values())


def test_a_failing_call_shows_its_error():
    with tool_server(tool_engine(code="1/0")) as srv:
        message = chat(srv.url, seed=0)["choices"][0]["message"]
    assert message["reasoning_content"].startswith("<python>1/0</python><output>")
    assert "ZeroDivisionError" in message["reasoning_content"] and message["content"] == "42"


def test_a_call_past_max_tool_calls_ends_the_reply():
    with tool_server(tool_engine(loop=True), max_tool_calls=2) as srv:
        choice = chat(srv.url, seed=0)["choices"][0]
        assert srv.stats["tool_limit_rows"] == 1 and srv.stats["tool_calls"] == 2
    reasoning = choice["message"]["reasoning_content"]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == ""
    assert reasoning == CALL * 2 + "<python>print(6*7)</python>"


def test_tool_outputs_count_against_max_tokens():
    prompt = render_conversation(tool_tokenizer(), QUESTION, "auto")
    with tool_server(tool_engine(loop=True), max_tool_calls=50) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": prompt, "max_tokens": 50, "seed": 0})
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert choice["finish_reason"] == "length" and usage["completion_tokens"] == 50
    text = choice["text"]
    assert text.startswith("<think>" + CALL) and text.count("<output>") >= 2
    assert len(tool_tokenizer().encode(text, add_special_tokens=False)) == 50  # outputs' tokens are in the 50


def test_other_requests_flow_while_a_call_runs():
    started, release = threading.Event(), threading.Event()

    def slow(code, spec):
        started.set()
        release.wait(30)
        return run_in_sandbox(code, spec)

    replies = []
    with tool_server(tool_engine(), runner=slow) as srv:
        caller = threading.Thread(target=lambda: replies.append(chat(srv.url, seed=1)))
        caller.start()
        assert started.wait(30)
        t0 = time.monotonic()
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny", "prompt": "z", "max_tokens": 8}, timeout=30)
        assert r.json()["choices"][0]["text"] == "yzyzyzyz" and time.monotonic() - t0 < 20
        assert caller.is_alive() and not replies  # the call still runs: its reply waits, the other one did not
        release.set()
        caller.join(30)
    assert replies[0]["choices"][0]["message"]["reasoning_content"].startswith(CALL)


def test_startup_message_and_the_client_side_tools_refusal(server):
    from r1lab.serve.app import startup_message

    assert "tool calls run in the sandbox with" in startup_message(server.app.state.server)
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                   json={"model": "tiny", "messages": QUESTION, "tools": [{"type": "function"}]})
    assert r.status_code == 400 and "client-side" in r.json()["error"]["message"]


def test_tool_settings_are_checked():
    from r1lab.cli import build_parser
    from r1lab.config import ChatConfig, ServeConfig, resolve

    for cls in (ServeConfig, ChatConfig):
        with pytest.raises(ValueError, match="tool_tag and tool_output_tag"):
            cls(model="m", tools="python", tool_tag="out", tool_output_tag="out").check()
    args = build_parser().parse_args(["serve", "--model", "m", "--tools", "python", "--max-tool-calls", "2"])
    cfg = resolve(ServeConfig, args)
    assert (cfg.tools, cfg.max_tool_calls) == ("python", 2)


def test_terminal_chat_runs_the_tool():
    from rich.console import Console

    from r1lab.config import ChatConfig
    from r1lab.serve.chat import run_chat

    out = io.StringIO()
    run_chat(ChatConfig(model="tiny", device="cpu", tools="python", seed=4), io.StringIO("What is 6*7?\n/quit\n"),
             Console(file=out, width=200, color_system=None), engine=tool_engine())
    text = out.getvalue()
    assert "tool calls run in the sandbox with" in text
    assert f"thinking: {CALL}" in text and "answer: 42" in text


def run_jobs(batcher, jobs: list[tuple[str, int, int]]) -> dict[tuple[str, int, int], str]:
    """Submit (client, seed, n) jobs of the question together; the text of each of their completions."""
    from r1lab.serve.batcher import Done, Job, SamplingParams

    tok = batcher.engine.tokenizer
    prompt = tok.encode(render_conversation(tok, QUESTION, "auto"))
    texts, finished, lock = {}, threading.Event(), threading.Lock()
    total = sum(n for _, _, n in jobs)

    def deliverer(client: str, seed: int):
        def deliver(events) -> None:
            with lock:
                for e in events:
                    assert isinstance(e, Done) or e.__class__.__name__ == "Delta", e
                    if isinstance(e, Done):
                        texts[client, seed, e.index] = e.text
                if len(texts) == total:
                    finished.set()
        return deliver

    for client, seed, n in jobs:
        batcher.submit(Job(prompt, SamplingParams(max_tokens=300, n=n, seed=seed), deliverer(client, seed),
                           stream=seed % 2 == 0, client=client))
    assert finished.wait(60)
    return texts


def test_paused_rows_share_the_batch_fairly_and_keep_their_tokens():
    from r1lab.engine.tools import ToolSpec
    from r1lab.serve.batcher import Batcher

    jobs = [("heavy", 1, 3), ("heavy", 5, 3), ("light", 2, 1), ("other", 3, 2)]
    alone = {}
    for job in jobs:  # each job on an idle server
        batcher = Batcher(tool_engine(), max_batch=8, tools=ToolSpec())
        alone.update(run_jobs(batcher, [job]))
        batcher.close()
    crowded = Batcher(tool_engine(), max_batch=3, tools=ToolSpec())  # fewer slots than rows: parking, lanes
    together = run_jobs(crowded, jobs)
    crowded.close()
    assert together == alone and len(together) == 9
    assert all(text.startswith("<think>" + CALL) and text.endswith("<answer>42</answer>") for text in alone.values())
    stats = crowded.stats
    assert stats["tool_calls"] == 9 and stats["rows"] == 9 and stats["max_batch_rows"] == 3, stats


def test_terminal_chat_ends_a_reply_past_max_tool_calls():
    from rich.console import Console

    from r1lab.config import ChatConfig
    from r1lab.serve.chat import run_chat

    out = io.StringIO()
    run_chat(ChatConfig(model="tiny", device="cpu", tools="python", max_tool_calls=1), io.StringIO("6*7?\n"),
             Console(file=out, width=200, color_system=None), engine=tool_engine(loop=True))
    text = out.getvalue()
    assert f"thinking: {CALL}<python>print(6*7)</python>\n" in text
    assert "[a tool call past max_tool_calls (1) ends the reply]" in text


def test_logprobs_of_tool_output_tokens_are_zero(server):
    tokens = chat(server.url, seed=3, logprobs=True)["choices"][0]["logprobs"]["content"]
    pieces = [t["token"] for t in tokens]  # one character or tag per token
    start, end = pieces.index("<output>"), pieces.index("</output>")
    assert "".join(pieces[start : end + 1]) == "<output>42\n</output>"
    # the output block's tokens were appended, not sampled: 0.0; the letter after it was drawn among 9 tokens
    assert all(t["logprob"] == 0.0 for t in tokens[start : end + 1])
    assert tokens[end + 1]["logprob"] == pytest.approx(-math.log(9), abs=1e-3)
