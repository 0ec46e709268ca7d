"""Logits parity with transformers, both directions, for Qwen2, Qwen3 and Llama; clear errors for unsupported configs."""

import json

import pytest
import torch

import r1lab.cpu.decode_kernel
from r1lab.cpu.decode_kernel import SLICE_ROWS, few_rows_linear
from r1lab.model.architecture import ModelConfig
from r1lab.model.hf_format import load_model, save_model
from r1lab.model.transformer import CausalLM

transformers = pytest.importorskip("transformers")


KINDS = ["qwen2", "llama", "qwen3", "qwen3-tied"]


def make_hf(kind, kw, **extra):
    if kind.startswith("qwen3"):  # head_dim 24, not hidden_size / heads = 16: Qwen3 sets it explicitly
        cfg = transformers.Qwen3Config(**kw, head_dim=24, rope_theta=1000000.0, tie_word_embeddings=kind.endswith("tied"),
                                       **extra)
        model = transformers.Qwen3ForCausalLM(cfg)
        with torch.no_grad():  # q_norm/k_norm start at ones: random weights check that they are applied and loaded
            for name, p in model.named_parameters():
                if "q_norm" in name or "k_norm" in name:
                    p.uniform_(0.5, 1.5)
        return model
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**kw, rope_theta=50000.0, tie_word_embeddings=True, **extra)
        return transformers.Qwen2ForCausalLM(cfg)
    cfg = transformers.LlamaConfig(**kw, rope_theta=500000.0, tie_word_embeddings=False, attention_bias=True, **extra)
    return transformers.LlamaForCausalLM(cfg)


def batch(vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 8:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("kind", KINDS)
def test_hf_to_r1lab_logits_match(kind, tiny_config_kwargs, tmp_path):
    torch.manual_seed(0)
    hf = make_hf(kind, tiny_config_kwargs).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    ids, mask = batch(tiny_config_kwargs["vocab_size"])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (ref[real] - got[real]).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_r1lab_to_hf_logits_match(kind, tiny_config_kwargs, tmp_path):
    torch.manual_seed(1)
    hf_src = make_hf(kind, tiny_config_kwargs)
    cfg = ModelConfig.from_hf(hf_src.config.to_dict())
    ours = CausalLM(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.05)
    save_model(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = batch(tiny_config_kwargs["vocab_size"])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (ref[real] - got[real]).abs().max().item() < 1e-4


def test_llama3_rope_scaling_matches(tiny_config_kwargs, tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    torch.manual_seed(2)
    hf = make_hf("llama", tiny_config_kwargs, rope_scaling=scaling).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    ids, mask = batch(tiny_config_kwargs["vocab_size"])
    with torch.no_grad():
        diff = hf(input_ids=ids).logits - ours(ids)
    assert diff.abs().max().item() < 1e-4


def test_sharded_save_loads(tiny_config_kwargs, tmp_path):
    torch.manual_seed(3)
    hf = make_hf("qwen2", tiny_config_kwargs)
    ours = CausalLM(ModelConfig.from_hf(hf.config.to_dict())).eval()
    save_model(ours, tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    back = load_model(tmp_path)
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        assert torch.equal(back(ids), ours(ids))


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        load_model(tmp_path)


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_qwen3_config_round_trips_and_keeps_its_names(tiny_config_kwargs, tmp_path):
    hf = make_hf("qwen3", tiny_config_kwargs)
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    assert (cfg.head_dim, cfg.qk_norm, cfg.qkv_bias, cfg.o_bias, cfg.tie_word_embeddings) == (24, True, False, False, False)
    save_model(CausalLM(cfg), tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["model_type"], written["head_dim"], written["attention_bias"]) == ("qwen3", 24, False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.q_norm.weight" in names and "model.layers.0.self_attn.k_norm.weight" in names
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.0.self_attn.q_proj.bias" not in names


def test_sliding_window_is_refused(tiny_config_kwargs, tmp_path):
    cfg = transformers.Qwen3Config(**tiny_config_kwargs, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(ValueError, match="sliding-window"):
        ModelConfig.from_hf(cfg.to_dict())


@pytest.mark.parametrize("out", [7, 4 * SLICE_ROWS + 3])  # one product; slices, the last one short
@pytest.mark.parametrize("bias", [True, False])
def test_few_rows_product_equals_linear(out, bias, monkeypatch):
    """A decode step's product over a few rows (r1lab's Linear and the LM head in the engine) equals F.linear, on
    torch's path (the C kernel's own tests are in test_decode_matmul.py)."""
    monkeypatch.setattr(r1lab.cpu.decode_kernel, "SLICED_MIN", 0)  # the small weight is sliced too
    monkeypatch.setitem(r1lab.cpu.decode_kernel._loaded, "kernel", None)
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(out, 24, generator=g), torch.randn(8, 1, 24, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    torch.testing.assert_close(few_rows_linear(x, weight, b), torch.nn.functional.linear(x, weight, b),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("edit, expected", [
    ({"hidden_size": "MISSING"}, "hidden_size is missing"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers '2' is not a whole number >= 1"),
    ({"num_attention_heads": -4}, "num_attention_heads -4 is not a whole number >= 1"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps '1e-6' is not a number > 0"),
    ({"rope_theta": None}, "rope_theta None is not a number > 0"),
])
def test_a_config_json_field_missing_or_of_the_wrong_type_is_named(tiny_config_kwargs, tmp_path, edit, expected):
    hf = {"architectures": ["Qwen2ForCausalLM"], "rms_norm_eps": 1e-6, "rope_theta": 1e4, **tiny_config_kwargs, **edit}
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if v != "MISSING"}))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'config.json'}: {expected}$".replace("(", r"\(")):
        load_model(tmp_path)  # was a KeyError or TypeError from deep inside the model's construction


def test_a_config_json_that_is_not_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{'vocab_size': 97}")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_model(tmp_path)
