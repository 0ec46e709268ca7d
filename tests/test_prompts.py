"""Prompts the same way in every command: one template default (the model's chat template, else R1-Zero's), TRL's
conversational prompts and a system message in grpo, eval and sample, and the first prompt shown as the model sees it."""

import dataclasses
import json

import pytest

from r1lab.cli import main
from r1lab.config import DistillConfig, EvalConfig, GRPOConfig, PipelineConfig, SampleConfig, SFTConfig
from r1lab.model.loading import describe_prompts, prompt_text
from r1lab.model.templates import render_prompt
from r1lab.model.tokenizer import build_tiny_tokenizer
from r1lab.rewards.tasks import DatasetError, DatasetTask, Problem

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("config", [GRPOConfig, EvalConfig, SampleConfig, SFTConfig, DistillConfig, PipelineConfig])
def test_every_command_renders_prompts_with_the_models_template_by_default(config):
    assert {f.name: f.default for f in dataclasses.fields(config)}["template"] == "auto"


def test_a_conversational_prompt_is_read_and_rendered_whole(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{n}+1"}],
             "answer": str(n + 1)} for n in range(10)]
    data = tmp_path / "conv.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problem = DatasetTask(data).problems("all", 1, 0)[0]
    assert problem.messages[0] == {"role": "system", "content": "Be brief."} and problem.prompt.endswith("+1")
    tok = build_tiny_tokenizer()
    tok.chat_template = CHATML
    text = prompt_text(tok, problem, "auto", system="ignored: the row has its own")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "ignored" not in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("prompt, message", [
    ([], "empty list of messages"),
    ([{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}], "must end with the user's"),
    ([{"role": "bot", "content": "1+1"}], "role 'bot'"),
    ([{"role": "user", "content": 2}], "string content"),
])
def test_a_bad_conversational_prompt_names_its_line(tmp_path, prompt, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n" + json.dumps({"prompt": prompt, "answer": "2"}) + "\n")
    with pytest.raises(DatasetError, match=f"bad.jsonl:2: .*{message}"):
        DatasetTask(data)


def test_a_system_message_comes_first_and_none_refuses_it():
    tok = build_tiny_tokenizer()
    problem = Problem(prompt="1+1", answer="2")
    assert prompt_text(tok, problem, "r1zero") == render_prompt(tok, "1+1", "r1zero")  # unchanged without one
    assert prompt_text(tok, problem, "r1zero", system="Be brief.").startswith("Be brief.\n")
    with pytest.raises(ValueError, match="template 'none'"):
        prompt_text(tok, problem, "none", system="Be brief.")
    assert "template r1zero (the tokenizer has no chat template)" in describe_prompts(tok, problem, "auto")


def test_grpo_shows_the_first_prompt_and_stores_it_with_the_samples(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    main(["grpo", "--model", str(tiny_base), "--steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2",
          "--max-new-tokens", "6", "--samples-every", "1", "--eval-every", "0", "--system", "Be brief.",
          "--out", str(out), "--device", "cpu"])
    logged = capsys.readouterr().out
    assert "grpo: template r1zero" in logged and "the first prompt as the model sees it: 'Be brief.\\n" in logged
    record = json.loads((out / "samples" / "step_000000.jsonl").read_text().splitlines()[0])
    assert record["prompt_text"].startswith("Be brief.\n") and record["prompt"] in record["prompt_text"]
