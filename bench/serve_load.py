#!/usr/bin/env python
"""Load test for `r1lab serve`: many concurrent clients against a CPU-served tiny model, batching checked.

One run:

1. builds (once) a tiny random-init model in ``WORKDIR/model``: the demo's shape (hidden 128, 4 layers, 4 heads,
   2 KV heads, FFN 384) with the built-in tiny tokenizer;
2. starts ``python -m r1lab serve`` on a free port (a child process) and waits for ``/health``;
3. one at a time: ``--sequential`` chat requests, one after another (the rate with no batching possible);
4. concurrent: ``--clients`` clients, each sending ``--requests`` requests back to back;
5. checks every response (HTTP 200, a finish_reason, usage consistent with it and with max_tokens; with
   ``--stream``, also the SSE framing and the usage chunk), counts errors, and prints one table: p50/p99 latency,
   aggregate completion tokens/s of both phases and their ratio, with the server's batch statistics.

Every request is a chat completion of a short arithmetic question with ``--max-tokens`` (64) and its own seed, at
temperature 1. A random model rarely samples end-of-text, so most completions run to max_tokens. Throughput =
completion tokens of the phase / wall time of the phase. Client and server share the machine's cores; the
script also reports how busy *other* processes kept the CPU, since a neighbour on a 2-core machine skews both.

    python bench/serve_load.py                       # 64 clients x 10 requests, ~1 minute on 2 cores
    python bench/serve_load.py --stream --json out.json

``--flood`` runs the fairness scenario instead: a small client (the chat request above, from 127.0.0.2) sends
``--flood-small`` requests one after another, first alone, then while a flooding client (from 127.0.0.1: another
host as far as the server knows) has one huge /v1/completions request running: ``--flood-prompts`` prompts x
``--flood-max-tokens``, the most the server's default per-request budget allows. It prints the small client's
latency in both phases and their ratio (bar: under the flood within 2x of alone).

    python bench/serve_load.py --flood               # ~1 minute on 2 cores

``--mixed`` runs the latency scenario: a small client (127.0.0.2) sends ``--mixed-short`` chat requests
(``--max-tokens`` each) one after another, first on an idle server, then while ``--mixed-long`` long completions
(``--mixed-long-tokens`` each, from 127.0.0.1, each sent again as soon as it ends) keep running. It prints the small
requests' p50 and p99 latency both ways, the ratios, and errors (bar: p99 with the long ones running within 2x of
idle, and no errors).

    python bench/serve_load.py --mixed               # ~1.5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MODEL_SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048)


def build_model(path: Path, endless: bool = False) -> None:
    """The demo-size model, random init (seed 0), with the built-in tokenizer; kept if already there. endless: the
    same shapes (the same cost per token), but end-of-text is never sampled, so every completion runs to max_tokens
    (a random model otherwise ends one in about a hundred tokens, and a flood would drain by itself)."""
    if (path / "config.json").exists():
        return
    import torch

    from r1lab.model.architecture import ModelConfig
    from r1lab.model.hf_format import save_model
    from r1lab.model.tokenizer import EOS, build_tiny_tokenizer
    from r1lab.model.transformer import CausalLM

    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    eos = tok.backend.token_to_id(EOS)
    model = CausalLM(ModelConfig(vocab_size=tok.vocab_size, eos_token_id=eos, **MODEL_SHAPE))
    if endless:
        with torch.no_grad():
            # The residual stream's last dimension is a constant 1 that no layer writes to; the tied embedding row
            # of end-of-text (never an input here) reads it as a large negative logit.
            k = MODEL_SHAPE["hidden_size"] - 1
            model.model.embed_tokens.weight[:, k] = 1.0
            model.model.embed_tokens.weight[eos, k] = -100.0
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight[k].zero_()
                layer.mlp.down_proj.weight[k].zero_()
    save_model(model, path)
    tok.save(path)


# ---------------------------------------------------------------------------------------------------------------
# the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, args, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "r1lab", "serve", "--model", str(model), "--port", str(port),
           "--served-model-name", "tiny", "--log-level", "warning", "--max-batch", str(args.max_batch),
           "--device", "cpu"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT)


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


# ---------------------------------------------------------------------------------------------------------------
# clients


@dataclass
class Result:
    latency_s: float = 0.0
    completion_tokens: int = 0
    error: str = ""


@dataclass
class Phase:
    name: str
    wall_s: float
    results: list[Result] = field(default_factory=list)

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if not r.error]

    def summary(self) -> dict:
        lat = sorted(r.latency_s for r in self.ok) or [float("nan")]
        tokens = sum(r.completion_tokens for r in self.ok)
        return {"requests": len(self.results), "errors": len(self.results) - len(self.ok), "wall_s": self.wall_s,
                "completion_tokens": tokens, "tokens_per_s": tokens / self.wall_s,
                "p50_latency_s": percentile(lat, 50), "p99_latency_s": percentile(lat, 99),
                "error_examples": sorted({r.error for r in self.results if r.error})[:5]}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    k = math.ceil(q / 100 * len(sorted_values)) - 1
    return sorted_values[max(0, min(len(sorted_values) - 1, k))]


def request_body(i: int, args) -> dict:
    rng = random.Random(i)
    question = "What is " + "+".join(str(rng.randint(0, 99)) for _ in range(rng.randint(2, 4))) + "?"
    body = {"model": "tiny", "messages": [{"role": "user", "content": question}], "max_tokens": args.max_tokens,
            "temperature": 1.0, "seed": i}
    if args.stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


async def one_request(client, i: int, args) -> Result:
    t0 = time.perf_counter()
    try:
        if args.stream:
            tokens = await streamed_request(client, request_body(i, args), args.max_tokens)
        else:
            r = await client.post("/v1/chat/completions", json=request_body(i, args))
            if r.status_code != 200:
                return Result(error=f"HTTP {r.status_code}: {r.text[:120]}")
            tokens = check_response(r.json(), args.max_tokens)
    except Exception as err:  # every failure is counted, none stops the run
        return Result(error=f"{type(err).__name__}: {err}"[:160])
    return Result(time.perf_counter() - t0, tokens)


def check_response(body: dict, max_tokens: int) -> int:
    """The completion tokens of a complete, consistent chat.completion; raises ValueError otherwise."""
    choice, usage = body["choices"][0], body["usage"]
    return check_finish(choice["finish_reason"], usage, max_tokens,
                        (choice["message"]["content"] or "") + (choice["message"].get("reasoning_content") or ""))


def check_finish(finish: str | None, usage: dict, max_tokens: int, text: str) -> int:
    n = usage["completion_tokens"]
    if finish not in ("stop", "length"):
        raise ValueError(f"finish_reason {finish!r}")
    if usage["total_tokens"] != usage["prompt_tokens"] + n or not 1 <= n <= max_tokens:
        raise ValueError(f"inconsistent usage {usage}")
    if finish == "length" and n != max_tokens:
        raise ValueError(f"finish_reason {finish} with {n} of {max_tokens} tokens")
    if n > 1 and not text and finish == "length":  # a text is returned (empty only if every token was a tag)
        raise ValueError(f"no text from {n} tokens")
    return n


async def streamed_request(client, body: dict, max_tokens: int) -> int:
    finish, usage, text, done = None, None, [], False
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise ValueError(f"HTTP {r.status_code}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise ValueError(chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                text += [c["delta"].get("content") or "", c["delta"].get("reasoning_content") or ""]
                finish = c["finish_reason"] or finish
    if not done or usage is None:
        raise ValueError("the stream ended without [DONE] or usage")
    return check_finish(finish, usage, max_tokens, "".join(text))


async def run_phase(name: str, url: str, clients: int, per_client: int, args, first_id: int) -> Phase:
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=args.timeout) as client:
        async def worker(c: int) -> list[Result]:
            return [await one_request(client, first_id + c * per_client + k, args) for k in range(per_client)]

        t0 = time.perf_counter()
        per_worker = await asyncio.gather(*(worker(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return Phase(name, wall, [r for rs in per_worker for r in rs])


# ---------------------------------------------------------------------------------------------------------------
# CPU use by other processes (a 2-core machine is easily skewed by a neighbour)


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def process_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(stat[11]) + int(stat[12])  # utime + stime


class CpuMeter:
    """Cores used during a phase by the server, this client, and every other process."""

    def __init__(self, server_pid: int):
        self.pids = [server_pid, os.getpid()]
        self.cores = os.cpu_count() or 1

    def __enter__(self):
        self.start = (cpu_ticks(), [process_ticks(p) for p in self.pids])
        return self

    def __exit__(self, *exc):
        (busy0, total0), own0 = self.start
        (busy1, total1), own1 = cpu_ticks(), [process_ticks(p) for p in self.pids]
        span = max(1, total1 - total0) / self.cores  # jiffies of one core over the phase
        server, client = ((b - a) / span for a, b in zip(own0, own1))
        self.result = {"server_cores": server, "client_cores": client,
                       "other_cores": max(0.0, (busy1 - busy0) / span - server - client)}


# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# the flood scenario: one client's huge request against another's small ones


def flood_body(args) -> dict:
    prompts = [f"What is {i}+{i * 7 % 100}?" for i in range(args.flood_prompts)]
    return {"model": "tiny", "prompt": prompts, "max_tokens": args.flood_max_tokens, "temperature": 1.0, "seed": 1}


async def small_requests(url: str, args, first_id: int) -> list[Result]:
    """--flood-small chat requests one after another, from 127.0.0.2."""
    import httpx

    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=args.timeout) as client:
        return [await one_request(client, first_id + k, args) for k in range(args.flood_small)]


async def measure_flood(url: str, server: subprocess.Popen, args) -> dict:
    import httpx

    await small_requests(url, argparse.Namespace(**{**vars(args), "flood_small": 3}), 10**6)  # warm-up
    phases = {}
    with CpuMeter(server.pid) as meter:
        alone = await small_requests(url, args, 0)
    phases["alone"] = {**latency_summary(alone), "cpu": meter.result}
    async with httpx.AsyncClient(base_url=url, transport=httpx.AsyncHTTPTransport(local_address="127.0.0.1"),
                                 timeout=None) as flooder:
        flood = asyncio.create_task(flooder.post("/v1/completions", json=flood_body(args)))
        await wait_generating(url, flood)
        with CpuMeter(server.pid) as meter:
            under = await small_requests(url, args, 1000)
        phases["under flood"] = {**latency_summary(under), "cpu": meter.result}
        health = (await flooder.get("/health")).json()
        flood.cancel()  # the connection closes: the server drops the flood's rows
    phases["under flood"]["flood_completions_waiting"] = health["pending"]
    return phases


async def wait_generating(url: str, flood: asyncio.Task, timeout: float = 60) -> None:
    """Until the flood's first batch is generating (tokens out, the rest of its rows waiting), then a second more."""
    import httpx

    async with httpx.AsyncClient(base_url=url) as client:
        deadline = time.monotonic() + timeout
        while True:
            health = (await client.get("/health")).json()
            if health["pending"] and health["batcher"]["completion_tokens"]:
                break
            if flood.done() or time.monotonic() > deadline:
                raise RuntimeError(f"the flood did not start: {flood.result().text if flood.done() else 'timeout'}")
            await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)


def latency_summary(results: list[Result]) -> dict:
    ok = sorted(r.latency_s for r in results if not r.error)
    lat = ok or [float("nan")]
    return {"requests": len(results), "errors": len(results) - len(ok), "p50_latency_s": percentile(lat, 50),
            "p90_latency_s": percentile(lat, 90), "p99_latency_s": percentile(lat, 99), "max_latency_s": lat[-1],
            "error_examples": sorted({r.error for r in results if r.error})[:5]}


def print_latency_rows(phases: dict[str, dict], width: int, tail: str) -> None:
    """One row per phase: errors, p50, the tail percentile (p90 or p99), max latency, and whose cores were busy."""
    print(f"{'phase':<{width}} {'errors':>6} {'p50':>9} {tail:>9} {'max':>9}  server / client / other cores")
    for name, s in phases.items():
        cpu = s["cpu"]
        print(f"{name:<{width}} {s['errors']:>6} {s['p50_latency_s'] * 1000:>6.0f} ms "
              f"{s[tail + '_latency_s'] * 1000:>6.0f} ms {s['max_latency_s'] * 1000:>6.0f} ms  "
              f"{cpu['server_cores']:.2f} / {cpu['client_cores']:.2f} / {cpu['other_cores']:.2f}")


def print_flood(phases: dict[str, dict], ratio: float, stats: dict, args) -> None:
    print(f"small client: chat, max_tokens {args.max_tokens}, {args.flood_small} requests one after another; "
          f"flood: {args.flood_prompts} prompts x {args.flood_max_tokens} tokens in one /v1/completions request")
    print_latency_rows(phases, 12, "p90")
    print(f"\nunder flood / alone, p50 latency: {ratio:.2f}x (bar: <= 2x); flood completions still waiting at the "
          f"end: {phases['under flood']['flood_completions_waiting']}")
    print(f"server: {stats['steps']} decode steps, at most {stats['max_batch_rows']} rows at once, "
          f"{stats['parked_rows']} of the flood's rows parked to give the small client its share")


def run_flood(url: str, server: subprocess.Popen, args) -> int:
    import httpx

    phases = asyncio.run(measure_flood(url, server, args))
    stats = httpx.get(f"{url}/health").json()["batcher"]
    ratio = phases["under flood"]["p50_latency_s"] / phases["alone"]["p50_latency_s"]
    print_flood(phases, ratio, stats, args)
    errors = sum(p["errors"] for p in phases.values())
    for p in phases.values():
        for example in p["error_examples"]:
            print(f"error: {example}")
    write_json(args, {"phases": phases, "ratio": ratio, "server_batcher": stats})
    return 0 if errors == 0 and ratio <= 2 else 1


# ---------------------------------------------------------------------------------------------------------------
# the mixed scenario: short requests arriving while long generations run


def long_body(i: int, args) -> dict:
    return {"model": "tiny", "prompt": f"Count on from {i}:", "max_tokens": args.mixed_long_tokens,
            "temperature": 1.0, "seed": i}


async def one_long_request(client, i: int, args) -> Result:
    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/completions", json=long_body(i, args))
        if r.status_code != 200:
            return Result(error=f"HTTP {r.status_code}: {r.text[:120]}")
        choice = r.json()["choices"][0]
        n = check_finish(choice["finish_reason"], r.json()["usage"], args.mixed_long_tokens, choice["text"])
    except Exception as err:  # counted, never stops the run
        return Result(error=f"{type(err).__name__}: {err}"[:160])
    return Result(time.perf_counter() - t0, n)


async def keep_long_running(url: str, args, stop: asyncio.Event, results: list[Result]) -> None:
    """--mixed-long clients of 127.0.0.1, each sending a long completion again as soon as its previous one ended,
    until stop is set; the ones then running are dropped (the server sees their clients leave)."""
    import httpx

    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.1")
    limits = httpx.Limits(max_connections=args.mixed_long, max_keepalive_connections=args.mixed_long)
    async with httpx.AsyncClient(base_url=url, transport=transport, limits=limits, timeout=args.timeout) as client:
        async def worker(w: int) -> None:
            for k in range(10**9):
                results.append(await one_long_request(client, w * 10**6 + k, args))

        tasks = [asyncio.create_task(worker(w)) for w in range(args.mixed_long)]
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_long_running(url: str, args, timeout: float = 120) -> None:
    """Until every long completion has produced tokens for a while (all of them are in the batch)."""
    import httpx

    async with httpx.AsyncClient(base_url=url) as client:
        start = (await client.get("/health")).json()["batcher"]["completion_tokens"]
        deadline = time.monotonic() + timeout
        while (await client.get("/health")).json()["batcher"]["completion_tokens"] - start < 20 * args.mixed_long:
            if time.monotonic() > deadline:
                raise RuntimeError("the long completions did not start")
            await asyncio.sleep(0.05)


async def measure_mixed(url: str, server: subprocess.Popen, args) -> tuple[dict, list[Result], dict]:
    import httpx

    short = argparse.Namespace(**{**vars(args), "flood_small": args.mixed_short})
    await small_requests(url, argparse.Namespace(**{**vars(args), "flood_small": 3}), 10**6)  # warm-up
    phases = {}
    with CpuMeter(server.pid) as meter:
        idle = await small_requests(url, short, 0)
    phases["idle"] = {**latency_summary(idle), "cpu": meter.result}
    stop, long_results = asyncio.Event(), []
    longs = asyncio.create_task(keep_long_running(url, args, stop, long_results))
    await wait_long_running(url, args)
    with CpuMeter(server.pid) as meter:
        busy = await small_requests(url, short, 1000)
    phases["long ones running"] = {**latency_summary(busy), "cpu": meter.result}
    async with httpx.AsyncClient(base_url=url) as client:
        stats = (await client.get("/health")).json()["batcher"]  # before the long ones leave
    stop.set()
    await longs
    return phases, long_results, stats


def print_mixed(phases: dict[str, dict], long_results: list[Result], stats: dict, args) -> tuple[float, float]:
    print(f"short client: chat, max_tokens {args.max_tokens}, {args.mixed_short} requests one after another; long: "
          f"{args.mixed_long} completions of {args.mixed_long_tokens} tokens kept running (another client)")
    print_latency_rows(phases, 18, "p99")
    idle, busy = phases["idle"], phases["long ones running"]
    p50, p99 = (busy[k] / idle[k] for k in ("p50_latency_s", "p99_latency_s"))
    print(f"\nlong ones running / idle: p50 {p50:.2f}x, p99 {p99:.2f}x (bar: p99 <= 2x)")
    long_errors = [r for r in long_results if r.error]
    print(f"long completions finished: {len(long_results) - len(long_errors)}, errors: {len(long_errors)}")
    print(f"server: {stats['steps']} decode steps, at most {stats['max_batch_rows']} rows at once, "
          f"{stats['parked_rows']} rows parked")
    return p50, p99


def run_mixed(url: str, server: subprocess.Popen, args) -> int:
    phases, long_results, stats = asyncio.run(measure_mixed(url, server, args))
    p50, p99 = print_mixed(phases, long_results, stats, args)
    examples = sorted({r.error for r in long_results if r.error} | {e for p in phases.values()
                                                                     for e in p["error_examples"]})
    for example in examples[:5]:
        print(f"error: {example}")
    errors = sum(p["errors"] for p in phases.values()) + sum(1 for r in long_results if r.error)
    write_json(args, {"phases": phases, "p50_ratio": p50, "p99_ratio": p99, "errors": errors,
                      "long_finished": sum(1 for r in long_results if not r.error), "server_batcher": stats})
    return 0 if errors == 0 and p99 <= 2 else 1


def write_json(args, figures: dict) -> None:
    if not args.json:
        return
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "python": platform.python_version(), "args": vars(args), **figures}
    Path(args.json).write_text(json.dumps(record, indent=2))
    print(f"figures: {args.json}")


def print_table(phases: dict[str, dict], ratio: float, stats: dict, args) -> None:
    rows = [("phase", "clients x requests", "errors", "p50 latency", "p99 latency", "completion tok/s",
             "server / client / other cores")]
    for name, s in phases.items():
        cpu = s["cpu"]
        rows.append((name, s["shape"], str(s["errors"]), f"{s['p50_latency_s'] * 1000:.0f} ms",
                     f"{s['p99_latency_s'] * 1000:.0f} ms", f"{s['tokens_per_s']:,.0f}",
                     f"{cpu['server_cores']:.2f} / {cpu['client_cores']:.2f} / {cpu['other_cores']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\nconcurrent / one-at-a-time tokens/s: {ratio:.2f}x (bar: >= 4x)")
    print(f"server: {stats['rows']} completions in {stats['steps']} decode steps ({stats['batches']} busy spells), at "
          f"most {stats['max_batch_rows']} at once; max_tokens {args.max_tokens}, "
          f"{'streaming' if args.stream else 'not streaming'}")


async def measure(url: str, server: subprocess.Popen, args) -> tuple[dict, float]:
    await run_phase("warm-up", url, 4, 2, args, 10**6)
    phases = {}
    for name, clients, per_client, first in [("one at a time", 1, args.sequential, 0),
                                              ("concurrent", args.clients, args.requests, 10_000)]:
        with CpuMeter(server.pid) as meter:
            phase = await run_phase(name, url, clients, per_client, args, first)
        phases[name] = {**phase.summary(), "shape": f"{clients} x {per_client}", "cpu": meter.result}
    ratio = phases["concurrent"]["tokens_per_s"] / phases["one at a time"]["tokens_per_s"]
    return phases, ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=10, help="requests per client, one after another")
    parser.add_argument("--sequential", type=int, default=20, help="requests in the one-at-a-time phase")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stream", action="store_true", help="stream every response over SSE")
    parser.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    parser.add_argument("--threads", type=int, default=0, help="the server's torch threads (0: its default)")
    parser.add_argument("--timeout", type=float, default=300, help="per-request timeout, seconds")
    parser.add_argument("--workdir", default="", help="where the model and server log go (default: a temp dir)")
    parser.add_argument("--json", default="", help="write every figure here")
    parser.add_argument("--flood", action="store_true", help="the fairness scenario instead (see above)")
    parser.add_argument("--flood-prompts", type=int, default=128, help="prompts in the flooding request")
    parser.add_argument("--flood-max-tokens", type=int, default=2000, help="max_tokens of the flooding request")
    parser.add_argument("--flood-small", type=int, default=10, help="small requests in each phase")
    parser.add_argument("--mixed", action="store_true", help="the latency scenario instead (see above)")
    parser.add_argument("--mixed-long", type=int, default=16, help="long completions kept running")
    parser.add_argument("--mixed-long-tokens", type=int, default=1000, help="max_tokens of each long completion")
    parser.add_argument("--mixed-short", type=int, default=100, help="short requests in each phase (100: p99 is not the max)")
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="r1lab-serve-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    endless = args.flood or args.mixed  # every long completion runs to its max_tokens
    model = workdir / ("model-endless" if endless else "model")
    build_model(model, endless=endless)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(model, port, args, workdir / "server.log")
    try:
        wait_ready(url, server)
        if args.flood:
            return run_flood(url, server, args)
        if args.mixed:
            return run_mixed(url, server, args)
        phases, ratio = asyncio.run(measure(url, server, args))
        import httpx

        stats = httpx.get(f"{url}/health").json()["batcher"]
    finally:
        server.terminate()
        server.wait(30)
    print_table(phases, ratio, stats, args)
    errors = sum(p["errors"] for p in phases.values())
    for p in phases.values():
        for example in p["error_examples"]:
            print(f"error: {example}")
    write_json(args, {"phases": phases, "ratio": ratio, "server_batcher": stats})
    return 0 if errors == 0 and ratio >= 4 else 1


if __name__ == "__main__":
    sys.exit(main())
