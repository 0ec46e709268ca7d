"""Reasoning models as they ship: `\\boxed{}` answers after a `</think>` that the prompt may have opened, read by the
one extractor behind rewards, evaluation, sampling, `r1lab score` and the server's split; and the run that says
when nothing is learned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1lab.cli import main
from r1lab.config import GRPOConfig
from r1lab.model.templates import response_prefix, template_opens_think
from r1lab.model.tokenizer import build_tiny_tokenizer
from r1lab.rewards.answers import boxes, choose_answer_format, extract_answer, format_reward, last_boxed
from r1lab.rewards.rules import RewardWeights, score_completions
from r1lab.rewards.tasks import get_task
from r1lab.rewards.tasks.base import Problem
from r1lab.serve.reasoning import split_reasoning
from r1lab.train import grpo

# DeepSeek-R1-Distill's template, reduced to what matters here: its generation prompt opens <think>
R1_DISTILL_TEMPLATE = ("{% for m in messages %}{% if m.role == 'user' %}<|User|>{{ m.content }}{% else %}"
                       "<|Assistant|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
                       "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}")


# ---------------------------------------------------------------- the extractor


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\boxed {7}", "7"),  # a space before the brace is the same box in LaTeX
    ("\\fbox{x^{2}}", "x^{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are content, not structure
    ("\\boxed{1} then \\boxed{ 2 }", "2"),  # the last box counts
    ("\\boxed{1} then \\boxed{2", None),  # the last box is never closed: no answer, not the one before
    ("\\boxedx{3}", None),  # another command
    ("no box", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_boxed_answer_is_the_last_box_after_think_never_one_inside():
    assert extract_answer("<think>maybe \\boxed{3}</think> so \\boxed{4}", "boxed") == "4"
    assert extract_answer("<think>maybe \\boxed{3}</think> so 4", "boxed") is None
    assert extract_answer("<think>still thinking \\boxed{3}", "boxed") is None  # the think block never closed
    assert extract_answer("a </think> b </think> \\boxed{5}", "boxed") == "5"  # after the last </think>
    assert extract_answer("\\boxed{6}", "boxed") == "6"  # a model that does not reason aloud
    assert extract_answer("<think>x</think><answer>7</answer>", "boxed") is None  # tags are not boxes
    assert extract_answer("<think>x</think>\\boxed{7}", "tags") is None  # and boxes are not tags
    assert extract_answer("<think>x</think>```python\nf()\n```", "boxed", code=True) == "```python\nf()\n```"


GOOD_BOXED = "<think>\n6 times 7 is 42</think>\n\nThe answer is $\\boxed{42}$."


@pytest.mark.parametrize("text", [
    "<think>r</think> \\boxed{3} and \\boxed{4}",  # several boxed answers
    "<think>r \\boxed{4}</think> so \\boxed{4}",  # a box in the think part
    "<think>r</think> \\boxed{4",  # unclosed brace
    "<think>r</think> \\boxed{\\frac{1}{2}",  # unclosed nested brace
    "<think>r</think> x </think> \\boxed{4}",  # </think> twice
    "<think>r<think>s</think> \\boxed{4}",  # <think> twice
    "r</think> \\boxed{4}",  # the think block never opened (and the prompt did not open it)
    "<think>r</think> no answer",
    "<think>r</think> \\boxed{ }",  # an empty answer
    "<think>r</think> <answer>4</answer> \\boxed{4}",  # two formats at once
    "<think>r",
    "",
])
def test_boxed_format_rejects(text):
    assert format_reward(text, "boxed") == 0.0


def test_boxed_format_accepts_one_box_after_one_closed_think():
    assert format_reward(GOOD_BOXED, "boxed") == 1.0
    assert format_reward("<think>r</think>\\fbox{x}", "boxed") == 1.0
    assert boxes(GOOD_BOXED) == (["42"], False)


def test_think_opened_by_the_prompt_is_judged_with_the_response_prefix():
    """R1-Distill's completion starts inside the think block and only has </think>: the prompt's <think> is read in
    front of it, as the prompt wrote it."""
    tok = build_tiny_tokenizer()
    tok.chat_template = R1_DISTILL_TEMPLATE
    prefix = response_prefix(tok, "chat")
    assert prefix == "<think>\n" and template_opens_think(tok, "chat") and not template_opens_think(tok, "r1zero")
    assert response_prefix(tok, "r1zero", "Let me solve it.\n<think>") == "<think>"  # a prefill that opens it
    assert response_prefix(tok, "r1zero") == ""
    completion = "6 times 7 is 42</think>\n\nThe answer is $\\boxed{42}$."
    task, problem = get_task("arithmetic"), Problem("6*7", "42")
    scored = score_completions(task, [problem] * 2, [completion, "<think>" + completion], response_prefix=prefix,
                               answer_format="boxed")
    assert scored.components == {"accuracy": [1.0, 1.0], "format": [1.0, 0.0]}  # opening it again: two <think>


def test_boxed_answers_are_compared_by_math_verify(tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text(json.dumps({"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$."}) + "\n")
    task = get_task(str(data), test_fraction=0)
    problem = task.problems("train")[0]
    completions = ["<think>r</think> \\boxed{0.5}", "<think>r</think> \\boxed{\\dfrac{1}{2}}",
                   "<think>r</think> \\boxed{\\frac{1}{3}}", "<think>\\boxed{\\frac{1}{2}}</think> no answer"]
    scored = score_completions(task, [problem] * 4, completions, RewardWeights(1.0, 0.0), answer_format="boxed")
    assert scored.components["accuracy"] == [1.0, 1.0, 0.0, 0.0]


def test_auto_answer_format():
    assert choose_answer_format("tags", opens_think=True) == ("tags", "as given")
    assert choose_answer_format("auto", opens_think=True)[0] == "boxed"
    assert choose_answer_format("auto", closes_think=True, template="chat")[0] == "boxed"  # Qwen3's template
    assert choose_answer_format("auto", template="r1zero", solutions=["\\boxed{1}"])[0] == "tags"
    assert choose_answer_format("auto", template="chat", solutions=["\\boxed{1}", "$\\boxed{2}$", "#### 3"]) == \
        ("boxed", "2 of the data's 3 solutions use \\boxed")
    assert choose_answer_format("auto", template="chat", solutions=["#### 3"])[0] == "tags"
    assert choose_answer_format("auto", completions=["r</think> \\boxed{1}", "<answer>2</answer>", "\\fbox{3}"])[0] \
        == "boxed"
    assert choose_answer_format("auto", completions=["<answer>2</answer>"])[0] == "tags"
    with pytest.raises(ValueError, match="answer format 'box' is not one of tags, boxed"):
        choose_answer_format("box")


def test_server_split_keeps_a_boxed_answer_as_written():
    text = "6 times 7</think>\n\nThe answer is \\boxed{42}."
    assert split_reasoning(text, True, "boxed") == ("6 times 7", "The answer is \\boxed{42}.")
    assert split_reasoning("<think>r</think><answer>42</answer>", False, "tags") == ("r", "42")
    assert split_reasoning("<think>r</think><answer>42</answer>", False, "boxed") == ("r", "<answer>42</answer>")


# ---------------------------------------------------------------- nothing learned, said


def test_a_run_of_zero_variance_steps_is_said_once_with_its_likely_causes():
    cfg, lines = GRPOConfig(max_new_tokens=64), []
    flat = {"zero_variance_groups": 1.0, "reward/mean": 0.0, "reward/format": 0.0, "accuracy": 0.0, "truncated": 1.0}
    streak = 0
    for _ in range(grpo.ZERO_VARIANCE_PATIENCE + 2):
        streak = grpo.zero_variance_streak(streak, flat, cfg, "tags", lines.append)
    assert streak == grpo.ZERO_VARIANCE_PATIENCE + 2 and len(lines) == 1
    causes = ("answer format (--answer-format, here tags;", "too hard", "max_new_tokens 64")
    assert all(cause in lines[0] for cause in causes)
    assert grpo.zero_variance_streak(streak, {**flat, "zero_variance_groups": 0.5}, cfg, "tags", lines.append) == 0


# ---------------------------------------------------------------- r1lab score


def _completion(answer: int) -> str:
    """A completion as vLLM returns it for R1-Distill: the <think> was the prompt's, only </think> is here."""
    return f"Let me add the numbers.\nThat makes {answer}.</think>\n\nThe answer is $\\boxed{{{answer}}}$."


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_a_data_file_task_five_right_five_wrong(tmp_path):
    data = _write_rows(tmp_path / "sums.jsonl", [{"prompt": f"What is {n} + {n}?", "answer": str(2 * n)}
                                                 for n in range(10)])
    rows = [{"prompt": f"What is {n} + {n}?", "completion": _completion(2 * n if n % 2 else 2 * n + 1)}
            for n in range(10)]
    rows[9]["prompt"] = "<|User|>What is 9 + 9?<|Assistant|><think>\n"  # as a template rendered it, <think> opened
    completions, out = _write_rows(tmp_path / "vllm.jsonl", rows), tmp_path / "scores.json"
    main(["score", "--task", str(data), "--completions", str(completions), "--answer-format", "boxed",
          "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["accuracy"] == 0.5 and report["format_rate"] == 1.0 and report["answer_format"] == "boxed"
    assert [r["correct"] for r in report["results"]] == [n % 2 == 1 for n in range(10)]
    assert all(r["think_in_prompt"] for r in report["results"]) and report["results"][3]["answer"] == "6"


@pytest.mark.parametrize("answer_format,said", [("boxed", "boxed (as given)"),
                                                ("auto", "boxed (10 of 10 completions write \\boxed, 0 an </answer>)")])
def test_score_the_builtin_arithmetic_task_five_right_five_wrong(tmp_path, capsys, answer_format, said):
    problems = get_task("arithmetic").problems("test", 10, seed=0)
    rows = [{"prompt": p.prompt, "completion": _completion(int(p.answer) + (i % 2))} for i, p in enumerate(problems)]
    rows[0] = {"prompt": [{"role": "user", "content": rows[0]["prompt"]}],  # TRL's conversational rows too
               "completion": [{"role": "assistant", "content": rows[0]["completion"]}]}
    completions = _write_rows(tmp_path / "api.jsonl", rows)
    main(["score", "--task", "arithmetic", "--completions", str(completions), "--answer-format", answer_format])
    report = json.loads((tmp_path / "api.score.json").read_text())
    assert report["accuracy"] == 0.5 and report["format_rate"] == 1.0
    assert [r["correct"] for r in report["results"]] == [i % 2 == 0 for i in range(10)]
    assert f"score: answer format {said}" in capsys.readouterr().out


def test_score_a_tags_completion_and_a_code_file_through_the_sandbox(tmp_path):
    code = _write_rows(tmp_path / "code.jsonl", [{"prompt": "Write double(x).", "entry_point": "double",
                                                  "tests": ["assert double(2) == 4", "assert double(0) == 0"]}])
    rows = [{"prompt": "Write double(x).", "completion": "<think>x2</think><answer>def double(x):\n    return 2 * x"
                                                          "</answer>"},
            {"prompt": "Write double(x).", "completion": "<think>x1</think><answer>def double(x):\n    return x"
                                                          "</answer>"}]
    completions, out = _write_rows(tmp_path / "c.jsonl", rows), tmp_path / "c.json"
    main(["score", "--task", "code", "--task-options", f"{{path: {code}}}", "--completions", str(completions),
          "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["answer_format"] == "tags" and report["format_rate"] == 1.0
    assert [r["accuracy"] for r in report["results"]] == [1.0, 0.5] and report["accuracy"] == 0.75


@pytest.mark.parametrize("row,error", [
    ({"prompt": "What is 1 + 1?"}, "c.jsonl:2: field 'completion' is missing"),
    ({"completion": "\\boxed{2}"}, "c.jsonl:2: field 'prompt' is missing"),
    ({"prompt": "What is 9 + 9?", "completion": "\\boxed{2}"}, "c.jsonl:2: prompt 'What is 9 + 9?' matches no problem"),
    ({"prompt": "What is 1 + 1?", "completion": 2}, "c.jsonl:2: field 'completion' must be a string"),
])
def test_score_names_the_line_of_a_bad_row(tmp_path, capsys, row, error):
    data = _write_rows(tmp_path / "d.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}])
    completions = _write_rows(tmp_path / "c.jsonl", [{"prompt": "What is 1 + 1?", "completion": "\\boxed{2}"}, row])
    with pytest.raises(SystemExit) as exit_:
        main(["score", "--task", str(data), "--completions", str(completions)])
    assert exit_.value.code == 2 and error in capsys.readouterr().err


def test_score_refuses_a_task_whose_prompts_do_not_identify_problems(tmp_path, capsys):
    completions = _write_rows(tmp_path / "c.jsonl", [{"prompt": "Write f.", "completion": "x"}])
    with pytest.raises(SystemExit):
        main(["score", "--task", "code", "--completions", str(completions)])
    assert "score against a file of its problems" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end: an R1-Distill-style model directory


R1_DISTILL_CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                   "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}"
                   "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")


def r1_distill_model_dir(path):
    """What `save_pretrained` writes for a tiny Qwen2 with an R1-Distill-style tokenizer: <think> and </think> as
    added tokens, a chat template that opens <think> in the generation prompt."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["What is 12 + 30? The answer is $\\boxed{42}$."] * 50, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<｜begin▁of▁sentence｜>",
                                                     eos_token="<｜end▁of▁sentence｜>", chat_template=R1_DISTILL_CHAT)
    tokenizer.save_pretrained(path)
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                                      tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


SEES_THE_PROMPTS_THINK = '''
def opened(completion, problem):
    # the response as the rewards read it: the <think> the chat template opened, then the sampled completion
    return 1.0 if completion.startswith("<think>\\n") else 0.0
'''


def test_grpo_on_an_r1_distill_style_model_chooses_boxed_and_scores_what_follows_the_prompts_think(
        tmp_path, monkeypatch, capsys):
    model = r1_distill_model_dir(tmp_path / "r1-distill-tiny")
    data = _write_rows(tmp_path / "sums.jsonl", [{"prompt": f"What is {n} + 30?", "answer": str(n + 30)}
                                                 for n in range(20)])
    (tmp_path / "rewards.py").write_text(SEES_THE_PROMPTS_THINK)
    seen = []

    def recording(*args, **kw):
        seen.append((args[2], kw["answer_format"], kw["response_prefix"]))
        return score_completions(*args, **kw)

    monkeypatch.setattr(grpo, "score_completions", recording)
    run = tmp_path / "run"
    main(["grpo", "--model", str(model), "--task", str(data), "--template", "chat", "--answer-format", "auto",
          "--steps", "2", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "8",
          "--eval-every", "0", "--samples-every", "1", "--device", "cpu", "--out", str(run),
          "--reward-functions", json.dumps({f"{tmp_path / 'rewards.py'}:opened": 1.0})])
    assert "grpo: answer format boxed (the chat template opens <think> in the generation prompt)" in \
        capsys.readouterr().out
    assert len(seen) == 2 and all(fmt == "boxed" and prefix == "<think>\n" for _, fmt, prefix in seen)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["reward/opened"] for m in metrics] == [1.0, 1.0]  # every completion reached it behind the <think>
    assert all("zero_variance_streak" in m for m in metrics)
    sample = json.loads((run / "samples" / "step_000000.jsonl").read_text().splitlines()[0])
    assert sample["components"]["opened"] == 1.0


def test_sample_stopped_by_a_full_disk_at_its_summary_leaves_no_rows_a_stage_would_take_for_done(tmp_path, monkeypatch):
    from r1lab.commands.sample import sample
    from r1lab.config import SampleConfig

    model = r1_distill_model_dir(tmp_path / "r1-distill-tiny")
    data = _write_rows(tmp_path / "sums.jsonl", [{"prompt": f"What is {n} + 30?", "answer": str(n + 30)}
                                                 for n in range(4)])
    real_write = Path.write_text

    def full_at_the_summary(self, *args, **kwargs):
        if self.name.endswith(".summary.json"):
            raise OSError(28, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_at_the_summary)
    out = tmp_path / "traces" / "sft.jsonl"
    cfg = SampleConfig(model=str(model), task=str(data), template="chat", problems=2, samples=1, max_new_tokens=4,
                       out=str(out), device="cpu", threads=1)
    with pytest.raises(OSError):
        sample(cfg, log=lambda *_: None)
    assert not out.exists()  # distill and pipeline read the summary of any rows they find
