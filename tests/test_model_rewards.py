"""Rewards a model gives: an LLM judge behind an OpenAI-compatible endpoint and a transformers reward model, in GRPO."""

import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import r1lab.rewards.llm_judge as judge_module
from r1lab.config import GRPOConfig
from r1lab.rewards.learned import LearnedRewards, add_learned_rewards
from r1lab.rewards.llm_judge import (
    Judge,
    JudgeSettings,
    load_template,
    parse_score,
    template_problem,
)
from r1lab.rewards.rules import score_completions
from r1lab.rewards.tasks import get_task
from r1lab.rewards.tasks.base import Problem
from r1lab.train.task_settings import check_settings

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("openai") is None, reason="needs the openai client")


# ---------------------------------------------------------------------------------------------------------------
# the score parser and the template


@pytest.mark.parametrize("reply, score", [
    ("The answer is right.\nscore: 0.8", 0.8),
    ("Score = 7/10", 0.7),
    ("**Score**: 8 out of 10", 0.8),
    ("score: 1", 1.0),
    ("score: 0", 0.0),
    ("score: 9", 0.9),  # a 0-10 score
    ("first score: 0.2, on reflection score: 0.6", 0.6),  # the last one counts
    ("<think>maybe score: 0.1</think>score: 0.9", 0.9),
    ("0.25", 0.25),
    (" 6 \n", 0.6),
    ("3/4", 0.75),
])
def test_parser_reads_scores(reply, score):
    assert parse_score(reply) == pytest.approx(score)


@pytest.mark.parametrize("reply", [
    "score: 11", "score: -1", "score: 5/0", "score: 12/10", "I would give it 3", "", "<think>score: 0.5</think>",
    None, 0.5, "9" * 400, "score: " + "9" * 400, "nan", "score: inf", "{\"score\": }", "<answer>7</answer>",
])
def test_parser_never_raises_and_refuses_what_it_cannot_read(reply):
    assert parse_score(reply) is None


@pytest.mark.parametrize("template, problem", [
    ("{problem} {completion}", None),
    ("{completion} {answer}", "placeholder {answer}"),
    ("{problem} {reference}", "no {completion} placeholder"),
    ('{"score": 1} {completion}', "placeholder {\"score\""),
    ("{completion} }", "not a template"),
    ('{{"score": 1}} {completion}', None),
])
def test_template_placeholders_are_checked(template, problem):
    found = template_problem(template)
    assert (found is None) if problem is None else (problem in found)


def test_unreadable_template_file_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="cannot be read"):
        load_template(str(tmp_path / "missing.txt"))
    (tmp_path / "t.txt").write_text("{answer}")
    with pytest.raises(ValueError, match=r"judge_template .* has the placeholder \{answer\}"):
        load_template(str(tmp_path / "t.txt"))


# ---------------------------------------------------------------------------------------------------------------
# the judge against a stub OpenAI-compatible server


class StubJudge(BaseHTTPRequestHandler):
    """Replies by the completion it is shown: GOOD -> "score: 0.9", SLOW -> late, FAIL -> 500, anything else junk."""

    calls: list = []
    in_flight = peak = 0
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        cls = type(self)
        with cls.lock:
            cls.calls.append((prompt, self.headers.get("Authorization")))
            cls.in_flight += 1
            cls.peak = max(cls.peak, cls.in_flight)
        time.sleep(2.0 if "SLOW" in prompt else 0.05)
        with cls.lock:
            cls.in_flight -= 1
        if "FAIL" in prompt:
            return self._send(500, {"error": {"message": "boom"}})
        reply = "Looks right. score: 0.9" if "GOOD" in prompt else "I like turtles"
        self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": reply}}]})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except BrokenPipeError:  # the client gave up on a SLOW reply
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_url():
    StubJudge.calls, StubJudge.peak = [], 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def problems(n):
    return [Problem(prompt=f"What is {i}+1?", answer=str(i + 1)) for i in range(n)]


@pytest.mark.slow
def test_judge_scores_caches_and_counts_failures(stub_url, monkeypatch):
    monkeypatch.setattr(judge_module, "_WARNED", set())
    judge = Judge(JudgeSettings(stub_url, "stub", "secret", "{problem}|{reference}|{completion}", concurrency=4,
                                timeout_s=0.5, retries=1))
    texts = ["GOOD", "GOOD", "junk", "FAIL", "SLOW", "GOOD"]
    ps = problems(6)
    ps[1] = ps[0]  # the same problem and completion twice: one call
    with pytest.warns(RuntimeWarning, match="judge"):
        first = judge.score([p.prompt for p in ps], [p.answer for p in ps], texts)
    assert first.scores == [0.9, 0.9, 0.0, 0.0, 0.0, 0.9]
    assert (first.errors, first.timeouts) == (2, 1)  # junk + 500; the slow one past its timeout and one retry
    asked = [prompt for prompt, _ in StubJudge.calls]
    assert asked.count("What is 0+1?|1|GOOD") == 1 and asked.count("What is 3+1?|4|FAIL") == 2  # 500: retried
    assert {auth for _, auth in StubJudge.calls} == {"Bearer secret"}
    assert StubJudge.peak > 1  # requests overlap

    before = len(StubJudge.calls)
    again = judge.score([p.prompt for p in ps[:3]], [p.answer for p in ps[:3]], texts[:3])
    assert again.scores == [0.9, 0.9, 0.0] and again.errors == 1  # a cached junk reply still counts as an error
    assert len(StubJudge.calls) == before  # every one of them cached


def test_unreachable_judge_costs_rewards_not_the_run(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setattr(judge_module, "_WARNED", set())
    judge = Judge(JudgeSettings(f"http://127.0.0.1:{port}/v1", "stub", timeout_s=1.0, retries=0))
    with pytest.warns(RuntimeWarning, match="APIConnectionError"):
        result = judge.score(["q", "q"], ["a", "a"], ["x", "y"])
    assert result.scores == [0.0, 0.0] and result.errors == 2
    assert judge.cache == {}  # failed requests are asked again next time


def test_judge_reward_is_a_weighted_component_with_its_errors_counted(stub_url, monkeypatch):
    monkeypatch.setattr(judge_module, "_WARNED", set())
    task, ps = get_task("arithmetic"), problems(2)
    texts = ["<think>GOOD</think> <answer>1</answer>", "<think>junk</think> <answer>2</answer>"]
    result = score_completions(task, ps, texts)
    assert result.total == [2.0, 2.0] and result.errors == 0
    settings = JudgeSettings(stub_url, "stub", template="{completion}", retries=0)
    with pytest.warns(RuntimeWarning, match="no score in its reply 'I like turtles'"):
        add_learned_rewards(result, LearnedRewards(judge=settings, judge_weight=0.5), ps, texts)
    assert result.components["judge"] == [0.9, 0.0]
    assert result.total == pytest.approx([2.45, 2.0]) and result.errors == 1


# ---------------------------------------------------------------------------------------------------------------
# settings


@pytest.mark.parametrize("kw, message", [
    (dict(judge_url="ftp://host/v1", judge_model="m"), "not an http(s)://"),
    (dict(judge_url="http://", judge_model="m"), "not an http(s)://"),
    (dict(judge_url="http://h:1/v1"), "judge_url and judge_model go together"),
    (dict(judge_model="m"), "judge_url and judge_model go together"),
    (dict(judge_weight=-1.0), "judge_weight: -1 is below the minimum 0"),
    (dict(judge_weight=float("nan")), "judge_weight: nan is not a finite number"),
    (dict(judge_concurrency=0), "judge_concurrency: 0 is below the minimum 1"),
    (dict(judge_timeout_s=0.0), "judge_timeout_s: 0"),
    (dict(judge_retries=-1), "judge_retries: -1 is below the minimum"),
    (dict(judge_api_key_env="sk-abc123"), "not an environment variable name"),
    (dict(reward_model_batch_size=0), "reward_model_batch_size: 0 is below the minimum 1"),
    (dict(reward_model_normalize="btach"), "did you mean 'batch'"),
    (dict(reward_model_weight=float("inf")), "reward_model_weight: inf is not a finite number"),
])
def test_bad_settings_are_refused(kw, message):
    with pytest.raises(ValueError) as refused:
        GRPOConfig(**kw).check()
    assert message in str(refused.value)


def test_what_cannot_start_is_refused_before_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("R1LAB_TEST_JUDGE_KEY", raising=False)
    cfg = GRPOConfig(judge_url="http://127.0.0.1:1/v1", judge_model="m", judge_api_key_env="R1LAB_TEST_JUDGE_KEY",
                     judge_template=str(tmp_path / "missing.txt"), reward_model=str(tmp_path))
    with pytest.raises(ValueError) as refused:
        check_settings(cfg)
    text = str(refused.value)
    assert "R1LAB_TEST_JUDGE_KEY is not set" in text and "cannot be read" in text and "not a model directory (no config.json)" in text
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(ValueError, match=r"reward_model needs transformers, .*pip install 'r1lab\[reward-model\]'"):
        check_settings(GRPOConfig(reward_model=str(tmp_path)))


# ---------------------------------------------------------------------------------------------------------------
# the reward model


@pytest.fixture(scope="module")
def reward_model_dir(tiny_base, tmp_path_factory):
    """A tiny transformers Qwen2ForSequenceClassification (num_labels 1) and a tokenizer with a chat template."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("reward_model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=512, num_labels=1)
    transformers.Qwen2ForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_classifier_of_several_labels_is_refused_at_start(reward_model_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(reward_model_dir)
    config.num_labels = 2
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has 2 outputs"):
        check_settings(GRPOConfig(reward_model=str(tmp_path)))
    check_settings(GRPOConfig(reward_model=str(reward_model_dir)))


def test_reward_model_scores_in_batches_as_one_by_one(reward_model_dir):
    from r1lab.rewards.reward_model import RewardModel, RewardModelSettings

    prompts, texts = ["What is 1+1?", "2*3?", "7-5?"], ["<answer>2</answer>", "six, I think: <answer>6</answer>", ""]
    one = RewardModel(RewardModelSettings(str(reward_model_dir), batch_size=1))
    batched = RewardModel(RewardModelSettings(str(reward_model_dir), batch_size=3))
    singles, errors = one.score(prompts, texts)
    assert errors == 0 and len(set(singles)) == 3
    assert batched.score(prompts, texts)[0] == pytest.approx(singles, abs=1e-5)  # padding changes nothing
    assert one.text("Q", "A") == "user: Q\nassistant: A\n"  # the model's own chat template
    normalised, _ = RewardModel(RewardModelSettings(str(reward_model_dir), 2, normalize="batch")).score(prompts, texts)
    assert sum(normalised) == pytest.approx(0, abs=1e-6) and sum(x * x for x in normalised) == pytest.approx(3)


# ---------------------------------------------------------------------------------------------------------------
# end to end: GRPO with a judge served by `r1lab serve`, and with a reward model


def grpo_args(base, out):
    return ["grpo", "--model", str(base), "--out", str(out), "--task", "arithmetic", "--task-options",
            "{min_terms: 3, max_terms: 4}", "--steps", "2", "--prompts-per-step", "2", "--samples-per-prompt", "2",
            "--max-new-tokens", "12", "--eval-every", "0", "--save-every", "0", "--device", "cpu"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def served_judge(tiny_base):
    """`r1lab serve` of the tiny model on a free port, as a separate process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "r1lab", "serve", "--model", str(tiny_base), "--port", str(port),
                             "--device", "cpu", "--served-model-name", "judge", "--api-key", "sekrit",
                             "--log-level", "warning"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    httpx = pytest.importorskip("httpx")
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "r1lab serve did not start"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_grpo_logs_the_reward_of_a_judge_under_r1lab_serve(tiny_base, served_judge, tmp_path, monkeypatch):
    from r1lab.cli import main

    outcomes, ask = [], Judge._ask
    monkeypatch.setattr(Judge, "_ask", lambda self, prompt: outcomes.append(ask(self, prompt)) or outcomes[-1])
    monkeypatch.setenv("R1LAB_TEST_JUDGE_KEY", "sekrit")
    (tmp_path / "judge.txt").write_text("{problem} {completion} score:")
    out = tmp_path / "run"
    main([*grpo_args(tiny_base, out), "--judge-url", served_judge, "--judge-model", "judge", "--judge-template",
          str(tmp_path / "judge.txt"), "--judge-api-key-env", "R1LAB_TEST_JUDGE_KEY", "--judge-max-tokens", "6",
          "--judge-weight", "0.5"])
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["reward/judge"] <= 1 and r["scorer_timeouts"] == 0
    assert outcomes and all(kind == "ok" for kind, _ in outcomes)  # the server answered every request
    unreadable = sum(score is None for _, score in outcomes)  # a random tiny model's replies: junk, as a rule
    assert sum(r["scorer_errors"] for r in rows) >= unreadable
    assert "sekrit" not in (out / "config.yaml").read_text()  # the variable's name is saved, never the key


@pytest.mark.slow
def test_grpo_logs_the_reward_of_a_reward_model(tiny_base, reward_model_dir, tmp_path):
    from r1lab.cli import main

    out = tmp_path / "run"
    main([*grpo_args(tiny_base, out), "--reward-model", str(reward_model_dir), "--reward-model-batch-size", "3",
          "--reward-model-weight", "2"])
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["reward/reward_model"] != 0 and r["scorer_errors"] == 0
        total = r["reward/accuracy"] + r["reward/format"] + 2 * r["reward/reward_model"]
        assert r["reward/mean"] == pytest.approx(total, abs=1e-5)
