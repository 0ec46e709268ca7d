"""SFT loss masks on the chat templates reasoning models ship with: DeepSeek-R1-Distill's (opens <think> in the
generation prompt, strips the reasoning from every assistant message it renders), Qwen3's (keeps the reasoning of the
last turn only, re-formatted) and Llama 3's (renders messages as they are). Each trained turn is what a model prompted
with the history (the template's generation prompt) must write, closed by the template's end token."""

import json

import pytest

from r1lab.cli import main
from r1lab.model.tokenizer import Tokenizer, build_tiny_tokenizer
from r1lab.train.sft_data import conversation_examples

R1_DISTILL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set content = m['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")
QWEN3 = (  # the shape of Qwen3's template: reasoning kept for the turns after the last user message only
    "{% set ns = namespace(last_user=0) %}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% set content = m['content'] %}"
    "{% set reasoning = '' %}{% if '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "{% if loop.index0 > ns.last_user %}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{% endif %}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
SPECIALS = {"r1": ["<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>"],
            "qwen3": ["<|im_start|>", "<|im_end|>"],
            "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>"]}
EOS = {"r1": "<｜end▁of▁sentence｜>", "qwen3": "<|im_end|>", "llama3": "<|eot_id|>"}
BOS = {"r1": "<｜begin▁of▁sentence｜>", "llama3": "<|begin_of_text|>"}
TEMPLATES = {"r1": R1_DISTILL, "qwen3": QWEN3, "llama3": LLAMA3}

CONVERSATION = [
    {"role": "user", "content": "2+3"},
    {"role": "assistant", "content": "<think>\n2+3=5\n</think>\n\nThe sum is \\boxed{5}."},
    {"role": "user", "content": "and times 2?"},
    {"role": "assistant", "content": "<think>\n5*2=10\n</think>\n\nSo \\boxed{10}."},
]


def tokenizer(style: str) -> Tokenizer:
    from tokenizers import AddedToken

    backend = build_tiny_tokenizer().backend
    backend.add_tokens(["<think>", "</think>"])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS[style]])
    return Tokenizer(backend, EOS[style], TEMPLATES[style], name=f"{style}-tiny", bos_token=BOS.get(style))


def trained(tok: Tokenizer, ids: list[int], mask: list[bool]) -> str:
    return tok.backend.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)


def untrained(tok: Tokenizer, ids: list[int], mask: list[bool]) -> str:
    return tok.backend.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)


def test_r1_distill_each_turn_is_what_the_model_writes_after_the_opened_think():
    tok = tokenizer("r1")
    examples = conversation_examples(tok, CONVERSATION)
    assert len(examples) == 2  # the template rewrites earlier turns: one example per trained turn
    (ids1, mask1, closers1), (ids2, mask2, _) = examples
    assert trained(tok, ids1, mask1) == "2+3=5\n</think>\n\nThe sum is \\boxed{5}.<｜end▁of▁sentence｜>"
    assert untrained(tok, ids1, mask1).endswith("<｜User｜>2+3<｜Assistant｜><think>\n")
    assert closers1 == {tok.backend.token_to_id("<｜end▁of▁sentence｜>")}
    # the second turn's history is rendered as the template renders it: the first answer without its reasoning
    assert untrained(tok, ids2, mask2).endswith(
        "<｜Assistant｜>\n\nThe sum is \\boxed{5}.<｜end▁of▁sentence｜><｜User｜>and times 2?<｜Assistant｜><think>\n")
    assert trained(tok, ids2, mask2) == "5*2=10\n</think>\n\nSo \\boxed{10}.<｜end▁of▁sentence｜>"
    # the prompt part is exactly what generation is prompted with
    from r1lab.model.templates import render_conversation

    prompt = tok.encode(render_conversation(tok, CONVERSATION[:3], "chat"))
    assert ids2[: len(prompt)] == prompt and not any(mask2[: len(prompt)]) and all(mask2[len(prompt):])


def test_r1_distill_reasoning_without_its_opening_tag_is_kept_whole():
    tok = tokenizer("r1")
    messages = [{"role": "user", "content": "2+3"}, {"role": "assistant", "content": "2+3=5\n</think>\n\n5"}]
    [(ids, mask, _)] = conversation_examples(tok, messages)
    assert trained(tok, ids, mask) == "2+3=5\n</think>\n\n5<｜end▁of▁sentence｜>"


def test_qwen3_last_turn_keeps_its_reasoning_as_the_template_formats_it():
    tok = tokenizer("qwen3")
    (ids1, mask1, _), (ids2, mask2, closers) = conversation_examples(tok, CONVERSATION)
    assert trained(tok, ids1, mask1) == "<think>\n2+3=5\n</think>\n\nThe sum is \\boxed{5}.<|im_end|>"
    assert trained(tok, ids2, mask2) == "<think>\n5*2=10\n</think>\n\nSo \\boxed{10}.<|im_end|>"
    assert "<|im_start|>assistant\nThe sum is" in untrained(tok, ids2, mask2)  # history without reasoning
    im_end = tok.backend.token_to_id("<|im_end|>")
    assert closers == {im_end} and ids2[-1] == im_end and mask2[-1]  # the newline after <|im_end|> is not trained


def test_llama3_renders_messages_as_they_are_so_one_example_holds_every_turn():
    tok = tokenizer("llama3")
    [(ids, mask, closers)] = conversation_examples(tok, CONVERSATION)
    assert trained(tok, ids, mask) == CONVERSATION[1]["content"] + "<|eot_id|>" + CONVERSATION[3]["content"] + "<|eot_id|>"
    assert closers == {tok.backend.token_to_id("<|eot_id|>")}


@pytest.mark.parametrize("style", ["r1", "qwen3"])
def test_tool_output_inside_a_rewritten_turn_stays_out_of_the_mask(style):
    tok = tokenizer(style)
    messages = [{"role": "user", "content": "2+3"},
                {"role": "assistant", "content": "<think>\nrun <output>5</output> ok\n</think>\n\n5"}]
    [(ids, mask, _)] = conversation_examples(tok, messages, tool_output_tag="output")
    assert "<output>" not in trained(tok, ids, mask) and "ok" in trained(tok, ids, mask)


def test_a_template_with_no_end_token_still_fails_clearly():
    from r1lab.model.tokenizer import build_tiny_tokenizer as tiny

    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'].split('</think>')[-1] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: <think>{% endif %}")
    tok = Tokenizer(tiny().backend, None, template, name="no-eos")
    with pytest.raises(ValueError, match="never learn to stop"):
        conversation_examples(tok, CONVERSATION)


def test_sft_trains_trl_conversational_prompt_completion_rows_on_an_r1_distill_model(tmp_path):
    """The issue's bar: TRL's conversational prompt/completion rows, a model directory as transformers writes an
    R1-Distill-style one, and its generation_config (two eos ids, sampling defaults) kept in the saved model."""
    transformers = pytest.importorskip("transformers")
    model = tmp_path / "r1-distill-tiny"
    tok = tokenizer("r1")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=EOS["r1"],
                                                  bos_token=BOS["r1"], pad_token=EOS["r1"], chat_template=R1_DISTILL)
    hf_tok.save_pretrained(model)
    eos, other = hf_tok.convert_tokens_to_ids([EOS["r1"], "<｜User｜>"])
    config = transformers.Qwen2Config(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=256, eos_token_id=eos, tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(config).save_pretrained(model)
    generation = {"bos_token_id": hf_tok.bos_token_id, "eos_token_id": [eos, other], "do_sample": True,
                  "temperature": 0.6, "top_p": 0.95, "transformers_version": transformers.__version__}
    (model / "generation_config.json").write_text(json.dumps(generation))
    rows = [{"prompt": [{"role": "user", "content": f"{n}+1"}],
             "completion": [{"role": "assistant", "content": f"<think>\n{n}+1={n + 1}\n</think>\n\n\\boxed{{{n + 1}}}"}]}
            for n in range(8)]
    data = tmp_path / "trl.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft"
    main(["sft", "--model", str(model), "--data", str(data), "--steps", "2", "--batch-size", "2", "--out", str(out),
          "--device", "cpu"])
    saved = json.loads((out / "model" / "generation_config.json").read_text())
    assert saved == generation
    reloaded = transformers.GenerationConfig.from_pretrained(out / "model")
    assert reloaded.eos_token_id == [eos, other] and reloaded.temperature == 0.6 and reloaded.top_p == 0.95


QWEN3_WITH_GENERATION = (  # ChatML with the assistant's text marked, as TRL's assistant-only loss templates do
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_generation_blocks_draw_the_mask_and_render_as_their_content():
    tok = tokenizer("qwen3")
    tok.chat_template = QWEN3_WITH_GENERATION
    from r1lab.model.templates import render_conversation

    assert "generation" not in render_conversation(tok, CONVERSATION, "chat", add_generation_prompt=False)
    [(ids, mask, closers)] = conversation_examples(tok, CONVERSATION)
    assert trained(tok, ids, mask) == CONVERSATION[1]["content"] + "<|im_end|>" + CONVERSATION[3]["content"] + "<|im_end|>"
    assert closers == {tok.backend.token_to_id("<|im_end|>")}
    [(ids, mask, _)] = conversation_examples(tok, CONVERSATION, train_from=2)  # only the last reply is trained
    assert trained(tok, ids, mask) == CONVERSATION[3]["content"] + "<|im_end|>"


def test_generation_blocks_that_leave_out_the_end_token_still_train_it():
    tok = tokenizer("qwen3")
    tok.chat_template = QWEN3_WITH_GENERATION.replace("m['content'] + '<|im_end|>' }}{% endgeneration %}",
                                                      "m['content'] }}{% endgeneration %}{{ '<|im_end|>' }}")
    [(ids, mask, _)] = conversation_examples(tok, CONVERSATION[:2])
    assert trained(tok, ids, mask) == CONVERSATION[1]["content"] + "<|im_end|>"


def test_generation_blocks_that_do_not_match_the_assistant_messages_fail_clearly():
    tok = tokenizer("qwen3")
    tok.chat_template = QWEN3_WITH_GENERATION.replace("{% if m['role'] == 'assistant' %}", "{% if false %}")
    with pytest.raises(ValueError, match="0 spans for 2 assistant messages"):
        conversation_examples(tok, CONVERSATION)
    tok.chat_template = QWEN3_WITH_GENERATION
    with pytest.raises(ValueError, match="U\\+E000"):
        conversation_examples(tok, [{"role": "user", "content": "\ue000"}, CONVERSATION[1]])


def test_generation_block_mask_is_transformers_own():
    transformers = pytest.importorskip("transformers")
    tok = tokenizer("qwen3")
    tok.chat_template = QWEN3_WITH_GENERATION
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token="<|im_end|>",
                                              chat_template=QWEN3_WITH_GENERATION)
    theirs = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    [(ids, mask, _)] = conversation_examples(tok, CONVERSATION)
    assert ids == list(theirs["input_ids"]) and mask == [bool(m) for m in theirs["assistant_masks"]]
