"""torchrun on this machine's CPUs (gloo): 2 ranks train, resume and evaluate exactly as one process does.

Every test that launches torchrun is marked `torchrun` (`make test-torchrun`; `make test` runs them too): each costs
several seconds of process starts on a 2-core machine. One of them, the smoke test that two ranks train to the weights
of one process, is also marked `smoke` and stays in the fast tier (`make test-fast`).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_moe_training import DEEPSEEK

from r1lab.model.architecture import ModelConfig
from r1lab.model.hf_format import save_model
from r1lab.model.tokenizer import build_tiny_tokenizer, load_tokenizer
from r1lab.model.transformer import CausalLM
from r1lab.train.distributed import World

torchrun = pytest.mark.torchrun  # launches a torchrun job of 2 processes

TASK = ["--task-options", '{"min_terms": 3, "max_terms": 4}']
GRPO = ["--prompts-per-step", "4", "--samples-per-prompt", "4", "--micro-batch-size", "3", "--max-new-tokens", "24",
        "--eval-every", "0", "--lr", "1e-3", "--save-every", "2", "--threads", "1", "--samples-every", "0"]
HELDOUT = ["--steps", 3, "--eval-problems", 5, "--eval-samples", 2]


def r1lab(args, ranks=1, timeout=300, check=True):
    """`python -m r1lab ARGS`, or under torchrun with `ranks` processes; the finished process."""
    return at_once([(args, ranks)], timeout, check)[0]


def at_once(jobs, timeout=300, check=True):
    """Each (args, ranks) job of r1lab started at once: their start-ups, most of a tiny job's time, overlap on the
    cores. The finished processes, in order."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    commands = [(launcher + [str(ranks)] if ranks > 1 else [sys.executable]) + ["-m", "r1lab", *map(str, args)]
                for args, ranks in jobs]
    started = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for c in commands]
    try:
        outputs = [p.communicate(timeout=timeout) for p in started]
        done = [subprocess.CompletedProcess(c, p.returncode, *out) for c, p, out in zip(commands, started, outputs)]
    finally:
        for p in started:
            p.kill()  # a job left running by a timeout (or one that failed first)
    for job in done:
        if check and job.returncode:
            raise AssertionError(f"{' '.join(job.args)} failed ({job.returncode}):\n{job.stdout}\n{job.stderr}")
    return done


def weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory):
    """3 GRPO steps of the same global batch and seed, in 1 process and in 2 (checkpoints at step 2)."""
    root = tmp_path_factory.mktemp("dist")
    # with a held-out evaluation at steps 0, 2 and 3
    at_once([(["grpo", "--model", tiny_base, *TASK, *GRPO, *HELDOUT, "--eval-every", 2, "--out", root / name], ranks)
             for name, ranks in (("one", 1), ("two", 2))])
    return root


@torchrun
@pytest.mark.smoke  # the fast tier's one torchrun test: 2 ranks train together, to one process's weights
def test_two_ranks_reach_the_weights_of_one_process(runs, tiny_base):
    one, two = weights(runs / "one" / "model"), weights(runs / "two" / "model")
    assert max_difference(one, two) <= 1e-5
    assert max_difference(one, weights(tiny_base)) > 1e-4  # the steps did train
    # rank 0 alone wrote the run: one metrics row per step, with the whole batch's figures
    rows = [json.loads(line) for line in (runs / "two" / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(line) for line in (runs / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for a, b in zip(rows, single):
        assert a["completion_tokens"] == b["completion_tokens"] and a["reward/mean"] == b["reward/mean"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    evals = [[{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}  # a timing, not a figure
              for line in (runs / r / "eval.jsonl").read_text().splitlines()] for r in ("one", "two")]
    assert len(evals[0]) == 3 and evals[0] == evals[1]  # held-out evaluation sharded, figure for figure


def resumed(runs, source, name, ranks, tiny_base):
    """Copy source's run up to its step-2 checkpoint and continue it to step 3 with `ranks` processes."""
    target = runs / name
    shutil.copytree(runs / source, target)
    shutil.rmtree(target / "model")
    shutil.rmtree(target / "checkpoints" / "step_000003", ignore_errors=True)
    r1lab(["grpo", "--model", tiny_base, *TASK, *GRPO, *HELDOUT, "--eval-every", 0, "--out", target, "--resume"], ranks)
    return weights(target / "model")


@torchrun
def test_a_two_rank_checkpoint_resumes_in_one_process_and_back(runs, tiny_base):
    assert (runs / "two" / "checkpoints" / "step_000002" / "optimizer" / ".metadata").exists()
    continued = weights(runs / "two" / "model")
    assert max_difference(resumed(runs, "two", "two-then-two", 2, tiny_base), continued) == 0.0  # exact
    assert max_difference(resumed(runs, "two", "two-then-one", 1, tiny_base), continued) <= 1e-5
    assert max_difference(resumed(runs, "one", "one-then-two", 2, tiny_base), continued) <= 1e-5


@torchrun
def test_sharded_evaluation_equals_one_process_exactly(tiny_base, tmp_path):
    args = ["eval", "--model", tiny_base, *TASK, "--problems", 7, "--samples", 3, "--max-new-tokens", 24,
            "--threads", 1]
    at_once([([*args, "--out", tmp_path / "one.json"], 1), ([*args, "--out", tmp_path / "two.json"], 2)])  # shares 3, 4
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["test"] for n in ("one", "two"))
    assert one.pop("tokens_per_s") > 0 and two.pop("tokens_per_s") > 0  # a timing, not a figure
    assert one == two and one["n_problems"] == 7 and len(two["records"]) == 7


@torchrun
def test_a_batch_that_does_not_divide_across_ranks_is_refused(tiny_base, tmp_path):
    done = r1lab(["grpo", "--model", tiny_base, *TASK, *GRPO, "--prompts-per-step", 3, "--steps", 1,
                  "--out", tmp_path / "run"], ranks=2, check=False)
    assert done.returncode != 0
    assert "rank 0 of 2: error: prompts_per_step 3 does not divide across 2 ranks" in done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@torchrun
def test_a_killed_rank_ends_the_job_naming_it(tiny_base, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "r1lab",
               "grpo", "--model", str(tiny_base), *TASK, *GRPO, "--steps", "1000", "--save-every", "0",
               "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists():  # training has started on both ranks
            assert job.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        os.kill(rank_pid(job.pid, 1), signal.SIGKILL)
        killed = time.monotonic()
        output, _ = job.communicate(timeout=60)
        assert time.monotonic() - killed < 30
    finally:
        job.kill()
    assert job.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in output and "Signal 9 (SIGKILL)" in output


@torchrun
@pytest.mark.slow  # 5 s to notice, then torchrun's 30 s grace
def test_a_hung_rank_ends_the_job_after_the_timeout_with_a_message(tiny_base, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "r1lab",
               "grpo", "--model", str(tiny_base), *TASK, *GRPO, "--steps", "1000", "--save-every", "0",
               "--dist-timeout-s", "5", "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists():
            assert job.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        os.kill(rank_pid(job.pid, 1), signal.SIGSTOP)  # hung: alive, silent, deaf even to SIGTERM
        output, _ = job.communicate(timeout=90)  # 5 s to notice, then torchrun's 30 s grace before SIGKILL
    finally:
        job.kill()
    assert job.returncode != 0
    assert "rank 0 of 2: RuntimeError" in output and "another rank stopped answering for dist_timeout_s" in output


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of the worker with RANK=rank among the torchrun launcher's children."""
    for child in open(f"/proc/{launcher}/task/{launcher}/children").read().split():
        environ = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker of rank {rank}")


def test_shares_cover_every_item_once():
    for n in range(0, 12):
        for size in (1, 2, 3, 5):
            shares = [World(rank, size).share(n) for rank in range(size)]
            assert [i for s in shares for i in s] == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_one_process_world_collectives_are_the_identity():
    world = World()
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 2.0)
    world.sum_gradients([param])
    assert world.main and not world.distributed and world.concat([1, 2]) == [1, 2] and world.sum([1.5]) == [1.5]
    assert torch.equal(param.grad, torch.full((3,), 2.0)) and world.all(True) and not world.all(False)


@pytest.fixture(scope="module")
def wide_model(tiny_base, tmp_path_factory):
    """A random-initialised model of 1.3M parameters (FSDP refuses smaller ones) with the tiny base's tokenizer, and
    a reward file whose reward varies between its random completions (the length), so that GRPO has a gradient."""
    root = tmp_path_factory.mktemp("wide")
    base = json.loads((tiny_base / "config.json").read_text())
    cfg = ModelConfig(vocab_size=base["vocab_size"], hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=base["eos_token_id"], bos_token_id=base.get("bos_token_id"))
    torch.manual_seed(0)
    model = CausalLM(cfg)
    save_model(model, root / "model")
    load_tokenizer(tiny_base).save(root / "model")
    # odd answers only: the even-answer groups have zero advantage and are skipped, so the ranks' micro-batch
    # counts differ (FSDP's ranks must still run as many passes as each other)
    (root / "length.py").write_text("def reward(completion, problem):\n"
                                    "    return len(completion) / 100 if int(problem.answer) % 2 else 0.0\n")
    return root


@torchrun
def test_fsdp_trains_the_steps_of_unsharded_ranks_with_half_the_memory_each(wide_model, tmp_path):
    args = ["grpo", "--model", wide_model / "model", *TASK, *GRPO, "--steps", 3, "--save-every", 0, "--micro-batch-size", 1,
            "--accuracy-weight", 0, "--format-weight", 0, "--reward-functions",
            json.dumps({f"{wide_model / 'length.py'}:reward": 1.0})]
    at_once([([*args, "--out", tmp_path / "ddp"], 2), ([*args, "--out", tmp_path / "fsdp", "--shard"], 2)])
    ddp, fsdp = weights(tmp_path / "ddp" / "model"), weights(tmp_path / "fsdp" / "model")
    assert max_difference(ddp, fsdp) <= 1e-5
    assert max_difference(ddp, weights(wide_model / "model")) > 1e-4  # the steps did train
    last = [json.loads((tmp_path / r / "metrics.jsonl").read_text().splitlines()[-1]) for r in ("ddp", "fsdp")]
    for held in ("weights", "optimizer"):  # rank 0's share: half, up to the optimizer's per-tensor step counts
        assert last[1][f"memory/rank_{held}_mb"] == pytest.approx(last[0][f"memory/rank_{held}_mb"] / 2, rel=0.01)


@torchrun
def test_fsdp_refuses_one_process_and_a_small_model(tiny_base, tmp_path):
    alone = r1lab(["grpo", "--model", tiny_base, *TASK, *GRPO, "--steps", 1, "--shard", "--out", tmp_path / "a"],
                  check=False)
    assert alone.returncode == 2 and "shard: FSDP splits a model across the ranks of a torchrun job" in alone.stderr
    small = r1lab(["grpo", "--model", tiny_base, *TASK, *GRPO, "--steps", 1, "--shard", "--out", tmp_path / "b"],
                  ranks=2, check=False)
    assert small.returncode != 0 and "parameters, under 1,000,000" in small.stderr


def chat_rows(path, n=24):
    rows = [{"messages": [{"role": "user", "content": f"{a}+{a % 7}"},
                          {"role": "assistant", "content": f" <think>{a}+{a % 7}={a + a % 7}</think> "
                                                           f"<answer>{a + a % 7}</answer>"}]} for a in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SFT = ["--steps", 3, "--batch-size", 4, "--micro-batch-size", 1, "--lr", "1e-3", "--threads", 1, "--eval-every", 2,
       "--eval-fraction", 0.3]


@torchrun
def test_sft_across_ranks_equals_one_process_and_so_does_fsdp(wide_model, tmp_path):
    data = chat_rows(tmp_path / "chat.jsonl")
    args = ["sft", "--model", wide_model / "model", "--data", data, *SFT]
    at_once([([*args, "--out", tmp_path / "one"], 1), ([*args, "--out", tmp_path / "two"], 2),
             ([*args, "--out", tmp_path / "fsdp", "--shard"], 2)])
    one = weights(tmp_path / "one" / "model")
    assert max_difference(one, weights(wide_model / "model")) > 1e-4
    assert max_difference(one, weights(tmp_path / "two" / "model")) <= 1e-5
    assert max_difference(one, weights(tmp_path / "fsdp" / "model")) <= 1e-5
    heldout = [[json.loads(line)["loss"] for line in (tmp_path / r / "eval.jsonl").read_text().splitlines()]
               for r in ("one", "two", "fsdp")]
    assert len(heldout[0]) == 3 and heldout[0] == pytest.approx(heldout[1], abs=1e-6) and heldout[0] == pytest.approx(heldout[2], abs=1e-6)


@torchrun
def test_rejection_sampling_across_ranks_keeps_the_rows_of_one_process(tiny_base, tmp_path):
    args = ["sample", "--model", tiny_base, "--task-options", "{min_terms: 3, max_terms: 3}", "--problems", 9,
            "--samples", 4, "--max-new-tokens", 48, "--prefill", " <think>", "--threads", 1]
    at_once([([*args, "--out", tmp_path / "one.jsonl"], 1), ([*args, "--out", tmp_path / "two.jsonl"], 2)])
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()
    one, two = (json.loads((tmp_path / f"{n}.summary.json").read_text()) for n in ("one", "two"))
    assert {**one, "out": ""} == {**two, "out": ""} and one["sampled"] == 36


@torchrun
def test_commands_that_run_in_one_process_refuse_torchrun(tmp_path):
    done = r1lab(["pretrain", "--out", tmp_path / "base", "--steps", 1], ranks=2, check=False)
    assert done.returncode != 0 and "r1lab pretrain runs in one process, not under torchrun" in done.stderr
    assert not (tmp_path / "base").exists()


@torchrun
def test_a_deepseek_v3_moe_trains_across_ranks_as_in_one_process(tmp_path):
    # experts that no token of a rank reached have no gradient there (zeros from it in the sum, none anywhere stays
    # none), and the routing bias moves by the loads summed over ranks: the same model as one process
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf({**DEEPSEEK, "vocab_size": tok.vocab_size,
                                          "eos_token_id": sorted(tok.eos_ids)[0]}))
    save_model(model, tmp_path / "base")
    tok.save(tmp_path / "base")
    (tmp_path / "length.py").write_text("def reward(completion, problem):\n    return len(completion) / 10\n")
    args = ["grpo", "--model", tmp_path / "base", "--task", "arithmetic", "--steps", 3, "--prompts-per-step", 4,
            "--samples-per-prompt", 4, "--micro-batch-size", 4, "--max-new-tokens", 8, "--eval-every", 0,
            "--save-every", 0, "--samples-every", 0, "--lr", "1e-2", "--moe-bias-update-speed", 0.01,
            "--accuracy-weight", 0, "--format-weight", 0, "--threads", 1,
            "--reward-functions", json.dumps({f"{tmp_path / 'length.py'}:reward": 1.0})]
    at_once([([*args, "--out", tmp_path / "one"], 1), ([*args, "--out", tmp_path / "two"], 2)])
    one, two = weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")
    assert max_difference(one, two) <= 1e-5
    assert max_difference(one, weights(tmp_path / "base")) > 1e-4
    biases = [k for k in one if k.endswith("e_score_correction_bias")]
    assert biases and any(one[k].abs().max() > 0 for k in biases)  # the bias moved, the same way on both
