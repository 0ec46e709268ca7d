"""LoRA: logits parity with PEFT (adapted and merged), partial targets through the fused projections, only adapters
train, the base alone under adapters_disabled, every decoding path, PEFT-format round trips and clear errors."""

import copy
import json

import pytest
import torch
from test_model import batch  # 3 rows of 11 ids, one left-padded, one right-padded

from r1lab.engine.engine import Engine
from r1lab.model.architecture import ModelConfig, moe_from_hf
from r1lab.model.hf_format import save_model
from r1lab.model.lora import (ALL_LINEAR, LoRASpec, adapters_disabled, add_lora, has_lora, load_adapter,
                              load_adapter_weights, lora_state_dict, merge_lora, save_adapter)
from r1lab.model.tokenizer import build_tiny_tokenizer
from r1lab.model.transformer import CausalLM, KVCache

transformers = pytest.importorskip("transformers")

SPEC = LoRASpec(rank=4, alpha=8, targets=ALL_LINEAR)
QWEN_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}


def tiny_model(tied: bool = False, vocab: int = 128, seed: int = 0, std: float = 0.2) -> CausalLM:
    """A Qwen2-style model (q/k/v bias, grouped KV heads) with random weights, biases included: large enough that
    the logits are of order 1, so a tolerance of 1e-4 is a tight one."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = CausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def randomize_b(model: CausalLM, seed: int = 1) -> None:
    """Non-zero B everywhere, so that every adapter changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def max_diff(ref, got, mask) -> float:
    real = mask.bool()
    return (ref[real] - got[real]).abs().max().item()


def peft_logits(base_dir, adapter_dir, ids, mask):
    peft = pytest.importorskip("peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    with torch.no_grad():
        return peft_model(input_ids=ids, attention_mask=mask).logits


def plain_hf_logits(model_dir, ids, mask):
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits


def check_parity_with_peft(model: CausalLM, spec: LoRASpec, tmp_path) -> tuple[float, float]:
    """Max abs logits difference to PEFT with the adapter, and to plain transformers after merging."""
    save_model(model, tmp_path / "base")
    add_lora(model, spec)
    randomize_b(model)
    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    ids, mask = batch(model.config.vocab_size)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        base = plain_hf_logits(tmp_path / "base", ids, mask)
    assert max_diff(base, ours, mask) > 0.05  # the adapter changes the model: the parity below is not trivial
    adapted = max_diff(peft_logits(tmp_path / "base", tmp_path / "adapter", ids, mask), ours, mask)
    merge_lora(model)
    save_model(model, tmp_path / "merged")
    merged = max_diff(plain_hf_logits(tmp_path / "merged", ids, mask), ours, mask)
    print(f"targets {spec.targets}: max |logits - PEFT| {adapted:.2e}, merged vs transformers {merged:.2e}, "
          f"adapter's effect {max_diff(base, ours, mask):.2f}, largest logit {ours.abs().max():.2f}")
    assert adapted < 1e-4 and merged < 1e-4
    return adapted, merged


@pytest.mark.parametrize("tied", [False, True])
def test_all_linear_matches_peft_and_merges_to_a_plain_model(tied, tmp_path):
    check_parity_with_peft(tiny_model(tied), SPEC, tmp_path)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("up_proj",), ("k_proj", "gate_proj", "down_proj")])
def test_some_targets_match_peft(targets, tmp_path):
    check_parity_with_peft(tiny_model(), LoRASpec(rank=3, alpha=5, targets=targets), tmp_path)


def test_only_the_adapters_train_and_the_model_starts_unchanged():
    model = tiny_model()
    ids, mask = batch(128)
    with torch.no_grad():
        before = model(ids, attention_mask=mask)
    params = add_lora(model, SPEC)
    assert has_lora(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if "lora" in name}
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(params) == 2 * len(ALL_LINEAR) * model.config.num_hidden_layers
    assert all(p.dtype == torch.float32 for p in params)
    model(ids, attention_mask=mask).square().mean().backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for name, p in model.named_parameters() if "lora" not in name)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask), before)  # B starts at zero


def test_same_seed_same_adapters():
    a, b, c = tiny_model(), tiny_model(), tiny_model()
    add_lora(a, SPEC, seed=3)
    add_lora(b, SPEC, seed=3)
    add_lora(c, SPEC, seed=4)
    sa, sb, sc = lora_state_dict(a), lora_state_dict(b), lora_state_dict(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa[next(iter(sa))], sc[next(iter(sc))])


def test_adapters_disabled_gives_the_base_exactly():
    model = tiny_model()
    ids, mask = batch(128)
    with torch.no_grad():
        base = model(ids, attention_mask=mask)
        add_lora(model, SPEC)
        randomize_b(model)
        adapted = model(ids, attention_mask=mask)
        with adapters_disabled(model):
            assert torch.equal(model(ids, attention_mask=mask), base)
        assert torch.equal(model(ids, attention_mask=mask), adapted)
    assert not torch.equal(adapted, base)


@pytest.fixture(scope="module")
def adapted_and_merged():
    """(tokenizer, a model with trained-looking adapters, the same model merged)."""
    tok = build_tiny_tokenizer()
    tok.eos_ids = set()  # run every generation to its length
    spec = LoRASpec(rank=4, alpha=8, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    adapted = tiny_model(vocab=tok.vocab_size, std=0.3)  # sharp distributions, so greedy paths differ
    add_lora(adapted, spec)
    randomize_b(adapted)
    merged = copy.deepcopy(adapted)  # a copy's adapters and hooks are its own: merging it leaves the original's
    merge_lora(merged)
    assert has_lora(adapted) and not has_lora(merged)
    return tok, adapted, merged


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_greedy_decoding_equals_the_merged_model(adapted_and_merged, decode):
    tok, adapted, merged = adapted_and_merged
    prompts = [tok.encode(p) for p in ["3+5+2", "12+7", "9"]]
    ours = Engine(adapted, tok, decode=decode).generate(prompts, num_samples=2, max_new_tokens=10, temperature=0)
    ref = Engine(merged, tok, decode=decode).generate(prompts, num_samples=2, max_new_tokens=10, temperature=0)
    assert [s.token_ids for s in ours] == [s.token_ids for s in ref]
    for a, b in zip(ours, ref):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
    with adapters_disabled(adapted):  # and the base's own path differs (the adapters act in decoding)
        base = Engine(adapted, tok, decode=decode).generate(prompts, num_samples=2, max_new_tokens=10, temperature=0)
    assert [s.token_ids for s in base] != [s.token_ids for s in ours]


def test_completion_hidden_states_and_cached_prefill_match_the_merged_model(adapted_and_merged):
    _, adapted, merged = adapted_and_merged
    prompts = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    prompt_mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    completions = torch.tensor([[12, 13, 14], [15, 16, 0], [17, 18, 19]])
    completion_mask = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    rows = torch.tensor([0, 0, 1])
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = [m.completion_hidden_states(prompts, prompt_mask, rows, completions, completion_mask)
                  for m in (adapted, merged)]
        logits = [m.forward_cached(prompts, positions, KVCache(m.config, 2, 8, torch.float32, torch.device("cpu")),
                                   0, prompt_mask) for m in (adapted, merged)]
    assert (hidden[0] - hidden[1]).abs().max() < 1e-4
    assert (logits[0] - logits[1]).abs().max() < 1e-4


def test_bf16_base_keeps_float32_adapters_and_runs_under_autocast():
    model = tiny_model()
    ids, mask = batch(128)
    with torch.no_grad():
        add_lora(model, SPEC)
        randomize_b(model)
        ref = model(ids, attention_mask=mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(ids, attention_mask=mask)
    assert auto.dtype == torch.bfloat16 and max_diff(ref, auto.float(), mask) < 0.05
    bf16 = tiny_model().to(torch.bfloat16)
    params = add_lora(bf16, SPEC)
    assert all(p.dtype == torch.float32 for p in params)
    bf16(ids, attention_mask=mask).float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


def test_load_adapter_round_trips(tmp_path):
    model = tiny_model()
    add_lora(model, LoRASpec(rank=2, alpha=3.0, targets=("v_proj", "gate_proj")))
    randomize_b(model)
    save_adapter(model, tmp_path, base_model="some/base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["gate_proj", "v_proj"] and config["base_model_name_or_path"] == "some/base"
    other = tiny_model()
    spec = load_adapter(other, tmp_path)
    assert spec == LoRASpec(rank=2, alpha=3.0, targets=("v_proj", "gate_proj"))
    ids, mask = batch(128)
    with torch.no_grad():
        assert torch.equal(other(ids, attention_mask=mask), model(ids, attention_mask=mask))
    saved = lora_state_dict(model)
    assert all(torch.equal(v, saved[k]) for k, v in lora_state_dict(other).items())


def test_load_adapter_weights_resumes_in_place(tmp_path):
    model = tiny_model()
    add_lora(model, SPEC)
    randomize_b(model)
    save_adapter(model, tmp_path, base_model="base")
    other = tiny_model()
    params = add_lora(other, SPEC, seed=5)
    load_adapter_weights(other, tmp_path)
    assert [id(p) for p in params] == [id(p) for p in other.parameters() if p.requires_grad]
    saved = lora_state_dict(model)
    assert all(torch.equal(v, saved[k]) for k, v in lora_state_dict(other).items())
    wrong = tiny_model()
    add_lora(wrong, LoRASpec(rank=4, alpha=16, targets=ALL_LINEAR))
    with pytest.raises(ValueError, match="alpha 8, .* the model's adapters have rank 4, alpha 16"):
        load_adapter_weights(wrong, tmp_path)


@pytest.mark.parametrize("field, value", [("bias", "all"), ("use_rslora", True), ("use_dora", True),
                                          ("modules_to_save", ["lm_head"]), ("rank_pattern", {"q_proj": 8}),
                                          ("alpha_pattern", {"q_proj": 8}), ("target_modules", ["q_proj", "c_attn"]),
                                          ("peft_type", "IA3"), ("r", 0)])
def test_unsupported_adapter_config_names_the_field(field, value, tmp_path):
    model = tiny_model()
    add_lora(model, SPEC)
    save_adapter(model, tmp_path, base_model="base")
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config[field] = value
    config_file.write_text(json.dumps(config))
    fresh = tiny_model()
    with pytest.raises(ValueError, match=f"adapter_config.json: {field}"):
        load_adapter(fresh, tmp_path)
    assert not has_lora(fresh)


def test_dropout_is_accepted(tmp_path):
    model = tiny_model()
    add_lora(model, SPEC)
    save_adapter(model, tmp_path, base_model="base")
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "lora_dropout": 0.05}))
    assert load_adapter(tiny_model(), tmp_path) == SPEC


def test_adapter_weights_that_do_not_fit_are_named(tmp_path):
    small = tiny_model()
    add_lora(small, SPEC)
    save_adapter(small, tmp_path / "ok", base_model="base")
    wide = CausalLM(ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"mlp\.gate_proj\.lora_B\.weight has shape \(96, 4\)"):
        load_adapter(wide, tmp_path / "ok")
    assert not has_lora(wide) and all(p.requires_grad for p in wide.parameters())
    deeper = CausalLM(ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"missing \['base_model\.model\.model\.layers\.2\."):
        load_adapter(deeper, tmp_path / "ok")


def test_bad_specs_and_models_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="rank"):
        add_lora(model, LoRASpec(rank=0, alpha=8, targets=ALL_LINEAR))
    with pytest.raises(ValueError, match="unknown LoRA target.*'qkv_proj'.*valid ones: q_proj, k_proj"):
        add_lora(model, LoRASpec(rank=4, alpha=8, targets=("qkv_proj",)))
    assert not has_lora(model) and all(p.requires_grad for p in model.parameters())
    add_lora(model, SPEC)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, SPEC)
    moe = CausalLM(ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, architecture="Qwen3MoeForCausalLM",
                               moe=moe_from_hf(QWEN_MOE, "Qwen3MoeForCausalLM")))
    with pytest.raises(ValueError, match="dense MLP"):
        add_lora(moe, LoRASpec(rank=4, alpha=8, targets=("up_proj",)))
    add_lora(moe, LoRASpec(rank=4, alpha=8, targets=("q_proj",)))  # its attention is the standard one


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decoding_and_bf16_training_on_the_gpu():
    tok = build_tiny_tokenizer()
    tok.eos_ids = set()
    model = tiny_model(vocab=tok.vocab_size, std=0.3).cuda().to(torch.bfloat16)
    params = add_lora(model, LoRASpec(rank=4, alpha=8, targets=ALL_LINEAR))
    randomize_b(model)
    assert all(p.dtype == torch.float32 and p.is_cuda for p in params)
    prompts = [tok.encode(p) for p in ["3+5+2", "12+7", "9"]]
    args = dict(num_samples=2, max_new_tokens=16, temperature=0)
    graph = Engine(model, tok, decode="graph").generate(prompts, **args)
    eager = Engine(model, tok, decode="dynamic").generate(prompts, **args)
    assert [s.token_ids for s in graph] == [s.token_ids for s in eager]
    with adapters_disabled(model):
        base = Engine(model, tok, decode="graph").generate(prompts, **args)
    assert [s.token_ids for s in base] != [s.token_ids for s in graph]
    ids, mask = batch(tok.vocab_size)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(ids.cuda(), attention_mask=mask.cuda())
    assert logits.dtype == torch.bfloat16
    logits.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
