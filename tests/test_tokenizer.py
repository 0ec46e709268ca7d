"""Tokenizer directories read as transformers 5 reads them: ids equal to AutoTokenizer.from_pretrained's for r1lab's
own directories and for BPE tokenizers trained here inside qwen2/qwen3/llama directories; decoding keeps the R1 tags;
saving leaves the user's files as they were; chat templates found where transformers finds them."""

import json
import random

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from r1lab.model.architecture import ModelConfig
from r1lab.model.templates import R1_ZERO_PREAMBLE, R1_ZERO_SUFFIX, apply_chat_template, render_prompt
from r1lab.model.tokenizer import EOS, TAGS, build_tiny_tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

PIECES = ["Café", "Cafe\u0301", "naïve", "Ångström", "A\u030angstro\u0308m", "日本語のテキスト", "中文", "😀", "👍🏽",
          "🇫🇷", "12345", "3.14159", "1,000,000", " ", "  ", "    ", "\t", "\n", "\n\n", " \n ", "<think>", "</think>",
          "<answer>", "</answer>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "Hello", " world", "don't", "x=7*6",
          "What is 17 + 25?", "<think>17 + 25 = 42</think> <answer>42</answer>", "ﬁ", "Ⅸ", "①", "ｆｕｌｌ"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Café au lait, naïve résumé, Ångström. 日本語のテキスト 中文 😀👍🏽",
    "What is 17 + 25? <think>17 + 25 = 42</think> <answer>42</answer> 1234567890 3.14159",
    "def f(x):\n    return x * 2\n\n\n\tindented\ttabs   and   spaces",
] * 20


def strings(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [""] + PIECES + ["".join(rng.choice(PIECES) for _ in range(rng.randint(2, 8))) for _ in range(n)]


def write_model_config(path, model_type: str, vocab_size: int = 300) -> None:
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[model_type]
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, architecture=arch)
    (path / "config.json").write_text(json.dumps(cfg.to_hf()))


def bpe_backend(tags: str) -> Backend:
    """A byte-level BPE trained here; tags: "special", "added" (plain added tokens) or "none"."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = [EOS, "<|im_start|>", "<|im_end|>"] + (TAGS if tags == "special" else [])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    if tags == "added":
        backend.add_tokens([AddedToken(t, normalized=False) for t in TAGS])
    return backend


def assert_same_ids(path, texts=None):
    ours = load_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    for text in texts or strings():
        assert ours.encode(text) == theirs.encode(text), (text, type(theirs).__name__)
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False), text
    return ours, theirs


# ---------------------------------------------------------------- r1lab's own directories


def test_builtin_directory_gives_autotokenizer_and_r1lab_ids(tmp_path):
    tiny = build_tiny_tokenizer()
    tiny.save(tmp_path)
    write_model_config(tmp_path, "qwen2", tiny.vocab_size)
    ours, theirs = assert_same_ids(tmp_path)
    assert type(theirs).__name__ == "Qwen2Tokenizer"  # what transformers makes of any model_type qwen2 directory
    ascii_texts = [render_prompt(tiny, "What is 17 + 25?", "r1zero") + " <think>17 + 25 = 42</think> <answer>42"
                   "</answer>" + EOS, "  two  spaces\nand\n\nnewlines  ", string_of_every_ascii_character()]
    for text in ascii_texts:  # the ids the demo's models were trained on
        assert ours.encode(text) == tiny.encode(text) == theirs.encode(text)
        assert ours.decode(tiny.encode(text)) == tiny.decode(tiny.encode(text))
    assert ours.vocab_size == tiny.vocab_size == len(theirs)


def string_of_every_ascii_character() -> str:
    return "".join(chr(c) for c in range(32, 127)) + "\n"


def test_builtin_tokenizer_ids_are_unchanged():
    tiny = build_tiny_tokenizer()
    assert tiny.encode("12 + 3 <answer>") == [2, 3, 95, 73, 95, 4, 95, 100]
    assert tiny.encode(R1_ZERO_PREAMBLE + "1" + R1_ZERO_SUFFIX) == [102, 2, 103]
    assert tiny.encode("é") == [0]  # characters outside the alphabet are <unk>, as before
    assert tiny.vocab_size == 104


def test_legacy_builtin_directory_keeps_its_ids_and_is_saved_in_the_new_form(tmp_path):
    tiny = build_tiny_tokenizer()
    legacy = tmp_path / "legacy"  # as r1lab wrote the built-in tokenizer before
    legacy.mkdir()
    tiny.backend.save(str(legacy / "tokenizer.json"))
    (legacy / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS}))
    write_model_config(legacy, "qwen2", tiny.vocab_size)
    loaded = load_tokenizer(legacy)
    text = "What is 1 + 2? <think>1 + 2 = 3</think> <answer>3</answer>"
    assert loaded.encode(text) == tiny.encode(text)
    resaved = tmp_path / "resaved"
    loaded.save(resaved)
    write_model_config(resaved, "qwen2", tiny.vocab_size)
    assert load_tokenizer(resaved).encode(text) == tiny.encode(text)
    assert transformers.AutoTokenizer.from_pretrained(resaved).encode(text) == tiny.encode(text)


# ---------------------------------------------------------------- trained BPE tokenizers in model directories


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("tags", ["special", "added"])
def test_trained_bpe_saved_by_transformers_matches(model_type, tags, tmp_path):
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe_backend(tags), eos_token="<|im_end|>",
                                                pad_token=EOS, bos_token=EOS)
    fast.save_pretrained(tmp_path)
    write_model_config(tmp_path, model_type)
    ours, _ = assert_same_ids(tmp_path)
    assert ours.eos_token == "<|im_end|>"


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("tokenizer_class", ["PreTrainedTokenizerFast", "Qwen2TokenizerFast", "LlamaTokenizerFast", None])
def test_tokenizer_json_with_a_handwritten_config_matches(model_type, tokenizer_class, tmp_path):
    """A user's directory: tokenizer.json as the tokenizers library saves it, tokenizer_config.json by hand (the
    class each says, or none), R1 tags as special tokens."""
    bpe_backend("special").save(str(tmp_path / "tokenizer.json"))
    config = {"eos_token": EOS, "pad_token": EOS, "extra_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    if tokenizer_class:
        config["tokenizer_class"] = tokenizer_class
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    write_model_config(tmp_path, model_type)
    assert_same_ids(tmp_path)


def test_qwen2_directory_without_an_end_of_text_token_gets_the_one_transformers_adds(tmp_path):
    backend = bpe_backend("none")
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    write_model_config(tmp_path, "qwen2")
    ours, theirs = assert_same_ids(tmp_path)
    assert ours.vocab_size == len(theirs)


def test_sentencepiece_style_llama_tokenizer_is_rebuilt_as_transformers_does(tmp_path):
    backend = Backend(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    backend.train_from_iterator(CORPUS, trainer)
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    write_model_config(tmp_path, "llama")
    _, theirs = assert_same_ids(tmp_path)
    assert type(theirs).__name__ == "LlamaTokenizer"


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("tags", ["special", "added"])
def test_decode_keeps_r1_tags_and_drops_end_and_pad_tokens(tags, tmp_path):
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe_backend(tags), eos_token="<|im_end|>",
                                                pad_token=EOS)
    fast.save_pretrained(tmp_path)
    write_model_config(tmp_path, "qwen2")
    tok = load_tokenizer(tmp_path)
    completion = " <think>17 + 25 = 42</think> <answer>42</answer>"
    ids = tok.encode("<|im_start|>" + completion + "<|im_end|>" + EOS + EOS)
    assert tok.decode(ids) == completion
    assert tok.decode([tok.backend.token_to_id("<|im_end|>")]) == ""  # sft's turn closers rely on this


# ---------------------------------------------------------------- saving


def test_save_copies_the_users_files_verbatim(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    bpe_backend("special").save(str(src / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "pad_token": EOS, "eos_token": "<|im_end|>", "bos_token": None,
              "extra_special_tokens": ["<|im_start|>", "<|im_end|>"], "model_max_length": 32768}
    (src / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (src / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (src / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    write_model_config(src, "qwen2")
    tok = load_tokenizer(src)
    for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:  # a run may delete its source
        (src / name).unlink()
    tok.save(dst)
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]:
        assert (dst / name).read_bytes() == tok.files[name]
    assert json.loads((dst / "tokenizer_config.json").read_text()) == config
    assert not (dst / "config.json").exists()


# ---------------------------------------------------------------- chat templates


def _chat_dir(tmp_path, **files):
    bpe_backend("special").save(str(tmp_path / "tokenizer.json"))
    for name, text in files.items():
        (tmp_path / name.replace("_dot_", ".")).write_text(text)
    if "tokenizer_config_dot_json" not in files:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    write_model_config(tmp_path, "qwen2")
    return load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | trim + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("where", ["jinja", "json", "config", "named"])
def test_chat_template_is_found_where_transformers_finds_it(where, tmp_path):
    cfg = {"eos_token": "<|im_end|>"}
    if where == "jinja":
        cfg["chat_template"] = "{{ 'the config template, which chat_template.jinja overrides' }}"
        ours, theirs = _chat_dir(tmp_path, chat_template_dot_jinja=CHATML, tokenizer_config_dot_json=json.dumps(cfg))
    elif where == "json":
        ours, theirs = _chat_dir(tmp_path, chat_template_dot_json=json.dumps({"chat_template": CHATML}))
        theirs = None  # transformers' tokenizer reads chat_template.json only through a processor
    elif where == "config":
        ours, theirs = _chat_dir(tmp_path, tokenizer_config_dot_json=json.dumps({**cfg, "chat_template": CHATML}))
    else:
        cfg["chat_template"] = [{"name": "tool_use", "template": "{{ 'tools' }}"}, {"name": "default", "template": CHATML}]
        ours, theirs = _chat_dir(tmp_path, tokenizer_config_dot_json=json.dumps(cfg))
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "What is 2+2?"}]
    text = apply_chat_template(ours, messages)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    if theirs is not None:
        assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_generation_config_eos_ids_all_stop(tmp_path):
    ours, _ = _chat_dir(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 1, 2]}))
    tok = load_tokenizer(tmp_path)
    assert {0, 1, 2} <= tok.eos_ids
    assert tok.backend.token_to_id("<|im_end|>") in tok.eos_ids
