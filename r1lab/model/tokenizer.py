"""Tokenizers: the tiny built-in character-level one, and Hugging Face tokenizer directories read as transformers 5's
AutoTokenizer reads them (class, rebuilt pipeline, added and special tokens), so both give the same ids."""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from r1lab.model.templates import R1_ZERO_PREAMBLE, R1_ZERO_SUFFIX, load_chat_template

EOS = "<|endoftext|>"
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")
CHAT_TEMPLATE_DIR = "additional_chat_templates"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' Qwen2Tokenizer, verbatim: its split regex and the model types that map to it.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_MODEL_TYPES = {"qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_next"}
QWEN2_FORCED = {"qwen2"}  # transformers ignores tokenizer_class for these (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS)
GENERIC_CLASSES = {"", "PreTrainedTokenizerFast", "PreTrainedTokenizer", "TokenizersBackend", "PythonBackend"}
CLASS_DEFAULTS = {  # the named special tokens each class's __init__ defaults to when the config has none
    "qwen2": {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    "llama": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "backend": {},
}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus end-of-text ids and the chat template; files: the loaded files, saved verbatim."""

    def __init__(self, backend, eos_token: str | None, chat_template: str | None = None, name: str = "",
                 files: dict[str, bytes] | None = None, bos_token: str | None = None, pad_token: str | None = None):
        self.backend = backend
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.chat_template = chat_template
        self.name = name
        self.files = files
        eos_id = backend.token_to_id(eos_token) if eos_token else None
        self.eos_ids: set[int] = {eos_id} if eos_id is not None else set()
        self.pad_id = eos_id if eos_id is not None else 0
        named = [backend.token_to_id(t) for t in (bos_token, pad_token) if t]
        self._named_ids = {i for i in named if i is not None}

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ids without special tokens, but with the R1 tags even where they are special (rewards read them)."""
        special = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special and t.content not in TAGS}
        drop = special | self.eos_ids | self._named_ids
        return self.backend.decode([i for i in ids if i not in drop], skip_special_tokens=False)

    def add_eos_ids(self, ids) -> None:
        """Extra stop ids, e.g. from a model's generation_config.json (Qwen2.5 lists two)."""
        for i in [ids] if isinstance(ids, int) else ids or []:
            self.eos_ids.add(int(i))

    def save(self, path: str | Path) -> None:
        """The tokenizer files as loaded, byte for byte; the built-in tokenizer's own files otherwise."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.files is None:
            _save_builtin(self, path)
            return
        for name, data in self.files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer directory (tokenizer.json + tokenizer_config.json) or a bare tokenizer.json file."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{path}: no tokenizer.json (r1lab reads the fast-tokenizer format)")
    directory = file.parent
    files = _read_tokenizer_files(directory) if path.is_dir() else {"tokenizer.json": file.read_bytes()}
    config = json.loads(files.get("tokenizer_config.json", b"{}"))
    tokenizer_json = json.loads(files["tokenizer.json"])
    if _is_legacy_builtin(tokenizer_json):
        return _load_legacy_builtin(file, config, str(path))
    kind = _transformers_class(_model_type(directory), config.get("tokenizer_class"), files["tokenizer.json"])
    named, added = _special_tokens(config, files, tokenizer_json, kind)
    backend = _backend(kind, file, tokenizer_json, config)
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    extra = [_added(t) for t in (extra.values() if isinstance(extra, dict) else extra)]
    _add_tokens(backend, added, named, extra)
    if kind == "qwen2":  # Qwen2Tokenizer.__init__ ends by re-adding every special token as special
        backend.add_tokens([AddedToken(str(_content(t)), special=True) for t in [*named.values(), *extra]])
    if backend.post_processor is None:  # transformers' update_post_processor: no bos/eos once tokenizer.json exists
        backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    tok = Tokenizer(backend, _content(named.get("eos_token")), load_chat_template(directory, config), str(path),
                    files, _content(named.get("bos_token")), _content(named.get("pad_token")))
    if tok.eos_token is None and backend.token_to_id(EOS) is not None:
        tok = Tokenizer(backend, EOS, tok.chat_template, tok.name, files, tok.bos_token)
    return _with_generation_eos(tok, directory)


def _with_generation_eos(tok: Tokenizer, directory: Path) -> Tokenizer:
    gen_config = directory / "generation_config.json"
    if gen_config.exists():
        tok.add_eos_ids(json.loads(gen_config.read_text()).get("eos_token_id"))
    return tok


def _read_tokenizer_files(directory: Path) -> dict[str, bytes]:
    # Read now, not at save time: a run may delete the checkpoint it resumed from before it saves again.
    files = {name: (directory / name).read_bytes() for name in TOKENIZER_FILES if (directory / name).is_file()}
    for extra in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja")):
        files[f"{CHAT_TEMPLATE_DIR}/{extra.name}"] = extra.read_bytes()
    return files


def _model_type(directory: Path) -> str | None:
    config = directory / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.exists() else None


def _transformers_class(model_type: str | None, declared: str | None, tokenizer_json: bytes) -> str:
    """'qwen2', 'llama' or 'backend' (tokenizer.json as it is): the class AutoTokenizer builds."""
    declared = (declared or "").removesuffix("Fast")
    registered = "Qwen2Tokenizer" if model_type in QWEN2_MODEL_TYPES else ""
    # LlamaTokenizer hard-codes a SentencePiece pipeline, so transformers skips it for byte-level tokenizer.json
    if declared == "LlamaTokenizer" and model_type not in QWEN2_FORCED and b'"ByteLevel"' in tokenizer_json:
        return "backend"
    if not declared or model_type in QWEN2_FORCED:  # QWEN2_FORCED types are all registered
        declared = registered
    if declared in GENERIC_CLASSES:
        return "backend"
    kinds = {"Qwen2Tokenizer": "qwen2", "LlamaTokenizer": "llama"}
    if declared not in kinds:
        raise ValueError(f"tokenizer_class {declared!r} (model_type {model_type!r}): transformers rebuilds that "
                         "tokenizer in its own way, which r1lab does not reproduce; r1lab reads TokenizersBackend / "
                         "PreTrainedTokenizerFast, Qwen2Tokenizer and LlamaTokenizer directories")
    return kinds[declared]


def _backend(kind: str, file: Path, tokenizer_json: dict, config: dict) -> Backend:
    if kind == "backend":
        return Backend.from_file(str(file))
    model = tokenizer_json["model"]
    vocab = model["vocab"]
    vocab = {t[0] if isinstance(t, list) else t: i for i, t in enumerate(vocab)} if isinstance(vocab, list) else vocab
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    backend = _qwen2_pipeline(vocab, merges, config) if kind == "qwen2" else _llama_pipeline(vocab, merges, config)
    minimal = dict(tokenizer_json, model={**model, "vocab": {}, "merges": []}, added_tokens=[])
    backend.post_processor = Backend.from_str(json.dumps(minimal)).post_processor  # as transformers keeps it
    return backend


def _qwen2_pipeline(vocab: dict, merges: list, config: dict) -> Backend:
    """transformers' Qwen2Tokenizer.__init__: its own normaliser, split regex and byte-level steps."""
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    backend.decoder = decoders.ByteLevel()
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space")), use_regex=False),
    ])
    return backend


def _llama_pipeline(vocab: dict, merges: list, config: dict) -> Backend:
    """transformers' LlamaTokenizer.__init__: SentencePiece-style metaspace with byte fallback."""
    prefix = config.get("add_prefix_space")
    prefix = True if prefix is None else prefix
    scheme = ("always" if config.get("legacy", False) else "first") if prefix else "never"
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
    return backend


def _special_tokens(config: dict, files: dict, tokenizer_json: dict, kind: str) -> tuple[dict, list]:
    """The named special tokens and the added tokens in id order, with transformers' _from_pretrained precedence."""
    named = dict(CLASS_DEFAULTS[kind])
    named.update({k: _added(config[k]) for k in SPECIAL_KEYS if k in config})
    if "added_tokens_decoder" in config:
        added = {int(i): _added(t) for i, t in config["added_tokens_decoder"].items()}
    else:
        added = {t["id"]: _added({k: v for k, v in t.items() if k != "id"}) for t in tokenizer_json.get("added_tokens", [])}
        for key, value in json.loads(files.get("special_tokens_map.json", b"{}")).items():
            if key in SPECIAL_KEYS:
                named[key] = _added({**value, "special": True}) if isinstance(value, dict) else value
    by_content = {t.content: t for t in added.values()}
    named = {k: by_content.get(_content(v), v) for k, v in named.items() if v is not None}
    return named, [added[i] for i in sorted(added)]


def _added(value) -> AddedToken | str | None:
    if isinstance(value, dict):
        return AddedToken(**{k: v for k, v in value.items() if k != "__type"})
    return value


def _content(token) -> str | None:
    return token.content if isinstance(token, AddedToken) else token


def _add_tokens(backend: Backend, added: list, named: dict, extra: list) -> None:
    """transformers' TokenizersBackend.__init__: missing added tokens, then missing named and extra ones (special)."""
    def key(t: AddedToken) -> tuple:
        return t.content, t.special, t.lstrip, t.rstrip, t.normalized, t.single_word

    present = backend.get_added_tokens_decoder().values()
    present_keys = {key(t) for t in present}
    todo = [t for t in added if key(t) not in present_keys]
    known = {t.content for t in present} | {t.content for t in todo}
    for token in [*named.values(), *extra]:
        if _content(token) not in known:
            todo.append(token)
            known.add(_content(token))
    names = {_content(t) for t in named.values()}
    tokens = [AddedToken(t, special=True) if isinstance(t, str) else t for t in todo]
    for token in tokens:
        token.special = token.special or token.content in names
    if tokens:
        backend.add_tokens(tokens)


def build_tiny_tokenizer(alphabet: str | None = None) -> Tokenizer:
    """The built-in character-level tokenizer (about 110 tokens)."""
    chars = alphabet or (string.digits + string.ascii_letters + string.punctuation + " \n")
    vocab = {c: i for i, c in enumerate(dict.fromkeys(["<unk>", *chars]))}
    backend = Backend(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()  # characters concatenate back exactly, spaces included
    backend.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in [*TAGS, R1_ZERO_PREAMBLE, R1_ZERO_SUFFIX]])
    return Tokenizer(backend, EOS, name="r1lab-tiny")


def byte_symbols() -> dict[int, str]:
    """GPT-2's byte-to-character table, which the byte-level pre-tokenizer applies to every byte of the text."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def _save_builtin(tok: Tokenizer, path: Path) -> None:
    """The built-in tokenizer as transformers reads it: a qwen2 directory's tokenizer is rebuilt as Qwen2Tokenizer
    (byte-level), so the vocabulary is written in byte-level characters (" " as "Ġ") : ASCII gets the same ids."""
    symbols = byte_symbols()
    vocab = tok.backend.get_vocab(with_added_tokens=False)
    if any(len(t) != 1 or ord(t) > 127 for t in vocab if t != "<unk>"):
        raise ValueError("only a character-level tokenizer over ASCII can be saved in transformers' byte-level form")
    byte_vocab = {("<unk>" if t == "<unk>" else symbols[ord(t)]): i for t, i in vocab.items()}
    added = tok.backend.get_added_tokens_decoder()
    backend = _qwen2_pipeline(byte_vocab, [], {})
    backend.add_tokens([added[i] for i in sorted(added)])
    backend.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": tok.eos_token, "pad_token": tok.eos_token,
        "unk_token": None, "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): _token_dict(t) for i, t in sorted(added.items())},
    }
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _token_dict(t: AddedToken) -> dict:
    return {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
            "single_word": t.single_word, "special": t.special}


def _is_legacy_builtin(tokenizer_json: dict) -> bool:
    """A built-in tokenizer saved by an earlier r1lab: no pre-tokenizer, raw space in the vocab."""
    contents = {t["content"] for t in tokenizer_json.get("added_tokens", [])}
    return (R1_ZERO_PREAMBLE in contents and tokenizer_json.get("pre_tokenizer") is None
            and " " in tokenizer_json.get("model", {}).get("vocab", {}))


def _load_legacy_builtin(file: Path, config: dict, name: str) -> Tokenizer:
    # Its models were trained on these ids; loaded as it is, and saved again in the byte-level form (files=None).
    eos = config.get("eos_token") or EOS
    tok = Tokenizer(Backend.from_file(str(file)), _content(_added(eos)), config.get("chat_template"), name)
    return _with_generation_eos(tok, file.parent)
