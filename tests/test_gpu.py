"""The GPU path: run on a CUDA machine, skipped elsewhere. bf16 rollouts from CUDA-graph decoding against the
training pass, and a few GRPO steps end to end on the GPU."""

import json
import math

import pytest
import torch
from test_grpo import small_config

import r1lab.train.grpo as grpo

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_graph_decoding_gives_the_eager_tokens():
    from r1lab.engine.engine import Engine
    from r1lab.model.architecture import ModelConfig
    from r1lab.model.tokenizer import build_tiny_tokenizer
    from r1lab.model.transformer import CausalLM

    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    model = CausalLM(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).cuda().eval()
    ids = [tok.encode(p) for p in ("3+5+2", "12+7", "9")]
    args = dict(num_samples=4, max_new_tokens=24, temperature=0.0)
    graph = Engine(model, tok, decode="graph").generate(ids, **args)
    eager = Engine(model, tok, decode="dynamic").generate(ids, **args)
    assert [s.token_ids for s in graph] == [s.token_ids for s in eager]


def test_bf16_graph_rollouts_match_the_training_pass(tiny_base, tmp_path):
    cfg = small_config(tiny_base, tmp_path, dtype="bfloat16", device="cuda", skip_zero_advantage=False)
    model, tok = grpo.load_policy(str(tiny_base), torch.device("cuda"))
    engine = grpo.Engine(grpo.rollout_policy(model, cfg), tok)  # "auto": CUDA graphs
    task = grpo.get_task("arithmetic", **cfg.task_options)
    rollouts = grpo.sample_rollouts(engine, grpo.PromptStream(task, cfg).batch(0), cfg, seed=0)
    adv = torch.ones(len(rollouts.texts))
    mb = grpo.make_micro_batches(rollouts, adv, torch.ones(len(adv), dtype=torch.bool), cfg, tok.pad_id, "cuda")[0]
    with torch.no_grad(), grpo.training_precision(cfg.dtype, torch.device("cuda")):
        train_logp = grpo.completion_logprobs(model, mb, cfg.temperature)[0]
    diff = (train_logp.float() - mb.old_logp).abs()
    print(f"bf16 sampler vs trainer: mean {diff.mean():.2e}, max {diff.max():.2e}")
    assert diff.mean() < 0.03 and diff.max() < 0.3


def test_a_few_grpo_steps_on_the_gpu(tiny_base, tmp_path):
    cfg = small_config(tiny_base, tmp_path, dtype="bfloat16", device="cuda", recompute_logits=True,
                       updates_per_batch=2)
    final = grpo.train(cfg, log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == cfg.steps and all(math.isfinite(r["loss"]) and r["skipped_nonfinite"] == 0 for r in rows)
    assert (final / "model.safetensors").exists()
