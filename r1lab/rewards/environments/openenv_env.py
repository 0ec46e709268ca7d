"""OpenEnv environments as r1lab tasks: `r1lab grpo --task openenv:ENV`, `pip install 'r1lab[openenv]'`.

ENV is a running server (`openenv:http://host:8000`), or an installed environment that r1lab serves with openenv's
server in a child process for the run: an app (`openenv:my_env.server.app:app`) or an Environment subclass declared
with its types (`openenv:my_env.server.env:MyEnvironment`). One WebSocket session per episode in flight.

A problem is a reset with a seed (problem.meta["seed"]), its observation the prompt; each sample of a group starts its
own episode from that seed. A policy turn is a step whose action's text field holds the turn; the steps' rewards
summed are the episode's reward (reward/openenv). A failing or silent server costs that episode its reward, counted.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import typing
import urllib.request
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import r1lab.rewards.environments as environments  # the module: it imports tasks, which import this
from r1lab.rewards.tasks.base import Problem

PREFIX = "openenv:"
INSTALL = ("--task openenv:... needs the openenv package: pip install 'r1lab[openenv]' (in an environment without "
           "r1lab[verifiers]: verifiers pins mcp 2, openenv's fastmcp needs mcp < 2)")
SESSIONS = 256  # sessions a server r1lab starts admits at once, for an environment that allows concurrent sessions
PROMPT_FIELDS = ("messages", "prompt", "question", "text", "message")  # where an observation's prompt is looked for


def openenv_refusal() -> str | None:
    return None if importlib.util.find_spec("openenv") else INSTALL


@dataclass
class _Episode:
    client: Any  # openenv's SyncEnvClient: one server session
    seed: int
    turns: tuple[str, ...] = ()  # the policy turns stepped so far
    total: float = 0.0  # the steps' rewards summed
    reward: float = 0.0  # the last step's
    done: bool = False
    observation: dict = field(default_factory=dict)


class OpenEnvTask:
    """An OpenEnv environment meeting r1lab.rewards.environments.Environment (single- and multi-step)."""

    def __init__(self, env: str, max_turns: int = 1, action_field: str = "", prompt_field: str = "",
                 timeout_s: float = 60.0, sessions: int = 1) -> None:
        if openenv_refusal():
            raise ValueError(INSTALL)
        if max_turns < 1 or timeout_s <= 0 or sessions < 1:
            raise ValueError(f"openenv: max_turns and sessions must be >= 1 and timeout_s > 0 (got {max_turns}, "
                             f"{sessions}, {timeout_s})")
        self.name, self.max_turns, self.timeout_s, self.prompt_field = PREFIX + env, max_turns, timeout_s, prompt_field
        self.sessions = sessions  # episodes stepped at once: the server's max_concurrent_envs, 1 unless it says more
        remote = env.startswith(("http://", "https://"))
        self.server = None if remote else _LocalServer(env, timeout_s)
        self.url = env.rstrip("/") if remote else self.server.url
        self.action_field = action_field or _text_field(self.url, timeout_s)
        self._idle: list = []  # sessions between episodes: the next reset reuses one
        self._open: dict[tuple, list[_Episode]] = {}  # (seed, turns) -> episodes waiting for the next policy turn
        self._lock = threading.Lock()  # rollouts may be scored or answered from several threads at once

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        """n resets with distinct seeds: even for train, odd for test, so the two splits never share an episode. A
        reset that fails is replaced by another seed's; n failures in one draw mean the server is broken."""
        rng, problems, failures = random.Random(f"{split}/{seed}"), {}, 0
        while len(problems) < n:
            s = 2 * rng.randrange(2**30) + (split == "test")
            try:
                episode = self._start(s)
            except Exception as err:
                failures += 1
                warnings.warn(f"{self.name}: a reset failed ({type(err).__name__}: {err}); another seed is drawn")
                if failures >= max(n, 3):
                    raise RuntimeError(f"{self.name}: {failures} resets failed, the last: {err}") from None
                continue
            self._idle.append(episode.client)
            problems[s] = self._problem(episode.observation, s)
        return list(problems.values())

    def _problem(self, observation: dict, seed: int) -> Problem:
        value = observation.get(self.prompt_field) if self.prompt_field else next(
            (observation[f] for f in PROMPT_FIELDS if observation.get(f)), None)
        if isinstance(value, list):  # a conversation: rendered whole, like a dataset's messages
            return Problem(value[-1]["content"], "", {"seed": seed}, messages=value)
        if value is None:
            value = json.dumps({k: v for k, v in observation.items() if k != "metadata"}, ensure_ascii=False)
        return Problem(str(value), "", {"seed": seed})

    def reply(self, problem: Problem, messages: list[dict]) -> environments.EnvReply:
        """The step of the last policy turn: its observation as the next user turn, its reward, done."""
        episode = self._advance(problem, messages)
        with self._lock:
            self._open.setdefault((episode.seed, episode.turns), []).append(episode)
        text = self._problem(episode.observation, episode.seed).prompt
        return environments.EnvReply([{"role": "user", "content": text}], episode.done, {"openenv": episode.reward})

    def rewards(self, problem: Problem, messages: list[dict]) -> dict[str, float]:
        """The episode's reward: the steps' rewards summed (turns not stepped yet are stepped now)."""
        episode = self._advance(problem, messages)
        self._idle.append(episode.client)
        return {"reward": episode.total, "openenv": episode.total}

    def score(self, problem: Problem, answer: str) -> float:
        """The Task protocol's scorer: the answer as the one policy turn."""
        prompt = problem.messages or [{"role": "user", "content": problem.prompt}]
        return self.rewards(problem, [*prompt, {"role": "assistant", "content": answer}])["reward"]

    def canonical(self, answer: str) -> str:
        return answer.strip()

    def _advance(self, problem: Problem, messages: list[dict]) -> _Episode:
        """The episode of this conversation, stepped through its policy turns: continued from the episode that
        stepped the longest prefix of them (episodes of identical histories are interchangeable), else started."""
        seed, prompt = problem.meta["seed"], len(problem.messages or [problem.prompt])
        turns = tuple(m["content"] for m in messages[prompt:] if m.get("role") == "assistant")
        with self._lock:
            k = next((k for k in range(len(turns), 0, -1) if self._open.get((seed, turns[:k]))), 0)
            episode = self._open[(seed, turns[:k])].pop() if k else None
        episode = episode or self._start(seed)
        try:
            for turn in turns[k:]:
                if episode.done:
                    break
                self._take(episode, episode.client.step({self.action_field: turn}))
                episode.turns += (turn,)
        except BaseException:
            _close(episode.client)  # a session that failed or timed out may be out of step: never reused
            raise
        return episode

    def _start(self, seed: int) -> _Episode:
        with self._lock:
            client = self._idle.pop() if self._idle else None
        if client is None:
            from openenv.core import GenericEnvClient  # optional: only an OpenEnv task needs it
            client = GenericEnvClient(base_url=self.url, message_timeout_s=self.timeout_s).sync()
        episode = _Episode(client, seed)
        try:
            self._take(episode, client.reset(seed=seed))
        except BaseException:
            _close(client)
            raise
        return episode

    @staticmethod
    def _take(episode: _Episode, result: Any) -> None:
        episode.reward = float(result.reward or 0.0)
        episode.total += episode.reward
        episode.done, episode.observation = bool(result.done), result.observation


load = OpenEnvTask  # --task openenv:NAME with its task options


def _close(client: Any) -> None:
    with contextlib.suppress(Exception):  # the server may be gone already
        client.close()


def _text_field(url: str, timeout_s: float) -> str:
    """The action's one required field, where the turn's text goes; ValueError naming the fields otherwise."""
    try:
        with urllib.request.urlopen(f"{url}/schema", timeout=timeout_s) as response:
            schema = json.load(response)["action"]
    except Exception as err:
        raise ValueError(f"openenv: {url}/schema cannot be read ({err}): is an OpenEnv server running there?") from None
    required = [f for f in schema.get("required", []) if f != "metadata"]
    if len(required) != 1:
        raise ValueError(f"openenv: the action has the fields {', '.join(schema.get('properties', {}))}: give "
                         "task option action_field, the one that holds the policy's text")
    return required[0]


class _LocalServer:
    """openenv's server for an environment module, in a child process listening on a socket bound here (port 0: the
    OS picks a free one, and nothing else can take it before the child listens); stopped with the task or at exit."""

    def __init__(self, spec: str, timeout_s: float) -> None:
        if spec.count(":") != 1:
            raise ValueError(f"openenv: {spec!r} is neither http://host:port nor module:attribute")
        sock = socket.create_server(("127.0.0.1", 0))
        self.url, log = f"http://127.0.0.1:{sock.getsockname()[1]}", tempfile.TemporaryFile()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}
        self.process = subprocess.Popen([sys.executable, "-m", __name__, spec, str(sock.fileno())],
                                        pass_fds=[sock.fileno()], stdin=subprocess.PIPE, stdout=log, stderr=log,
                                        env=env)
        sock.close()
        weakref.finalize(self, _stop, self.process)
        deadline = time.monotonic() + max(timeout_s, 60.0)
        while not _healthy(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                _stop(self.process)
                log.seek(0)
                last = (log.read().decode(errors="replace").strip().splitlines() or ["no output"])[-1]
                raise ValueError(f"openenv: the server for {spec} did not start: {last}")
            time.sleep(0.1)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return response.status == 200
    except Exception:
        return False


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def _app(spec: str) -> Any:
    """The FastAPI app of a `module:attribute` spec: the attribute itself, or openenv's app for an Environment class."""
    from openenv.core.env_server import Environment, create_fastapi_app

    module, attribute = spec.split(":")
    target = getattr(importlib.import_module(module), attribute)
    if not (inspect.isclass(target) and issubclass(target, Environment)):
        return target
    types = next((typing.get_args(b) for b in getattr(target, "__orig_bases__", ()) if typing.get_args(b)), ())
    if len(types) < 2:
        raise SystemExit(f"{spec}: declare it as Environment[MyAction, MyObservation, State], or name its app")
    sessions = SESSIONS if getattr(target, "SUPPORTS_CONCURRENT_SESSIONS", False) else 1
    return create_fastapi_app(target, types[0], types[1], max_concurrent_envs=sessions)


if __name__ == "__main__":  # the child _LocalServer starts: python -m ... SPEC FD
    import uvicorn

    # stdin is a pipe no one writes to: it closes when the parent ends, even by SIGKILL, and the server with it
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    uvicorn.run(_app(sys.argv[1]), fd=int(sys.argv[2]), log_level="warning")
