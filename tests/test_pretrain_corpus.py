"""The pretraining corpora (r1lab/commands/pretrain.py): the demo's is pinned, the tool demo's reads as rollouts with tools do."""

import hashlib
import re

from r1lab.commands.pretrain import corpus_pairs, tokenize_pairs
from r1lab.config import PretrainConfig
from r1lab.engine.engine import Sample
from r1lab.engine.tools import ToolSpec, generate_with_tools
from r1lab.model.tokenizer import build_tiny_tokenizer
from r1lab.rewards.rules import extract_answer, format_reward
from r1lab.rewards.tasks.arithmetic import TOOL_DEMO_OPTIONS

TOK = build_tiny_tokenizer()
TOOL_CORPUS = PretrainConfig(documents=60, tools="python", task_options=TOOL_DEMO_OPTIONS)
CALL = re.compile(r" <think><python>(print\(\d+\*\d+\))</python>(<output>.*?</output>)</think> <answer>(\d+)</answer>",
                  re.DOTALL)


def test_the_default_corpus_is_the_one_the_readme_figures_were_measured_on():
    # the token ids of the first 500 documents at main's commit e9c3a0b (before the tool corpus existed)
    docs = tokenize_pairs(TOK, corpus_pairs(PretrainConfig(documents=500), TOK))
    assert hashlib.sha256(repr(docs).encode()).hexdigest() == \
        "8ed60567a3502886d1a89c4ad3ba11e72f35ff7eaba80bceeef6010fb3de5136"


class Replay:
    """An engine that writes the rest of a document's response (whatever text the rollout has so far), cut like
    Engine.generate at a stop string or end-of-text: what a base that learned the document exactly would sample."""

    def __init__(self, documents):
        self.documents, self.tokenizer = documents, TOK

    def generate(self, prompt_ids, *, num_samples=1, max_new_tokens=128, seed=None, stop_strings=(), **_):
        samples = []
        for i, ids in enumerate(prompt_ids):
            text = TOK.decode(ids)
            document = next(d for d in self.documents if d.startswith(text))
            rest = TOK.encode(document[len(text):], add_special_tokens=False) + [TOK.pad_id]
            n = next(n for n in range(1, len(rest) + 1)
                     if rest[n - 1] == TOK.pad_id or any(TOK.decode(rest[:n]).endswith(s) for s in stop_strings))
            samples.append(Sample(i, rest[:n], TOK.decode(rest[:n]), [0.0] * n, "stop"))
        return samples


def test_the_tool_corpus_calls_the_tool_exactly_as_a_rollout_reads_it():
    pairs = corpus_pairs(TOOL_CORPUS, TOK)
    calls = [(prompt, response) for prompt, response in pairs if "<python>" in response]
    assert 0.15 <= len(calls) / len(pairs) <= 0.45  # a minority calls the tool; the rest guess
    for _, response in calls:
        code, block, answer = CALL.fullmatch(response).groups()
        assert block == f"<output>{answer}\n</output>" and format_reward(response) == 1.0
    # replayed through generate_with_tools with the real sandbox, each call's document comes back token for token:
    # the output block the rollout appends is the document's, and so are the ids the model is trained on
    prompts = [prompt for prompt, _ in calls[:4]]
    docs = [prompt + response for prompt, response in calls[:4]]
    rollouts = generate_with_tools(Replay(docs), [TOK.encode(p) for p in prompts], ToolSpec(), max_new_tokens=128)
    for rollout, (prompt, response), ids in zip(rollouts, calls, tokenize_pairs(TOK, calls[:4])):
        assert rollout.calls == 1 and rollout.failures == 0 and rollout.text == response
        assert TOK.encode(prompt) + rollout.token_ids == ids


def test_a_share_of_the_tool_calls_miscopy_the_problem_and_answer_what_the_miscopy_printed():
    pairs = corpus_pairs(PretrainConfig(documents=400, tools="python", task_options=TOOL_DEMO_OPTIONS), TOK)
    calls = [(p, CALL.fullmatch(r).groups()) for p, r in pairs if "<python>" in r]
    miscopied = [(prompt, code) for prompt, (code, _, _) in calls if f" {code[6:-1]}. Assistant:" not in prompt]
    assert 0.05 <= len(miscopied) / len(calls) <= 0.4
    for _, (code, _, answer) in calls:
        left, right = code[6:-1].split("*")
        assert int(answer) == int(left) * int(right)  # the output and answer are the printed product, miscopied or not
    guesses = [extract_answer(r) for _, r in pairs if "<think>Easy.</think>" in r]
    assert guesses and all(g.isdigit() for g in guesses)
