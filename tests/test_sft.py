"""`r1lab sft` and `r1lab sample`: the assistant-token loss mask (R1 template and a real Jinja chat template), row
validation with file:line, a few SFT steps that learn, and rejection sampling whose output `r1lab sft` accepts."""

import json
import shutil
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import r1lab.train.supervised as sft_module
from r1lab.cli import main
from r1lab.commands.sample import Filters, Tally, judge_prompt
from r1lab.config import SampleConfig, SFTConfig
from r1lab.engine.engine import Sample
from r1lab.model.architecture import ModelConfig
from r1lab.model.hf_format import load_model, save_model
from r1lab.model.templates import render_prompt
from r1lab.model.tokenizer import Tokenizer, build_tiny_tokenizer, load_tokenizer
from r1lab.model.transformer import CausalLM
from r1lab.rewards.rules import score_completions
from r1lab.rewards.tasks import ArithmeticTask, DatasetError, Problem
from r1lab.train.optimizer import make_optimizer
from r1lab.train.sft_data import ChatFields, Conversation, conversation_tokens, read_conversations
from r1lab.train.supervised import heldout_loss, lm_step, sft

CONVERSATION = [
    {"role": "system", "content": "Think step by step."},
    {"role": "user", "content": "2+3"},
    {"role": "assistant", "content": " <think>2+3=5</think> <answer>5</answer>"},
    {"role": "user", "content": "and times 2?"},
    {"role": "assistant", "content": " <think>5*2=10</think> <answer>10</answer>"},
]
# ChatML as in Qwen2.5's tokenizer_config.json, minus its default system prompt.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chatml_tokenizer(eos: str = "<|im_end|>", template: str = CHATML) -> Tokenizer:
    """The built-in character-level tokenizer plus ChatML's two special tokens and a Jinja chat template."""
    from tokenizers import AddedToken

    backend = build_tiny_tokenizer().backend
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    return Tokenizer(backend, eos, template, name="chatml-tiny")


def masked_text(tokenizer: Tokenizer, ids: list[int], mask: list[bool]) -> str:
    return tokenizer.backend.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)


def test_r1_template_mask_is_exactly_the_assistant_turns_and_their_end_of_text():
    tok = build_tiny_tokenizer()
    assert tok.chat_template is None  # so `r1lab sft` falls back to the R1-Zero template
    ids, mask, closers = conversation_tokens(tok, CONVERSATION)
    assert masked_text(tok, ids, mask) == (CONVERSATION[2]["content"] + "<|endoftext|>"
                                           + CONVERSATION[4]["content"] + "<|endoftext|>")
    assert closers == tok.eos_ids
    expected = [t for turn in (2, 4) for t in tok.encode(CONVERSATION[turn]["content"], False) + [tok.pad_id]]
    assert [i for i, m in zip(ids, mask) if m] == expected


@pytest.mark.parametrize("eos", ["<|im_end|>", "<|endoftext|>"])  # an instruct tokenizer, and a base one
def test_chat_template_mask_covers_content_and_im_end_not_the_scaffolding(eos):
    tok = chatml_tokenizer(eos)
    ids, mask, closers = conversation_tokens(tok, CONVERSATION)
    im_end = tok.backend.token_to_id("<|im_end|>")
    assert masked_text(tok, ids, mask) == (CONVERSATION[2]["content"] + "<|im_end|>"
                                           + CONVERSATION[4]["content"] + "<|im_end|>")
    assert closers == {im_end}  # on a base tokenizer, sft adds it to the saved model's end-of-text ids
    assert not mask[-1]  # the newline ChatML writes after <|im_end|> is scaffolding
    assert ids == tok.encode(tok.backend.decode(ids, skip_special_tokens=False))


@pytest.mark.parametrize("template, message", [
    # no end-of-text after the answer: the model would never learn to stop
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
     "{% if add_generation_prompt %}assistant: {% endif %}", "never learn to stop"),
])
def test_a_template_the_mask_cannot_follow_fails_clearly(template, message):
    with pytest.raises(ValueError, match=message):
        conversation_tokens(chatml_tokenizer(template=template), CONVERSATION)


GOOD_ROW = {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": " <answer>2</answer>"}]}


@pytest.mark.parametrize("bad_row, field", [
    ({"prompt": "1+1", "answer": "2"}, "field 'messages' is missing"),
    ({"messages": [{"role": "bot", "content": "hi"}, GOOD_ROW["messages"][1]]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 7}, GOOD_ROW["messages"][1]]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "1+1"}]}, "no assistant message"),
    ({"messages": [GOOD_ROW["messages"][1], GOOD_ROW["messages"][0]]}, "messages[0].role"),
])
def test_malformed_row_is_reported_with_file_line_and_field_before_loading(tmp_path, capsys, bad_row, field):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(GOOD_ROW) + "\n" + json.dumps(bad_row) + "\n")
    with pytest.raises(DatasetError, match="chat.jsonl:2"):
        read_conversations(data)
    with pytest.raises(SystemExit):  # the model does not exist: validation must fail first
        main(["sft", "--model", str(tmp_path / "no-model"), "--data", str(data), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "chat.jsonl:2" in err and field in err and "no-model" not in err


# ---------------------------------------------------------------- other chat formats: prompt-completion, ShareGPT


def write_rows(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def masked_ids(ids: list[int], mask: list[bool]) -> list[int]:
    return [i for i, m in zip(ids, mask) if m]


@pytest.mark.parametrize("template", ["r1zero", "chat"])
def test_plain_prompt_completion_is_the_user_turn_and_the_loss_is_on_the_completion(tmp_path, template):
    tok = chatml_tokenizer("<|endoftext|>")
    row = {"prompt": "2+3", "completion": " <think>2+3=5</think> <answer>5</answer>"}
    [conv] = read_conversations(write_rows(tmp_path / "pc.jsonl", [row]))
    assert conv == Conversation(1, [{"role": "user", "content": "2+3"},
                                    {"role": "assistant", "content": row["completion"]}], 1)
    ids, mask, _ = conversation_tokens(tok, conv.messages, template, conv.train_from)
    closer = "<|endoftext|>" if template == "r1zero" else "<|im_end|>"
    if template == "r1zero":  # the prompt is the whole R1-Zero prompt around the question
        assert ids[: ids.index(tok.pad_id) - len(tok.encode(row["completion"]))] == tok.encode(
            render_prompt(tok, "2+3", "r1zero"))
    assert masked_ids(ids, mask) == tok.encode(row["completion"]) + [tok.backend.token_to_id(closer)]
    assert mask == [False] * (len(ids) - sum(mask) - (template == "chat")) + [True] * sum(mask) + [False] * (
        template == "chat")  # one trained stretch: the completion and its closer (ChatML's newline after it)


def test_conversational_prompt_completion_trains_the_completion_not_the_prompts_assistant_turns(tmp_path):
    tok = chatml_tokenizer()
    row = {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}
    [conv] = read_conversations(write_rows(tmp_path / "pc.jsonl", [row]))
    assert conv.messages == CONVERSATION and conv.train_from == 4
    ids, mask, _ = conversation_tokens(tok, conv.messages, "auto", conv.train_from)
    assert ids == conversation_tokens(tok, CONVERSATION)[0]  # the same text as the messages row
    im_end = tok.backend.token_to_id("<|im_end|>")
    assert masked_ids(ids, mask) == tok.encode(CONVERSATION[4]["content"]) + [im_end]
    tail = tok.encode(CONVERSATION[4]["content"] + "<|im_end|>\n")
    assert ids[-len(tail):] == tail and mask[-len(tail):] == [True] * (len(tail) - 1) + [False]


def test_sharegpt_rows_become_the_same_messages_with_a_custom_role_map(tmp_path):
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    rows = [{"conversations": [{"from": speaker[m["role"]], "value": m["content"]} for m in CONVERSATION]},
            {"dialog": [{"from": "person", "value": "2+3"}, {"from": "bot", "value": " <answer>5</answer>"}]}]
    [conv] = read_conversations(write_rows(tmp_path / "share.jsonl", rows[:1]))
    assert conv == Conversation(1, CONVERSATION, 0)
    tok = build_tiny_tokenizer()
    assert conversation_tokens(tok, conv.messages)[:2] == conversation_tokens(tok, CONVERSATION)[:2]
    fields = ChatFields(conversations="dialog", roles={"person": "user", "bot": "assistant"})
    [conv] = read_conversations(write_rows(tmp_path / "custom.jsonl", rows[1:]), fields)
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]
    with pytest.raises(DatasetError, match=r"custom.jsonl:1: field 'dialog\[0\].from' is 'person'.*role_map"):
        read_conversations(tmp_path / "custom.jsonl", ChatFields(conversations="dialog"))


def test_columns_can_be_renamed_and_the_format_forced(tmp_path):
    data = write_rows(tmp_path / "renamed.jsonl", [{"question": "1+1", "response": " <answer>2</answer>",
                                                    "chat": "not used"}])
    with pytest.raises(DatasetError, match="no chat format matches"):
        read_conversations(data)
    [conv] = read_conversations(data, ChatFields(prompt="question", completion="response"))
    assert conv.messages[1]["content"] == " <answer>2</answer>" and conv.train_from == 1
    with pytest.raises(DatasetError, match="field 'chat' must be a non-empty list"):
        read_conversations(data, ChatFields(format="messages", messages="chat"))
    with pytest.raises(ValueError, match="data_format 'alpaca'"):
        read_conversations(data, ChatFields(format="alpaca"))


def test_no_matching_format_names_the_line_and_the_fields_found(tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("\n{broken\n" + json.dumps({"text": "The sky is blue.", "id": 3}) + "\n")
    with pytest.raises(DatasetError) as info:
        read_conversations(data)
    message = str(info.value)
    assert "text.jsonl:2: invalid JSON" in message  # a broken first row: the next one decides the format
    assert "text.jsonl:3: no chat format matches this row's fields ('text', 'id')" in message
    assert "'messages'" in message and "'conversations'" in message and "'prompt' and 'completion'" in message


GOOD_PC = {"prompt": [{"role": "user", "content": "1+1"}], "completion": [{"role": "assistant", "content": " 2"}]}


@pytest.mark.parametrize("first, bad_row, field", [
    ({"prompt": "1+1", "completion": " 2"}, {"prompt": "1+1", "completion": 2}, "field 'completion' must be a string"),
    ({"prompt": "1+1", "completion": " 2"}, {"prompt": "1+1"}, "field 'completion' is missing"),
    ({"prompt": "1+1", "completion": " 2"}, {"prompt": " ", "completion": " 2"}, "field 'prompt' is empty"),
    (GOOD_PC, {**GOOD_PC, "completion": [{"role": "user", "content": "2"}]}, "completion[0].role"),
    (GOOD_PC, {**GOOD_PC, "completion": []}, "field 'completion' must be a string (plain) or a non-empty list"),
    (GOOD_PC, {"prompt": GOOD_PC["prompt"] + GOOD_PC["completion"], "completion": GOOD_PC["completion"]},
     "completion[0].role"),
    ({"conversations": [{"from": "human", "value": "1+1"}, {"from": "gpt", "value": "2"}]},
     {"conversations": [{"from": "human", "value": "1+1"}, {"from": "gpt"}]}, "conversations[1].value' is missing"),
    ({"conversations": [{"from": "human", "value": "1+1"}, {"from": "gpt", "value": "2"}]},
     {"conversations": [{"from": "human", "value": "1+1"}]}, "no assistant ('gpt') message"),
])
def test_malformed_rows_of_each_format_name_file_line_and_field(tmp_path, capsys, first, bad_row, field):
    data = write_rows(tmp_path / "chat.jsonl", [first, bad_row])
    with pytest.raises(DatasetError, match="chat.jsonl:2") as info:
        read_conversations(data)
    assert field in str(info.value) and "chat.jsonl:1" not in str(info.value)
    with pytest.raises(SystemExit):  # through the command too, before any model is loaded
        main(["sft", "--model", str(tmp_path / "no-model"), "--data", str(data), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "chat.jsonl:2" in err and field in err and "no-model" not in err


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sft_trains_on_plain_prompt_completion_rows(tmp_path, checkpointing):
    tok = build_tiny_tokenizer()
    tiny_random_model(tmp_path / "init", tok)
    rows = [{"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"]}
            for r in sum_conversations(4)]
    data = write_rows(tmp_path / "pc.jsonl", rows)
    sft(SFTConfig(model=str(tmp_path / "init"), data=str(data), out=str(tmp_path / "run"), steps=1, batch_size=2,
                  template="r1zero", activation_checkpointing=checkpointing), log=lambda *_: None)
    summary = json.loads((tmp_path / "run" / "data.json").read_text())
    assert summary["train"] == 4
    assert summary["target_tokens"] == sum(len(tok.encode(r["completion"])) + 1 for r in rows)  # + end-of-text
    assert summary["tokens"] == sum(len(tok.encode(render_prompt(tok, r["prompt"], "r1zero") + r["completion"]))
                                    + 1 for r in rows)


def tiny_random_model(path, tokenizer: Tokenizer) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=tokenizer.pad_id)
    save_model(CausalLM(cfg), path)
    tokenizer.save(path)


def sum_conversations(n: int) -> list[dict]:
    rows = []
    for a in range(n):
        b = (3 * a + 1) % 10
        answer = f" <think>{a}+{b}={a + b}</think> <answer>{a + b}</answer>"
        rows.append({"messages": [{"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": answer}]})
    return rows


def test_a_few_sft_steps_lower_the_loss_and_write_a_model_directory(tmp_path):
    tok = build_tiny_tokenizer()
    tiny_random_model(tmp_path / "init", tok)
    rows = sum_conversations(8)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoded = [conversation_tokens(tok, r["messages"])[:2] for r in rows]
    docs, masks = [e[0] for e in encoded], [e[1] for e in encoded]
    before = heldout_loss(load_model(tmp_path / "init"), docs, masks, tok.pad_id, 8)
    cfg = SFTConfig(model=str(tmp_path / "init"), data=str(data), out=str(tmp_path / "run"), steps=40, batch_size=4,
                    lr=1e-2, warmup_steps=2, save_every=20)
    out = sft(cfg, log=lambda *_: None)
    after = heldout_loss(load_model(out), docs, masks, tok.pad_id, 8)
    assert after < 0.6 * before
    losses = [row["loss"] for row in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert len(losses) == 40 and sum(losses[-5:]) < 0.6 * sum(losses[:5])
    assert load_tokenizer(out).eos_ids == tok.eos_ids
    assert (tmp_path / "run" / "checkpoints" / "step_000040").is_dir() and (tmp_path / "run" / "config.yaml").exists()


def test_sft_prints_its_progress_once_with_an_eta_and_the_loss(tmp_path, capsys):
    tiny_random_model(tmp_path / "init", build_tiny_tokenizer())
    data = write_rows(tmp_path / "chat.jsonl", sum_conversations(4))
    main(["sft", "--model", str(tmp_path / "init"), "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "3",
          "--batch-size", "2", "--device", "cpu"])
    out = capsys.readouterr().out.splitlines()  # not a terminal: plain lines, as in a CI log
    progress = [line for line in out if "step" in line and "/3" in line]
    assert [line.split()[:2] for line in progress] == [["step", f"{i}/3"] for i in (1, 2, 3)], out  # each once
    assert all(" eta " in line and "loss " in line for line in progress)


def test_resume_from_a_checkpoint_ends_with_the_uninterrupted_weights(tmp_path):
    tok = build_tiny_tokenizer()
    tiny_random_model(tmp_path / "init", tok)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sum_conversations(6)))
    cfg = SFTConfig(model=str(tmp_path / "init"), data=str(data), out=str(tmp_path / "run"), steps=8, batch_size=4,
                    lr=1e-2, warmup_steps=2, save_every=4)
    sft(cfg, log=lambda *_: None)
    uninterrupted = (tmp_path / "run" / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_000008")  # as if killed between steps 4 and 8
    cfg.resume = True
    sft(cfg, log=lambda *_: None)
    assert (tmp_path / "run" / "model" / "model.safetensors").read_bytes() == uninterrupted
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_sft_with_a_base_chat_template_makes_the_turn_end_a_stop_token(tmp_path):
    tok = chatml_tokenizer("<|endoftext|>")  # a base model's tokenizer: ChatML's <|im_end|> is no stop token yet
    tiny_random_model(tmp_path / "init", tok)
    data = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(sum_conversations(4)), data)
    out = sft(SFTConfig(model=str(tmp_path / "init"), data=str(data), out=str(tmp_path / "run"), steps=1,
                        batch_size=2), log=lambda *_: None)
    assert tok.backend.token_to_id("<|im_end|>") in load_tokenizer(out).eos_ids


def twin_models(vocab_size: int) -> list[CausalLM]:
    """Two tiny models with the same weights, to take one step two ways."""
    torch.manual_seed(0)
    first = CausalLM(ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1))
    second = CausalLM(first.config)
    second.load_state_dict(first.state_dict())
    return [first, second]


def test_micro_batches_give_the_same_step_as_one_batch():
    tok = build_tiny_tokenizer()
    encoded = [conversation_tokens(tok, r["messages"])[:2] for r in sum_conversations(4)]
    docs, masks = [e[0] for e in encoded], [e[1] for e in encoded]
    models = twin_models(tok.vocab_size)
    results = [lm_step(m, make_optimizer(m, 1e-3, 0.0, 0.95), docs, masks, tok.pad_id, micro)
               for m, micro in zip(models, (0, 1))]  # the whole batch at once, and one conversation at a time
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)
    assert results[0]["target_tokens"] == results[1]["target_tokens"] == sum(map(sum, masks))
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        # AdamW divides by sqrt(v): a near-zero gradient entry's rounding (summation order differs between one
        # batch and micro-batches) moves its step by up to ~1% of lr (1e-3)
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_micro_batches_group_documents_by_length_and_give_the_same_step(monkeypatch):
    tok = build_tiny_tokenizer()
    docs = [tok.encode("1+2=3" * n, add_special_tokens=False) for n in (9, 1, 8, 2, 7, 1)]  # long, short, ...
    shapes = []
    real_lm_batch = sft_module.lm_batch

    def recording_lm_batch(batch_docs, pad_id, loss_masks=None):
        ids, mask = real_lm_batch(batch_docs, pad_id, loss_masks)
        shapes.append(tuple(ids.shape))
        return ids, mask
    monkeypatch.setattr(sft_module, "lm_batch", recording_lm_batch)
    models = twin_models(tok.vocab_size)
    results = [lm_step(m, make_optimizer(m, 1e-3, 0.0, 0.95), docs, None, tok.pad_id, micro)
               for m, micro in zip(models, (0, 3))]
    # one (6, 45) batch, then the three short documents padded to 10 tokens and the three long ones to 45
    assert shapes == [(6, 45), (3, 10), (3, 45)]
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_filters_reject_what_they_should():
    task, problem = ArithmeticTask(), Problem("2+2", "4")
    filters = Filters.of(SampleConfig(min_tokens=10, max_tokens=40, language="en"))
    texts = {
        "keep": " <think>2+2=4</think> <answer>4</answer>",
        "incorrect": " <think>2+2=5</think> <answer>5</answer>",
        "format": " <answer>4</answer>",
        "language": " <think>two plus two 等于四</think> <answer>4</answer>",
        "keep, in words": " <think>two plus two is four</think> <answer>4</answer>",
    }
    result = score_completions(task, [problem] * len(texts), list(texts.values()))
    for i, (expected, text) in enumerate(texts.items()):
        reason = filters.reason(text, 20, result.correct[i], result.components["format"][i])
        assert reason == (None if expected.startswith("keep") else expected), text
    keep = texts["keep"]
    assert filters.reason(keep, 20, True, 1.0, finished=False) == "truncated"
    assert filters.reason(keep, 9, True, 1.0) == "too_short"
    assert filters.reason(keep, 41, True, 1.0) == "too_long"
    assert Filters.of(SampleConfig(language="")).reason(texts["language"], 20, True, 1.0) is None  # no filter
    half_english = texts["language"]
    assert Filters.of(SampleConfig(language="zh")).reason(half_english, 20, True, 1.0) == "language"
    with pytest.raises(ValueError, match="klingon"):
        Filters.of(SampleConfig(language="klingon"))


def test_duplicates_and_the_per_prompt_cap_are_rejected():
    task, problem = ArithmeticTask(), Problem("2+2", "4")
    texts = [" <think>2+2=4</think> <answer>4</answer>", " <think>2+2=4</think> <answer>4</answer> ",
             " <think>2 and 2 make 4</think> <answer>4</answer>", " <think>4</think> <answer>4</answer>"]
    samples = [Sample(0, [1] * 12, t, [0.0] * 12, "stop") for t in texts]
    result = score_completions(task, [problem] * 4, texts)
    cfg = SampleConfig(samples=4, max_per_prompt=2)
    tally = Tally()
    kept = judge_prompt(problem, samples, 0, result, cfg, Filters.of(cfg), set(), tally, cfg.prefill)
    assert [j for j, _, _ in kept] == [0, 2]
    assert tally.rejected == {"duplicate": 1, "over_max_per_prompt": 1}


def test_the_filters_read_the_think_a_chat_template_opened_in_front_of_the_completion():
    """An R1-Distill-style template opens <think> in the prompt: the completion starts inside it. The language
    filter reads the response as the scorer does, so readable reasoning is kept, not rejected as no reasoning."""
    task, problem = ArithmeticTask(), Problem("2+2", "4")
    texts = ["I add 2 and 2 to get 4.</think> <answer>4</answer>"]
    samples = [Sample(0, [1] * 12, texts[0], [0.0] * 12, "stop")]
    result = score_completions(task, [problem], texts, response_prefix="<think>\n")
    assert result.correct == [True] and result.components["format"] == [1.0]
    cfg = SampleConfig(samples=1, language="en")
    tally = Tally()
    kept = judge_prompt(problem, samples, 0, result, cfg, Filters.of(cfg), set(), tally, "<think>\n")
    assert [(j, response) for j, response, _ in kept] == [(0, texts[0])] and not tally.rejected
    # the same completion read without the opened <think> has no reasoning in English: the bug this guards
    assert judge_prompt(problem, samples, 0, result, cfg, Filters.of(cfg), set(), tally, cfg.prefill) == []
    assert tally.rejected == {"language": 1}


def test_sample_writes_sft_rows_that_sft_accepts(tiny_base, tmp_path, capsys):
    data = tmp_path / "sampled.jsonl"
    main(["sample", "--model", str(tiny_base), "--task-options", "{min_terms: 3, max_terms: 3}", "--problems", "32",
          "--samples", "8", "--max-new-tokens", "48", "--prefill", " <think>", "--max-per-prompt", "2",
          "--out", str(data)])
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    summary = json.loads((tmp_path / "sampled.summary.json").read_text())
    assert summary["prompts"] == 32 and summary["sampled"] == 256
    assert summary["kept"] == len(rows) > 0  # the tiny base is right a few percent of the time: about 14 expected
    assert max(Counter(row["prompt_index"] for row in rows).values()) <= 2
    assert summary["kept"] + sum(summary["rejected"].values()) == summary["sampled"]
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"].startswith(" <think>") and row["accuracy"] == 1.0 and row["format"] == 1.0
        assert {"source_model", "source_step", "reward", "sample_index", "seed"} <= set(row)
    assert rows[0]["source_step"] is None  # a final model directory, not a checkpoint
    assert "kept" in capsys.readouterr().out
    main(["sft", "--model", str(tiny_base), "--data", str(data), "--steps", "2", "--batch-size", "4",
          "--lr", "1e-4", "--out", str(tmp_path / "sft")])
    assert json.loads((tmp_path / "sft" / "data.json").read_text())["train"] == len(rows)
    assert load_model(tmp_path / "sft" / "model").config.vocab_size == load_model(tiny_base).config.vocab_size


def test_tool_output_blocks_of_sampled_rows_are_left_out_of_the_loss():
    """Rows kept by `sample --tools python` carry <output> blocks the sampler wrote: SFT must not train on them."""
    from r1lab.train.sft_data import conversation_tokens, tool_output_spans

    tok = build_tiny_tokenizer()
    answer = "<think><python>print(6*7)</python><output>42\n</output> so</think> <answer>42</answer>"
    messages = [{"role": "user", "content": "6*7"}, {"role": "assistant", "content": answer}]
    assert tool_output_spans(answer, "output") == [(answer.index("<output>"), answer.index(" so"))]
    ids, plain, _ = conversation_tokens(tok, messages, "r1zero")
    ids_too, masked, _ = conversation_tokens(tok, messages, "r1zero", tool_output_tag="output")
    assert ids == ids_too
    left_out = [i for i, (a, b) in enumerate(zip(plain, masked)) if a and not b]
    assert tok.decode([ids[i] for i in left_out]) == "<output>42\n</output>"
    assert tok.decode([ids[i] for i in range(len(ids)) if masked[i]]).startswith("<think><python>print(6*7)</python> so")
