"""Tool calls inside rollouts (r1lab/engine/tools.py): the sandboxed call, the turn-by-turn driver, the loss mask, GRPO."""

import json

import pytest
import torch

import r1lab.train.grpo as grpo
from r1lab.cli import main
from r1lab.engine.engine import Sample
from r1lab.engine.tools import ToolSpec, block_code, generate_with_tools, output_text
from r1lab.model.tokenizer import build_tiny_tokenizer
from r1lab.rewards.sandbox.runner import ProgramResult, run_program
from r1lab.rewards.tasks import Problem, get_task
from r1lab.train.evaluate import evaluate

TOK = build_tiny_tokenizer()


class ScriptedEngine:
    """A model that writes what script(text so far) says comes next, then end-of-text; it stops like
    Engine.generate does (end-of-text, a completed stop string, the token limit) and records each call's prompts."""

    def __init__(self, script):
        self.script, self.tokenizer, self.calls = script, TOK, []

    def generate(self, prompt_ids, *, num_samples=1, max_new_tokens=128, seed=None, stop_strings=(), **_):
        limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompt_ids)
        self.calls.append([TOK.decode(p) for p in prompt_ids])
        samples = []
        for i, prompt in enumerate(prompt_ids):
            ids = TOK.encode(self.script(TOK.decode(prompt)), add_special_tokens=False) + sorted(TOK.eos_ids)
            for _ in range(num_samples):
                samples.append(self._cut(i, ids, limits[i], stop_strings))
        return samples

    @staticmethod
    def _cut(i, ids, limit, stop_strings):
        for n in range(1, len(ids) + 1):
            text = TOK.decode(ids[:n])
            if ids[n - 1] in TOK.eos_ids or any(s in text for s in stop_strings):
                return Sample(i, ids[:n], text, [-0.5] * n, "stop")
            if n == limit:
                break
        return Sample(i, ids[:n], TOK.decode(ids[:n]), [-0.5] * n, "length")


def fake_runner(outputs):
    """A sandbox stand-in: code -> ProgramResult, recording the code it was given."""
    seen = []

    def run(code, spec):
        seen.append(code)
        return outputs(code)
    run.seen = seen
    return run


def calculator(text):
    """Writes one block, then the answer it read from the output."""
    if "<output>" not in text:
        return "<think>let me compute<python>print(6*7)</python>"
    return "so</think><answer>42</answer>"


# ---------------------------------------------------------------------------------------------------------------
# the sandboxed call


def test_a_program_runs_in_the_sandbox_and_its_failures_are_told_apart():
    assert run_program("print(6*7)") == ProgramResult("42\n", True, layers=run_program("print(6*7)").layers)
    raised = run_program("print('a')\n1/0")
    assert not raised.ok and raised.output == "a\nZeroDivisionError: division by zero\n" and not raised.timed_out
    slow = run_program("print('started')\nwhile True: pass", timeout_s=0.5)
    assert not slow.ok and slow.timed_out and slow.output == "started\n"
    flood = run_program("print('x' * 10000)", max_output_bytes=100)
    assert not flood.ok and flood.truncated and flood.output == "x" * 100
    assert not run_program("import os\nos.system('true')").ok  # the sandbox's guards hold for tool calls too


def test_output_block_format_and_truncation_marker():
    spec = ToolSpec(output_chars=16)
    assert output_text(ProgramResult("42\n", True), spec) == "<output>42\n</output>"
    cut = output_text(ProgramResult("y" * 40, True), spec)
    assert cut == "<output>" + "y" * 16 + "\n[... 24 more characters]\n</output>"
    timed = output_text(ProgramResult("", False, timed_out=True, error="timed out after 2 s"), spec)
    assert timed == "<output>error: timed out after 2 s\n</output>"
    assert output_text(None, spec) == "<output>error: </python> without <python>\n</output>"
    assert block_code("a<python>x = 1\nprint(x)</python>", spec) == "x = 1\nprint(x)"
    assert block_code("no block</python>", spec) is None


# ---------------------------------------------------------------------------------------------------------------
# the turn-by-turn driver


def test_a_closed_block_runs_its_output_is_appended_and_generation_continues():
    engine = ScriptedEngine(calculator)
    runner = fake_runner(lambda code: ProgramResult("42\n", True))
    [out] = generate_with_tools(engine, [TOK.encode("Q:", add_special_tokens=False)], ToolSpec(), runner=runner,
                                max_new_tokens=200, seed=[3])
    block = "<output>42\n</output>"
    assert out.text == "<think>let me compute<python>print(6*7)</python>" + block + "so</think><answer>42</answer>"
    assert runner.seen == ["print(6*7)"] and (out.calls, out.failures, out.finish_reason) == (1, 0, "stop")
    assert engine.calls[1] == ["Q:<think>let me compute<python>print(6*7)</python>" + block]  # the model reads it
    # the mask is False exactly on the output block's tokens, which carry no sampling log-prob
    n_first = len(TOK.encode("<think>let me compute<python>print(6*7)</python>", add_special_tokens=False))
    n_block = len(TOK.encode(block, add_special_tokens=False))
    assert out.model_mask == [True] * n_first + [False] * n_block + [True] * (len(out.token_ids) - n_first - n_block)
    assert TOK.decode(out.token_ids[n_first : n_first + n_block]) == block
    assert out.logprobs[n_first : n_first + n_block] == [0.0] * n_block
    assert all(lp == -0.5 for lp, m in zip(out.logprobs, out.model_mask) if m)


def test_the_real_sandbox_answers_print_6_times_7():
    [out] = generate_with_tools(ScriptedEngine(calculator), [TOK.encode("Q:", add_special_tokens=False)], ToolSpec(),
                                max_new_tokens=200)
    assert "</python><output>42\n</output>so</think>" in out.text and (out.calls, out.failures) == (1, 0)


def test_failed_calls_are_counted_and_shown_to_the_model():
    programs = iter(["1/0", "while True: pass", "print('ok')"])

    def script(text):
        n = text.count("<output>")
        return f"<python>{next(programs)}</python>" if n < 3 else "<answer>1</answer>"
    [out] = generate_with_tools(ScriptedEngine(script), [[1]], ToolSpec(timeout_s=0.5), max_new_tokens=300)
    assert (out.calls, out.failures, out.finish_reason) == (3, 2, "stop")
    assert "<output>ZeroDivisionError: division by zero\n</output>" in out.text
    assert "<output>error: timed out after 0.5 s\n</output>" in out.text and "<output>ok\n</output>" in out.text


def test_a_block_past_the_call_limit_ends_the_rollout_unrun():
    runner = fake_runner(lambda code: ProgramResult("1\n", True))
    [out] = generate_with_tools(ScriptedEngine(lambda text: "<python>print(1)</python>"), [[1]],
                                ToolSpec(max_calls=2), runner=runner, max_new_tokens=500)
    assert len(runner.seen) == 2 and out.text.count("<output>") == 2 and out.text.endswith("</python>")
    assert (out.calls, out.failures, out.finish_reason) == (3, 1, "tool_limit")


def test_tool_output_counts_against_the_token_budget():
    runner = fake_runner(lambda code: ProgramResult("z" * 200, True))
    head = "<python>print(1)</python>"
    n_head = len(TOK.encode(head, add_special_tokens=False))
    [out] = generate_with_tools(ScriptedEngine(lambda text: head), [[1]], ToolSpec(output_chars=300), runner=runner,
                                max_new_tokens=n_head + 30)
    assert len(out.token_ids) == n_head + 30 and out.finish_reason == "length"
    assert out.model_mask == [True] * n_head + [False] * 30 and out.text == head + "<output>" + "z" * 22
    # and a turn after an output gets only what is left of the budget
    [out] = generate_with_tools(ScriptedEngine(calculator), [[1]], ToolSpec(), max_new_tokens=50,
                                runner=fake_runner(lambda code: ProgramResult("42\n", True)))
    assert len(out.token_ids) == 50 and out.finish_reason == "length"


def test_rollouts_with_tools_are_the_same_alone_and_in_a_batch(tiny_base):
    # The tiny base writes <think>...</think>: with "think" as the tool tag nearly every rollout makes a call, and a
    # short output leaves room for a second turn. Per-rollout seeds make each one independent of its batch-mates.
    model, tok = grpo.load_policy(str(tiny_base), torch.device("cpu"))
    engine = grpo.Engine(model, tok)
    spec, runner = ToolSpec(tag="think", max_calls=2), fake_runner(lambda code: ProgramResult("1\n", True))
    problems = grpo.get_task("arithmetic", min_terms=3, max_terms=4).problems("train", 3, 0)
    prompts = [grpo.encode_prompt(tok, p, "r1zero", "") for p in problems]
    kw = dict(num_samples=2, max_new_tokens=60, runner=runner)
    batch = generate_with_tools(engine, prompts, spec, seed=[11, 12, 13], **kw)
    alone = generate_with_tools(engine, prompts[1:2], spec, seed=[12], **kw)
    second_turns = [s for s in alone if True in s.model_mask[s.model_mask.index(False):]]
    assert all(s.calls > 0 for s in alone) and second_turns  # a model turn after a tool output
    assert [s.token_ids for s in alone] == [s.token_ids for s in batch[2:4]]
    assert [s.model_mask for s in alone] == [s.model_mask for s in batch[2:4]]
    for got, want in zip(alone, batch[2:4]):
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)
    # one int seed: each prompt still draws its own stream (the same prompt twice gives different rollouts)
    twice = generate_with_tools(engine, [prompts[0]] * 2, spec, max_new_tokens=40, seed=5, runner=runner)
    assert twice[0].token_ids != twice[1].token_ids


# ---------------------------------------------------------------------------------------------------------------
# the loss mask


def test_tool_output_tokens_are_attended_to_but_never_trained(tiny_base):
    model, tok = grpo.load_policy(str(tiny_base), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 60, (n,), generator=g).tolist() for n in (6, 4)]
    completions = [torch.randint(5, 60, (n,), generator=g).tolist() for n in (9, 7, 5, 8)]
    masks = [[True] * 3 + [False] * 4 + [True] * 2, [True] * 7, [True, False, False, True, True], [True] * 8]
    rollouts = grpo.Rollouts(problems=[None] * 4, prompt_ids=[prompts[i // 2] for i in range(4)],
                             completion_ids=completions,
                             old_logprobs=[[-1.0 if m else float("nan") for m in mask] for mask in masks],
                             texts=[""] * 4, truncated=[False] * 4, model_mask=masks, tool_calls=[1, 0, 1, 0],
                             tool_failures=[0, 0, 1, 0])
    cfg = grpo.GRPOConfig(micro_batch_size=4, samples_per_prompt=2, loss_norm="sequence", updates_per_batch=2,
                          skip_zero_advantage=False)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    [mb] = grpo.make_micro_batches(rollouts, adv, torch.ones(4, dtype=torch.bool), cfg, tok.pad_id, "cpu")
    n_model = sum(map(sum, masks))
    assert len(mb.old_logp) == len(mb.weights) == n_model and torch.equal(mb.old_logp, torch.full((n_model,), -1.0))
    assert mb.completion_mask.sum() == sum(map(len, masks))  # every token is still attended to
    # sequence normalisation divides by each sequence's own (model) tokens
    assert mb.weights.tolist() == pytest.approx([1 / (4 * sum(m)) for m in masks for _ in range(sum(m))])
    logp = grpo.completion_logprobs(model, mb, 1.0)[0]
    loss = (-(torch.exp(logp - mb.old_logp)) * mb.advantages * mb.weights).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # by hand: full sequences (tool tokens in the context), log-probs taken and weighted only at the model's tokens
    by_hand = 0.0
    for i, (p_ids, c_ids, mask) in enumerate(zip(rollouts.prompt_ids, completions, masks)):
        logits = model(torch.tensor([p_ids + c_ids]))[0, len(p_ids) - 1 : -1]
        full = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c_ids)[:, None]).squeeze(-1)
        kept = full[torch.tensor(mask)]
        by_hand = by_hand - (torch.exp(kept + 1.0) * adv[i]).sum() / (4 * sum(mask))
    by_hand.backward()
    assert torch.allclose(loss, by_hand, atol=1e-6)
    for n, p in model.named_parameters():
        assert (grads[n] - p.grad).norm() <= 1e-5 * p.grad.norm() + 1e-12, n
    # and the training step itself stays finite although the tool tokens' placeholder log-probs are NaN
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = grpo.update_policy(model, None, opt, [mb], cfg)
    assert stats["skipped_nonfinite"] == 0 and stats["importance_ratio/max"] < 2


# ---------------------------------------------------------------------------------------------------------------
# GRPO with tools


def test_grpo_runs_with_tools_and_logs_the_calls(tiny_base, tmp_path):
    cfg = grpo.GRPOConfig(model=str(tiny_base), out=str(tmp_path), task="arithmetic",
                          task_options={"min_terms": 3, "max_terms": 4}, steps=2, prompts_per_step=2,
                          samples_per_prompt=4, micro_batch_size=8, lr=1e-3, max_new_tokens=40, eval_every=2,
                          eval_problems=2, eval_samples=2,
                          save_every=0, samples_every=1, seed=0, tools="python", tool_tag="think",
                          tool_timeout_s=1.0, max_tool_calls=2, tool_failure_penalty=0.1, skip_zero_advantage=False)
    grpo.train(cfg, log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["tools/calls_per_rollout"] > 0 and 0 <= r["tools/failure_rate"] <= 1
        assert 0 < r["tools/output_token_share"] < 1 and "reward/tool_failures" in r
        assert r["skipped_nonfinite"] == 0 and r["logprob_diff/max"] < 1e-4  # no placeholder reached the loss
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2] and all("tool_calls" in json.dumps(e) for e in evals)  # with tools
    # which rollout calls depends on the tool outputs before it (one generator per batch): any of them
    samples = [json.loads(line) for line in (tmp_path / "samples" / "step_000000.jsonl").read_text().splitlines()]
    assert all("tool_calls" in s for s in samples)
    assert any(s["tool_calls"] and "<output>" in s["completion"] for s in samples)


# ---------------------------------------------------------------------------------------------------------------
# eval and sample


def test_evaluation_with_tools_scores_what_the_model_wrote_after_the_output():
    problems = [Problem("What is 6*7?", "42", {})]
    result = evaluate(ScriptedEngine(calculator), get_task("arithmetic"), problems, lambda p: [1], k=2,
                      max_new_tokens=200, tools=ToolSpec())
    assert result.pass_at_1 == 1.0 and result.format_rate == 1.0  # a tool block inside <think> keeps the format
    samples = result.records[0]["samples"]
    assert all("<output>42\n</output>" in s["completion"] and s["tool_calls"] == 1 for s in samples)
    figures = result.to_dict()
    assert figures["tool_calls"] == 1.0 and figures["tool_failure_rate"] == 0.0


def test_eval_and_sample_commands_take_tools(tiny_base, tmp_path):
    # "think" as the tool tag: the tiny base closes it in nearly every completion, so calls happen
    tools = ["--tools", "python", "--tool-tag", "think", "--max-tool-calls", "1", "--tool-timeout-s", "1"]
    main(["eval", "--model", str(tiny_base), "--task-options", "{min_terms: 3, max_terms: 3}", "--problems", "3",
          "--samples", "2", "--max-new-tokens", "40", "--out", str(tmp_path / "eval.json"), "--threads", "1", *tools])
    figures = json.loads((tmp_path / "eval.json").read_text())["test"]
    assert figures["tool_calls"] > 0 and "tool_calls" in figures["records"][0]["samples"][0]
    main(["sample", "--model", str(tiny_base), "--task-options", "{min_terms: 3, max_terms: 3}", "--problems", "3",
          "--samples", "2", "--max-new-tokens", "40", "--out", str(tmp_path / "sampled.jsonl"), "--threads", "1",
          *tools])
    summary = json.loads((tmp_path / "sampled.summary.json").read_text())
    assert summary["sampled"] == 6 and summary["tool_calls"] > 0 and 0 <= summary["tool_failures"] <= 6


@pytest.mark.parametrize("command", ["grpo", "eval", "sample"])
def test_tool_settings_are_checked_before_anything_runs(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--tools", "python", "--tool-tag", "out", "--tool-output-tag", "out"])
    assert "could not tell a call from its output" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([command, "--tools", "python", "--tool-tag", "<python>"])
    assert "is not a tag name" in capsys.readouterr().err
