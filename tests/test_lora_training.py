"""LoRA in GRPO and SFT: adapters train and the base stays frozen; the run writes PEFT's adapter and the merged
model; checkpoints resume the adapter exactly; the KL reference is the base with the adapters off, no copy;
`r1lab merge` and `--adapter` give the merged model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from r1lab.cli import main
from r1lab.config import GRPOConfig
from r1lab.model.hf_format import load_model
from r1lab.train import grpo


def lora_config(base, out, **kw):
    values = dict(model=str(base), out=str(out), task="arithmetic", task_options={"min_terms": 3, "max_terms": 4},
                  steps=3, prompts_per_step=4, samples_per_prompt=4, micro_batch_size=8, lr=1e-2, max_new_tokens=24,
                  eval_every=0, save_every=0, samples_every=0, seed=0, lora_rank=4, lora_alpha=8.0)
    values.update(kw)
    return GRPOConfig(**values)


@pytest.mark.slow  # whole GRPO runs: test_lora.py keeps the adapters' training, merging and loading in the fast tier
def test_lora_grpo_trains_adapters_only_and_writes_the_adapter_and_the_merged_model(tiny_base, tmp_path):
    final = grpo.train(lora_config(tiny_base, tmp_path / "run"), log=lambda *_: None)
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_base)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(t.abs().max() > 0 for k, t in lora.items() if "lora_B" in k)  # B started at zero and trained
    merged, base = load_model(final).state_dict(), load_model(tiny_base).state_dict()
    assert merged.keys() == base.keys()  # a plain model: no adapter weights left in it
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all("proj" in k for k in changed)  # only the adapted projections moved
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["memory/rank_optimizer_mb"] < 0.2 * last["memory/rank_weights_mb"]  # AdamW state of adapters only


@pytest.mark.slow
def test_lora_resume_reaches_the_uninterrupted_adapter(tiny_base, tmp_path):
    straight = grpo.train(lora_config(tiny_base, tmp_path / "a", steps=4, save_every=2), log=lambda *_: None)
    grpo.train(lora_config(tiny_base, tmp_path / "b", steps=2, save_every=2), log=lambda *_: None)
    assert (tmp_path / "b" / "checkpoints" / "step_000002" / "adapter_config.json").exists()
    resumed = grpo.train(lora_config(tiny_base, tmp_path / "b", steps=4, save_every=2, resume=True),
                         log=lambda *_: None)
    a, b = load_model(straight).state_dict(), load_model(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_kl_reference_and_rollouts_are_the_policy_itself(tiny_base, tmp_path):
    for dtype in ("float32", "bfloat16"):
        cfg = lora_config(tiny_base, tmp_path / dtype, kl_coef=0.1, dtype=dtype)
        model, _ = grpo.load_policy(str(tiny_base), torch.device("cpu"), dtype)  # LoRA keeps the base in dtype
        grpo.add_lora(model, grpo.lora_spec(cfg))
        assert grpo.reference_policy(model, cfg) is model and grpo.rollout_policy(model, cfg) is model  # no copy


@pytest.mark.slow
def test_the_lora_kl_is_zero_before_any_update_and_grows_as_the_adapters_move(tiny_base, tmp_path):
    grpo.train(lora_config(tiny_base, tmp_path / "run", kl_coef=0.1, steps=3, prompts_per_step=8),
               log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[0]["kl"]) < 1e-9  # before any update the policy is its base (B = 0)
    assert rows[0]["grad_norm"] > 0 and rows[-1]["kl"] > 0  # the reference stayed the base while the adapters moved


@pytest.mark.slow
def test_merge_command_and_eval_adapter_give_the_runs_merged_model(tiny_base, tmp_path, capsys):
    final = grpo.train(lora_config(tiny_base, tmp_path / "run", steps=2), log=lambda *_: None)
    main(["merge", "--model", str(tiny_base), "--adapter", str(tmp_path / "run" / "adapter"),
          "--out", str(tmp_path / "merged")])
    a, b = load_model(final).state_dict(), load_model(tmp_path / "merged").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    common = ["--task-options", "{min_terms: 3, max_terms: 4}", "--problems", "6", "--samples", "2",
              "--max-new-tokens", "24"]
    main(["eval", "--model", str(final), *common, "--out", str(tmp_path / "merged.json")])
    main(["eval", "--model", str(tiny_base), "--adapter", str(tmp_path / "run" / "adapter"), *common,
          "--out", str(tmp_path / "adapter.json")])
    merged, adapted = (json.loads((tmp_path / f"{n}.json").read_text())["test"] for n in ("merged", "adapter"))
    assert merged["pass@1"] == adapted["pass@1"] and merged["mean_length"] == adapted["mean_length"]


def test_lora_sft_writes_an_adapter(tiny_base, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"{a}+1"},
                          {"role": "assistant", "content": f" <think>{a}+1={a + 1}</think> <answer>{a + 1}</answer>"}]}
            for a in range(8)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["sft", "--model", str(tiny_base), "--data", str(data), "--steps", "2", "--batch-size", "4", "--lr", "1e-2",
          "--lora-rank", "2", "--lora-targets", "q_proj,v_proj", "--out", str(tmp_path / "sft")])
    config = json.loads((tmp_path / "sft" / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["r"] == 2
    assert (tmp_path / "sft" / "model" / "model.safetensors").exists()
