"""LiveBatch (r1lab/engine/live_batch.py): sequences join and leave a running continuous batch between decode steps, and a
seeded sequence's tokens do not depend on who else runs, joins, leaves or is parked beside it."""

import functools

import pytest
import torch
from test_engine import reference_penalties

from r1lab.engine import live_batch as live_module
from r1lab.engine import slots as slots_module
from r1lab.engine.live_batch import LiveBatch
from r1lab.engine.sampling import row_generator, sample_next

PROMPTS = ["3+5+2", "12+7", "9", "100+200+300+400", "7*8", "1"]
SETTINGS = [dict(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=11),
            dict(max_new_tokens=4, temperature=0.7, seed=12),
            dict(max_new_tokens=17, temperature=1.3, top_k=5, seed=13),
            dict(max_new_tokens=9, temperature=0.0),  # greedy
            dict(max_new_tokens=2, temperature=1.0, seed=15),
            dict(max_new_tokens=24, temperature=0.9, top_p=0.8, top_k=20, seed=16)]


@pytest.fixture(scope="module")
def engine(sharp_engine):
    return sharp_engine()


def run(batch: LiveBatch, events: dict[int, list] | None = None) -> dict[int, list]:
    """Step until nothing runs or waits; events[step] lists calls made before that step. Returns each sequence's
    (token, logprob, finish_reason) triples."""
    out: dict[int, list] = {}
    step = 0
    while not batch.idle or (events and any(k >= step for k in events)):
        for call in (events or {}).get(step, []):
            call()
        for t in batch.step():
            out.setdefault(t.seq, []).append((t.token, t.logprob, t.finish_reason))
        step += 1
    return out


@functools.cache  # the reference every test compares with, decoded once per engine (the tokens are seeded)
def alone(engine, i: int) -> list:
    batch = LiveBatch(engine, 1)
    seq = batch.add(engine.tokenizer.encode(PROMPTS[i]), **SETTINGS[i])
    return run(batch)[seq]


def assert_same(got: list, want: list) -> None:
    assert [t for t, _, _ in got] == [t for t, _, _ in want]
    assert [r for _, _, r in got] == [r for _, _, r in want]
    assert [lp for _, lp, _ in got] == pytest.approx([lp for _, lp, _ in want], abs=1e-5)  # float rounding only


def test_alone_equals_engine_generate(engine):
    for i in (0, 2, 3):
        s = SETTINGS[i]
        want = engine.generate([engine.tokenizer.encode(PROMPTS[i])], max_new_tokens=[s["max_new_tokens"]],
                               temperature=[s["temperature"]], top_p=[s.get("top_p", 1.0)], top_k=[s.get("top_k", 0)],
                               seed=[s.get("seed")])[0]
        got = alone(engine, i)
        assert [t for t, _, _ in got] == want.token_ids
        assert [lp for _, lp, _ in got] == pytest.approx(want.logprobs, abs=1e-5)
        assert got[-1][2] == want.finish_reason == "length" and all(r is None for _, _, r in got[:-1])


def test_same_tokens_alone_or_in_a_crowd_that_joins_leaves_and_parks(engine):
    # Three slots for six sequences: 0 starts alone, others join mid-run (2 and 3 wait for a slot), a stranger is
    # cancelled, 5 is taken out (parked) for a few steps and put back while the rest go on.
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    batch = LiveBatch(engine, 3)
    seq: dict[int, int] = {}
    add = lambda i: lambda: seq.__setitem__(i, batch.add(ids[i], **SETTINGS[i]))  # noqa: E731
    extra = batch.add(ids[1], max_new_tokens=40, seed=99)  # a stranger, cancelled at step 6
    parked = []
    events = {0: [add(0)], 2: [add(5), add(1)], 3: [add(2), add(3)], 5: [add(4)],
              6: [lambda: batch.cancel(extra)], 8: [lambda: parked.append(batch.take(seq[5]))],
              12: [lambda: batch.put(parked[0])]}
    crowd = run(batch, events)
    assert len(crowd[extra]) == 6 and crowd[extra][-1][2] is None  # ended by the cancel, no finish reason
    for i in range(6):
        assert_same(crowd[seq[i]], alone(engine, i))


def test_a_request_starts_at_the_next_step_whatever_runs(engine):
    batch = LiveBatch(engine, 4)
    long = batch.add(engine.tokenizer.encode(PROMPTS[3]), max_new_tokens=50, seed=1)
    for _ in range(10):
        batch.step()
    short = batch.add(engine.tokenizer.encode(PROMPTS[2]), max_new_tokens=3, seed=2)
    assert [t.seq for t in batch.step()] == [long, short]
    assert batch.running == 2 and not batch.waiting


def test_the_cache_grows_and_slides_without_changing_tokens(engine, monkeypatch):
    # A cache of 2 rows x 8 columns must double both ways; dead columns slide out every step they can.
    monkeypatch.setattr(live_module, "INITIAL_ROWS", 1)
    monkeypatch.setattr(live_module, "INITIAL_COLUMNS", 8)
    monkeypatch.setattr(slots_module, "SLIDE_MIN_COLUMNS", 1)
    slides, resizes = [], []
    resize = LiveBatch._resize
    monkeypatch.setattr(LiveBatch, "_resize", lambda self, r, w: resizes.append((r, w)) or resize(self, r, w))
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    batch = LiveBatch(engine, 4)
    seq = {i: batch.add(ids[i], **SETTINGS[i]) for i in range(6)}
    clock = []
    original_step = batch.step
    monkeypatch.setattr(batch, "step", lambda: clock.append(batch.clock) or original_step())
    crowd = run(batch)
    slides = [a - b for a, b in zip(clock, clock[1:]) if b < a]
    assert slides and len(resizes) > 1 and batch.key_mask.shape[0] == 4
    for i in range(6):
        assert_same(crowd[seq[i]], alone(engine, i))


def test_end_of_text_and_stop_strings_end_a_sequence(engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    free = alone(engine, 0)
    text = engine.tokenizer.decode([t for t, _, _ in free])
    engine.tokenizer.eos_ids = {free[5][0]}
    try:
        batch = LiveBatch(engine, 2)
        a = batch.add(ids, **SETTINGS[0])
        b = batch.add(ids, **{**SETTINGS[0], "seed": 11}, stop_strings=(text[2:4],))
        out = run(batch)
    finally:
        engine.tokenizer.eos_ids = set()
    first_eos = [t for t, _, _ in free].index(free[5][0])
    assert [t for t, _, _ in out[a]] == [t for t, _, _ in free][: first_eos + 1] and out[a][-1][2] == "stop"
    assert out[b][-1][2] == "stop" and len(out[b]) <= len(out[a])
    assert text[2:4] in engine.tokenizer.decode([t for t, _, _ in out[b]])


@pytest.mark.slow  # the fast tier moves rows between lanes in test_serve_tools.py (the batcher's parking)
def test_sequences_moved_between_batches_keep_their_tokens(engine):
    # Two batches of the same engine: sequences taken from one mid-run (running or still waiting) and put into the
    # other go on there, and back again.
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    one, two = LiveBatch(engine, 4), LiveBatch(engine, 2)
    seq = {i: one.add(ids[i], **SETTINGS[i]) for i in range(6)}
    out: dict[int, list] = {}
    for step in range(200):
        if step == 3:
            for i in (0, 5, 2):  # 0 and 2 run, 5 still waits for a slot
                two.put(one.take(seq[i]))
        if step == 9:
            one.put(two.take(seq[0]))
        for t in one.step() + two.step():
            out.setdefault(t.seq, []).append((t.token, t.logprob, t.finish_reason))
        if one.idle and two.idle:
            break
    for i in range(6):
        assert_same(out[seq[i]], alone(engine, i))


# vLLM's extras: each sequence its own min-p and penalties, which read its own prompt and output
PENALISED = [dict(max_new_tokens=20, temperature=0.0, repetition_penalty=1.8),  # greedy: the penalty decides alone
             dict(max_new_tokens=25, temperature=1.0, top_k=10, min_p=0.05, repetition_penalty=1.2,
                  presence_penalty=0.7, frequency_penalty=0.4, seed=21),
             dict(max_new_tokens=15, temperature=0.8, frequency_penalty=-0.5, presence_penalty=1.5, seed=22,
                  output_start=1)]  # its prompt's last tokens are output so far (a tool turn's prompt)


def reference_extras(engine, prompt: list[int], s: dict) -> list[int]:
    """Token by token, the whole sequence recomputed: the penalties by their definitions, then the sampler."""
    generator, start, seq = row_generator(s.get("seed"), 0, "cpu"), s.get("output_start", len(prompt)), list(prompt)
    for _ in range(s["max_new_tokens"]):
        with torch.no_grad():
            logits = engine.model(torch.tensor([seq]))[0, -1].tolist()
        penalised = reference_penalties(logits, seq, seq[start:], s.get("repetition_penalty", 1.0),
                                        s.get("presence_penalty", 0.0), s.get("frequency_penalty", 0.0))
        token, _ = sample_next(torch.tensor([penalised]), s["temperature"], s.get("top_k", 0), 1.0, [generator],
                               s.get("min_p", 0.0))
        seq.append(int(token))
    return seq[len(prompt):]


@pytest.mark.slow  # the fast tier checks each row's penalties and min-p in test_engine.py
def test_penalties_and_min_p_per_sequence_in_a_crowd(engine):
    """Penalised sequences among plain ones, joining, parked and put back: each penalised one samples what the
    definitions give for it alone, and each plain one exactly what it samples alone."""
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    batch = LiveBatch(engine, 3)
    seq: dict[str, int] = {}
    add = lambda name, prompt, s: lambda: seq.__setitem__(name, batch.add(prompt, **s))  # noqa: E731
    parked = []
    events = {0: [add("p0", ids[3], PENALISED[0]), add("n0", ids[0], SETTINGS[0])],
              2: [add("p1", ids[1], PENALISED[1]), add("n2", ids[2], SETTINGS[2])],
              4: [add("p2", ids[4], PENALISED[2]), add("n5", ids[5], SETTINGS[5])],
              6: [lambda: parked.append(batch.take(seq["p1"]))], 9: [lambda: batch.put(parked[0])]}
    crowd = run(batch, events)
    for name, prompt, s in (("p0", ids[3], PENALISED[0]), ("p1", ids[1], PENALISED[1]), ("p2", ids[4], PENALISED[2])):
        assert [t for t, _, _ in crowd[seq[name]]] == reference_extras(engine, prompt, s), name
    plain = reference_extras(engine, ids[1], {k: v for k, v in PENALISED[1].items() if "penalty" not in k})
    assert plain != reference_extras(engine, ids[1], PENALISED[1])  # the penalties changed something
    for name, i in (("n0", 0), ("n2", 2), ("n5", 5)):
        assert [t for t, _, _ in crowd[seq[name]]] == [t for t, _, _ in alone(engine, i)], name
