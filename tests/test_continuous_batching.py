"""Continuous batching (Engine.generate with max_rows, r1lab/engine/slots.py): a sequence's tokens do not depend on the
slot it gets, who held that slot before, or who runs beside it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1lab.commands.pretrain import tiny_model_config
from r1lab.config import PretrainConfig
from r1lab.engine import slots as slots_module
from r1lab.engine.engine import Engine
from r1lab.engine.static_decode import StaticDecoder
from r1lab.model.tokenizer import build_tiny_tokenizer
from r1lab.model.transformer import CausalLM, KVCache

PROMPTS = ["3+5+2", "12+7", "9", "100+200+300+400", "7*8", "1"]
LIMITS = [30, 4, 17, 9, 2, 24]  # very different lengths, so slots free at different steps
SEEDS = [11, 12, 13, 14, 15, 16]


@pytest.fixture(scope="module")
def engine(sharp_engine):
    return sharp_engine()


def ids(engine):
    return [engine.tokenizer.encode(p) for p in PROMPTS]


SAMPLING = dict(num_samples=2, max_new_tokens=LIMITS, temperature=1.0, top_p=0.9, seed=SEEDS)


def assert_same_samples(got, want):
    assert [s.prompt_index for s in got] == [s.prompt_index for s in want]  # prompt-major, as without slots
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids and g.text == w.text and g.finish_reason == w.finish_reason
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)  # attended widths differ: float rounding only


@pytest.mark.parametrize("max_rows", [1, 3, 5])
def test_each_sequence_in_few_slots_equals_it_generated_alone(engine, max_rows):
    # The last prompts come in only after earlier ones freed their slots: a reused slot whose previous occupant's
    # keys are still in the buffer. Alone, each prompt has the cache to itself.
    crowd = engine.generate(ids(engine), max_rows=max_rows, **SAMPLING)
    for i, prompt in enumerate(ids(engine)):
        alone = engine.generate([prompt], num_samples=2, max_new_tokens=LIMITS[i], temperature=1.0, top_p=0.9,
                                seed=[SEEDS[i]])
        for s in alone:
            s.prompt_index = i  # alone, it is prompt 0
        assert_same_samples(crowd[2 * i : 2 * i + 2], alone)


def test_few_slots_equal_all_at_once_and_reuse_their_rows(engine):
    running: list[int] = []
    out = engine.generate(ids(engine), max_rows=3, on_step=lambda rows, tokens: running.append(len(rows)), **SAMPLING)
    assert_same_samples(out, engine.generate(ids(engine), **SAMPLING))
    assert max(running) == 3  # never more than the slots
    assert sum(running) == sum(len(s.token_ids) for s in out) == 2 * sum(LIMITS)
    # batch-at-a-time in 3 rows would take at least as many steps as each group of 3's longest; reuse takes fewer
    batch_steps = sum(max(len(s.token_ids) for s in out[k : k + 3]) for k in range(0, len(out), 3))
    assert len(running) < batch_steps


@pytest.mark.parametrize("max_rows", [12, 50])
def test_slots_for_every_sequence_is_todays_engine_exactly(engine, max_rows):
    assert engine.generate(ids(engine), max_rows=max_rows, **SAMPLING) == engine.generate(ids(engine), **SAMPLING)


def test_greedy_in_one_slot_equals_all_at_once(engine):
    # One slot: every sequence but the first takes a row another has just left.
    kw = dict(num_samples=3, max_new_tokens=LIMITS, temperature=0)
    assert_same_samples(engine.generate(ids(engine), max_rows=1, **kw), engine.generate(ids(engine), **kw))


def test_latent_attention_cache_rows_are_reused_too():
    # DeepSeek-V3's MLA caches latents, not keys and values: slots move and slide them the same way.
    tok = build_tiny_tokenizer()
    cfg = tiny_model_config(PretrainConfig(arch="deepseek-v3", hidden_size=64, num_layers=2, num_heads=2,
                                           num_kv_heads=2, intermediate_size=128), tok)
    torch.manual_seed(0)
    model = CausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    tok.eos_ids = set()
    engine = Engine(model.eval(), tok)
    assert cfg.mla is not None
    assert_same_samples(engine.generate(ids(engine), max_rows=3, **SAMPLING), engine.generate(ids(engine), **SAMPLING))


def test_end_of_text_stop_strings_and_limits_per_sequence(engine):
    free = engine.generate(ids(engine), num_samples=2, max_new_tokens=20, temperature=0.9, seed=SEEDS)
    stop_token, stop_text = free[0].token_ids[3], free[5].text[4:6]
    kw = dict(num_samples=2, max_new_tokens=LIMITS, temperature=0.9, seed=SEEDS, stop_strings=(stop_text,))
    engine.tokenizer.eos_ids = {stop_token}
    try:
        want = engine.generate(ids(engine), **kw)
        got = engine.generate(ids(engine), max_rows=4, **kw)
        suppressed = engine.generate(ids(engine), max_rows=4, suppress_eos=True, **kw)
    finally:
        engine.tokenizer.eos_ids = set()
    assert {s.finish_reason for s in want} == {"stop", "length"}  # both endings occur
    assert_same_samples(got, want)
    assert all(stop_token not in s.token_ids for s in suppressed)


def test_slides_keep_the_tokens(engine, monkeypatch):
    # Sliding dead columns out of the cache (every step here) moves keys, not what any row attends.
    slides = []
    slide = KVCache.slide
    monkeypatch.setattr(slots_module, "SLIDE_MIN_COLUMNS", 1)
    monkeypatch.setattr(KVCache, "slide", lambda self, shift, used: slides.append(shift) or slide(self, shift, used))
    assert_same_samples(engine.generate(ids(engine), max_rows=2, **SAMPLING), engine.generate(ids(engine), **SAMPLING))
    assert slides


@pytest.mark.parametrize("max_rows", [1, 5])
def test_static_decoding_reuses_its_fixed_rows(engine, max_rows, monkeypatch):
    # The fixed-shape decoder (a CUDA graph on a GPU, eager here): newcomers and slides write into its buffers in
    # place; one slot fills the cache, so it slides; five leave a tail that is compacted into a smaller decoder.
    slides, selected = [], []
    slide, select = KVCache.slide, StaticDecoder.select
    monkeypatch.setattr(KVCache, "slide", lambda self, shift, used: slides.append(shift) or slide(self, shift, used))
    monkeypatch.setattr(StaticDecoder, "select", lambda self, keep: selected.append(len(keep)) or select(self, keep))
    static = Engine(engine.model, engine.tokenizer, decode="static")
    assert_same_samples(static.generate(ids(engine), max_rows=max_rows, **SAMPLING),
                        engine.generate(ids(engine), **SAMPLING))
    assert bool(slides) == (max_rows == 1)
    assert bool(selected) == (max_rows == 5)


def test_a_row_ended_by_the_caller_frees_its_slot(engine):
    def on_step(rows, tokens):
        return [r for r in rows if r % 2 == 0]  # every first sample ends after one token

    out = engine.generate(ids(engine), max_rows=2, on_step=on_step, **SAMPLING)
    full = engine.generate(ids(engine), **SAMPLING)
    for i, (s, f) in enumerate(zip(out, full)):
        if i % 2 == 0:
            assert s.finish_reason == "abort" and s.token_ids == f.token_ids[:1]
        else:
            assert s.token_ids == f.token_ids


@pytest.mark.slow
def test_the_bench_runs_and_both_sides_sample_the_same_tokens():
    # bench/continuous_batching.py at a tiny size: it exits 1 when the two sides' tokens differ.
    bench = Path(__file__).resolve().parent.parent / "bench" / "continuous_batching.py"
    flags = ["--prompts", "4", "--samples", "2", "--slots", "4", "--max-new", "24", "--hidden", "32", "--layers", "1",
             "--repeats", "1", "--eos-tokens", "8"]
    proc = subprocess.run([sys.executable, str(bench), *flags], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(bench.parent.parent)})
    assert proc.returncode == 0, proc.stderr
    assert "the same tokens on every side" in proc.stdout and "continuous / batch-at-a-time:" in proc.stdout
