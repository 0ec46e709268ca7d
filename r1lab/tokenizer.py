"""Tokenizers: the tiny built-in one made in code, any Hugging Face tokenizer.json, and the prompt templates.

The built-in tokenizer is character-level over printable ASCII, plus the R1 tags and end-of-text as single tokens.
It also carries the fixed text of the R1-Zero template as two tokens (the preamble up to "User: ", and
". Assistant:"), so a CPU model reads the real template without paying ~80 characters per prompt for it.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

EOS = "<|endoftext|>"
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]

R1_ZERO_PREAMBLE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>. User: "
)
R1_ZERO_SUFFIX = ". Assistant:"
TEMPLATES = ("r1zero", "chat", "none")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what generation needs: end-of-text ids and the chat template."""

    def __init__(self, backend, eos_token: str | None, chat_template: str | None = None, name: str = ""):
        self.backend = backend
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.name = name
        eos_id = backend.token_to_id(eos_token) if eos_token else None
        self.eos_ids: set[int] = {eos_id} if eos_id is not None else set()
        self.pad_id = eos_id if eos_id is not None else 0

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ids with end-of-text and other special tokens dropped; R1 tags are kept."""
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def add_eos_ids(self, ids) -> None:
        """Extra stop ids, e.g. from a model's generation_config.json (Qwen2.5 lists two)."""
        for i in [ids] if isinstance(ids, int) else ids or []:
            self.eos_ids.add(int(i))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                  "pad_token": self.eos_token, "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer directory (tokenizer.json + tokenizer_config.json) or a bare tokenizer.json file."""
    from tokenizers import Tokenizer as Backend

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{path}: no tokenizer.json (r1lab reads the fast-tokenizer format)")
    backend = Backend.from_file(str(file))
    config_file = file.parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    eos = config.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if eos is None and backend.token_to_id(EOS) is not None:
        eos = EOS
    tok = Tokenizer(backend, eos, config.get("chat_template"), name=str(path))
    gen_config = file.parent / "generation_config.json"
    if gen_config.exists():
        tok.add_eos_ids(json.loads(gen_config.read_text()).get("eos_token_id"))
    return tok


def build_tiny_tokenizer(alphabet: str | None = None) -> Tokenizer:
    """The built-in character-level tokenizer (about 110 tokens)."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models

    chars = alphabet or (string.digits + string.ascii_letters + string.punctuation + " \n")
    vocab = {c: i for i, c in enumerate(dict.fromkeys(["<unk>", *chars]))}
    backend = Backend(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()  # characters concatenate back exactly, spaces included
    backend.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in [*TAGS, R1_ZERO_PREAMBLE, R1_ZERO_SUFFIX]])
    return Tokenizer(backend, EOS, name="r1lab-tiny")


def render_prompt(tokenizer: Tokenizer, question: str, template: str = "r1zero", prefill: str = "") -> str:
    """The text the model continues: the R1-Zero template, the tokenizer's chat template, or the question as is."""
    if template == "r1zero":
        text = f"{R1_ZERO_PREAMBLE}{question}{R1_ZERO_SUFFIX}"
    elif template == "chat":
        text = apply_chat_template(tokenizer, [{"role": "user", "content": question}])
    elif template == "none":
        text = question
    else:
        raise ValueError(f"template {template!r} is not one of {', '.join(TEMPLATES)}")
    return text + prefill


def apply_chat_template(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    if not tokenizer.chat_template:
        raise ValueError(f"{tokenizer.name}: tokenizer_config.json has no chat_template; use template 'r1zero' or 'none'")
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(tokenizer.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, eos_token=tokenizer.eos_token or "", bos_token="")
