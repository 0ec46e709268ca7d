"""Asynchronous rollouts for GRPO (`--async-steps K`, docs/performance.md): a worker process samples the coming steps'
batches, and runs the held-out evaluations, while this one trains. Step s's batch comes from the weights after
max(s - K, 0) steps and checkpoints carry the batches sampled ahead, so a resumed run goes on exactly. Either process
may take unclaimed work (Claims): same seeds, weights and thread count, so no figure depends on timing.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback

import torch
import torch.multiprocessing as mp

from r1lab.cpu.process import setup_training_process
from r1lab.engine.engine import Engine
from r1lab.rewards.sandbox.runner import use_sandbox

RESULT_POLL_S = 1.0  # how often a trainer waiting for a batch checks that the worker is still alive


def check_async(cfg, world, device: torch.device) -> None:
    """Refuse, before anything loads, what the single-machine rollout worker cannot do."""
    if not cfg.async_steps:
        return
    refusals = [(world.size > 1, "runs on one process (no torchrun)"), (device.type != "cpu", "runs on the CPU "
                 "(the worker's weights live in shared host memory)"), (bool(cfg.tools), "does not run tool calls"),
                (cfg.shard, "needs unsharded weights"), (cfg.lora_rank > 0, "does not train LoRA adapters"),
                (str(cfg.task).startswith("agent:"), "does not run agents (their rewards are kept where they ran)")]
    for refused, why in refusals:
        if refused:
            raise ValueError(f"--async-steps {cfg.async_steps}: the rollout worker {why}; use --async-steps 0")


def thread_split(total: int, rollout_threads: int) -> tuple[int, int]:
    """(worker, trainer) CPU threads: rollout_threads (0: half) for the worker, the rest for the trainer; each >= 1."""
    worker = rollout_threads or max(1, total // 2)
    return worker, max(1, total - worker)


class AsyncRollouts(contextlib.AbstractContextManager):
    """The trainer's side of the rollout worker; as a context manager, the worker ends with it however the run ends."""

    def __init__(self, rollout_model, tokenizer, cfg, sample, sync, batch_of, log=print, evaluate=None, report=None):
        self.K, self.steps, self.sync, self.batch_of, self.log = cfg.async_steps, cfg.steps, sync, batch_of, log
        self.report, self.evaluating = report, None  # the step of the evaluation asked for and not yet reported
        self.tokenizer, self.cfg, self.sample, self.offer = tokenizer, cfg, sample, None  # the chunks on offer
        self.engines: dict = {}  # the trainer's engines over the shared weights, to sample and evaluate here
        self.taken = {"rollouts": 0, "chunks": 0}  # the worker's work the trainer did
        self.worker_threads, trainer_threads = thread_split(torch.get_num_threads(), cfg.rollout_threads)
        self.previous_threads = torch.get_num_threads()
        torch.set_num_threads(trainer_threads)
        ctx = mp.get_context("spawn")  # no fork of a process that holds torch's thread pools
        shared_copy = lambda: copy.deepcopy(rollout_model).requires_grad_(False).eval().share_memory()
        self.shared, self.evaluated = shared_copy(), evaluate and shared_copy()
        self.version = ctx.Value("q", -1)
        self.requests, self.results, self.claims = ctx.Queue(), ctx.Queue(), Claims(ctx)
        self.process = ctx.Process(target=worker_main, name="r1lab-rollouts", daemon=True,
                                   args=(self.shared, self.evaluated, tokenizer, cfg, sample, evaluate, self.version,
                                         self.requests, self.results, self.worker_threads, self.claims))
        self.ready: dict = {}  # step -> Rollouts, received and not yet trained
        self.pending: dict = {}  # step -> (version, problems, seeds): asked for, not yet received

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, start: int, model, restored: dict | None) -> None:
        """Start the worker at version `start`, with the checkpoint's batches and requests up to start + K."""
        self.process.start()
        self.log(f"grpo: async rollouts, {self.K} step(s) ahead: a worker process with {self.worker_threads} "
                 f"thread(s), the trainer {torch.get_num_threads()}")
        if restored:
            self.ready.update(restored["rollouts"])
        self._publish(model, start)
        for s in range(start, min(start + self.K + 1, self.steps)):
            if s not in self.ready:
                self._request(s)

    def take(self, step: int):
        """Step's rollouts, waited for, from a version at most K steps old."""
        while step not in self.ready:
            self._advance()
        rollouts = self.ready.pop(step)
        stale = step - min(rollouts.versions)
        assert 0 <= stale <= self.K, f"step {step + 1}'s rollouts come from version {min(rollouts.versions)}"
        return rollouts

    def after_update(self, step: int, model) -> None:
        """Once the batch in flight is in, publish version step + 1 and ask for the batch it samples."""
        while self.pending:
            self._advance()
        self._publish(model, step + 1)
        if step + 1 + self.K < self.steps:
            self._request(step + 1 + self.K)

    def evaluate(self, step: int, model) -> None:
        """The held-out evaluation of `model` after `step` steps, in the worker once the previous one is done."""
        self.report_evaluations()
        self.sync(self.evaluated, model)
        self.requests.put(("heldout", step))
        self.evaluating = step

    def report_evaluations(self) -> None:
        while self.evaluating is not None:
            self._receive()

    def state(self) -> dict:
        """What a checkpoint carries: the batches sampled and not yet trained."""
        return {"async_steps": self.K, "rollouts": dict(self.ready)}

    def close(self) -> None:
        """End the worker now and give the trainer its threads back."""
        if self.process.is_alive():
            self.process.kill()  # it leaves SIGTERM to the trainer (worker_main); there is nothing of its to save
        if self.process.pid is not None:
            self.process.join()
        for q in (self.requests, self.results):
            q.cancel_join_thread()  # data still in a queue must not hold the exit up
            q.close()
        torch.set_num_threads(self.previous_threads)

    def _publish(self, model, version: int) -> None:
        self.sync(self.shared, model)
        with self.version.get_lock():
            self.version.value = version

    def _request(self, step: int) -> None:
        wanted = max(step - self.K, 0)
        if wanted != self.version.value:  # only a run resumed with more --steps than it was started with
            self.log(f"grpo: async: step {step + 1} is sampled from version {self.version.value}, not {wanted} "
                     "(its batch was not in the checkpoint)")
        problems, seeds = self.batch_of(step)
        self.requests.put(("rollouts", step, self.version.value, problems, seeds))
        self.pending[step] = (self.version.value, problems, seeds)

    def _advance(self) -> None:
        """Sample the first pending batch here if the worker has not begun it, else take the worker's next message."""
        first = min(self.pending, default=None)
        if first is None or not self.claims.batch(first):
            return self._receive()
        version, problems, seeds = self.pending.pop(first)
        batch = self._here("rollouts", self.shared, lambda engine: self.sample(engine, problems, self.cfg, seeds))
        batch.versions = [version] * len(batch.texts)
        self.ready[first] = batch

    def _receive(self) -> None:
        while True:
            if self.offer and self.results.empty():  # waiting: decode a chunk of the evaluation meanwhile
                self._take_offered_chunk()
                continue
            try:
                kind, step, result, error = self.results.get(timeout=RESULT_POLL_S)
                break
            except queue.Empty:
                if not self.process.is_alive():
                    raise RuntimeError(f"the rollout worker ended (exit code {self.process.exitcode})") from None
        if error:
            where = f"step {step + 1}" if kind == "rollouts" else f"the held-out evaluation at step {step}"
            raise RuntimeError(f"the rollout worker failed at {where}: {error.strip().splitlines()[-1]}\n{error}")
        if kind == "chunks":
            self.offer = (step, result)
        elif kind == "heldout":
            self.evaluating = None
            self.report(step, result)
        else:
            del self.pending[step]
            self.ready[step] = result

    def _take_offered_chunk(self) -> None:
        serial, (parts, sampling) = self.offer
        if (i := self.claims.chunk(serial)) is None:
            self.offer = None
            return
        decoded = self._here("chunks", self.evaluated, lambda engine: decode(engine, parts[i], sampling))
        self.requests.put(("chunk", serial, i, *decoded))

    def _here(self, kind: str, weights, work):
        """The worker's work done here, on its thread count (so the numbers are the same)."""
        if kind not in self.engines:
            self.engines[kind] = Engine(weights, self.tokenizer)
        engine = self.engines[kind]
        threads = torch.get_num_threads()
        torch.set_num_threads(self.worker_threads)
        try:
            result = work(engine)
        finally:
            torch.set_num_threads(threads)
        self.taken[kind] += 1
        return result


class Claims:
    """Work done by whichever process claims it first: [call serial, next chunk, chunks, last batch claimed]."""

    def __init__(self, ctx):
        self.shared = ctx.Array("q", [0, 0, 0, -1])

    def open(self, n: int) -> int:
        with self.shared.get_lock():
            self.shared[:3] = [self.shared[0] + 1, 0, n]
            return self.shared[0]

    def chunk(self, serial: int) -> int | None:
        with self.shared.get_lock():
            current, i, n, _ = self.shared[:]
            if current != serial or i >= n:
                return None
            self.shared[1] = i + 1
            return i

    def batch(self, step: int) -> bool:
        with self.shared.get_lock():
            if self.shared[3] >= step:
                return False
            self.shared[3] = step
            return True


def worker_main(model, evaluated, tokenizer, cfg, sample, evaluate, version, requests, results, threads: int,
                claims: Claims) -> None:
    """The rollout worker: samples each requested batch from the shared weights, evaluates `evaluated` when asked."""
    # Ctrl-C and SIGTERM (which a scheduler sends to every process of the job) are the trainer's: it checkpoints,
    # then ends this process
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    _exit_with_parent()
    setup_training_process(threads)
    use_sandbox(cfg.sandbox)  # the run's choice, for scoring the held-out completions of a code task
    engine = Engine(model, tokenizer)
    # an evaluation's chunk decodes as many sequences as a step's batch: about what fits while the trainer updates
    chunk = max(1, cfg.prompts_per_step * cfg.samples_per_prompt // cfg.eval_samples)

    def rollouts(wanted, problems, seeds):
        if version.value != wanted:
            raise RuntimeError(f"asked for version {wanted}, the shared weights are version {version.value}")
        batch = sample(engine, problems, cfg, seeds)
        batch.versions = [wanted] * len(batch.texts)
        return batch

    taken: dict[int, list] = {}  # chunk -> what the trainer decoded of the generate call on offer

    def offer(serial, parts, sampling):  # one call at a time: its chunks all come back before the next
        taken.clear()
        results.put(("chunks", serial, (parts, sampling), None))
        return taken

    def heldout():
        chunked = ChunkedEngine(Engine(evaluated, tokenizer), chunk, serve_waiting, claims, offer, serve_next)
        result = evaluate(chunked)
        result.tokens_per_s = chunked.tokens / chunked.seconds  # the evaluation's decoding, not the batches between
        return result

    def serve(kind, step, *request) -> None:
        if kind == "rollouts" and not claims.batch(step):
            return  # the trainer sampled it
        try:
            results.put((kind, step, (rollouts if kind == "rollouts" else heldout)(*request), None))
        except Exception:  # any failure is the trainer's to report, with the worker's traceback
            results.put((kind, step, None, traceback.format_exc()))

    def serve_next() -> None:  # a request, or a chunk the trainer decoded
        kind, *rest = requests.get()
        if kind == "chunk":
            _, i, *decoded = rest
            taken[i] = decoded  # [samples, seconds]
        else:
            serve(kind, *rest)

    def serve_waiting() -> None:  # between an evaluation's chunks: the batches asked for meanwhile
        while not requests.empty():  # this process alone takes from the queue: what it holds stays there
            serve_next()

    while (request := requests.get()) is not None:
        serve(*request)


class ChunkedEngine:
    """Generates `chunk` prompts at a time, calling between() before each; `shared`: the trainer may claim chunks."""

    def __init__(self, engine: Engine, chunk: int, between, shared: Claims | None = None, offer=None, wait=None):
        self.engine, self.chunk, self.between, self.tokens, self.seconds = engine, chunk, between, 0, 0.0
        self.shared, self.offer, self.wait = shared, offer, wait

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def generate(self, prompts: list, seed: list[int], **sampling) -> list:
        parts = [(prompts[i : i + self.chunk], seed[i : i + self.chunk]) for i in range(0, len(prompts), self.chunk)]
        serial = self.shared.open(len(parts)) if self.shared else None
        done, taken = {}, self.offer(serial, parts, sampling) if self.shared else {}
        while (i := self.shared.chunk(serial) if self.shared else len(done)) is not None and i < len(parts):
            self.between()
            done[i] = decode(self.engine, parts[i], sampling)
        while len(done) + len(taken) < len(parts):
            self.wait()
        done.update(taken)
        samples = [s for i in range(len(parts)) for s in done[i][0]]
        self.seconds += sum(seconds for _, seconds in done.values())
        self.tokens += sum(len(s.token_ids) for s in samples)
        return samples


def decode(engine: Engine, part: tuple[list, list[int]], sampling: dict) -> list:
    """A chunk's (prompts, seeds) samples, and the seconds they took."""
    start = time.perf_counter()
    samples = engine.generate(part[0], seed=part[1], **sampling)
    return [samples, time.perf_counter() - start]


def _exit_with_parent() -> None:
    """End this process as soon as the trainer's ends (one killed without unwinding)."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()
