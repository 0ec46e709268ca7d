"""`--task agent:MODULE:FUNCTION` (r1lab/engine/agents.py, r1lab/rewards/environments/agent_env.py): an agent that
calls the policy through a real OpenAI client against the in-process endpoint; its rollout is trained token in, token
out (the served replies trained, the agent's messages between them context with loss mask 0)."""

import importlib.util
import json
import re
import sys

import pytest

import r1lab.engine.agents as agent_turns
import r1lab.train.grpo as grpo
from r1lab.config import GRPOConfig
from r1lab.engine.engine import Sample
from r1lab.engine.tools import context_delta, conversation, generate_with_tools
from r1lab.model.loading import encode_prompt
from r1lab.model.tokenizer import build_tiny_tokenizer
from r1lab.rewards.rules import score_completions
from r1lab.rewards.tasks import get_task

pytestmark = pytest.mark.skipif(importlib.util.find_spec("openai") is None, reason="needs the openai client")
TOK = build_tiny_tokenizer()
SERVED: dict[str, list[tuple[list[int], list[int]]]] = {}  # rollout key -> (prompt ids, completion ids) per reply

AGENTS = '''
import asyncio
import itertools
from test_agent_env import SERVED

CALLS = itertools.count()

async def ask(client, model, messages, **extra):
    reply = await client.chat.completions.create(model=model, messages=messages, **extra)
    SERVED.setdefault(client.api_key, []).append((reply.model_extra["prompt_token_ids"],
                                                  reply.choices[0].model_extra["token_ids"]))
    return reply.choices[0].message.content

async def retry(client, model, problem):
    """Answers, is told to try again, answers again: the reward is the second answer's."""
    messages = [{"role": "user", "content": problem.prompt}]
    first = await ask(client, model, messages)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "try again"}]
    second = await ask(client, model, messages)
    return {"reward": float(problem.answer in second), "first": float(problem.answer in first)}

async def rewrite(client, model, problem):
    """Asks, then asks again with its first question edited: history rewritten."""
    first = await ask(client, model, [{"role": "user", "content": problem.prompt}])
    edited = [{"role": "user", "content": problem.prompt + "?"}, {"role": "assistant", "content": first}]
    await ask(client, model, [*edited, {"role": "user", "content": "try again"}])
    return 1.0

async def broken(client, model, problem):
    await ask(client, model, [{"role": "user", "content": problem.prompt}])
    if next(CALLS) % 2:
        raise RuntimeError("the agent broke")
    await asyncio.sleep(30)

async def streams(client, model, problem):
    await ask(client, model, [{"role": "user", "content": problem.prompt}], stream=True)
    return 1.0

async def lazy(client, model, problem):
    return "yes"

async def quits(client, model, problem):
    raise SystemExit("done here")

async def malformed(client, model, problem):
    """Requests no server should act on, and one good one: the statuses are its reward's components."""
    import httpx
    bodies = [b"{", {"messages": "hi"}, {"messages": [{"content": "hi"}]}, {"messages": [], "max_tokens": "many"},
              {"messages": [{"role": "user", "content": {"a": 1}}]}, {"messages": [{"role": "user", "content": "hi"}]}]
    statuses = {}
    async with httpx.AsyncClient(base_url=str(client.base_url)) as http:
        for i, body in enumerate(bodies):
            sent = {"content": body} if isinstance(body, bytes) else {"json": body}
            reply = await http.post("chat/completions", headers={"Authorization": f"Bearer {client.api_key}"}, **sent)
            statuses[f"status{i}"] = reply.status_code
        statuses["stranger"] = (await http.post("chat/completions", json=bodies[-1])).status_code
        statuses["models"] = (await http.get("models")).status_code
    return {"reward": 1.0, **statuses}
'''


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    root = tmp_path_factory.mktemp("agents")
    (root / "my_agents.py").write_text(AGENTS)
    sys.path.insert(0, str(root))
    sys.modules["test_agent_env"] = sys.modules[__name__]  # the agents' SERVED is this module's
    yield root
    sys.path.remove(str(root))


def script(text):
    """A policy that answers 0 first, then the right sum once told to try again."""
    expression = re.findall(r"\d+(?:\+\d+)+", text)
    return f"<answer>{eval(expression[-1])}</answer>" if "try again" in text else "<answer>0</answer>"


def spelled(text):
    """text one character a token: not how the tokenizer encodes it ("<answer>" is one token), so a reply decoded and
    re-encoded would not be the tokens sampled."""
    return [t for c in text for t in TOK.encode(c, add_special_tokens=False)]


class ScriptedEngine:
    """Writes script(text so far) spelled, then end-of-text; log-prob -0.5 on every sampled token."""

    tokenizer = TOK

    def __init__(self):
        self.batches = []

    def generate(self, prompt_ids, *, max_new_tokens, seed, **_):
        self.batches.append(len(prompt_ids))
        out = []
        for i, (prompt, limit) in enumerate(zip(prompt_ids, max_new_tokens)):
            ids = (spelled(script(TOK.decode(prompt))) + sorted(TOK.eos_ids))[:limit]
            out.append(Sample(i, ids, TOK.decode([t for t in ids if t not in TOK.eos_ids]), [-0.5] * len(ids),
                              "stop" if len(ids) and ids[-1] in TOK.eos_ids else "length"))
        return out


def rollouts_of(agent, n=2, samples=2, max_new_tokens=200, **options):
    env = get_task(f"agent:my_agents:{agent}", problems="arithmetic", **options)
    problems = env.problems("train", n, 0)
    turns = grpo.rollout_turns(GRPOConfig(template="r1zero"), env, problems, TOK)
    engine = ScriptedEngine()
    prompts = [encode_prompt(TOK, p, "r1zero") for p in problems]
    SERVED.clear()
    out = generate_with_tools(engine, prompts, turns, num_samples=samples, max_new_tokens=max_new_tokens, seed=3)
    return env, problems, out, engine


def test_the_sample_is_the_served_tokens_and_the_agents_messages_are_never_trained(agents, monkeypatch):
    monkeypatch.setattr(agent_turns, "GATHER_S", 5.0)  # however loaded the machine: a batch waits for every agent
    env, problems, samples, engine = rollouts_of("retry")
    assert engine.batches == [4, 4]  # the four agents' requests in flight, answered in one generate call each turn
    try_again = context_delta(TOK, [{"role": "user", "content": "try again"}], "r1zero")
    delta = TOK.encode(try_again, add_special_tokens=False)
    first = spelled("<answer>0</answer>") + sorted(TOK.eos_ids)
    served = sorted(SERVED.values())
    for s, p in zip(samples, [q for q in problems for _ in range(2)]):
        second = spelled(f"<answer>{p.answer}</answer>") + sorted(TOK.eos_ids)
        assert s.prompt_ids == encode_prompt(TOK, p, "r1zero")  # the first request, as the template renders it
        assert s.token_ids == first + delta + second  # the replies as sampled, the agent's message between them
        assert s.model_mask == [True] * len(first) + [False] * len(delta) + [True] * len(second)
        assert s.logprobs == [-0.5] * len(first) + [0.0] * len(delta) + [-0.5] * len(second)
        # what the endpoint returned: each request's prompt is the sample so far, token for token
        assert [(s.prompt_ids, first), (s.prompt_ids + first + delta, second)] in served
        assert (s.calls, s.rewrites, s.failures) == (2, 0, 0)
    rollouts = grpo.sample_rollouts(engine, problems, GRPOConfig(template="r1zero", samples_per_prompt=2), 3, env)
    [batch] = grpo.make_micro_batches(rollouts, grpo.torch.ones(4), grpo.torch.ones(4, dtype=grpo.torch.bool),
                                      GRPOConfig(micro_batch_size=4), TOK.pad_id, "cpu")
    n = len(first)
    assert not batch.trained[:, n : n + len(delta)].any() and batch.trained[:, :n].all()  # loss mask 0 on the agent's
    result = grpo.score_rollouts(env, rollouts, GRPOConfig(template="r1zero"), TOK)
    assert result.total == [1.0] * 4 and result.components["first"] == [0.0] * 4 and result.errors == 0


def test_rewritten_history_is_answered_but_not_trained_and_counted(agents):
    with pytest.warns(RuntimeWarning, match="did not extend the conversation as served"):
        _, problems, samples, _ = rollouts_of("rewrite")
    first = spelled("<answer>0</answer>") + sorted(TOK.eos_ids)
    for s in samples:
        assert (s.token_ids, s.model_mask, s.rewrites, s.calls) == (first, [True] * len(first), 1, 2)
        assert len(SERVED[next(k for k, v in SERVED.items() if v[0][0] == s.prompt_ids)]) == 2  # both answered
    rollouts = grpo.Rollouts(problems, [], [s.token_ids for s in samples], [], [""] * 4, [False] * 4,
                             model_mask=[s.model_mask for s in samples], tool_calls=[2] * 4, tool_failures=[0] * 4,
                             conversations=[[]] * 4, rewrites=[1, 0, 1, 0])
    assert grpo.tool_metrics(rollouts)["env/rewritten_history"] == 0.5


@pytest.mark.slow  # waits out a hanging agent's 1 s timeout
def test_a_failing_or_hanging_agent_is_counted_and_scores_zero(agents):
    with pytest.warns(RuntimeWarning):
        env, problems, samples, _ = rollouts_of("broken", n=4, samples=1, timeout_s=1.0)
    assert sorted((s.failures, s.timeouts) for s in samples) == [(0, 1), (0, 1), (1, 0), (1, 0)]
    assert all(s.token_ids and any(s.model_mask) for s in samples)  # what was served is kept, scored 0
    result = score_completions(env, [problems[s.prompt_index] for s in samples], [s.messages for s in samples])
    assert result.total == [0.0] * 4 and result.errors == 0  # counted once, as the runs' failures


def test_unserved_requests_and_bad_returns_are_the_agents_errors(agents):
    for agent, match in (("streams", "stream not served"), ("lazy", "returned 'yes'"), ("quits", "done here")):
        with pytest.warns(RuntimeWarning, match=match):
            env, problems, samples, _ = rollouts_of(agent, n=1, samples=1)
        assert samples[0].failures == 1 and not any(samples[0].model_mask)
        result = score_completions(env, problems, [samples[0].messages or samples[0].text])  # as eval scores it
        assert (result.total, result.errors) == ([0.0], 0)  # the failure is counted once, as the run's


def test_messages_the_template_cannot_render_are_the_agents_error(agents):
    env = get_task("agent:my_agents:retry", problems="arithmetic")
    problems = env.problems("train", 1, 0)
    turns = grpo.rollout_turns(GRPOConfig(template="none"), env, problems, TOK)
    with pytest.warns(RuntimeWarning, match="template 'none' sends a question as it is"):
        [s] = generate_with_tools(ScriptedEngine(), [[1]], turns, max_new_tokens=50, seed=3)
    assert (s.failures, s.calls) == (1, 0)


def test_malformed_requests_get_a_400_and_the_run_goes_on(agents):
    env, problems, [s], _ = rollouts_of("malformed", n=1, samples=1)
    scored = env.rewards(problems[0], conversation(problems[0], s.messages))  # the components the agent returned
    assert [scored[f"status{i}"] for i in range(6)] == [400, 400, 400, 400, 400, 200]
    assert (scored["stranger"], scored["models"], s.failures, s.calls) == (401, 200, 0, 1)


def test_a_rollouts_requests_share_its_token_budget(agents):
    _, _, [s], _ = rollouts_of("retry", n=1, samples=1, max_new_tokens=12)
    assert len(s.token_ids) == 12 and s.finish_reason == "length"
    assert [len(c) for _, c in SERVED[next(iter(SERVED))]][1:] in ([0], [])  # past the budget: an empty reply


def test_agent_specs_are_checked_in_one_line(agents):
    for options, match in (({}, "needs the task its problems come from"),
                           ({"problems": "verifiers:x"}, "not an environment"),
                           ({"problems": "arithmetic", "turns": 3}, "unknown task options turns")):
        with pytest.raises(ValueError, match=match):
            get_task("agent:my_agents:retry", **options)
    with pytest.raises(ValueError, match="name an `async def"):
        get_task("agent:json:dumps", problems="arithmetic")
    with pytest.raises(ValueError, match="cannot load the agent"):
        get_task("agent:no_such_module:run", problems="arithmetic")


# ---------------------------------------------------------------------------------------------------------------
# end to end: `r1lab grpo --task agent:...` on the tiny model


@pytest.mark.slow
def test_grpo_trains_exactly_the_tokens_it_served(agents, tiny_base, tmp_path, monkeypatch):
    from r1lab.cli import main

    trained, real = [], grpo.make_micro_batches
    monkeypatch.setattr(grpo, "make_micro_batches", lambda rollouts, *a, **k: trained.append(rollouts) or
                        real(rollouts, *a, **k))
    SERVED.clear()
    main(["grpo", "--model", str(tiny_base), "--out", str(tmp_path / "run"), "--task", "agent:my_agents:retry",
          "--task-options", "{problems: arithmetic, problem_options: {min_terms: 3, max_terms: 4}}", "--steps", "2",
          "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "60", "--eval-every", "0",
          "--save-every", "0", "--device", "cpu"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["scorer_errors"] == 0 for r in rows)
    assert len(trained) == 2 and len(SERVED) == 8
    served = [reassembled(replies) for replies in SERVED.values()]
    for rollouts in trained:
        for sample in zip(rollouts.prompt_ids, rollouts.completion_ids, rollouts.model_mask):
            assert sample in served  # trained: the served replies (mask 1) and the agent's messages (mask 0), exactly
    assert any(not all(mask) for _, _, mask in served)  # the agent's "try again" is in the samples
    main(["eval", "--model", str(tmp_path / "run" / "model"), "--task", "agent:my_agents:retry", "--task-options",
          "{problems: arithmetic}", "--problems", "3", "--samples", "2", "--max-new-tokens", "60", "--device", "cpu",
          "--out", str(tmp_path / "eval.json")])
    evaluated = json.loads((tmp_path / "eval.json").read_text())["test"]
    assert (evaluated["n_problems"], evaluated["tool_calls"] > 0, evaluated["tool_failure_rate"]) == (3, True, 0.0)


def reassembled(replies):
    """A rollout's sample from what the endpoint returned: each request's prompt is the previous one and its reply,
    token for token, and then its new messages."""
    prompt, ids, mask = replies[0][0], [], []
    for served_prompt, completion in replies:
        assert served_prompt[: len(prompt) + len(ids)] == prompt + ids
        mask += [False] * (len(served_prompt) - len(prompt) - len(ids)) + [True] * len(completion)
        ids = served_prompt[len(prompt) :] + completion
    return prompt, ids, mask


def test_heldout_line_counts_an_environments_replies_not_tool_calls(agents, tmp_path, monkeypatch):
    """EvalResult.tool_calls counts an environment's replies: GRPO's held-out line says so."""
    from types import SimpleNamespace

    from r1lab.train.distributed import Silent

    monkeypatch.setattr(grpo, "save_json", lambda path, figures: None)
    result = SimpleNamespace(pass_at_1=0.5, k=2, cons_at_k=0.5, format_rate=1.0, mean_length=9.0, tool_calls=1.5,
                             to_dict=lambda: {})
    lines = []
    for task in (get_task("agent:my_agents:retry", problems="arithmetic"), get_task("arithmetic")):
        grpo.report_heldout(Silent(), tmp_path, 3, result, lines.append, grpo.calls_name(task))
    assert lines[0].endswith("1.50 environment replies per sample") and lines[1].endswith("1.50 tool calls per sample")
