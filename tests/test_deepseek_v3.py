"""DeepSeek-V3 (MLA, DeepSeekMoE, YaRN) and Qwen3-MoE: logits parity with transformers both ways, cached greedy
decode (the MLA latent cache, weight-absorbed decode) equal to recomputation and to transformers' generate, MLA cache
size, and experts computing only what is routed."""

import json
import math

import pytest
import torch

from r1lab.engine.engine import Engine
from r1lab.model import mla, moe
from r1lab.model.architecture import ModelConfig
from r1lab.model.hf_format import load_model, save_model
from r1lab.model.tokenizer import build_tiny_tokenizer
from r1lab.model.transformer import CausalLM, KVCache

transformers = pytest.importorskip("transformers")

YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.7, "rope_theta": 10000.0}  # mscale != mscale_all_dim: both corrections act
DEEPSEEK = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=128,
                tie_word_embeddings=False)
KINDS = {
    # q_lora_rank set, group-limited routing (4 groups, best 2), dense first layer, YaRN, interleaved rope
    "dsv3-qlora-groups-yarn": dict(q_lora_rank=24, n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=1,
                                   routed_scaling_factor=2.5, norm_topk_prob=True, rope_parameters=YARN),
    # q_proj directly, one group, no renormalisation, two shared experts, rope halves, biases on q_a/kv_a/o
    "dsv3-no-qlora": dict(q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0, n_shared_experts=2,
                          routed_scaling_factor=1.5, norm_topk_prob=False, rope_interleave=False, attention_bias=True,
                          rope_parameters={"rope_type": "default", "rope_theta": 50000.0}),
    "qwen3moe": dict(norm_topk_prob=True),
    "qwen3moe-sparse-step": dict(norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[2]),
}


def make_hf(kind: str, vocab: int = 97, scale: float = 0.08):
    """A random-init transformers model; weights drawn wider than its 0.02 init so that every part moves the logits."""
    if kind.startswith("dsv3"):
        cfg = transformers.DeepseekV3Config(vocab_size=vocab, **DEEPSEEK, **KINDS[kind], bos_token_id=None,
                                            eos_token_id=None, pad_token_id=0)
        model = transformers.DeepseekV3ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3MoeConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                                          moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=24, num_experts=8, num_experts_per_tok=2,
                                          max_position_embeddings=128,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                          tie_word_embeddings=False, **KINDS[kind], pad_token_id=0)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, scale)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.1)  # chosen on, never weighted by: a random bias checks both
    return model.eval()


def batch(vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    return ids, mask


def max_diff(hf, ours, vocab=97):
    ids, mask = batch(vocab)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    return (ref[real] - got[real]).abs().max().item(), ref[real].abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
def test_hf_to_r1lab_logits_match(kind, tmp_path):
    torch.manual_seed(0)
    hf = make_hf(kind)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    diff, size = max_diff(hf, ours)
    assert size > 0.5 and diff <= 1e-4, (diff, size)


@pytest.mark.parametrize("kind", KINDS)
def test_r1lab_to_hf_logits_match(kind, tmp_path):
    torch.manual_seed(1)
    ours = CausalLM(ModelConfig.from_hf(make_hf(kind).config.to_dict())).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.08)
        for name, b in ours.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.1)
    save_model(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == ours.config.architecture
    diff, size = max_diff(hf, ours)
    assert size > 0.5 and diff <= 1e-4, (diff, size)


def test_deepseek_config_round_trips_and_saves_transformers_names(tmp_path):
    hf = make_hf("dsv3-qlora-groups-yarn")
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    assert cfg.head_dim == 8 and cfg.mla["q_lora_rank"] == 24 and cfg.moe["n_group"] == 4
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    save_model(CausalLM(cfg), tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "deepseek_v3" and written["kv_lora_rank"] == 16
    assert written["rope_scaling"]["rope_type"] == "yarn" and "mla" not in written and "moe" not in written
    from safetensors import safe_open

    hf.save_pretrained(tmp_path / "hf")
    names = lambda d: set(safe_open(str(d / "model.safetensors"), "pt").keys())  # noqa: E731
    mtp = {n for n in names(tmp_path) if n.startswith("model.layers.3.")}  # the MTP layer, which transformers lacks
    assert "model.layers.3.eh_proj.weight" in mtp
    assert names(tmp_path) - mtp == names(tmp_path / "hf")  # per-expert names: model.layers.1.mlp.experts.7.down_proj.weight
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names(tmp_path)


def _greedy_without_cache(model, ids, n):
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("kind", ["dsv3-qlora-groups-yarn", "dsv3-no-qlora", "qwen3moe"])
def test_cached_greedy_decode_equals_recomputation_and_transformers(kind, tmp_path, monkeypatch):
    """Prefill expands the MLA latents; each decode step attends to the cached latents in the weight-absorbed form
    (dynamic: a growing cache; static: the whole buffer under a mask). Same tokens as a full forward per token and as
    transformers' greedy generate, and log-probs equal to the full forward's."""
    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    tok.eos_ids = set()
    hf = make_hf(kind, vocab=tok.vocab_size, scale=0.3)  # sharp distributions: greedy paths differ between prompts
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path).eval()
    prompts = [tok.encode(p) for p in ["3+5+2", "12+7", "9"]]
    n = 10
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(p):]
                    .tolist() for p in prompts]
    assert len({tuple(e) for e in expected}) > 1
    absorbed_steps = []
    absorbed = mla.MLAttention._absorbed
    monkeypatch.setattr(mla.MLAttention, "_absorbed", lambda self, *a: absorbed_steps.append(1) or absorbed(self, *a))
    no_cache = [_greedy_without_cache(model, p, n) for p in prompts]
    with torch.no_grad():  # each greedy token's log-prob under the full forward
        logprobs = [torch.log_softmax(model(torch.tensor([p + e]))[0, len(p) - 1 : -1], -1)
                    .gather(-1, torch.tensor(e)[:, None]).squeeze(-1) for p, e in zip(prompts, expected)]
    for decode in ("dynamic", "static"):
        out = Engine(model, tok, decode=decode).generate(prompts, num_samples=2, max_new_tokens=n, temperature=0)
        for i, s in enumerate(out):
            assert s.token_ids == expected[i // 2] == no_cache[i // 2], (decode, i)
            assert torch.allclose(logprobs[i // 2], torch.tensor(s.logprobs), atol=1e-5)
    assert bool(absorbed_steps) == kind.startswith("dsv3")  # MLA decode steps never expand the latents


def test_grpo_completion_pass_through_the_mla_cache_equals_full_sequences():
    """completion_hidden_states (GRPO's training pass) runs each prompt once into the latent cache, expands it to the
    group's rows and continues with the completions: the hidden states and gradients of full sequences."""
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf(make_hf("dsv3-qlora-groups-yarn").config.to_dict()))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    prompts = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]).bool()  # left padding on the first prompt
    rows = torch.tensor([0, 0, 1])
    completions = torch.tensor([[8, 9, 10], [11, 12, 0], [13, 14, 15]])
    completion_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]]).bool()
    got = model.completion_hidden_states(prompts, prompt_mask, rows, completions, completion_mask)  # (3, 3, D)
    for b in range(3):
        p = prompts[rows[b]][prompt_mask[rows[b]]]
        c = completions[b][completion_mask[b]]
        full = model.hidden_states(torch.cat([p, c])[None])[0]  # (P + C, D)
        ref = full[len(p) - 1 : len(p) - 1 + len(c)]
        assert (got[b, : len(c)] - ref).abs().max().item() < 1e-5
    got.sum().backward()
    assert model.model.layers[1].self_attn.kv_b_proj.weight.grad.abs().sum() > 0


def test_deepseek_router_stays_float32_in_bf16():
    model = CausalLM(ModelConfig.from_hf(make_hf("dsv3-qlora-groups-yarn").config.to_dict()))
    gate = model.model.layers[1].mlp.gate
    gate.e_score_correction_bias.normal_(0, 0.1)
    bias, weight = gate.e_score_correction_bias.clone(), gate.weight.detach().clone()
    model.to(torch.bfloat16)
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, bias) and torch.equal(gate.weight, weight)  # not rounded to bf16
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in model.state_dict()
    assert model.model.layers[1].mlp.experts.down_proj.dtype == torch.bfloat16
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def _cache_bytes_per_token(cfg: ModelConfig) -> int:
    cache = KVCache(cfg, 1, 1, torch.bfloat16, torch.device("meta"))  # meta: sizes without memory
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in layer)


def test_mla_cache_holds_only_the_latent_and_rope_key():
    """Bytes per cached token (bf16, all layers) against a multi-head model of the same width, heads and depth."""
    for hf_cfg in (transformers.DeepseekV3Config(), make_hf("dsv3-qlora-groups-yarn").config):  # real V3 sizes; tiny
        cfg = ModelConfig.from_hf(hf_cfg.to_dict())
        mha = ModelConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                          intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                          num_attention_heads=cfg.num_attention_heads,
                          num_key_value_heads=cfg.num_attention_heads)
        mla_bytes, mha_bytes = _cache_bytes_per_token(cfg), _cache_bytes_per_token(mha)
        L = cfg.num_hidden_layers
        assert mla_bytes == L * (cfg.mla["kv_lora_rank"] + cfg.mla["qk_rope_head_dim"]) * 2
        assert mha_bytes == L * 2 * cfg.hidden_size * 2
        assert mla_bytes * 4 <= mha_bytes, f"MLA {mla_bytes} B/token vs MHA {mha_bytes} B/token"
    # DeepSeek-V3 itself: 61 layers x (512 + 64) x 2 bytes = 70,272 B/token, against 1,748,992 for MHA (1/24.9)
    v3 = ModelConfig.from_hf(transformers.DeepseekV3Config().to_dict())
    assert _cache_bytes_per_token(v3) == 70_272


def test_experts_run_only_on_their_tokens_and_loads_are_recorded(monkeypatch):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf(make_hf("dsv3-qlora-groups-yarn").config.to_dict())).eval()
    E, k, F = 8, 2, 24
    rows = []
    linear = moe.F.linear

    def counting_linear(x, w, *args):
        if w.shape == (2 * F, 64) and not isinstance(w, torch.nn.Parameter):  # a slice of the experts' gate_up bank
            rows.append(x.shape[0])
        return linear(x, w, *args)

    monkeypatch.setattr(moe.F, "linear", counting_linear)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        model(ids)
    counts = moe.expert_counts(model)
    assert sorted(counts) == [1, 2]  # layer 0 is dense (first_k_dense_replace=1)
    for c in counts.values():
        assert c.shape == (E,) and int(c.sum()) == 2 * 7 * k
    assert sum(rows) == 2 * 2 * 7 * k  # every expert matmul together saw tokens x top-k rows, not tokens x experts
    assert len(rows) == sum(int((c > 0).sum()) for c in counts.values())


def test_moe_trains_router_and_experts():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf(make_hf("dsv3-qlora-groups-yarn").config.to_dict()))
    ids = torch.randint(0, 97, (2, 9))
    loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    mlp = model.model.layers[1].mlp
    for p in (mlp.gate.weight, mlp.experts.gate_up_proj, mlp.experts.down_proj, mlp.shared_experts.gate_up_proj.weight,
              model.model.layers[1].self_attn.kv_b_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_deepseek_v3_release_config_reads_and_writes_back_for_transformers():
    """config.json as DeepSeek-V3 ships it (legacy rope_scaling with "type", no head_dim, its own extra keys)."""
    shipped = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
               "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
               "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
               "n_shared_experts": 1, "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5,
               "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
               "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
               "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
               "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
               "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "rope_theta": 10000,
               "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                                "original_max_position_embeddings": 4096, "type": "yarn"},
               "attention_bias": False, "attention_dropout": 0.0}
    cfg = ModelConfig.from_hf(shipped)
    assert cfg.head_dim == 64 and cfg.mla["q_lora_rank"] == 1536 and cfg.moe["first_k_dense_replace"] == 3
    assert cfg.extra["topk_method"] == "noaux_tc"  # unknown keys written back unchanged
    scale = mla.softmax_scale(cfg)
    assert scale == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2)  # YaRN's mscale_all_dim correction
    hf = transformers.DeepseekV3Config(**cfg.to_hf())
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 40
    assert hf.qk_head_dim == 192 and hf.n_group == 8 and hf.q_lora_rank == 1536


def test_auto_decoding_on_cuda_skips_the_graph_an_moe_model_cannot_capture(monkeypatch):
    """An MoE layer reads its experts' group sizes on the host: "auto" decodes an MoE model on CUDA without a CUDA
    graph (no capture tried, no warning), a dense one with it."""
    from r1lab.engine.engine import Engine
    from r1lab.model.tokenizer import build_tiny_tokenizer

    monkeypatch.setattr(Engine, "device", property(lambda self: torch.device("cuda")))
    moe_model = CausalLM(ModelConfig.from_hf(make_hf("dsv3-qlora-groups-yarn").config.to_dict()))
    dense = CausalLM(ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2))
    modes = [Engine(m, build_tiny_tokenizer())._decode_mode() for m in (moe_model, dense)]
    assert modes == ["dynamic", "graph"]
