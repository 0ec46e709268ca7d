"""Agents that call the policy through an OpenAI client (`--task agent:MODULE:FUNCTION`,
r1lab/rewards/environments/agent_env.py), and what answers the policy between its turns in a command (rollout_turns).

For a batch of rollouts, an OpenAI-compatible endpoint is served on a loopback port; each agent's API key names its
rollout, and the requests in flight are batched into one generate call. Token in, token out: a request that extends
the conversation as served appends only its new messages (tools.context_delta), so the sample trained on is exactly
the served tokens; one that does not is answered but not trained on (env/rewritten_history). A rollout's requests
share its max_new_tokens.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from r1lab.engine.tools import (EnvTurns, ToolSample, ToolSpec, ToolTurns, Turns, _Rollout, append_context,
                                append_turn, context_delta, conversation, prompt_seeds, turn_seed)
from r1lab.model.loading import encode_prompt
from r1lab.rewards.environments import is_environment
from r1lab.rewards.tasks.base import Problem

GATHER_S = 0.02  # a batch waits this long for more requests once none came in, unless every live agent has asked
SHUTDOWN_POLL_S = 0.02  # how often the endpoint's loop looks whether the batch is over


def rollout_turns(cfg: Any, task: Any, problems: list, tokenizer: Any) -> Turns | AgentTurns | None:
    """The task's agent, else its environment, else the tools cfg asks for (None: none of them)."""
    if callable(getattr(task, "agent", None)):
        return AgentTurns(task, problems, tokenizer, cfg.template, cfg.prefill)
    if is_environment(task):
        return EnvTurns(task, problems, tokenizer, cfg.template, cfg.prefill, cfg.reward_timeout_s)
    spec = ToolSpec.of(cfg)
    return ToolTurns(spec) if spec else None


@dataclass
class _Chain(_Rollout):
    """A rollout as served; pending not None while later requests still extend it."""

    served: list[dict] = field(default_factory=list)
    spent: int = 0  # tokens sampled for requests outside the sample (after a rewrite)

    def left(self, max_new_tokens: int) -> int:
        return max_new_tokens - len(self.out.token_ids) - self.spent


@dataclass
class _Request:
    chain: _Chain
    messages: list[dict]
    max_tokens: int  # 0: as many as the rollout's budget leaves
    reply: Future = field(default_factory=Future)


def text_of(content: Any) -> str:
    """A message's content as text: a string, or OpenAI's list of parts (their text joined)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is None or isinstance(content, str):
        return content or ""
    raise TypeError(f"a message's content is text or a list of parts, not {type(content).__name__}")


@dataclass
class AgentTurns:
    """The rollouts of an agent task: its agent run once per rollout against the endpoint."""

    env: Any  # an AgentEnvironment (r1lab/rewards/environments/agent_env.py)
    problems: list
    tokenizer: Any
    template: str
    prefill: str = ""

    def rollouts(self, engine: Any, prompt_ids: list[list[int]], *, num_samples: int = 1, max_new_tokens: int = 128,
                 seed: Any = None, stop_strings: tuple[str, ...] = (), **sampling: Any) -> list[ToolSample]:
        seeds = prompt_seeds(seed, len(prompt_ids))
        chains = {uuid.uuid4().hex: _Chain([], seeds[i // num_samples], i % num_samples,
                                           ToolSample(i // num_samples, [], "", [], "stop"), pending="open")
                  for i in range(len(prompt_ids) * num_samples)}
        requests: queue.Queue[_Request] = queue.Queue()
        server = _endpoint(chains, requests)
        # shutdown() waits for the loop's next poll: at serve_forever's default 0.5 s, half a second of every batch
        threading.Thread(target=server.serve_forever, args=(SHUTDOWN_POLL_S,), daemon=True).start()
        outcomes, done = [], []  # each agent's (kind, rewards); the agents that finished
        agents = threading.Thread(target=lambda: outcomes.extend(asyncio.run(self._run_agents(server, chains, done))),
                                  daemon=True)
        agents.start()
        try:
            while agents.is_alive() or not requests.empty():
                if batch := _gather(requests, agents, len(chains) - len(done)):
                    self._serve(engine, batch, max_new_tokens, stop_strings, sampling)
        finally:
            while not requests.empty():  # an agent cancelled mid-request (timed out): its handler must not wait on
                requests.get_nowait().reply.set_exception(ValueError("the rollout batch is over"))
            server.shutdown()
            server.server_close()
        if len(outcomes) != len(chains):  # not an agent's failure (those are its outcome): the loop itself broke
            raise RuntimeError(f"{self.env.name}: the agents' event loop ended before their runs did")
        return [self._finish(chain, outcome) for chain, outcome in zip(chains.values(), outcomes)]

    async def _run_agents(self, server: ThreadingHTTPServer, chains: dict[str, _Chain], done: list) -> list:
        import openai  # r1lab[judge]: the agents' client

        url = f"http://127.0.0.1:{server.server_address[1]}/v1"

        async def run(key: str, chain: _Chain) -> tuple[str, Any]:
            async with openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0) as client:
                try:
                    return "ok", await asyncio.wait_for(
                        self.env.run(client, "policy", self.problems[chain.out.prompt_index]), self.env.timeout_s)
                except asyncio.TimeoutError:
                    return "timeout", f"ran past {self.env.timeout_s:g} s"
                except Exception as err:  # noqa: BLE001 - an agent's failure costs its rollout, never the run
                    return "error", f"{type(err).__name__}: {err}"
                finally:
                    done.append(key)

        return await asyncio.gather(*(run(key, chain) for key, chain in chains.items()))

    def _serve(self, engine: Any, batch: list[_Request], max_new_tokens: int, stops: tuple, sampling: dict) -> None:
        """Sample one reply per request, in one generate call; record those that extend their rollout's sample."""
        jobs = []
        for request in batch:
            chain = request.chain
            try:
                ids, trained = self._prompt(chain, request.messages, max_new_tokens) if chain.left(max_new_tokens) > 0 \
                    else (chain.prompt + chain.out.token_ids, False)
            except Exception as err:  # noqa: BLE001 - messages the template cannot render: the agent's error
                request.reply.set_exception(ValueError(f"{type(err).__name__}: {err}"))
                continue
            room = min(chain.left(max_new_tokens), request.max_tokens or max_new_tokens)
            if room <= 0:  # the rollout's budget is spent (or was while its messages were appended)
                request.reply.set_result(_completion(ids, [], "", "length"))
                continue
            jobs.append((request, ids, trained, room, turn_seed(chain.seed, chain.sample, chain.out.calls)))
            chain.out.calls += 1
        if not jobs:
            return
        samples = engine.generate([j[1] for j in jobs], max_new_tokens=[j[3] for j in jobs],
                                  seed=[j[4] for j in jobs], stop_strings=stops, **sampling)
        for (request, ids, trained, _, _), s in zip(jobs, samples):
            chain, out = request.chain, request.chain.out
            if trained:
                append_turn(out, s)
                out.messages.append({"role": "assistant", "content": s.text})
                chain.served = [*request.messages, {"role": "assistant", "content": s.text}]
                if not (s.token_ids and s.token_ids[-1] in engine.tokenizer.eos_ids):
                    chain.pending = None  # cut short: the next turn cannot follow it token for token
            else:
                chain.spent += len(s.token_ids)
            request.reply.set_result(_completion(ids, s.token_ids, s.text, s.finish_reason, s.logprobs))

    def _prompt(self, chain: _Chain, messages: list[dict], max_new_tokens: int) -> tuple[list[int], bool]:
        """The token ids a request is answered from, and whether its reply extends the rollout's sample."""
        tok = self.tokenizer
        if not chain.prompt:  # the rollout's first request: its rendering is the sample's prompt
            chain.prompt = encode_prompt(tok, Problem("", "", messages=messages), self.template, self.prefill)
            chain.served = messages
            return chain.prompt, True
        seen = len(chain.served)
        if chain.pending is not None and messages[:seen] == chain.served and len(messages) > seen:
            new = messages[seen:]
            text = context_delta(tok, new, self.template) + self.prefill
            append_context(chain, text, max_new_tokens, tok)
            chain.out.messages += new
            chain.served = messages
            return chain.prompt + chain.out.token_ids, True
        chain.pending, chain.out.rewrites = None, 1  # the sample stops before this request
        return encode_prompt(tok, Problem("", "", messages=messages), self.template, self.prefill), False

    def _finish(self, chain: _Chain, outcome: tuple[str, Any]) -> ToolSample:
        """The rollout's sample; its agent's reward recorded for scoring (0 for a failed or timed-out agent)."""
        kind, value = outcome
        out = chain.out
        out.failures += kind == "error"
        out.timeouts += kind == "timeout"
        out.prompt_ids = chain.prompt
        if out.rewrites and ("rewrite", self.env.name) not in _WARNED:
            _WARNED.add(("rewrite", self.env.name))
            warnings.warn(f"{self.env.name}: a request did not extend the conversation as served (history rewritten, "
                          "or a reply cut by length continued): it was answered but not trained on; the rollout's "
                          "sample stops before it (counted in env/rewritten_history, reported once)", RuntimeWarning)
        if kind != "ok" and (kind, self.env.name) not in _WARNED:
            _WARNED.add((kind, self.env.name))
            warnings.warn(f"{self.env.name}: {value}; counted in scorer_{kind}s, the rollout scores 0 (reported once)",
                          RuntimeWarning)
        if not out.token_ids:  # the agent was served nothing: no token is the policy's, its turn is empty
            out.token_ids, out.logprobs, out.model_mask = [self.tokenizer.pad_id], [0.0], [False]
            out.messages = [{"role": "assistant", "content": ""}]
        self.env.record(conversation(self.problems[out.prompt_index], out.messages),
                        value if kind == "ok" else {"reward": 0.0})
        return out


_WARNED: set[tuple[str, str]] = set()


def _gather(requests: queue.Queue, agents: threading.Thread, live: int) -> list[_Request]:
    """The requests waiting, and those that come until none came for GATHER_S or every live agent asked."""
    try:
        batch = [requests.get(timeout=0.05)]
    except queue.Empty:
        return []
    last = time.monotonic()
    while len({id(r.chain) for r in batch}) < live and agents.is_alive() and time.monotonic() - last < GATHER_S:
        try:
            batch.append(requests.get(timeout=GATHER_S / 4))
            last = time.monotonic()
        except queue.Empty:
            pass
    while not requests.empty():
        batch.append(requests.get_nowait())
    return batch


def _completion(prompt: list[int], ids: list[int], text: str, finish: str, logprobs: list[float] = ()) -> dict:
    """An OpenAI chat completion, with the token ids it was served from and sampled (as vLLM returns them)."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": "policy", "prompt_token_ids": prompt,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "token_ids": ids, "logprobs": {"content": [{"token": str(t), "logprob": lp, "bytes": None,
                                                                     "top_logprobs": []}
                                                                    for t, lp in zip(ids, logprobs)]}}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(ids),
                      "total_tokens": len(prompt) + len(ids)}}


def _endpoint(chains: dict[str, _Chain], requests: queue.Queue) -> ThreadingHTTPServer:
    """The loopback server: each request queued for the engine's thread, its handler waiting for the reply."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                return self._send(200, {"object": "list", "data": [{"id": "policy", "object": "model"}]})
            self._send(404, _error(f"no route {self.path}"))

        def do_POST(self) -> None:
            chain = chains.get(self.headers.get("Authorization", "").removeprefix("Bearer ").strip())
            if not self.path.rstrip("/").endswith("/chat/completions"):
                return self._send(404, _error(f"no route {self.path}: this endpoint serves chat completions"))
            if chain is None:
                return self._send(401, _error("the API key names no rollout of this batch"))
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                refused = [k for k in ("stream", "stop", "tools", "functions") if body.get(k)] + \
                    (["n"] if body.get("n", 1) != 1 else [])
                if refused:
                    raise ValueError(f"{', '.join(refused)} not served: one plain completion per request")
                messages = [{"role": str(m["role"]), "content": text_of(m.get("content"))} for m in body["messages"]]
                limit = int(body.get("max_completion_tokens") or body.get("max_tokens") or 0)
                request = _Request(chain, messages, limit)
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                return self._send(400, _error(f"bad request: {type(err).__name__}: {err}"))
            requests.put(request)
            try:
                self._send(200, request.reply.result())
            except ValueError as err:
                self._send(400, _error(str(err)))

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # the agents' requests are counted, not logged
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.handle_error = lambda *_: None  # an agent that went away (timed out) mid-request
    return server


def _error(message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error"}}
