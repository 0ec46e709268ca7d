"""DeepSeek-V3's multi-token prediction (MTP) module: a checkpoint holding it under V3's names (model.layers.{L}.*
with enorm, hnorm, eh_proj, shared_head and copies of the embedding and head) loads, saves back byte-identical and
leaves the main logits equal to transformers' (which skips the layer); the module's predictions equal the V3 recipe
computed with transformers' own decoder layer; its loss in pretraining and SFT (mtp_loss)."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from r1lab.model.architecture import ModelConfig
from r1lab.model.hf_format import load_model, save_model
from r1lab.model.transformer import CausalLM
from r1lab.train.optimizer import make_optimizer
from r1lab.train.supervised import lm_step

transformers = pytest.importorskip("transformers")

TINY_V3 = dict(vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_attention_heads=2,
               num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8,
               v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
               first_k_dense_replace=1, n_shared_experts=1, max_position_embeddings=64, tie_word_embeddings=False,
               bos_token_id=None, eos_token_id=None, pad_token_id=0)
MTP_ONLY = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")


def _randomise(model, scale=0.15):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, scale)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.1)
    return model.eval()


def hand_built_v3_checkpoint(path):
    """A 2-layer V3 whose model.layers.2.* is an MTP layer written as DeepSeek ships it: the block's weights are
    those of a 3-layer transformers model's last layer (returned, as the reference block), the rest drawn here."""
    torch.manual_seed(0)
    three = _randomise(transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(num_hidden_layers=3, **TINY_V3)))
    three.save_pretrained(path / "three")
    state = load_file(str(path / "three" / "model.safetensors"))
    D = TINY_V3["hidden_size"]
    state.update({"model.layers.2.enorm.weight": torch.rand(D) + 0.5, "model.layers.2.hnorm.weight": torch.rand(D) + 0.5,
                  "model.layers.2.eh_proj.weight": torch.randn(D, 2 * D) * 0.15,
                  "model.layers.2.shared_head.norm.weight": torch.rand(D) + 0.5,
                  "model.layers.2.embed_tokens.weight": state["model.embed_tokens.weight"].clone(),
                  "model.layers.2.shared_head.head.weight": state["lm_head.weight"].clone()})
    config = json.loads((path / "three" / "config.json").read_text())
    config.update(num_hidden_layers=2, num_nextn_predict_layers=1)
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return three, state


def reference_mtp_logits(three, state, ids):
    """DeepSeek-V3's MTP recipe with transformers' modules: h' = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]) through
    the decoder layer, shared_head.norm, the head; h: the 2-layer main model's final (normalised) hidden states."""
    two = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(num_hidden_layers=2, **TINY_V3)).eval()
    two.load_state_dict({k: v for k, v in three.state_dict().items() if not k.startswith("model.layers.2.")})
    rms = type(three.model.norm)  # transformers' DeepseekV3RMSNorm

    def apply(name, x):
        n = rms(x.shape[-1], three.config.rms_norm_eps)
        n.weight.data.copy_(state[f"model.layers.2.{name}.weight"])
        return n(x)

    with torch.no_grad():
        h = two.model(ids).last_hidden_state[:, :-1]  # (B, T - 1, D)
        emb = two.model.embed_tokens(ids[:, 1:])
        x = F.linear(torch.cat([apply("enorm", emb), apply("hnorm", h)], -1), state["model.layers.2.eh_proj.weight"])
        positions = torch.arange(x.shape[1])[None]
        out = three.model.layers[2](x, attention_mask=None, position_ids=positions,
                                    position_embeddings=three.model.rotary_emb(x, positions))
        out = out[0] if isinstance(out, tuple) else out
        return F.linear(apply("shared_head.norm", out), state["model.layers.2.shared_head.head.weight"])


def test_a_v3_checkpoint_with_its_mtp_layer_loads_matches_transformers_and_saves_back(tmp_path):
    three, state = hand_built_v3_checkpoint(tmp_path / "v3")
    ours = load_model(tmp_path / "v3").eval()
    assert ours.config.mtp_depth == 1 and len(ours.mtp) == 1 and len(ours.model.layers) == 2
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "v3").eval()  # skips model.layers.2.*
    ids = torch.randint(1, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = theirs(ids).logits
        assert ref.abs().max() > 0.5 and (ours(ids) - ref).abs().max() < 1e-4  # the main model is unchanged
        mtp = ours.lm_head(ours.mtp_hidden_states(ours.hidden_states(ids), ids)[0])  # (B, T - 1, V)
    expected = reference_mtp_logits(three, state, ids)
    assert expected.abs().max() > 0.5 and (mtp - expected).abs().max() < 1e-4
    save_model(ours, tmp_path / "back")
    written = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert written.keys() == state.keys()
    assert all(torch.equal(written[k], state[k]) for k in state), [k for k in state if not torch.equal(written[k], state[k])]
    assert json.loads((tmp_path / "back" / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_r1lab_saves_v3s_names_and_loads_them_back(tmp_path):
    cfg = ModelConfig.from_hf({**transformers.DeepseekV3Config(num_hidden_layers=2, **TINY_V3).to_dict(),
                               "num_nextn_predict_layers": 1})
    model = _randomise(CausalLM(cfg))
    save_model(model, tmp_path)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert {f"model.layers.2.{n}" for n in MTP_ONLY + ("embed_tokens.weight", "shared_head.head.weight")} <= names
    assert "model.layers.2.mlp.experts.3.down_proj.weight" in names and not any(n.startswith("mtp.") for n in names)
    back = load_model(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert back.state_dict().keys() == model.state_dict().keys()


def test_mtp_copies_of_the_shared_weights_that_differ_are_refused(tmp_path):
    hand_built_v3_checkpoint(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.2.shared_head.head.weight"][0, 0] += 1.0
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.2.shared_head.head.weight differs from lm_head.weight"):
        load_model(tmp_path)


def test_a_partial_mtp_layer_is_refused(tmp_path):
    hand_built_v3_checkpoint(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.2.eh_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*model.layers.2.eh_proj.weight"):
        load_model(tmp_path)


def test_a_transformers_saved_v3_without_the_layer_loads_without_the_module_and_says_so(tmp_path):
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(num_hidden_layers=2, **TINY_V3))
    assert hf.config.num_nextn_predict_layers == 1  # transformers' default, kept in config.json
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no model.layers.2.\\*: loading without the multi-token prediction module"):
        model = load_model(tmp_path)
    assert len(model.mtp) == 0 and model.config.to_hf()["num_nextn_predict_layers"] == 0


def test_mtp_on_another_architecture_is_refused():
    with pytest.raises(ValueError, match="DeepSeek-V3's module"):
        ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, mtp_depth=1)


def _tiny_mtp_model(depth):
    torch.manual_seed(0)
    cfg = ModelConfig.from_hf({**transformers.DeepseekV3Config(num_hidden_layers=2, **TINY_V3).to_dict(),
                               "num_nextn_predict_layers": depth})
    return _randomise(CausalLM(cfg), scale=0.05).train()


def _manual_mtp_loss(model, docs, masks):
    """Mean over depths of each depth's mean cross-entropy on the tokens k + 1 ahead, one document at a time."""
    per_depth = []
    for k in range(1, len(model.mtp) + 1):
        total, n = 0.0, 0
        for d, m in zip(docs, masks):
            ids = torch.tensor([d])
            with torch.no_grad():
                hk = model.mtp_hidden_states(model.hidden_states(ids), ids)[k - 1][0]  # (T - k, D)
                logp = torch.log_softmax(model.lm_head(hk[:-1]), -1)
            for i in range(len(d) - k - 1):
                if m[i + k + 1]:
                    total, n = total - logp[i, d[i + k + 1]].item(), n + 1
        per_depth.append(total / n)
    return sum(per_depth) / len(per_depth)


@pytest.mark.parametrize("depth", [1, 2])
def test_the_mtp_loss_is_each_depths_cross_entropy_and_trains_the_module(depth):
    """Right-padded documents of different lengths, a loss mask (SFT) and micro-batches: mtp_loss is the per-depth
    mean cross-entropy over exactly the masked tokens k + 1 ahead; the module's weights get gradients and move."""
    model = _tiny_mtp_model(depth)
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(1, 61, (n,), generator=g).tolist() for n in (9, 5, 12, 3)]
    masks = [[i >= 2 for i in range(len(d))] for d in docs]
    expected = _manual_mtp_loss(model, docs, masks)
    before = model.mtp[0].eh_proj.weight.detach().clone()
    metrics = lm_step(model, make_optimizer(model, 1e-2, 0.0, 0.95), docs, masks, pad_id=0, micro_batch_size=2,
                      mtp_loss_weight=0.3)
    assert metrics["mtp_loss"] == pytest.approx(expected, rel=1e-4)
    assert math.log(61) * 0.5 < metrics["mtp_loss"] < math.log(61) * 2
    assert not torch.equal(model.mtp[0].eh_proj.weight, before)


def test_without_the_weight_no_mtp_loss_and_the_module_stays():
    model = _tiny_mtp_model(1)
    before = model.mtp[0].eh_proj.weight.detach().clone()
    metrics = lm_step(model, make_optimizer(model, 1e-2, 0.0, 0.95), [[1, 2, 3, 4, 5]], None, pad_id=0,
                      mtp_loss_weight=0.0)
    assert "mtp_loss" not in metrics and torch.equal(model.mtp[0].eh_proj.weight, before)


def test_pretrain_a_tiny_v3_with_mtp_logs_the_loss_and_saves_the_layer(tmp_path, capsys):
    from r1lab.commands.pretrain import pretrain
    from r1lab.config import PretrainConfig

    lines = []
    cfg = PretrainConfig(out=str(tmp_path), arch="deepseek-v3", mtp_depth=1, steps=2, documents=32, batch_size=8,
                         hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, kv_lora_rank=8,
                         expert_intermediate_size=32, threads=1)
    model_dir = pretrain(cfg, log=lines.append)
    assert "mtp_loss" in capsys.readouterr().out  # the progress line shows it beside the loss
    assert json.loads((model_dir / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert "model.layers.2.eh_proj.weight" in load_file(str(model_dir / "model.safetensors"))
    model = load_model(model_dir)
    assert len(model.mtp) == 1
    facts = json.loads((tmp_path / "architecture.json").read_text())  # the main model's count, V3's convention
    assert facts["parameters"] + facts["mtp_parameters"] == sum(p.numel() for p in model.parameters())
    assert facts["mtp_parameters"] == sum(p.numel() for p in model.mtp.parameters()) > 0


def test_mtp_depth_needs_the_deepseek_v3_architecture():
    from r1lab.config import PretrainConfig

    with pytest.raises(ValueError, match="mtp_depth 1: multi-token prediction is DeepSeek-V3's"):
        PretrainConfig(mtp_depth=1).check()


# --- speculative decoding with the MTP module as the draft -------------------------------------------------------


class CountingTokenizer:
    """What the engine needs of a tokenizer, for a vocabulary of any size: no end-of-text, ids as text."""

    def __init__(self):
        self.eos_ids, self.pad_id = set(), 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def _spec_model(vocab, scale, depth=1):
    torch.manual_seed(0)
    cfg = ModelConfig.from_hf({**transformers.DeepseekV3Config(num_hidden_layers=2, **{**TINY_V3, "vocab_size": vocab})
                               .to_dict(), "num_nextn_predict_layers": depth})
    return _randomise(CausalLM(cfg), scale)


@pytest.mark.parametrize("k, depth", [(1, 1), (3, 1), (2, 2), (3, 2)])  # depth >= k: drafts from the depths
def test_speculative_greedy_decoding_gives_the_engines_tokens(k, depth):
    from r1lab.engine.engine import Engine

    model = _spec_model(61, 0.3, depth)
    prompts = [[3, 5, 7], [9, 1], [4, 4, 4, 4, 2]]  # left padding in the batch
    plain = Engine(model, CountingTokenizer()).generate(prompts, num_samples=2, max_new_tokens=12, temperature=0)
    engine = Engine(model, CountingTokenizer(), speculative="mtp", speculative_tokens=k)
    fast = engine.generate(prompts, num_samples=2, max_new_tokens=12, temperature=0)
    assert [s.token_ids for s in fast] == [s.token_ids for s in plain]
    assert len({tuple(s.token_ids) for s in plain}) == 3 and all(len(s.token_ids) == 12 for s in fast)
    for a, b in zip(plain, fast):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5) and a.finish_reason == b.finish_reason
    counts = engine.speculative_counts
    assert 0 < counts["accepted"] < counts["drafted"]  # both the accepted and the rejected path ran


@pytest.mark.parametrize("k, depth", [(1, 1), (2, 1), (2, 2)])
def test_speculative_rows_that_end_early_leave_the_batch_with_their_own_tokens(k, depth):
    """Rows ended by end-of-text or their own token limit (also inside a step's kept drafts) are dropped from the
    batch (both caches, every per-row tensor, each row's generator): greedy, the plain engine's tokens; sampled with
    per-prompt seeds, each row's tokens are those it samples alone."""
    from r1lab.engine.engine import Engine

    model = _spec_model(61, 0.3, depth)
    tok = CountingTokenizer()
    tok.eos_ids = {7, 11, 23}
    prompts = [[3, 5, 7], [9, 1], [4, 4, 4, 4, 2], [8], [2, 2]]
    settings = dict(num_samples=2, max_new_tokens=[3, 16, 9, 16, 5])
    plain = Engine(model, tok).generate(prompts, temperature=0, **settings)
    engine = Engine(model, tok, speculative="mtp", speculative_tokens=k)
    fast = engine.generate(prompts, temperature=0, **settings)
    assert [s.token_ids for s in fast] == [s.token_ids for s in plain]
    assert [s.finish_reason for s in fast] == [s.finish_reason for s in plain]
    assert len({len(s.token_ids) for s in fast}) >= 3 and {s.finish_reason for s in fast} == {"stop", "length"}
    for a, b in zip(plain, fast):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    seeds = [11, 12, 13, 14, 15]
    batch = engine.generate(prompts, temperature=1.0, seed=seeds, **settings)
    for i, p in enumerate(prompts):
        alone = engine.generate([p], num_samples=2, max_new_tokens=settings["max_new_tokens"][i], temperature=1.0,
                                seed=[seeds[i]])
        assert [s.token_ids for s in alone] == [s.token_ids for s in batch[2 * i : 2 * i + 2]], i
        assert [s.drafted for s in alone] == [s.drafted for s in batch[2 * i : 2 * i + 2]], i


def chi_square_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test of counts against expected counts (cells expecting fewer than 5 pooled into one)."""
    small = expected < 5
    observed = torch.cat([observed[~small], observed[small].sum()[None]]).double()
    expected = torch.cat([expected[~small], expected[small].sum()[None]]).double()
    stat = ((observed - expected) ** 2 / expected.clamp_min(1e-12)).sum()
    return float(torch.special.gammaincc(torch.tensor((len(expected) - 1) / 2.0, dtype=torch.float64), stat / 2))


def _dense_pair(vocab, tmp_path, scale):
    """A dense model and, saved in tmp_path/draft for `--speculative draft:DIR`, a noisy copy of it (a draft that
    agrees with it often, not always)."""
    torch.manual_seed(0)
    model = _randomise(CausalLM(ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)),
                       scale)
    draft = CausalLM(model.config)
    with torch.no_grad():
        for mine, theirs in zip(draft.parameters(), model.parameters()):
            mine.copy_(theirs + 0.5 * scale * torch.randn_like(theirs))
    save_model(draft, tmp_path / "draft")
    return model, f"draft:{tmp_path / 'draft'}"


@pytest.mark.parametrize("k", [1, 3])
def test_a_draft_model_gives_the_models_greedy_tokens(tmp_path, k):
    from r1lab.engine.engine import Engine

    model, draft = _dense_pair(61, tmp_path, 0.3)
    prompts = [[3, 5, 7], [9, 1], [4, 4, 4, 4, 2]]  # left padding in the batch
    plain = Engine(model, CountingTokenizer()).generate(prompts, num_samples=2, max_new_tokens=12, temperature=0)
    engine = Engine(model, CountingTokenizer(), speculative=draft, speculative_tokens=k)
    fast = engine.generate(prompts, num_samples=2, max_new_tokens=12, temperature=0)
    assert [s.token_ids for s in fast] == [s.token_ids for s in plain]
    for a, b in zip(plain, fast):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert all(0 < s.drafted <= 12 * k for s in fast)
    assert 0 < engine.speculative_counts["accepted"] < engine.speculative_counts["drafted"]
    assert engine.speculative_counts["accepted"] == sum(s.accepted for s in fast)
    with pytest.raises(ValueError, match="vocabulary of 61 tokens, the model 62: a draft model shares"):
        Engine(CausalLM(dataclasses.replace(model.config, vocab_size=62)), CountingTokenizer(), speculative=draft)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_the_model_drafting_for_itself_has_every_draft_accepted(tmp_path, k):
    """A draft model that is the model: every draft of every chain is the model's own greedy token, so each is
    kept, in rows of different prompt lengths that end at different steps. A draft model reading a wrong position,
    column or key mask (in its catch-up or its chained steps) drafts something else somewhere and fails this."""
    from r1lab.engine.engine import Engine

    model, _ = _dense_pair(61, tmp_path, 0.3)
    save_model(model, tmp_path / "self")
    prompts = [[3, 5, 7], [9, 1], [4, 4, 4, 4, 2, 8, 6]]
    engine = Engine(model, CountingTokenizer(), speculative=f"draft:{tmp_path / 'self'}", speculative_tokens=k)
    fast = engine.generate(prompts, max_new_tokens=[13, 9, 16], temperature=0)
    assert [len(s.token_ids) for s in fast] == [13, 9, 16]
    assert [s.accepted for s in fast] == [s.drafted for s in fast] and all(s.drafted > 0 for s in fast)
    # k drafts a step, k + 1 tokens a step after the prefill's first: a row stops drafting once it has its tokens
    assert [s.drafted for s in fast] == [k * -(-(n - 1) // (k + 1)) for n in (13, 9, 16)]


def test_a_row_ending_at_a_kept_draft_keeps_no_token_after_it(tmp_path):
    """The model drafting for itself keeps all 4 drafts of a step; one of them is the end-of-text token: the row ends
    there, with the plain engine's tokens and finish reason, not the kept drafts and bonus token after it."""
    from r1lab.engine.engine import Engine

    model, _ = _dense_pair(61, tmp_path, 0.3)
    save_model(model, tmp_path / "self")
    prompts, tok = [[3, 5, 7], [9, 1]], CountingTokenizer()
    [first, _] = Engine(model, tok).generate(prompts, max_new_tokens=16, temperature=0)
    end = first.token_ids[2]  # the second draft of the first step (the prefill gave token 0)
    assert end not in first.token_ids[:2]
    tok.eos_ids = {end}
    plain = Engine(model, tok).generate(prompts, max_new_tokens=16, temperature=0)
    fast = Engine(model, tok, speculative=f"draft:{tmp_path / 'self'}", speculative_tokens=4).generate(
        prompts, max_new_tokens=16, temperature=0)
    assert len(plain[0].token_ids) == 3 and plain[0].finish_reason == "stop"
    assert [(s.token_ids, s.finish_reason) for s in fast] == [(s.token_ids, s.finish_reason) for s in plain]


def _chained_mtp_reference(model, prompt, completion, k):
    """The draft logits of greedy speculative decoding with k chained MTP drafts, a (k, V) tensor per step, each
    computed from scratch without a cache: the module over the prompt and the tokens kept so far (position i reading
    the model's hidden state at i and token i + 1), then the chain (its own block output and the draft before)."""
    x = torch.tensor([prompt + completion])
    emb, steps = model.model.embed_tokens, []
    pos = len(prompt)  # x[pos] is the next token to feed (pending)
    while pos < x.shape[1] - 1:
        h = model.hidden_states(x[:, : pos + 1])
        H, E, logits = h[:, :pos], emb(x[:, 1 : pos + 1]), []
        for _ in range(k):
            cos, sin = model._rope(torch.arange(H.shape[1])[None], h.dtype)
            out = model.mtp[0].predict(H, E, cos, sin, None)[:, -1:]
            logits.append(model.lm_head(model.mtp[0].shared_head.norm(out))[0, 0])
            H, E = torch.cat([H, out], 1), torch.cat([E, emb(logits[-1].argmax()[None, None])], 1)
        n = 0
        while n < k and pos + 1 + n < x.shape[1] and int(logits[n].argmax()) == int(x[0, pos + 1 + n]):
            n += 1
        steps.append(torch.stack(logits))
        pos += n + 1
    return steps


def _depth_mtp_reference(model, prompt, completion, k):
    """The draft logits of greedy speculative decoding with k drafts from k MTP depths, a (k, V) tensor per step,
    each computed from scratch as training computes the depths (mtp_hidden_states, no cache): draft j from depth j
    at the last verified position p, which reads depth j - 1's output at p and token p + j (the pending token, then
    the drafts); what lies after p + j is never read (causal), so it is filled with 0."""
    x, steps = prompt + completion, []
    pos = len(prompt)  # x[pos] is the next token to feed (pending); p = pos - 1
    while pos < len(x) - 1:
        drafts, logits = [], []
        for j in range(k):
            seq = torch.tensor([x[: pos + 1] + drafts + [0] * (k - len(drafts))])
            outs = model.mtp_hidden_states(model.hidden_states(seq), seq, depth=j + 1)
            logits.append(model.lm_head(outs[j][0, pos - 1]))
            drafts.append(int(logits[-1].argmax()))
        n = 0
        while n < k and pos + 1 + n < len(x) and drafts[n] == x[pos + 1 + n]:
            n += 1
        steps.append(torch.stack(logits))
        pos += n + 1
    return steps


def _drafts_kept_matching(model, reference, k, monkeypatch) -> int:
    """Greedy decoding of prompts of 3, 1 and 5 tokens with k MTP drafts a step: every draft's logits (each
    proposal's) equal reference(model, prompt, completion, k)'s, step by step. Returns the drafts kept."""
    from r1lab.engine import speculative
    from r1lab.engine.engine import Engine

    proposed = []
    propose = speculative.Greedy.propose
    monkeypatch.setattr(speculative.Greedy, "propose", lambda self, logits: proposed.append(logits[0]) or
                        propose(self, logits))
    engine = Engine(model, CountingTokenizer(), speculative="mtp", speculative_tokens=k)
    kept = 0
    for prompt in ([3, 5, 1], [2], [4, 4, 6, 4, 2]):
        proposed.clear()
        with torch.no_grad():
            [sample] = engine.generate([prompt], max_new_tokens=14, temperature=0)
            expected = reference(model, prompt, list(sample.token_ids), k)
        assert len(proposed) == k * len(expected) == sample.drafted
        torch.testing.assert_close(torch.stack(proposed), torch.cat(expected), atol=2e-3, rtol=1e-3)
        kept += sample.accepted
    return kept


@pytest.mark.parametrize("k", [2, 3])
def test_drafts_from_mtp_depths_are_the_depths_own_computed_from_scratch(k, monkeypatch):
    """With k MTP depths (here 3), draft j comes from depth j, as DeepSeek-V3 trains them: every draft's logits equal
    the depths computed without a cache (the training forward), step by step, for prompts of different lengths (a
    1-token prompt leaves the deeper depths no position of the prompt to read). A depth that reads the wrong
    position, a stale key, another depth's keys or the normalised output fails this."""
    assert _drafts_kept_matching(_spec_model(7, 1.0, depth=3), _depth_mtp_reference, k, monkeypatch) > 6


@pytest.mark.parametrize("k", [2, 3])
def test_chained_mtp_drafts_are_the_modules_own_computed_from_scratch(k, monkeypatch):
    """Every draft's logits with k chained MTP drafts equal the module's recomputed without a cache, step by step,
    for prompts of different lengths. A chain that reads a stale key, a wrong position or the normalised state
    instead of the block's output gives other logits somewhere and fails this."""
    # chains were kept past their first draft, too
    assert _drafts_kept_matching(_spec_model(7, 1.0), _chained_mtp_reference, k, monkeypatch) > 6


@pytest.mark.parametrize("drafter, top_p, k", [("mtp", 1.0, 1), ("mtp", 0.8, 1), ("draft", 1.0, 1), ("mtp", 1.0, 2),
                                               ("draft", 0.8, 2), ("mtp-depth-2", 0.8, 2)])
def test_speculative_sampling_draws_from_the_models_own_distribution(drafter, top_p, k, tmp_path):
    """A vocabulary of 5: the empirical distribution of 3 sampled tokens (125 outcomes; an accepted draft brings a
    second token in the same step, a rejected one a token from the residual) against the exact one computed from
    the model's full forward passes, by a chi-square test. The control: the same counts against the distribution
    that always keeping the draft would give (the second token from the MTP module) are rejected by the test."""
    from r1lab.engine.engine import Engine
    from r1lab.engine.sampling import sampling_probs

    V, n, T = 5, 6000, 0.9
    model, speculative = _dense_pair(V, tmp_path, 0.5) if drafter == "draft" else \
        (_spec_model(V, 0.5, 2 if drafter == "mtp-depth-2" else 1), "mtp")
    prompt = [1, 3, 2]
    engine = Engine(model, CountingTokenizer(), speculative=speculative, speculative_tokens=k)
    samples = engine.generate([prompt], num_samples=n, max_new_tokens=3, temperature=T, top_p=top_p, seed=0)
    assert all(len(s.token_ids) == 3 for s in samples)
    seqs = torch.cartesian_prod(*[torch.arange(V)] * 3)  # (125, 3)
    index = {tuple(q): i for i, q in enumerate(seqs.tolist())}
    observed = torch.zeros(len(seqs))
    for s in samples:
        observed[index[tuple(s.token_ids)]] += 1
    with torch.no_grad():
        ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)  # (125, P + 3)
        logits = model(ids)[:, len(prompt) - 1 : -1]  # (125, 3, V) the distributions of the 3 tokens
        probs = sampling_probs(logits.reshape(-1, V), T, 0, top_p).view(len(seqs), 3, V)
        exact = probs.gather(-1, seqs[:, :, None]).squeeze(-1).prod(-1)  # (125,)
        if drafter == "draft":  # the draft model's distribution of token 2
            draft_logits = engine.draft(ids)[:, len(prompt)]
        else:  # the module's, from the prompt's end and token 1
            draft_logits = model.lm_head(model.mtp_hidden_states(model.hidden_states(ids), ids)[0][:, len(prompt) - 1])
        draft = sampling_probs(draft_logits, T, 0, top_p).gather(-1, seqs[:, 1:2]).squeeze(-1)
    assert abs(exact.sum().item() - 1) < 1e-4
    assert chi_square_pvalue(observed, exact * n) > 1e-3
    token = probs.gather(-1, seqs[:, :, None]).squeeze(-1)  # (125, 3) each token's probability
    always_kept = token[:, 0] * draft * token[:, 2]
    assert chi_square_pvalue(observed, always_kept * n / always_kept.sum()) < 1e-6
    assert 0 < engine.speculative_counts["accepted"] < engine.speculative_counts["drafted"]


def test_speculative_decoding_refuses_what_it_does_not_do():
    from r1lab.engine.engine import Engine

    model = _spec_model(11, 0.1)
    with pytest.raises(ValueError, match="needs a model with a multi-token prediction module"):
        Engine(CausalLM(dataclasses.replace(model.config, mtp_depth=0)), CountingTokenizer(), speculative="mtp")
    engine = Engine(model, CountingTokenizer(), speculative="mtp")
    with pytest.raises(ValueError, match="does not support stop_strings"):
        engine.generate([[1, 2]], max_new_tokens=4, stop_strings=("x",))
    from r1lab.config import EvalConfig

    for bad in ("draft:", "draft: ", "mtp2", "draft"):
        with pytest.raises(ValueError, match="is not none, mtp or draft:DIR"):
            EvalConfig(speculative=bad).check()
    from r1lab.config import ServeConfig

    for cfg, said in ((EvalConfig(speculative_tokens=2), "speculative_tokens 2 needs speculative mtp or draft:DIR"),
                      (EvalConfig(speculative="mtp", speculative_tokens=0), "speculative_tokens: 0 is not in"),
                      (EvalConfig(speculative="mtp", speculative_tokens=9), "speculative_tokens: 9 is not in"),
                      (ServeConfig(speculative="mtp", speculative_tokens=2), "speculative_tokens 2 needs speculative mtp or draft:DIR, and not serve")):
        with pytest.raises(ValueError, match=said):
            cfg.check()
    with pytest.raises(ValueError, match="speculative_tokens 0 is not between 1 and 8"):
        Engine(model, CountingTokenizer(), speculative="mtp", speculative_tokens=0)


def test_eval_with_speculative_mtp_reports_what_plain_eval_does_greedy(tmp_path, capsys):
    """`r1lab eval --speculative mtp` at temperature 0 on a V3 with its MTP layer: the same figures and completions
    as without it, and the throughput reported; a model without the module, or tools, are refused."""
    from r1lab.cli import main

    _save_spec_model(tmp_path / "m")
    results = {}
    for mode, chunk, k in (("none", "64", "1"), ("mtp", "64", "1"), ("mtp", "1", "1"), ("mtp", "64", "3")):
        out = tmp_path / f"{mode}-{chunk}-{k}.json"  # one prompt per generate call, too; and 3 drafts a step
        main(["eval", "--model", str(tmp_path / "m"), "--problems", "3", "--samples", "2", "--temperature", "0",
              "--max-new-tokens", "8", "--speculative", mode, "--out", str(out), "--threads", "1",
              "--prompts-per-chunk", chunk, "--speculative-tokens", k])
        results[mode if chunk == "64" and k == "1" else f"mtp-{chunk}-{k}"] = json.loads(out.read_text())["test"]
    for other in ("mtp", "mtp-1-1", "mtp-64-3"):
        assert [r["samples"] for r in results["none"]["records"]] == [r["samples"] for r in results[other]["records"]]
    assert results["mtp"]["tokens_per_s"] > 0 and 0 <= results["mtp"]["acceptance"] <= 1
    assert "acceptance" not in results["none"]
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tmp_path / "m"), "--speculative", "mtp", "--tools", "python"])
    assert "speculative mtp does not run with tools 'python'" in capsys.readouterr().err


def _save_spec_model(path, mtp=True):
    """A random V3 (with its MTP layer, or without) and the tiny tokenizer, saved as a model directory."""
    from r1lab.model.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = _spec_model(tok.vocab_size, 0.3)
    save_model(model if mtp else CausalLM(dataclasses.replace(model.config, mtp_depth=0)), path)
    tok.save(path)
    return path


def test_sample_with_speculative_mtp_keeps_what_plain_sampling_keeps_greedy(tmp_path, capsys):
    from r1lab.cli import main

    model, rows = _save_spec_model(tmp_path / "m"), {}
    for mode in ("none", "mtp"):
        out = tmp_path / mode / "sft.jsonl"
        main(["sample", "--model", str(model), "--problems", "3", "--samples", "2", "--temperature", "0",
              "--max-new-tokens", "8", "--min-tokens", "0", "--language", "", "--speculative", mode, "--out", str(out),
              "--threads", "1"])
        rows[mode] = (out.read_text(), json.loads((out.parent / "sft.summary.json").read_text()))
    assert rows["mtp"][0] == rows["none"][0]
    assert 0 <= rows["mtp"][1].pop("speculative_acceptance") <= 1
    assert rows["mtp"][1] == {**rows["none"][1], "out": rows["mtp"][1]["out"]}


@pytest.mark.parametrize("k", [1, 3])
def test_grpo_rollouts_with_mtp_drafts_carry_the_models_own_log_probs(k):
    """GRPO's sampler with speculation: greedy, the plain engine's completions; sampled, each token's recorded
    log-prob is the one the model's own forward pass gives it (what the update's ratio is taken against)."""
    import dataclasses

    from r1lab.config import GRPOConfig
    from r1lab.engine.engine import Engine
    from r1lab.model.tokenizer import build_tiny_tokenizer
    from r1lab.rewards.tasks import get_task
    from r1lab.train.grpo import sample_rollouts

    tok = build_tiny_tokenizer()
    model = _spec_model(tok.vocab_size, 0.3)
    problems = get_task("arithmetic").problems("train", 3, 0)
    greedy = GRPOConfig(samples_per_prompt=2, max_new_tokens=10, temperature=0)  # (GRPO's check wants > 0)
    plain, fast = (sample_rollouts(Engine(model, tok, speculative=mode, speculative_tokens=k if mode == "mtp" else 1),
                                   problems, greedy, [1, 2, 3]) for mode in ("none", "mtp"))
    assert fast.completion_ids == plain.completion_ids and fast.texts == plain.texts
    engine = Engine(model, tok, speculative="mtp", speculative_tokens=k)
    rollouts = sample_rollouts(engine, problems, dataclasses.replace(greedy, temperature=1.0), [1, 2, 3])
    assert 0 < engine.speculative_counts["accepted"] < engine.speculative_counts["drafted"]
    for prompt, completion, recorded in zip(rollouts.prompt_ids, rollouts.completion_ids, rollouts.old_logprobs):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion]))[0, len(prompt) - 1 : -1]  # (T, V)
        own = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        assert recorded == pytest.approx(own.tolist(), abs=1e-4)


def test_grpo_with_speculative_mtp_logs_each_steps_acceptance(tmp_path):
    from r1lab.cli import main

    model = _save_spec_model(tmp_path / "m")
    main(["grpo", "--model", str(model), "--out", str(tmp_path / "run"), "--steps", "2", "--prompts-per-step", "2",
          "--samples-per-prompt", "2", "--max-new-tokens", "6", "--eval-every", "0", "--save-every", "0",
          "--speculative", "mtp", "--threads", "1", "--report-to", "none"])
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["speculative/drafted"] > 0 and 0 <= s["speculative/acceptance"] <= 1 for s in steps] == [True, True]


@pytest.mark.parametrize("flags, said", [
    (["--rollout-slots", "2"], "speculative mtp does not run with rollout_slots 2"),
    (["--async-steps", "1"], "speculative mtp does not run with async_steps 1"),
    (["--tools", "python", "--suppress-eos", "true"], "does not run with tools 'python', suppress_eos True"),
    ([], "needs a model with a multi-token prediction module")])
def test_grpo_refuses_speculation_it_cannot_run_with_a_clear_error(tmp_path, capsys, flags, said):
    from r1lab.cli import main

    model = _save_spec_model(tmp_path / "m", mtp=bool(flags))  # no flags: a model without the module
    with pytest.raises(SystemExit):
        main(["grpo", "--model", str(model), "--out", str(tmp_path / "run"), "--steps", "1", "--eval-every", "0",
              "--max-new-tokens", "6", "--speculative", "mtp", "--threads", "1", *flags])
    err = capsys.readouterr().err
    assert said in err and err.startswith("r1lab grpo: error:") and "Traceback" not in err, err


def test_sft_of_a_v3_with_its_mtp_layer_trains_it_and_logs_mtp_loss(tmp_path):
    from r1lab.config import SFTConfig
    from r1lab.model.tokenizer import build_tiny_tokenizer
    from r1lab.train.supervised import sft

    tok = build_tiny_tokenizer()
    model = _spec_model(tok.vocab_size, 0.05)
    model.config.eos_token_id = tok.pad_id
    save_model(model, tmp_path / "init")
    tok.save(tmp_path / "init")
    rows = [{"messages": [{"role": "user", "content": f"{a}+{a}"},
                          {"role": "assistant", "content": f" <think>{a}+{a}={2 * a}</think> <answer>{2 * a}</answer>"}]}
            for a in range(6)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = sft(SFTConfig(model=str(tmp_path / "init"), data=str(tmp_path / "chat.jsonl"), out=str(tmp_path / "run"),
                        steps=2, batch_size=3, lr=1e-2, template="r1zero"), log=lambda *_: None)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in metrics if "loss" in m]
    assert len(trained) == 2 and all(m["mtp_loss"] > 0 for m in trained)
    tuned = load_model(out)
    assert not torch.equal(tuned.mtp[0].eh_proj.weight, model.mtp[0].eh_proj.weight)
