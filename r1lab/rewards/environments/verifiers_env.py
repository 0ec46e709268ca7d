"""`--task verifiers:ENV`: an installed verifiers (>= 0.4) environment as an r1lab task, loaded by
`vf.load_environment`; `--task-options` are its taskset config's fields. Its tasks are the problems; the reward is
verifiers' own scoring of the conversation as a trace (the task's rewards and judges, and what the env's run() records).

A multi-turn env is played by replaying: its run() runs against a seat that hands it the policy's turns so far and
stops it where the next policy turn is due; what it sent after the last policy turn is the environment's reply.
verifiers' harnesses (sandboxed agents, MCP tools) are not run: r1lab's engine is the agent.
"""

from __future__ import annotations

import asyncio
import random

from r1lab.rewards.environments import EnvReply
from r1lab.rewards.tasks.base import Problem
from r1lab.rewards.tasks.dataset import in_test_split

try:
    import verifiers.v1 as vf
    from verifiers.v1.configs.agent import agent_config_fields
    from verifiers.v1.dialects.chat import parse_message
    from verifiers.v1.types import content_text
except ImportError:
    vf = None

TEST_FRACTION = 0.1  # verifiers tasksets have no splits: this share of the tasks, by a stable hash of the task key
MAX_TASKS = 1000  # tasks read from an infinite taskset (a game's seeds)
DEFAULT_MAX_TURNS = 8  # policy turns of a multi-turn env whose seat sets no max_turns


class _PolicyTurn(BaseException):  # not an Exception: an env's own `except Exception` must not swallow it
    """The replayed run reached a policy turn that has not been sampled yet."""


def load(name: str, **options) -> VerifiersEnvironment:
    if vf is None:
        raise ValueError(f"--task verifiers:{name} needs the verifiers package: pip install 'r1lab[verifiers]'")
    return VerifiersEnvironment(name, **options)


class VerifiersEnvironment:
    """An r1lab Environment (r1lab/rewards/environments/__init__.py) over a verifiers env."""

    def __init__(self, name: str, **options) -> None:
        self.name = f"verifiers:{name}"
        try:
            self.env = vf.load_environment(vf.resolve_env_config({"taskset": {"id": name, **options}}))
        except Exception as err:  # noqa: BLE001 - not installed, bad options: one line saying which
            reason = " ".join(line.strip() for line in str(err).strip().splitlines()[:3])  # pydantic's: field, why
            raise ValueError(f"{self.name}: {type(err).__name__}: {reason[:300]}") from None
        seats = agent_config_fields(self.env.config)
        if len(seats) != 1:
            raise ValueError(f"{self.name}: its env has {len(seats)} agent seats ({', '.join(seats)}); r1lab's policy "
                             "plays an env of one seat")
        (self.seat, seat), = seats.items()
        self.max_turns = 1 if isinstance(self.env, vf.SingleAgentEnv) else seat.max_turns or DEFAULT_MAX_TURNS
        taskset = self.env.taskset if self.env.taskset.bounded else self.env.taskset.take(MAX_TASKS)
        self.tasks = {t.key: t for t in taskset}
        problems = [_problem(t, self.name) for t in self.tasks.values()]
        test = [p for p in problems if in_test_split(p.meta["key"], TEST_FRACTION)]
        train = [p for p in problems if not in_test_split(p.meta["key"], TEST_FRACTION)]
        self.splits = {"train": train, "test": test} if train and test else {"train": problems, "test": problems}

    def problems(self, split: str, n: int | None, seed: int) -> list[Problem]:
        pool, rng = self.splits[split], random.Random(seed)
        if n is None:
            return list(pool)
        return rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]

    def score(self, problem: Problem, answer: str) -> float:
        return float(self.rewards(problem, [*problem.messages, {"role": "assistant", "content": answer}])["reward"])

    def canonical(self, answer: str) -> str:
        return answer.strip()

    def reply(self, problem: Problem, messages: list[dict]) -> EnvReply:
        _, sent, waiting = self._replay(problem, messages)
        return EnvReply(sent if waiting else [], done=not waiting)

    def rewards(self, problem: Problem, messages: list[dict]) -> dict[str, float]:
        trace, task = self._replay(problem, messages)[0], self.tasks[problem.meta["key"]]
        asyncio.run(task.score(trace))  # the task's rewards and judges, then the env's cross-trace judgement
        asyncio.run(self.env.finalize(task, vf.Episode(env=vf.EnvInfo(id=self.env.config.env_id), task=trace.task,
                                                       traces=[trace])))
        scored = {name: r for name, r in trace.rewards.items() if r is not None}
        return {**{name: r.score for name, r in scored.items()}, "reward": trace.reward}

    def _replay(self, problem: Problem, messages: list[dict]) -> tuple[object, list[dict], bool]:
        """(the trace, the messages the env sent after the policy's last turn, whether it waits for another turn):
        the env's run() replayed over the policy's turns in messages (those after the problem's prompt)."""
        replies = [m["content"] for m in messages[len(problem.messages) :] if m["role"] == "assistant"]
        task = self.tasks[problem.meta["key"]]
        seat = _Seat(task, problem.messages, replies, self.max_turns, self.env.config, self.seat)
        async def episode():  # as verifiers' Env.run_episode: setup(agents), then run(task, agents)
            agents = vf.Agents(self.env.config, lambda name, spec: seat)
            await self.env.setup(agents)
            await self.env.run(task, agents)

        try:
            asyncio.run(episode())
        except _PolicyTurn:
            return seat.trace, seat.sent, True
        return seat.trace, [], False


class _Seat:
    """The agent an env's run() drives, played back from the policy's turns: `run(task)` is one turn,
    `interaction(task)` an exchange of `turn(message)` calls; the trace holds the conversation for scoring."""

    def __init__(self, task, prompt: list[dict], replies: list[str], max_turns: int, config, name: str) -> None:
        self.replies, self.max_turns, self.sent, self.turns = list(replies), max_turns, [], 0
        self.trace = vf.Trace(task=vf.TraceTask(type=type(task).__name__, data=task.data, key=task.key, hash=task.hash),
                              agent=vf.AgentInfo(config=getattr(config, name), name=name))
        for message in prompt:
            self._add(message, sampled=False)

    def _add(self, message: dict, sampled: bool) -> None:
        parent = len(self.trace.nodes) - 1 if self.trace.nodes else None
        self.trace.nodes.append(vf.MessageNode(parent=parent, message=parse_message(message), sampled=sampled))

    def interaction(self, task):
        return self

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        return None

    async def run(self, task):
        await self.turn()
        return self.trace

    async def turn(self, message=None):
        if self.turns >= self.max_turns:
            return vf.Segment(messages=[], terminated=True)
        if message is not None:
            sent = [{"role": "user", "content": message}] if isinstance(message, str) else [
                m if isinstance(m, dict) else {"role": m.role, "content": content_text(m.content)} for m in message]
            self.sent = sent
            for m in sent:
                self._add(m, sampled=False)
        if self.turns >= len(self.replies):
            raise _PolicyTurn
        reply = self.replies[self.turns]
        self.turns += 1
        self._add({"role": "assistant", "content": reply}, sampled=True)
        return vf.Segment(messages=[self.trace.nodes[-1].message])


def _problem(task, name: str) -> Problem:
    data = task.data
    if data.prompt is None:
        raise ValueError(f"{name}: task {data.idx} has no prompt (its user opens the conversation): r1lab needs a "
                         "prompted task")
    prompt = [{"role": "user", "content": data.prompt}] if isinstance(data.prompt, str) else [
        {"role": m.role, "content": content_text(m.content)} for m in data.prompt]
    messages = ([{"role": "system", "content": data.system_prompt}] if data.system_prompt else []) + prompt
    user = [m["content"] for m in messages if m["role"] == "user"]
    return Problem(prompt=user[-1] if user else "", answer=str(getattr(data, "answer", "") or ""), messages=messages,
                   meta={"key": task.key, "info": data.model_dump(mode="json", exclude_defaults=True)})
