"""Speculative decoding in the server's continuous batch (LiveBatch with an engine that drafts, `r1lab serve
--speculative`): every sequence's tokens are those the plain batch gives (greedy) or the offline speculative engine
gives it alone (seeded), whoever joins, leaves, is parked or cancelled beside it, while the drafter's cache follows
every row move (a drafter that loses a row's keys drafts differently, which the steps' token counts show)."""

import pytest
import torch
from test_live_batch import run
from test_mtp import CountingTokenizer, _dense_pair, _spec_model, chi_square_pvalue

from r1lab.engine import live_batch as live_module
from r1lab.engine import slots as slots_module
from r1lab.engine.engine import Engine
from r1lab.engine.live_batch import LiveBatch
from r1lab.engine.sampling import sampling_probs

PROMPTS = [[3, 5, 7], [9, 1], [4, 4, 4, 4, 2], [8], [2, 2, 6, 1, 9, 9, 3, 5, 5], [6, 1]]
EOS = {7, 11, 23}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """Per drafter: the plain engine and the drafting one over the same model (end-of-text ids EOS)."""
    tok = CountingTokenizer()
    tok.eos_ids = set(EOS)
    model, draft = _dense_pair(61, tmp_path_factory.mktemp("pair"), 0.3)
    mtp_model = _spec_model(61, 0.3)
    return {"mtp": (Engine(mtp_model, tok), Engine(mtp_model, tok, speculative="mtp")),
            "draft": (Engine(model, tok), Engine(model, tok, speculative=draft))}


def stepped(batch: LiveBatch, events=None) -> dict[int, list]:
    """run()'s triples per sequence, each with the number of tokens its step gave (1, or 2 after a kept draft)."""
    out, steps = {}, {}
    original = batch.step

    def step():
        tokens = original()
        if batch.drafting:
            check_drafts(batch)
        for t in tokens:
            steps.setdefault(t.seq, []).append(sum(u.seq == t.seq for u in tokens))
        return tokens

    batch.step = step
    for seq, triples in run(batch, events).items():
        out[seq] = [(*t, n) for t, n in zip(triples, steps[seq])]
    return out


def check_drafts(batch: LiveBatch) -> None:
    """Each running row's pending token is its last one and its draft's distribution the drafter's after its whole
    sequence, recomputed from scratch: a drafter's cache that lost or mixed up a row's keys drafts otherwise."""
    model, draft = batch.engine.model, batch.engine.draft
    for r, seq in enumerate(batch.rows):
        ids = torch.tensor([seq.prompt + seq.generated])
        assert int(batch.pending[r]) == ids[0, -1]
        if int(batch.draft[r]) < 0:
            continue
        with torch.no_grad():
            logits = draft(ids)[:, -1] if draft is not None else \
                model.lm_head(model.mtp_hidden_states(model.hidden_states(ids), ids)[0][:, -1])
        q = sampling_probs(logits, seq.temperature, seq.top_k, seq.top_p, seq.min_p)[0]
        assert torch.allclose(batch.logits[r], q, atol=1e-4), (seq.id, len(seq.generated))


def alone(engine: Engine, prompt: list[int], settings: dict) -> list:
    batch = LiveBatch(engine, 1)
    seq = batch.add(prompt, **settings)
    return stepped(batch)[seq]


def crowd(engine: Engine, settings: list[dict], stops=None) -> tuple[dict, list[int], bool]:
    """Three slots for six sequences of different lengths: some join mid-run, some wait for a slot, a stranger is
    cancelled, one is parked (take) for a few steps and put back. Returns the triples, each one's id and whether
    the park happened (not if that one had ended)."""
    batch = LiveBatch(engine, 3)
    seq: dict[int, int] = {}
    add = lambda i: lambda: seq.__setitem__(i, batch.add(PROMPTS[i], **settings[i]))  # noqa: E731
    extra = batch.add([13, 14], max_new_tokens=40, temperature=0)  # a stranger, cancelled at step 4
    parked = []
    events = {0: [add(0)], 2: [add(5), add(1)], 3: [add(2), add(3)], 4: [lambda: batch.cancel(extra)],
              5: [add(4), lambda: seq[0] in batch.sequences and parked.append(batch.take(seq[0]))],
              9: [lambda: parked and batch.put(parked[0])]}
    out = stepped(batch, events)
    assert len(out[extra]) >= 4 and out[extra][-1][2] is None  # ended by the cancel, no finish reason
    return out, [seq[i] for i in range(len(PROMPTS))], bool(parked)


def assert_same(got: list, want: list) -> None:
    """The same tokens and finish reasons; the model's log-probs, to float rounding."""
    assert [(t, r) for t, _, r, *_ in got] == [(t, r) for t, _, r, *_ in want]
    assert [lp for _, lp, *_ in got] == pytest.approx([lp for _, lp, *_ in want], abs=1e-5)


@pytest.fixture
def small_buffers(monkeypatch):
    """Buffers of 1 row x 8 columns that must double both ways, dead columns slid out whenever they can be."""
    monkeypatch.setattr(live_module, "INITIAL_ROWS", 1)
    monkeypatch.setattr(live_module, "INITIAL_COLUMNS", 8)
    monkeypatch.setattr(slots_module, "SLIDE_MIN_COLUMNS", 1)


GREEDY = [dict(max_new_tokens=n, temperature=0.0) for n in (12, 5, 20, 9, 16, 25)]


@pytest.mark.parametrize("drafter", ["mtp", "draft"])
def test_greedy_rows_get_the_plain_batchs_tokens_through_joins_parks_cancels_and_growth(drafter, engines,
                                                                                         small_buffers):
    plain, spec = engines[drafter]
    before = dict(spec.speculative_counts)
    got, ids, parked = crowd(spec, GREEDY)
    assert parked
    counts = {k: spec.speculative_counts[k] - before[k] for k in before}
    for i, seq in enumerate(ids):
        assert_same(got[seq], alone(plain, PROMPTS[i], GREEDY[i]))
        # the drafts are those it makes alone: the drafter's cache followed the row through every move
        assert [t[3] for t in got[seq]] == [t[3] for t in alone(spec, PROMPTS[i], GREEDY[i])], i
    assert {t[2] for seq in ids for t in got[seq][-1:]} == {"stop", "length"}
    assert 0 < counts["accepted"] < counts["drafted"]  # both the accepted and the rejected path ran


SAMPLED = [dict(max_new_tokens=12, temperature=1.0, seed=11), dict(max_new_tokens=5, temperature=0.8, seed=12),
           dict(max_new_tokens=20, temperature=1.2, top_k=5, seed=13), dict(max_new_tokens=9, temperature=0.0),
           dict(max_new_tokens=16, temperature=0.9, top_p=0.8, seed=15),
           dict(max_new_tokens=25, temperature=1.0, top_p=0.9, top_k=20, seed=16)]


@pytest.mark.parametrize("drafter", ["mtp", "draft"])
def test_seeded_rows_get_the_offline_speculative_engines_tokens(drafter, engines, small_buffers):
    """Each sequence draws its numbers from its own generator in the order the offline engine does (the first token,
    then a draft, three numbers per verification, a draft), so its tokens are those Engine.generate gives it
    alone, which draws each token as the plain sampler would (tests/test_mtp.py's chi-square test)."""
    plain, spec = engines[drafter]
    got, ids, _ = crowd(spec, SAMPLED)
    for i, seq in enumerate(ids):
        s = {"top_k": 0, "top_p": 1.0, "seed": None, **SAMPLED[i]}
        want = spec.generate([PROMPTS[i]], **{k: [v] for k, v in s.items()})[0]
        assert [t[0] for t in got[seq]] == want.token_ids, i
        assert [t[1] for t in got[seq]] == pytest.approx(want.logprobs, abs=1e-5), i
        assert got[seq][-1][2] == want.finish_reason, i
        assert [t[3] for t in got[seq]] == [t[3] for t in alone(spec, PROMPTS[i], SAMPLED[i])], i
    assert any(t[3] == 2 for seq in ids for t in got[seq])


def test_min_p_rows_draw_from_the_models_own_distribution():
    """min-p, which the offline engine does not take, through the rule: 4,000 seeded sequences of 3 tokens over a
    vocabulary of 5 (an accepted draft brings two tokens in a step, a rejected one a token from the residual), their
    empirical distribution against the exact one from the model's full forward passes, by tests/test_mtp.py's
    chi-square test; the control: the distribution without min-p is rejected."""
    V, n, T, min_p, prompt = 5, 4000, 0.9, 0.2, [1, 3, 2]
    model = _spec_model(V, 0.5)
    engine = Engine(model, CountingTokenizer(), speculative="mtp")
    batch = LiveBatch(engine, 500)
    for i in range(n):
        batch.add(prompt, max_new_tokens=3, temperature=T, min_p=min_p, seed=i)
    seqs = torch.cartesian_prod(*[torch.arange(V)] * 3)  # (125, 3)
    index = {tuple(q): i for i, q in enumerate(seqs.tolist())}
    observed = torch.zeros(len(seqs))
    for triples in run(batch).values():
        observed[index[tuple(t for t, _, _ in triples)]] += 1
    with torch.no_grad():
        logits = model(torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1))[:, len(prompt) - 1 : -1]
    exact = {}
    for cut in (min_p, 0.0):
        probs = sampling_probs(logits.reshape(-1, V), T, 0, 1.0, cut).view(len(seqs), 3, V)
        exact[cut] = probs.gather(-1, seqs[:, :, None]).squeeze(-1).prod(-1)  # (125,)
    assert abs(exact[min_p].sum().item() - 1) < 1e-4 and observed.sum() == n
    assert chi_square_pvalue(observed, exact[min_p] * n) > 1e-3
    assert chi_square_pvalue(observed, exact[0.0] * n) < 1e-6  # min-p cut something, and the test sees it
    assert 0 < engine.speculative_counts["accepted"] < engine.speculative_counts["drafted"]


PENALISED = [dict(max_new_tokens=20, temperature=0.0, repetition_penalty=1.8),
             dict(max_new_tokens=15, temperature=1.0, top_k=10, min_p=0.05, repetition_penalty=1.2,
                  presence_penalty=0.7, frequency_penalty=0.4, seed=21),
             dict(max_new_tokens=12, temperature=0.8, frequency_penalty=-0.5, presence_penalty=1.5, seed=22,
                  output_start=1)]


@pytest.mark.parametrize("drafter", ["mtp", "draft"])
def test_penalised_and_stop_string_rows_stay_exact(drafter, engines):
    """A penalised row never drafts: one token a step from its penalised logits, its generator drawn as the plain
    batch draws it, so its tokens are the plain batch's. A row with stop strings ends where the plain batch's does
    (greedy) or where its offline speculative tokens first complete one (seeded)."""
    plain, spec = engines[drafter]
    greedy_free = alone(plain, PROMPTS[4], GREEDY[4])
    stop = plain.tokenizer.decode([t[0] for t in greedy_free[3:5]])
    sampled_free = spec.generate([PROMPTS[0]], max_new_tokens=[30], temperature=[1.0], seed=[31])[0].token_ids
    sampled_stop = plain.tokenizer.decode(sampled_free[4:6])
    rows = [(PROMPTS[2], s) for s in PENALISED] + [
        (PROMPTS[4], {**GREEDY[4], "stop_strings": (stop,)}),
        (PROMPTS[0], dict(max_new_tokens=30, temperature=1.0, seed=31, stop_strings=(sampled_stop,)))]
    batch = LiveBatch(spec, 3)
    ids = [batch.add(p, **s) for p, s in rows[:2]]
    events = {2: [lambda: ids.append(batch.add(*rows[2][:1], **rows[2][1]))],
              3: [lambda: ids.extend(batch.add(p, **s) for p, s in rows[3:])]}
    got = stepped(batch, events)
    for (prompt, s), seq in zip(rows[:4], ids):
        assert_same(got[seq], alone(plain, prompt, s))
    assert all(t[3] == 1 for seq in ids[:3] for t in got[seq])  # the penalised rows never drafted
    assert got[ids[3]][-1][2] == "stop" and len(got[ids[3]]) < len(greedy_free)
    tokens = [t[0] for t in got[ids[4]]]
    first_hit = next(n for n in range(1, 31) if sampled_stop in plain.tokenizer.decode(sampled_free[:n]))
    assert tokens == sampled_free[:first_hit] and got[ids[4]][-1][2] == "stop"


@pytest.mark.slow  # the server end to end, twice: the live batch's drafting is tested above on its own
def test_serve_with_speculative_mtp_answers_as_the_plain_server_greedy(tmp_path, capsys):
    """`r1lab serve --speculative mtp` on a loopback port: a chat completion at temperature 0 is the plain server's
    (text, finish reason, log-probs); /health counts the drafts; what cannot draft is refused in one line."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from test_mtp import _save_spec_model
    from test_serve import ServerThread

    from r1lab.cli import build_parser, main
    from r1lab.config import ServeConfig, resolve
    from r1lab.serve.app import build_app
    from r1lab.serve.chat import load_engine

    model_dir = _save_spec_model(tmp_path / "m")
    body = {"model": "m", "messages": [{"role": "user", "content": "What is 6*7?"}], "temperature": 0,
            "max_tokens": 24, "n": 2, "logprobs": True}
    replies, stats = {}, {}
    for mode in ("none", "mtp"):
        args = build_parser().parse_args(["serve", "--model", str(model_dir), "--speculative", mode, "--device", "cpu",
                                          "--log-level", "warning"])
        cfg = resolve(ServeConfig, args)
        with ServerThread(build_app(cfg, load_engine(cfg))) as server:
            replies[mode] = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).json()
            stats[mode] = httpx.get(f"{server.url}/health").json()["batcher"]
    for plain, fast in zip(replies["none"]["choices"], replies["mtp"]["choices"], strict=True):
        assert fast["message"] == plain["message"] and fast["finish_reason"] == plain["finish_reason"]
        assert [t["token"] for t in fast["logprobs"]["content"]] == [t["token"] for t in plain["logprobs"]["content"]]
        assert [t["logprob"] for t in fast["logprobs"]["content"]] == \
            pytest.approx([t["logprob"] for t in plain["logprobs"]["content"]], abs=1e-4)
    assert replies["mtp"]["usage"] == replies["none"]["usage"] and replies["mtp"]["usage"]["completion_tokens"] > 10
    assert stats["none"]["drafted"] == 0 < stats["mtp"]["drafted"]
    assert stats["mtp"]["accepted"] <= stats["mtp"]["drafted"]
    no_module = _save_spec_model(tmp_path / "plain", mtp=False)
    for flags, error in (([str(no_module)], "needs a model with a multi-token prediction module"),
                         ([str(model_dir), "--tools", "python"], "speculative mtp does not run with tools 'python'")):
        with pytest.raises(SystemExit):
            main(["serve", "--model", *flags, "--speculative", "mtp", "--device", "cpu"])
        assert error in capsys.readouterr().err


def test_a_request_stop_string_ends_a_row_at_the_first_of_its_two_tokens(tmp_path):
    """The batcher ends a row whose text completes a request's stop string (or whose client left) itself: a bonus
    token of that row in the same step is dropped. A scripted model drafting for itself keeps every draft, so each
    step brings two tokens and every other stop falls on the first of them; the replies are the plain server's."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from test_serve import QUESTION, ServerThread, scripted_model_dir

    from r1lab.serve.app import create_app

    model_dir = scripted_model_dir(tmp_path / "scripted")
    replies, stats = {}, {}
    for mode in ("none", f"draft:{model_dir}"):
        app = create_app(model_dir, speculative=mode, device="cpu", log_level="warning")
        with ServerThread(app) as server:
            replies[mode] = [httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
                "model": "scripted", "messages": QUESTION, "temperature": 0, "stop": [stop]}).json()["choices"]
                for stop in ("W", "e", " ", "s", "u", "m", "4", "2")]
            stats[mode] = server.stats
    assert replies[f"draft:{model_dir}"] == replies["none"]
    assert all(choices[0]["finish_reason"] == "stop" for choices in replies["none"])
    assert stats[f"draft:{model_dir}"]["accepted"] == stats[f"draft:{model_dir}"]["drafted"] > 0
