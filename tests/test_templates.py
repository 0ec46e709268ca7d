"""One template module: the same conversation renders to the same tokens for RL prompts, SFT, `r1lab serve` and
`r1lab chat` (r1lab/model/templates.py), with the R1-Zero template and with a chat template."""

import io

import pytest
import torch
from rich.console import Console

from r1lab.config import ChatConfig
from r1lab.engine.engine import Engine
from r1lab.model.architecture import ModelConfig
from r1lab.model.hf_format import save_model
from r1lab.model.loading import encode_prompt
from r1lab.model.templates import R1_ZERO_PREAMBLE, R1_ZERO_SUFFIX, render_conversation, render_prompt
from r1lab.model.tokenizer import EOS, build_tiny_tokenizer
from r1lab.model.transformer import CausalLM
from r1lab.rewards.tasks.base import Problem
from r1lab.serve.chat import ReplyView, reply
from r1lab.train.sft_data import conversation_tokens

CHATML = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}"
          "{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6*7?"},
                {"role": "assistant", "content": " <think>6*7=42</think> <answer>42</answer>"},
                {"role": "user", "content": "And 6*8?"}]
NEXT_ANSWER = {"role": "assistant", "content": " <think>6*8=48</think> <answer>48</answer>"}


class RecordingEngine(Engine):
    """The real engine, remembering the prompt tokens it was asked to continue."""

    prompts: list

    def generate(self, prompt_ids, **kwargs):
        self.prompts = getattr(self, "prompts", []) + [list(p) for p in prompt_ids]
        return super().generate(prompt_ids, **kwargs)


def tiny_engine(template, tmp_path=None) -> RecordingEngine:
    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    tok.chat_template = template
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      eos_token_id=tok.pad_id)
    model = CausalLM(cfg).eval()
    if tmp_path is not None:
        save_model(model, tmp_path)
        tok.save(tmp_path)
    return RecordingEngine(model, tok)


def test_r1zero_conversation_text():
    tok = build_tiny_tokenizer()
    text = render_conversation(tok, CONVERSATION, "r1zero")
    assert text == (f"Be brief.\n{R1_ZERO_PREAMBLE}What is 6*7?{R1_ZERO_SUFFIX} <think>6*7=42</think> "
                    f"<answer>42</answer>{EOS}{R1_ZERO_PREAMBLE}And 6*8?{R1_ZERO_SUFFIX}")
    assert render_prompt(tok, "What is 6*7?", "r1zero") == f"{R1_ZERO_PREAMBLE}What is 6*7?{R1_ZERO_SUFFIX}"
    assert render_conversation(tok, CONVERSATION[1:2], "auto") == render_prompt(tok, "What is 6*7?", "r1zero")
    with pytest.raises(ValueError, match="not one of"):
        render_conversation(tok, CONVERSATION, "chatml")


@pytest.mark.parametrize("template", [None, CHATML], ids=["r1zero", "chat-template"])
def test_same_tokens_in_rl_sft_serve_and_chat(template, tmp_path, monkeypatch):
    engine = tiny_engine(template)
    tok = engine.tokenizer
    expected = tok.encode(render_conversation(tok, CONVERSATION, "auto"))

    # RL: a single question, rendered as the one-turn conversation it is
    rl = encode_prompt(tok, Problem(prompt="What is 6*7?", answer="42"), "auto")
    assert rl == tok.encode(render_conversation(tok, CONVERSATION[1:2], "auto"))

    # SFT: the tokens before the trained answer are the prompt the model is later served
    ids, mask, _ = conversation_tokens(tok, [*CONVERSATION, NEXT_ANSWER], "auto")
    last_answer_start = max(i for i in range(1, len(mask)) if mask[i] and not mask[i - 1])
    assert ids[:last_answer_start] == expected

    # chat: the terminal client's prompt
    cfg = ChatConfig(template="auto", max_tokens=2)
    reply(engine, CONVERSATION, cfg, seed=0, view=ReplyView(Console(file=io.StringIO())))
    assert engine.prompts[-1] == expected

    # serve: what the server asks the engine to continue
    testclient = pytest.importorskip("fastapi.testclient")
    from r1lab.engine.live_batch import LiveBatch
    from r1lab.serve.app import create_app

    served, added, add = tiny_engine(template, tmp_path), [], LiveBatch.add
    # the server's requests join its running batch (r1lab/engine/live_batch.py) rather than calling generate
    monkeypatch.setattr(LiveBatch, "add", lambda self, prompt_ids, **kw: added.append(list(prompt_ids)) or
                        add(self, prompt_ids, **kw))
    with testclient.TestClient(create_app(tmp_path, engine=served, device="cpu")) as client:
        response = client.post("/v1/chat/completions", json={"model": tmp_path.name, "messages": CONVERSATION,
                                                              "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert added[-1] == expected


def test_the_terminal_chat_prints_control_characters_as_escapes():
    # a model (or the program its tool call ran) writing terminal sequences: clear the screen, write the clipboard
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    view = ReplyView(console)
    hostile = 'print("\x1b[2J\x1b]52;c;ZWNobyBoaQ==\x1b\\done\r\b")'
    view.show(hostile, "")
    view.show("", "ok\x07\x9b31m")
    view.close("error: \x1b]0;title\x07")
    out = console.file.getvalue()
    for sequence in ("\x1b[2J", "\x1b]52", "\x1b]0;", "\x07", "\x9b", "\r", "\b"):
        assert sequence not in out, repr(sequence)
    assert "\\x1b[2J\\x1b]52;c;ZWNobyBoaQ==\\x1b\\done\\x0d\\x08" in out and "ok\\x07\\x9b31m" in out
