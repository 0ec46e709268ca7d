"""Settings whose largest step cannot fit the device's memory are refused at start, with the estimate, in one line
(r1lab/train/memory_budget.py); settings that fit are not."""

import json

import pytest
import torch

import r1lab.train.memory_budget as budget
from r1lab.cli import main
from r1lab.config import GRPOConfig, SFTConfig
from r1lab.model.architecture import ModelConfig
from r1lab.model.facts import kv_cache_bytes_per_token
from r1lab.model.transformer import CausalLM

CPU = torch.device("cpu")
QWEN_05B = ModelConfig(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2)


def test_grpo_parts_are_the_weights_the_kv_cache_the_tokens_and_the_kept_logits():
    cfg = GRPOConfig(prompts_per_step=16, samples_per_prompt=8, micro_batch_size=64, max_new_tokens=256)
    parts = budget.grpo_parts(cfg, QWEN_05B)
    params = budget.parameter_count(QWEN_05B)
    assert 490e6 < params < 500e6  # Qwen2.5-0.5B
    assert parts == {
        "weights, gradients and AdamW state": 16 * params,
        "KV cache of 128 rollouts x 256 tokens": 128 * 256 * kv_cache_bytes_per_token(QWEN_05B, torch.float32),
        "sampled tokens of 128 rollouts": 128 * 256 * 12,
        "logits kept for the backward pass (64 sequences x 256 tokens x 151,936 vocabulary)": 64 * 256 * 151_936 * 4,
    }
    slots = budget.grpo_parts(GRPOConfig(samples_per_prompt=100_000, rollout_slots=64, recompute_logits=True),
                              QWEN_05B)
    assert "KV cache of 64 rollouts x 256 tokens" in slots  # continuous batching bounds the cache, not the outputs
    assert slots["sampled tokens of 1,600,000 rollouts"] == 1_600_000 * 256 * 12
    assert slots["logits (one chunk, recomputed)"] == 256 << 20


def test_bf16_lora_kl_and_sharding_change_the_weights_part():
    params = budget.parameter_count(QWEN_05B)
    bf16 = budget.grpo_parts(GRPOConfig(dtype="bfloat16", kl_coef=0.01), QWEN_05B)
    assert bf16["rollout copy of the weights"] == bf16["KL reference model"] == 2 * params
    lora = budget.grpo_parts(GRPOConfig(dtype="bfloat16", lora_rank=8, kl_coef=0.01), QWEN_05B)
    assert lora["frozen weights"] == 2 * params and "KL reference model" not in lora  # the base is the reference
    sharded = budget.grpo_parts(GRPOConfig(shard=True), QWEN_05B, ranks=4)
    assert sharded["weights, gradients and AdamW state"] == 16 * params // 4


def test_more_than_the_device_holds_is_one_line_with_the_estimate(monkeypatch):
    monkeypatch.setattr(budget, "ram_bytes", lambda: 16 * 10**9)
    parts = budget.grpo_parts(GRPOConfig(samples_per_prompt=100_000), QWEN_05B)
    with pytest.raises(budget.MemoryBudgetError) as info:
        budget.check_fits(parts, CPU, "lower samples_per_prompt")
    message = str(info.value)
    assert "\n" not in message and message.startswith("these settings need an estimated ")
    assert "KV cache of 1,600,000 rollouts x 256 tokens 10,066.3 GB" in message
    assert "this machine's RAM has 16.0 GB: lower samples_per_prompt" in message
    monkeypatch.setattr(budget, "ram_bytes", lambda: 32 * 10**9)
    budget.check_fits(budget.grpo_parts(GRPOConfig(), QWEN_05B), CPU, "")  # 7.9 GB of weights and state, 10 of logits


def test_the_ram_is_the_containers_limit_where_it_is_lower(tmp_path, monkeypatch):
    unlimited, limited = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    unlimited.write_text("max\n")
    monkeypatch.setattr(budget, "_CGROUP_LIMITS", (str(unlimited), str(tmp_path / "absent")))
    machine = budget.ram_bytes()
    assert machine is not None and machine > 10**8
    limited.write_text(f"{machine // 4}\n")
    monkeypatch.setattr(budget, "_CGROUP_LIMITS", (str(unlimited), str(limited)))
    assert budget.ram_bytes() == machine // 4


def test_supervised_logits_are_those_of_the_longest_documents(monkeypatch):
    with torch.device("meta"):
        model = CausalLM(QWEN_05B)
    docs = [[0] * n for n in (10, 4000, 30, 3000, 20)]
    cfg = SFTConfig(batch_size=4, micro_batch_size=2)
    monkeypatch.setattr(budget, "ram_bytes", lambda: 10 * 10**9)  # 7.9 GB of weights and state, 4.3 of logits
    with pytest.raises(budget.MemoryBudgetError, match=r"2 longest documents, 6,998 tokens x 151,936 vocabulary"):
        budget.check_supervised_memory(cfg, model, docs, CPU)
    message = str(pytest.raises(budget.MemoryBudgetError, budget.check_supervised_memory, cfg, model, docs, CPU).value)
    assert "max_len" in message and "recompute_logits" in message
    budget.check_supervised_memory(SFTConfig(batch_size=4, micro_batch_size=2, recompute_logits=True), model, docs,
                                   CPU)


def test_samples_per_prompt_100000_is_refused_at_start(tiny_base, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["grpo", "--model", str(tiny_base), "--out", str(tmp_path / "run"), "--samples-per-prompt", "100000",
              "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("r1lab grpo: error: these settings need an estimated ") and "\n" not in err
    assert "KV cache of 1,600,000 rollouts x 256 tokens" in err and "this machine's RAM has" in err
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run started


def test_the_tiny_models_default_runs_fit(tiny_base):
    config = ModelConfig.from_hf(json.loads((tiny_base / "config.json").read_text()))
    assert sum(budget.grpo_parts(GRPOConfig(), config).values()) < 10**9
