"""The sampler: KV-cache decoding equals full recomputation, seeds reproduce, stop rules cut exactly."""

import pytest
import torch

from r1lab.engine.engine import Engine
from r1lab.engine.sampling import sample_next
from r1lab.model.architecture import ModelConfig
from r1lab.model.tokenizer import build_tiny_tokenizer
from r1lab.model.transformer import CausalLM


@pytest.fixture(scope="module")
def engine(sharp_engine):
    return sharp_engine()


PROMPTS = ["3+5+2", "12+7", "9"]


def prompt_ids(engine):
    return [engine.tokenizer.encode(p) for p in PROMPTS]


def greedy_without_cache(model, ids, n):
    seq = list(ids)
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(ids):]


def test_greedy_with_cache_equals_recomputation(engine):
    ids = prompt_ids(engine)
    out = engine.generate(ids, num_samples=2, max_new_tokens=12, temperature=0)
    assert len(out) == 6
    for i, s in enumerate(out):
        assert s.prompt_index == i // 2
        assert s.token_ids == greedy_without_cache(engine.model, ids[i // 2], 12)
        assert s.finish_reason == "length"


def test_logprobs_match_full_forward(engine):
    ids = prompt_ids(engine)
    out = engine.generate(ids, num_samples=3, max_new_tokens=10, temperature=0.7, seed=1)
    for s in out:
        seq = torch.tensor([ids[s.prompt_index] + s.token_ids])
        logp = torch.log_softmax(engine.model(seq)[0, :-1] / 0.7, -1)
        ref = logp[len(ids[s.prompt_index]) - 1:].gather(-1, torch.tensor(s.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(ref, torch.tensor(s.logprobs), atol=1e-5)


def test_same_seed_same_samples(engine):
    ids = prompt_ids(engine)
    kw = dict(num_samples=4, max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50)
    a = engine.generate(ids, seed=7, **kw)
    b = engine.generate(ids, seed=7, **kw)
    c = engine.generate(ids, seed=8, **kw)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.token_ids for s in a] != [s.token_ids for s in c]


def test_eos_stops_exactly_and_finished_rows_stay_finished(engine):
    ids = prompt_ids(engine)
    free = engine.generate(ids, max_new_tokens=12, temperature=0)
    stop_token = free[0].token_ids[4]
    first = free[0].token_ids.index(stop_token)
    engine.tokenizer.eos_ids = {stop_token}
    try:
        out = engine.generate(ids, max_new_tokens=12, temperature=0)
        suppressed = engine.generate(ids, max_new_tokens=12, temperature=0, suppress_eos=True)
    finally:
        engine.tokenizer.eos_ids = set()
    assert out[0].token_ids == free[0].token_ids[: first + 1]  # the stop token is kept, nothing after it
    assert out[0].finish_reason == "stop"
    for s, f in zip(out[1:], free[1:]):  # the other rows are unaffected by row 0 finishing
        cut = f.token_ids.index(stop_token) + 1 if stop_token in f.token_ids else len(f.token_ids)
        assert s.token_ids == f.token_ids[:cut]
    assert all(len(s.token_ids) == 12 and stop_token not in s.token_ids for s in suppressed)


def test_stop_string_cuts_text_right_after_it(engine):
    ids = prompt_ids(engine)
    free = engine.generate(ids[:1], max_new_tokens=16, temperature=0)[0]
    stop = free.text[5:8]
    out = engine.generate(ids[:1], max_new_tokens=16, temperature=0, stop_strings=(stop,))[0]
    end = free.text.index(stop) + len(stop)
    assert out.text == free.text[:end]
    assert out.finish_reason == "stop"
    # generation ended on the token that completed the stop string (a tag token may run past it)
    assert stop in engine.tokenizer.decode(out.token_ids)
    assert stop not in engine.tokenizer.decode(out.token_ids[:-1])


def test_top_k_one_and_tiny_top_p_are_greedy(engine):
    ids = prompt_ids(engine)
    greedy = [s.token_ids for s in engine.generate(ids, max_new_tokens=8, temperature=0)]
    k1 = [s.token_ids for s in engine.generate(ids, max_new_tokens=8, temperature=1.0, top_k=1, seed=3)]
    p0 = [s.token_ids for s in engine.generate(ids, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=3)]
    assert greedy == k1 == p0


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, 1.0, 0, 0.8, g)[0]) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8; 0.15 and 0.05 are cut


def test_sampler_frequencies_match_the_distribution():
    # Two-level inverse CDF over a vocabulary that is not a multiple of the block size; zero-weight tokens never come.
    probs = torch.rand(300) ** 4
    probs[::7] = 0.0
    probs /= probs.sum()
    logits = probs.log().expand(20_000, -1)
    tokens, logprobs = sample_next(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=300).float() / len(tokens)
    assert freq[::7].sum() == 0
    assert (freq - probs).abs().max() < 0.012
    assert torch.allclose(logprobs, probs.log()[tokens], atol=1e-5)


def test_per_row_settings_mix_greedy_top_k_and_sampling():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 3
    temperature, top_k = torch.tensor([[0.0], [1.0], [0.7]]), torch.tensor([[0], [1], [0]])
    tokens, logprobs = sample_next(logits, temperature, top_k, torch.tensor([[1.0], [1.0], [0.9]]),
                                   torch.Generator().manual_seed(0))
    assert tokens[0] == logits[0].argmax() and tokens[1] == logits[1].argmax()  # greedy row, top-k 1 row
    assert torch.isclose(logprobs[0], torch.log_softmax(logits[0], -1).max())
    assert torch.isclose(logprobs[2], torch.log_softmax(logits[2] / 0.7, -1)[tokens[2]])


def test_per_prompt_settings_and_seeds_do_not_depend_on_batch_mates(engine):
    ids = prompt_ids(engine)
    kw = dict(num_samples=2, temperature=[1.0, 0.0, 0.8], top_p=[0.9, 1.0, 1.0], max_new_tokens=[5, 9, 12])
    both = engine.generate(ids, seed=[11, 12, 13], **kw)
    assert [len(s.token_ids) for s in both] == [5, 5, 9, 9, 12, 12]
    assert all(s.finish_reason == "length" for s in both)
    for i in range(3):  # the same prompt alone, with its own settings and seed, gives the same samples
        alone = engine.generate([ids[i]], seed=[[11, 12, 13][i]], num_samples=2,
                                **{k: [v[i]] for k, v in kw.items() if k != "num_samples"})
        assert [s.token_ids for s in alone] == [s.token_ids for s in both[2 * i : 2 * i + 2]]
    greedy = engine.generate([ids[1]], max_new_tokens=9, temperature=0)[0]
    assert both[2].token_ids == both[3].token_ids == greedy.token_ids
    with pytest.raises(ValueError, match="per-prompt"):
        engine.generate(ids, temperature=[1.0, 1.0])


def test_on_step_streams_every_token_and_can_end_a_row(engine):
    ids = prompt_ids(engine)
    streamed: dict[int, list[int]] = {}

    def on_step(rows, tokens):
        for r, t in zip(rows, tokens):
            streamed.setdefault(r, []).append(t)
        return [1] if len(streamed[1]) == 3 else None  # the "client" of row 1 goes away after 3 tokens

    out = engine.generate(ids, max_new_tokens=10, temperature=0, on_step=on_step)
    assert [streamed[i] for i in range(3)] == [s.token_ids for s in out]
    assert len(out[1].token_ids) == 3 and out[1].finish_reason == "abort"
    assert [len(out[0].token_ids), len(out[2].token_ids)] == [10, 10]


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, seed=3),
                                      dict(temperature=0.8, top_k=5, seed=[1, 2, 3], max_new_tokens=[4, 9, 12])])
@pytest.mark.parametrize("check_every", [16, 1])  # 1: finished rows are compacted away as soon as half are done
def test_static_decoding_gives_the_dynamic_paths_tokens(engine, settings, check_every, monkeypatch):
    monkeypatch.setattr("r1lab.engine.engine.FINISHED_CHECK_EVERY", check_every)
    from r1lab.engine.static_decode import StaticDecoder

    selected = []
    select = StaticDecoder.select
    monkeypatch.setattr(StaticDecoder, "select", lambda self, keep: selected.append(len(keep)) or select(self, keep))
    # Fixed shapes (what a CUDA graph replays): the whole cache attended under a mask, keys written at a tensor
    # position, no compaction. Same tokens and log-probs as the growing cache, with rows finishing at end-of-text.
    static = Engine(engine.model, engine.tokenizer, decode="static")
    engine.tokenizer.eos_ids = {engine.generate(prompt_ids(engine), max_new_tokens=8, temperature=0)[0].token_ids[4]}
    try:
        settings = dict(settings)
        args = dict(num_samples=2, max_new_tokens=settings.pop("max_new_tokens", 12), **settings)
        dynamic_out = engine.generate(prompt_ids(engine), **args)
        static_out = static.generate(prompt_ids(engine), **args)
    finally:
        engine.tokenizer.eos_ids = set()
    if check_every == 1 and "seed" in settings and isinstance(settings["seed"], list):
        assert selected == [2]  # limits 4 and 9 end four of six rows: the last two go on in a batch of two
    if settings.get("temperature") == 0.0:  # greedy: row 0 meets its 5th token again, so it ends early
        assert dynamic_out[0].finish_reason == "stop" and len(dynamic_out[0].token_ids) < 12
    for d, s in zip(dynamic_out, static_out):
        assert s.token_ids == d.token_ids and s.finish_reason == d.finish_reason
        assert s.logprobs == pytest.approx(d.logprobs, abs=1e-5)


@pytest.mark.slow  # the fast tier decodes Qwen3's q/k norms from the cache in test_deepseek_v3.py (qwen3moe)
def test_qwen3_greedy_with_cache_equals_recomputation_dynamic_and_static():
    """Qwen3's per-head q/k norms and explicit head_dim (24, not 64 / 4) in both cached decode paths."""
    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24, architecture="Qwen3ForCausalLM",
                      qkv_bias=False, qk_norm=True, tie_word_embeddings=False)
    model = CausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    tok.eos_ids = set()
    ids = [tok.encode(p) for p in PROMPTS]
    for decode in ("dynamic", "static"):
        out = Engine(model.eval(), tok, decode=decode).generate(ids, num_samples=2, max_new_tokens=12, temperature=0)
        for i, s in enumerate(out):
            assert s.token_ids == greedy_without_cache(model, ids[i // 2], 12), decode


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])  # flat (the whole row is sorted), middling, peaked (top-k only)
def test_nucleus_equals_the_sorted_definition(scale):
    from r1lab.engine.sampling import NUCLEUS_FIRST_K, _nucleus

    def by_sorting(probs, top_p):
        sorted_probs, order = probs.sort(-1, descending=True)
        keep = ((sorted_probs.cumsum(-1) - sorted_probs) < top_p) | (top_p >= 1.0)
        return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep)

    torch.manual_seed(0)
    probs = (torch.randn(6, 3 * NUCLEUS_FIRST_K) * scale).softmax(-1)
    per_row = torch.tensor([[0.5], [0.9], [0.95], [1.0], [0.99], [1e-6]])
    assert torch.equal(_nucleus(probs, per_row), by_sorting(probs, per_row))
    assert torch.equal(_nucleus(probs, 0.9), by_sorting(probs, torch.tensor(0.9)))


# ---------------------------------------------------------------------------------------------------------------
# vLLM's sampling extras (the server's): penalties and min-p, per row


def reference_penalties(logits: list[float], context: list[int], output: list[int], repetition: float,
                        presence: float, frequency: float) -> list[float]:
    """The definitions, token by token: HF/vLLM's repetition penalty over the prompt and output, then OpenAI's
    frequency and presence penalties over the output."""
    out = list(logits)
    for t in set(context):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in set(output):
        out[t] -= frequency * output.count(t) + presence
    return out


def test_penalties_per_row_match_the_definitions_and_transformers():
    from r1lab.engine.sampling import Penalties

    transformers = pytest.importorskip("transformers")
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(2)) * 3
    contexts = [[1, 2, 2, 5, 9, 30], [3, 3, 3, 7, 11], [0, 39, 20], [4, 8]]
    outputs = [[2, 5, 30], [3, 3, 7, 7, 7], [], [8]]
    values = [(1.3, 0.0, 0.0), (1.0, 0.5, 0.25), (0.8, -1.0, 2.0), (1.0, 0.0, 0.0)]  # a boost, a negative penalty
    got = Penalties.build(values, contexts, outputs, 40, "cpu").apply(logits)
    want = torch.tensor([reference_penalties(row, c, o, *v)
                         for row, c, o, v in zip(logits.tolist(), contexts, outputs, values)])
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got[:3], logits[:3])
    assert torch.equal(got[3], logits[3])  # a neutral row is untouched, bit for bit
    # Rows 0 and 2 are penalised for repetition alone (row 2's presence and frequency count an empty output): the
    # same logits as transformers' processor over the prompt and output tokens
    for r in (0, 2):
        hf = transformers.RepetitionPenaltyLogitsProcessor(values[r][0])(torch.tensor([contexts[r]]), logits[r:r + 1])
        assert torch.equal(got[r], hf[0])


@pytest.mark.parametrize("min_p", [0.02, 0.1, 0.5, 1.0])
def test_min_p_keeps_what_transformers_min_p_keeps(min_p):
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(3)) * 2
    temperature = torch.tensor([[1.0], [0.7]])
    kept = transformers.MinPLogitsWarper(min_p)(None, logits / temperature) > float("-inf")  # (2, V)
    n = 4000
    rows = torch.arange(2).repeat_interleave(n)
    per_row_min_p = torch.tensor([[min_p], [0.0]]) if min_p == 0.02 else torch.full((2, 1), min_p)
    tokens, logprobs = sample_next(logits[rows], temperature[rows], 0, 1.0, torch.Generator().manual_seed(0),
                                   per_row_min_p[rows])
    for r in range(2):
        seen = set(tokens[rows == r].tolist())
        if per_row_min_p[r] > 0:
            assert seen == set(kept[r].nonzero().squeeze(-1).tolist())
        else:  # min_p 0 keeps every token: more than min_p 0.02 would
            assert len(seen) > kept[r].sum()
    # the log-prob is the token's under softmax(logits / temperature), before min-p cuts the row
    assert torch.allclose(logprobs, torch.log_softmax(logits / temperature, -1)[rows, tokens], atol=1e-5)


def test_neutral_extras_leave_every_token_and_logprob_bit_identical():
    """A row at min_p 0 and neutral penalties samples exactly what it sampled before these existed, even beside a
    row that uses them."""
    from r1lab.engine.sampling import NO_PENALTIES, Penalties, row_generator

    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(4)) * 2
    temperature = torch.tensor([[1.0], [0.0], [0.7], [1.3], [1.0]])  # a greedy row among them
    top_k, top_p = torch.tensor([[0], [0], [20], [0], [5]]), torch.tensor([[1.0], [1.0], [0.9], [0.8], [1.0]])
    generators = lambda: [row_generator(seed, 0, "cpu") for seed in range(5)]  # noqa: E731
    before = sample_next(logits, temperature, top_k, top_p, generators())
    contexts = [[1, 2, 3, int(logits[r].argmax())] for r in range(5)]  # each row's favourite token was seen
    values = [(1.5, 0.5, 0.5)] + [NO_PENALTIES] * 4  # row 0 penalised, the others neutral
    min_p = torch.tensor([[0.3], [0.0], [0.0], [0.0], [0.0]])
    after = sample_next(logits, temperature, top_k, top_p, generators(), min_p,
                        Penalties.build(values, contexts, contexts, 300, "cpu"))
    assert torch.equal(after[0][1:], before[0][1:]) and torch.equal(after[1][1:], before[1][1:])
    neutral = Penalties.build([NO_PENALTIES] * 5, contexts, contexts, 300, "cpu")
    again = sample_next(logits, temperature, top_k, top_p, generators(), torch.zeros(5, 1), neutral)
    assert torch.equal(again[0], before[0]) and torch.equal(again[1], before[1])
