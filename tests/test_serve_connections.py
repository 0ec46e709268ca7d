"""`r1lab serve` under clients that never finish a request (slowloris): the request-head deadline, the connection caps
(closing the longest-waiting connection, 503 when all are busy), the open-file limit, through a real server."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from test_serve import KEY, MODEL_ID, QUESTION, ServerThread, scripted_model_dir  # noqa: E402

from r1lab.cli import COMMANDS, build_parser  # noqa: E402
from r1lab.config import ServeConfig, resolve  # noqa: E402
from r1lab.serve.connections import FD_RESERVE, ConnectionLimits, raise_open_file_limit  # noqa: E402

PARTIAL_HEAD = b"GET /v1/mod"  # a request line that never ends


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return scripted_model_dir(tmp_path_factory.mktemp("scripted"))


@contextlib.contextmanager
def server_with(model_dir, **settings):
    from r1lab.serve.app import create_app

    app = create_app(model_dir, api_key=KEY, served_model_name=MODEL_ID, device="cpu", log_level="warning",
                     **settings)
    with ServerThread(app) as srv:
        srv.table = srv.config.http.table
        yield srv


def address(server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def half_open(server_address, n: int, source: str = "127.0.0.1") -> list[socket.socket]:
    """n connections that each send part of a request line and nothing more."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.create_connection(server_address, timeout=30, source_address=(source, 0))
            socks.append(sock)
            sock.sendall(PARTIAL_HEAD)
    except BaseException:
        close_all(socks)
        raise
    return socks


def close_all(socks) -> None:
    for sock in socks:
        sock.close()


def closed_by_server(socks, wait_s: float, enough: int | None = None) -> dict[socket.socket, float]:
    """When (time.monotonic()) the server closed each of socks that it closed within wait_s (or once `enough` are):
    each read to its end of file. wait_s 0: those closed already."""
    closed, deadline = {}, time.monotonic() + wait_s
    enough = len(socks) if enough is None else enough
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        while len(closed) < enough:
            left = deadline - time.monotonic()
            for key, _ in selector.select(max(0.0, min(left, 0.2))):
                try:
                    data = key.fileobj.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    closed[key.fileobj] = time.monotonic()
                    selector.unregister(key.fileobj)
            if left <= 0:
                return closed
    return closed


def resolve_flags(command: str, *flags: str):
    return resolve(COMMANDS[command].settings, build_parser().parse_args([command, *flags]))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def chat(url: str, source: str = "127.0.0.1") -> tuple[httpx.Response, float]:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=30) as client:
        t0 = time.monotonic()
        r = client.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                        json={"model": MODEL_ID, "messages": QUESTION, "max_tokens": 16})
        return r, time.monotonic() - t0


def busy(server_address, source: str) -> socket.socket:
    """A connection with a request in flight: its head is in, its body never comes (the server waits body_timeout_s)."""
    sock = socket.create_connection(server_address, timeout=30, source_address=(source, 0))
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{".encode())
    return sock


# ---------------------------------------------------------------------------------------------------------------
# the request-head deadline


@pytest.mark.slow
def test_two_thousand_half_open_connections_neither_starve_a_request_nor_stay(model_dir):
    n, timeout = 2000, 3.0
    if raise_open_file_limit() < 2 * n + 2 * FD_RESERVE:  # both ends of every connection are in this process
        pytest.skip(f"the open-file limit is below {2 * n + 2 * FD_RESERVE}")
    with server_with(model_dir, header_timeout_s=timeout, max_connections_per_client=n + 10) as server:
        opened = time.monotonic()
        socks = half_open(address(server), n)
        try:
            wait_for(lambda: len(server.table.open) >= n, 30, "the server did not accept every connection")
            r, took = chat(server.url)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "42"
            assert took < 2.0, f"a chat request took {took:.2f} s beside {n} half-open connections"
            early = closed_by_server(socks, 0)
            if time.monotonic() - opened < 0.8 * timeout:  # on a host slow enough to be past the deadline, skip this
                assert not early, f"{len(early)} half-open connections were closed before the head deadline"
            closed = closed_by_server([s for s in socks if s not in early], timeout + 20)
            assert len(closed) + len(early) == n, f"{n - len(closed) - len(early)} of {n} are still open"
            assert min(closed.values()) - opened > 0.9 * timeout
            wait_for(lambda: not server.table.open, 5, "the server still counts connections it closed")
        finally:
            close_all(socks)


@pytest.mark.slow
def test_a_head_sent_a_byte_at_a_time_gets_no_more_time(model_dir):
    with server_with(model_dir, header_timeout_s=1.5) as server, socket.create_connection(address(server)) as sock:
        t0 = time.monotonic()
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        with contextlib.suppress(OSError):  # the server closes it mid-way
            for byte in head:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
        assert closed_by_server([sock], 15), "a trickled head kept its connection open"
        assert 1.4 < time.monotonic() - t0 < 8


@pytest.mark.slow
def test_after_a_response_keep_alive_then_the_next_head_has_the_same_deadline(model_dir):
    with (server_with(model_dir, header_timeout_s=1.5, keep_alive_s=60) as server,
          socket.create_connection(address(server), timeout=30) as sock):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while b'"status":"ok"' not in reply:
            reply += sock.recv(65536)
        assert not closed_by_server([sock], 2.0), "an idle connection was closed before its keep-alive time"
        t0 = time.monotonic()
        sock.sendall(PARTIAL_HEAD)
        assert closed_by_server([sock], 15), "a partial second head kept its connection open"
        assert 1.2 < time.monotonic() - t0 < 8


@pytest.mark.slow
def test_an_idle_connection_is_closed_after_keep_alive_s(model_dir):
    with (server_with(model_dir, keep_alive_s=0.5) as server,
          socket.create_connection(address(server), timeout=30) as sock):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        t0 = time.monotonic()
        closed = closed_by_server([sock], 10)  # reads the response, then the end of file
        assert closed and 0.4 < closed[sock] - t0 < 5


# ---------------------------------------------------------------------------------------------------------------
# the caps


@pytest.mark.slow
def test_past_the_per_client_cap_the_longest_waiting_connection_is_closed(model_dir):
    with server_with(model_dir, max_connections_per_client=20) as server:
        mine = half_open(address(server), 30)
        other = half_open(address(server), 5, source="127.0.0.2")
        try:
            closed = closed_by_server(mine, 5, enough=10)
            assert set(closed) == set(mine[:10]) and not closed_by_server(mine[10:], 0.3), "not the 10 oldest closed"
            r, _ = chat(server.url)  # the same address as the half-open ones: it closes one more of them
            assert r.status_code == 200
            assert set(closed_by_server(mine[10:], 2, enough=1)) == {mine[10]}
            assert not closed_by_server(mine[11:], 0.3)
            assert not closed_by_server(other, 0.5), "another address's connections were closed"
            assert server.table.per_address["127.0.0.2"] == 5
        finally:
            close_all(mine + other)


@pytest.mark.slow
def test_a_client_whose_connections_are_all_busy_gets_503(model_dir):
    with server_with(model_dir, max_connections_per_client=2, max_connections=5) as server:
        busy_ones = [busy(address(server), "127.0.0.3") for _ in range(2)]
        try:
            wait_for(lambda: len(server.table.open) == 2 and not server.table.waiting, 10, "not both busy")
            r, _ = chat(server.url, source="127.0.0.3")
            assert r.status_code == 503 and r.headers["connection"] == "close"
            error = r.json()["error"]
            assert error["code"] == "too_many_connections" and "127.0.0.3" in error["message"]
            assert chat(server.url, source="127.0.0.4")[0].status_code == 200  # other clients are served
            busy_ones += [busy(address(server), f"127.0.0.{i}") for i in (4, 5, 6)]
            wait_for(lambda: len(server.table.open) == 5 and not server.table.waiting, 10, "not all five busy")
            r, _ = chat(server.url, source="127.0.0.7")
            assert r.status_code == 503 and "this server takes 5" in r.json()["error"]["message"]
        finally:
            close_all(busy_ones)
        wait_for(lambda: not server.table.open, 10, "the busy connections were not released")
        assert chat(server.url, source="127.0.0.3")[0].status_code == 200


@pytest.mark.slow
def test_the_cap_in_all_closes_the_oldest_waiting_connection_of_any_client(model_dir):
    with server_with(model_dir, max_connections=10) as server:
        socks = half_open(address(server), 10, source="127.0.0.8")
        try:
            wait_for(lambda: len(server.table.open) == 10, 10, "the server did not accept them all")
            assert chat(server.url, source="127.0.0.9")[0].status_code == 200
            assert set(closed_by_server(socks, 2, enough=1)) == {socks[0]} and not closed_by_server(socks[1:], 0.3)
        finally:
            close_all(socks)


# ---------------------------------------------------------------------------------------------------------------
# settings and the open-file limit


@pytest.mark.parametrize("flags, expected", [
    (["--header-timeout-s", "-1"], "header_timeout_s: -1 must be > 0"),
    (["--header-timeout-s", "nan"], "header_timeout_s: nan is not a finite number"),
    (["--keep-alive-s", "0"], "keep_alive_s: 0 must be > 0"),
    (["--max-connections", "0"], "max_connections: 0 is below the minimum 1"),
    (["--max-connections-per-client", "-5"], "max_connections_per_client: -5 is below the minimum 1"),
    (["--max-header-bytes", "100"], "max_header_bytes: 100 is below the minimum 1024"),
])
def test_connection_settings_are_validated(flags, expected):
    with pytest.raises(ValueError, match="invalid settings") as err:
        resolve_flags("serve", *flags)
    assert expected in str(err.value)


def test_the_cap_in_all_fits_the_open_file_limit():
    cfg = ServeConfig(max_connections=8192)
    limits = ConnectionLimits.of(cfg, 1024)
    assert limits.max_connections == 1024 - FD_RESERVE and "cut from 8192" in limits.summary()
    assert ConnectionLimits.of(cfg, 100_000).max_connections == 8192
    with pytest.raises(ValueError, match=r"open-file limit \(100\) leaves no room"):
        ConnectionLimits.of(cfg, 100)


def test_the_open_file_soft_limit_is_raised_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"hard open-file limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        assert raise_open_file_limit() == hard and resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
def test_r1lab_serve_holds_more_half_open_connections_than_its_starting_open_file_limit(model_dir, tmp_path):
    """The command itself, started at a soft limit of 1,024 files: it raises the limit, so 1,500 half-open
    connections do not make accept() fail; a chat request is answered beside them, and they are closed."""
    n, start_limit = 1500, 1024
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if raise_open_file_limit() < n + FD_RESERVE or hard < n + 2 * FD_RESERVE:
        pytest.skip(f"the open-file limit is below {n + 2 * FD_RESERVE}")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "r1lab", "serve", "--model", str(model_dir), "--port", str(port), "--device", "cpu",
           "--served-model-name", MODEL_ID, "--api-key", KEY, "--header-timeout-s", "6",
           "--max-connections-per-client", str(n + 10), "--log-level", "warning"]
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:  # the shell lowers the soft limit, then becomes the server
        server = subprocess.Popen(["sh", "-c", f'ulimit -Sn {start_limit} && exec "$@"', "sh", *cmd], stdout=log,
                                  stderr=subprocess.STDOUT, env=env)
    url, socks = f"http://127.0.0.1:{port}", []
    try:
        wait_for(lambda: server.poll() is None and b"connections: at most" in log_path.read_bytes(), 120,
                 f"the server did not start: {log_path.read_text()}")
        wait_for(lambda: _health(url), 30, "the server does not answer")
        opened = time.monotonic()
        socks = half_open(("127.0.0.1", port), n)
        r, took = chat(url)
        assert r.status_code == 200 and took < 2.0, (r.status_code, took)
        early = closed_by_server(socks, 0)
        if time.monotonic() - opened < 5:
            assert not early, f"{len(early)} connections were closed at once: accept() failed or a cap cut in"
        assert len(closed_by_server(socks, 30)) == n
        assert "Too many open files" not in log_path.read_text()
    finally:
        close_all(socks)
        server.terminate()
        server.wait(30)


def _health(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    return False


@pytest.mark.slow
def test_the_slowloris_bench_runs_small(tmp_path):
    """bench/serve_slowloris.py end to end at a small size (300 connections from 4 addresses, a 2 s head deadline,
    counted 12 s on): its figures are there and meet the bar. About 30 s."""
    figures = tmp_path / "figures.json"
    bench = Path(__file__).resolve().parents[1] / "bench" / "serve_slowloris.py"
    proc = subprocess.run([sys.executable, str(bench), "--connections", "300", "--workers", "2", "--sources", "4",
                           "--requests", "2", "--hold-s", "12", "--serve-args", "--header-timeout-s 2",
                           "--workdir", str(tmp_path), "--json", str(figures)],
                          capture_output=True, text=True, timeout=300, cwd=bench.parents[1])
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(figures.read_text())
    assert result["opened"] == 300 and result["still_open_share"] == 0.0 and 1.5 < result["closed_all_s"] < 12
    assert [status for status, _ in result["requests"]] == [200, 200] and result["closed_before_requests"] == 0
    assert "bar (every request 200 within 1 s, at most 10 % open after 12 s): met" in proc.stdout
