"""MoE models in training: expert-load metrics (moe/*) for MoE models only, DeepSeek-V3's auxiliary-loss-free
balancing of the routing bias (toward an even load, off at speed 0, its setting validated), and a tiny DeepSeek-V3
GRPO run whose saved model loads in transformers with the updated bias."""

import copy
import json
import types

import pytest
import torch

import r1lab.train.grpo as grpo
from r1lab.config import GRPOConfig, SFTConfig
from r1lab.model import moe
from r1lab.model.architecture import ModelConfig
from r1lab.model.hf_format import save_model
from r1lab.model.tokenizer import build_tiny_tokenizer
from r1lab.model.transformer import CausalLM
from r1lab.train.optimizer import make_optimizer
from r1lab.train.supervised import lm_step

transformers = pytest.importorskip("transformers")

DEEPSEEK = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 32,
            "intermediate_size": 48, "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "kv_lora_rank": 8, "q_lora_rank": None, "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 4, "v_head_dim": 8, "n_routed_experts": 8, "num_experts_per_tok": 2,
            "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1, "norm_topk_prob": True,
            "routed_scaling_factor": 2.5, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "hidden_act": "silu"}


def deepseek(vocab: int = 97, **kw) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig.from_hf({**DEEPSEEK, "vocab_size": vocab, **kw}))


def dense(vocab: int = 97) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256))


def docs(n=6, vocab=97):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, vocab, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def biases(model) -> dict:
    return {i: m.gate.e_score_correction_bias.clone() for i, m in moe.moe_layers(model).items()}


def test_lm_step_reports_expert_load_for_moe_and_nothing_for_dense():
    for model, is_moe in ((deepseek(), True), (dense(), False)):
        metrics = lm_step(model, make_optimizer(model, 1e-3, 0.0, 0.95), docs(), None, pad_id=0,
                          moe_bias_update_speed=0.001)
        keys = {k for k in metrics if k.startswith("moe/")}
        if is_moe:
            assert keys == {"moe/load_max_over_mean", "moe/routing_entropy"}
            assert metrics["moe/load_max_over_mean"] >= 1 and 0 < metrics["moe/routing_entropy"] <= torch.log(
                torch.tensor(8.0)).item() + 1e-6
        else:
            assert not keys


def test_load_counts_skip_padding():
    """Padding is routed too but is no load: left padding under an attention mask, and right padding in the
    pretraining/SFT forward (no attention mask; lm_step marks the real tokens)."""
    model, k = deepseek(), DEEPSEEK["num_experts_per_tok"]
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 8, 9, 10]])
    with moe.count_loads(model) as loads, torch.no_grad():
        model(ids, attention_mask=(ids != 0).long())
        moe.mark_real_lengths(model, [3, 5], 5)  # as lm_step does
        model(ids)
    assert int(loads[1].sum()) == (6 + 8) * k  # the real tokens, k experts each
    assert list(loads) == [1]  # layer 0 is dense (first_k_dense_replace 1)


def skewed_layer(n_experts=8, top_k=2, n_group=1, topk_group=1, hidden=16):
    """One DeepSeek-V3 MoE layer whose router prefers experts 0 and 1 for every token, and its inputs."""
    cfg = ModelConfig.from_hf({**DEEPSEEK, "vocab_size": 11, "hidden_size": hidden, "n_routed_experts": n_experts,
                               "num_experts_per_tok": top_k, "n_group": n_group, "topk_group": topk_group})
    torch.manual_seed(0)
    layer = moe.MoE(cfg)
    u = torch.nn.functional.normalize(torch.ones(hidden), dim=0)
    with torch.no_grad():
        layer.gate.weight[:2] += 3 * u  # experts 0 and 1 score high on every token, which all lean along u
    x = torch.randn(1, 256, hidden) + u
    holder = types.SimpleNamespace(model=types.SimpleNamespace(layers=[types.SimpleNamespace(mlp=layer)]))
    return layer, holder, x


def balance_run(speed: float, steps: int, **kw):
    layer, holder, x = skewed_layer(**kw)
    history = []
    for _ in range(steps):
        with moe.count_loads(holder) as loads, torch.no_grad():
            layer(x)
        history.append(moe.load_metrics(loads)["moe/load_max_over_mean"])
        moe.update_routing_bias(holder, loads, speed)
    return history, layer


@pytest.mark.slow  # 100 routing steps each: the fast tier keeps the bias's step (speed zero or not) below
@pytest.mark.parametrize("groups", [dict(), dict(n_group=2, topk_group=1)])
def test_routing_bias_moves_the_load_toward_balance(groups):
    history, layer = balance_run(speed=0.01, steps=100, **groups)
    settled = sum(history[-20:]) / 20  # sign steps of a fixed size: the load ends up oscillating around even
    print(f"load max/mean {groups}: {history[0]:.2f} -> {settled:.2f}")
    assert history[0] > 3  # experts 0 and 1 take most tokens: 4 is the most with 2 of 8 experts
    assert settled < 1.6 and settled < history[0] / 2
    bias = layer.gate.e_score_correction_bias
    assert bias[:2].max() < 0 < bias[2:].max()  # the overloaded experts pushed down, the idle ones up


def test_bias_changes_only_the_choice_not_the_gate_weights():
    layer, _, x = skewed_layer()
    flat = x.reshape(-1, x.shape[-1])
    weights, experts = layer.gate(flat)
    with torch.no_grad():
        layer.gate.e_score_correction_bias.normal_(0, 1.0)
    weights2, experts2 = layer.gate(flat)
    assert not torch.equal(experts, experts2)
    scores = torch.nn.functional.linear(flat, layer.gate.weight).sigmoid().gather(1, experts2)
    assert torch.allclose(weights2, scores / scores.sum(-1, keepdim=True) * layer.gate.scaling)


def test_speed_zero_leaves_the_bias_unchanged_and_a_positive_one_moves_it():
    history, layer = balance_run(speed=0.0, steps=3)
    assert torch.equal(layer.gate.e_score_correction_bias, torch.zeros(8)) and history[0] == history[-1]
    for speed in (0.0, 0.01):
        model = deepseek()
        before = biases(model)
        lm_step(model, make_optimizer(model, 1e-3, 0.0, 0.95), docs(), None, pad_id=0, moe_bias_update_speed=speed)
        moved = (biases(model)[1] - before[1]).abs()
        assert moved.max() == (0 if speed == 0 else pytest.approx(speed))


@pytest.mark.parametrize("cls", [GRPOConfig, SFTConfig])
@pytest.mark.parametrize("value, said", [(-0.001, "below the minimum 0"), (float("nan"), "not a finite number"),
                                         (float("inf"), "not a finite number")])
def test_bad_bias_speed_is_refused_naming_the_setting(cls, value, said):
    with pytest.raises(ValueError, match=f"moe_bias_update_speed: .*{said}"):
        cls(moe_bias_update_speed=value).check()
    assert cls().moe_bias_update_speed == 0.001  # DeepSeek-V3's (the paper's gamma)


def test_rollout_copy_gets_the_updated_bias():
    model = deepseek()
    rollout = copy.deepcopy(model).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias += 0.123
    grpo.sync_rollout_policy(rollout, model)
    assert torch.equal(biases(rollout)[1], biases(model)[1]) and biases(rollout)[1].dtype == torch.float32


def test_tiny_deepseek_grpo_logs_loads_and_saves_the_balanced_bias_for_transformers(tmp_path):
    tok = build_tiny_tokenizer()
    base = tmp_path / "base"
    save_model(deepseek(tok.vocab_size, eos_token_id=sorted(tok.eos_ids)[0]), base)
    tok.save(base)
    cfg = GRPOConfig(model=str(base), out=str(tmp_path / "run"), task="arithmetic", steps=2, prompts_per_step=2,
                     samples_per_prompt=2, micro_batch_size=4, max_new_tokens=6, eval_every=0, save_every=0,
                     samples_every=0, skip_zero_advantage=False, moe_bias_update_speed=0.01, device="cpu", threads=1)
    final = grpo.train(cfg, log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        for key in ("moe/load_max_over_mean", "moe/routing_entropy", "moe/rollout_load_max_over_mean",
                    "moe/rollout_routing_entropy"):
            assert r[key] > 0, key
    hf = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    bias = hf.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().max() > 0 and bias.abs().max() <= 2 * 0.01 + 1e-6  # two steps of 0.01 from zero
    print("metrics", {k: round(v, 3) for k, v in rows[-1].items() if k.startswith("moe/")}, "bias", bias.tolist())


def _balance_by_hand(model, ids, lengths, weight):
    """V3's sequence-wise balance loss written out sequence by sequence, expert by expert, from the router alone."""
    total = 0.0
    hidden = {}
    layers = moe.moe_layers(model)
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: hidden.__setitem__(i, args[0]))
             for i, m in layers.items()]
    model(ids)
    for hook in hooks:
        hook.remove()
    for i, m in layers.items():
        E, k = m.gate.n_experts, m.gate.top_k
        for b, T in enumerate(lengths):
            x = hidden[i][b, :T]
            _, experts = m.gate(x)
            scores = torch.sigmoid(x.float() @ m.gate.weight.float().T)
            for e in range(E):
                f = E / (k * T) * sum(int(e in experts[t].tolist()) for t in range(T))
                p = sum((scores[t, e] / scores[t].sum()).item() for t in range(T)) / T
                total += weight * f * p
    return total


def test_sequence_balance_loss_matches_a_hand_computation_and_reaches_the_router_not_the_experts():
    model = deepseek()
    batch = docs(3)
    lengths = [len(d) for d in batch]
    T = max(lengths)
    ids = torch.tensor([d + [0] * (T - len(d)) for d in batch])
    with moe.count_loads(model), moe.balance_loss(model, 0.01):
        moe.mark_real_lengths(model, lengths, T)
        model(ids)
        ours = moe.take_balance_loss(model)
    expected = _balance_by_hand(model, ids, lengths, 0.01)
    assert abs(ours.item() - expected) < 1e-6 * max(1.0, expected)
    model.zero_grad()
    ours.backward()
    layer = moe.moe_layers(model)[1]
    assert layer.gate.weight.grad.abs().sum() > 0
    assert layer.experts.gate_up_proj.grad is None or layer.experts.gate_up_proj.grad.abs().sum() == 0
    with moe.balance_loss(model, 0.0):  # off: nothing computed
        model(ids)
        assert moe.take_balance_loss(model) == 0.0


def test_lm_step_adds_the_balance_loss_only_when_asked():
    batch = docs()
    off, on = deepseek(), deepseek()
    plain = lm_step(off, make_optimizer(off, 1e-3, 0.0, 0.95), batch, None, pad_id=0)
    weighted = lm_step(on, make_optimizer(on, 1e-3, 0.0, 0.95), batch, None, pad_id=0, micro_batch_size=4,
                       balance_loss_weight=0.1)
    assert "moe/balance_loss" not in plain and weighted["moe/balance_loss"] > 0
    assert abs(plain["loss"] - weighted["loss"]) < 1e-5  # "loss" stays the language-model loss
    router_moved = [(a.gate.weight - b.gate.weight).abs().max() for a, b in
                    zip(moe.moe_layers(off).values(), moe.moe_layers(on).values())]
    assert max(router_moved) > 0


def test_the_tiny_deepseek_v3_base_is_what_transformers_reads_and_reports_its_costs(tmp_path):
    from r1lab.commands.pretrain import pretrain
    from r1lab.config import PretrainConfig
    from r1lab.model.hf_format import load_model

    cfg = PretrainConfig(out=str(tmp_path), arch="deepseek-v3", steps=3, documents=64, batch_size=16,
                         balance_loss_weight=0.001, threads=1)
    model_dir = pretrain(cfg, log=lambda *_: None)
    facts = json.loads((tmp_path / "architecture.json").read_text())
    ours = load_model(model_dir).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert type(theirs).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.tensor([[5, 17, 30, 2, 9, 44, 61, 3]])
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-4
    # 4 layers x (32 latent + 32 rotary key) x 2 bytes: a quarter of multi-head attention's 4 x 2 x 128 x 2
    assert facts["kv_cache_bytes_per_token_bf16"] == 4 * 64 * 2
    assert facts["multi_head_kv_cache_bytes_per_token_bf16"] == 4 * 2 * 128 * 2
    per_expert = 3 * 128 * 128  # gate, up and down of one expert
    assert facts["parameters"] - facts["active_parameters"] == 3 * (8 - 2) * per_expert  # 3 MoE layers, 6 idle
    assert facts["parameters"] == sum(p.numel() for p in theirs.parameters())
    assert 1.0 <= facts["moe/load_max_over_mean"] <= 8.0


@pytest.mark.parametrize("arch", ["deepseek", "qwen3moe"])
def test_sft_eval_sample_serve_and_chat_run_on_moe_models(tmp_path, arch, monkeypatch, capsys):
    """The commands a user runs on a dense model, on DeepSeek-V3 and Qwen3-MoE at toy size, through the CLI."""
    import io

    from fastapi import testclient

    from r1lab.cli import main
    from r1lab.serve.app import create_app

    tok = build_tiny_tokenizer()
    base = tmp_path / "base"
    eos = sorted(tok.eos_ids)[0]
    if arch == "deepseek":
        model = deepseek(tok.vocab_size, eos_token_id=eos)
    else:
        torch.manual_seed(0)
        model = CausalLM(ModelConfig.from_hf({
            "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": tok.vocab_size, "hidden_size": 32,
            "intermediate_size": 48, "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
            "max_position_embeddings": 256, "tie_word_embeddings": False, "eos_token_id": eos}))
    save_model(model, base)
    tok.save(base)
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}", "completion": f"<think>x</think> <answer>{2 * a}"
                                                                           f"</answer>"}) + "\n" for a in range(6)))
    main(["sft", "--model", str(base), "--data", str(data), "--steps", "2", "--batch-size", "3", "--template", "r1zero",
          "--moe-bias-update-speed", "0.01", "--out", str(tmp_path / "sft"), "--device", "cpu", "--threads", "1"])
    tuned = tmp_path / "sft" / "model"
    assert transformers.AutoModelForCausalLM.from_pretrained(tuned) is not None
    main(["eval", "--model", str(tuned), "--problems", "3", "--samples", "2", "--max-new-tokens", "8",
          "--out", str(tmp_path / "eval.json"), "--device", "cpu", "--threads", "1"])
    assert json.loads((tmp_path / "eval.json").read_text())["test"]["n_problems"] == 3
    main(["sample", "--model", str(tuned), "--problems", "2", "--samples", "2", "--max-new-tokens", "8",
          "--out", str(tmp_path / "samples.jsonl"), "--device", "cpu", "--threads", "1"])
    assert "2 prompts, 4 sampled" in capsys.readouterr().out  # an untrained toy: sampled and scored, none kept
    with testclient.TestClient(create_app(tuned, device="cpu")) as client:
        served = client.get("/v1/models").json()["data"][0]["id"]  # the run's name: sft
        reply = client.post("/v1/chat/completions", json={"model": served, "max_tokens": 5, "messages": [
            {"role": "user", "content": "1+1"}]})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 5, reply.text
    monkeypatch.setattr("sys.stdin", io.StringIO("1+1\n/quit\n"))
    main(["chat", "--model", str(tuned), "--max-tokens", "4", "--device", "cpu"])
    assert "you> 1+1" in capsys.readouterr().out
