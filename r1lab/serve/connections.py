"""Connections that cannot starve `r1lab serve` (slowloris): uvicorn's h11 protocol plus a deadline for each request
head and caps on open connections, per client and in all (docs/serving.md); uvicorn alone waits for a head forever.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
from collections import Counter
from dataclasses import dataclass

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from r1lab.config import ServeConfig
from r1lab.serve.protocol import ApiError

FD_RESERVE = 256  # descriptors kept for all but connections: model files, logs, the tool sandbox's pipes


def raise_open_file_limit() -> int:
    """The open-file soft limit raised to the hard one; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or hard == resource.RLIM_INFINITY:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # macOS refuses more than kern.maxfilesperproc: the cap is cut to fit instead
        return soft
    return hard


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    max_connections: int
    max_per_client: int
    cut_from: int = 0  # max_connections as set, when the open-file limit allowed fewer

    @classmethod
    def of(cls, cfg: ServeConfig, open_files: int) -> ConnectionLimits:
        room = open_files - FD_RESERVE if open_files != resource.RLIM_INFINITY else cfg.max_connections
        if room < 1:
            raise ValueError(f"the open-file limit ({open_files}) leaves no room for connections: raise it "
                             f"(ulimit -n) above {FD_RESERVE}")
        cut = room < cfg.max_connections
        return cls(cfg.header_timeout_s, min(cfg.max_connections, room), cfg.max_connections_per_client,
                   cfg.max_connections if cut else 0)

    def summary(self) -> str:
        cut = f", cut from {self.cut_from} to fit the open-file limit" if self.cut_from else ""
        return (f"  connections: at most {self.max_connections}{cut}, {self.max_per_client} per client; "
                f"a request head must be in within {self.header_timeout_s:g} s")


def uvicorn_config(app, cfg: ServeConfig, limits: ConnectionLimits | None = None, **overrides) -> uvicorn.Config:
    """How `r1lab serve` runs `app` under uvicorn, limits included (tests start their servers with it too)."""
    limits = limits or ConnectionLimits.of(cfg, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    settings = dict(host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5,
                    http=guarded_protocol(limits), timeout_keep_alive=cfg.keep_alive_s,
                    h11_max_incomplete_event_size=cfg.max_header_bytes,
                    ws="none")  # an upgrade would hand the socket to another protocol, uncounted: none is served
    return uvicorn.Config(app, **(settings | overrides))


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's TCP socket, bound before the model loads so that an address in use fails at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({err.strerror}): another server may hold the port; "
                         "choose another --port") from None
    return sock


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """The protocol class of one server: its connections share one table."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"table": ConnectionTable(limits)})


class ConnectionTable:
    """A server's open connections, in all and per address, and those waiting for a request head, oldest first."""

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self.open: set[GuardedH11Protocol] = set()
        self.per_address: Counter[str] = Counter()
        self.waiting: dict[GuardedH11Protocol, None] = {}  # dicts keep insertion order: the oldest first
        self.waiting_per_address: dict[str, dict[GuardedH11Protocol, None]] = {}

    def admit(self, conn: GuardedH11Protocol) -> str | None:
        """Count a new connection, closing a waiting one past a cap; None, or why conn gets 503 (none to close)."""
        self.open.add(conn)
        self.per_address[conn.address] += 1
        limits = self.limits
        if self.per_address[conn.address] > limits.max_per_client and not self._close_oldest(
                self.waiting_per_address.get(conn.address, {})):
            return (f"too many connections from {conn.address}: this server takes {limits.max_per_client} per client "
                    f"and all of yours are busy; retry later")
        if len(self.open) > limits.max_connections and not self._close_oldest(self.waiting):
            return f"too many connections: this server takes {limits.max_connections}, all busy; retry later"
        return None

    @staticmethod
    def _close_oldest(waiting: dict[GuardedH11Protocol, None]) -> bool:
        if not waiting:
            return False
        next(iter(waiting)).close_waiting()
        return True

    def remove(self, conn: GuardedH11Protocol) -> None:
        self.stop_waiting(conn)
        if conn in self.open:
            self.open.remove(conn)
            self.per_address[conn.address] -= 1
            if not self.per_address[conn.address]:
                del self.per_address[conn.address]

    def wait(self, conn: GuardedH11Protocol) -> None:
        self.waiting[conn] = None
        self.waiting_per_address.setdefault(conn.address, {})[conn] = None

    def stop_waiting(self, conn: GuardedH11Protocol) -> None:
        self.waiting.pop(conn, None)
        mine = self.waiting_per_address.get(conn.address)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self.waiting_per_address[conn.address]


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol under a ConnectionTable's caps and the request-head deadline; between a response's end
    and the next head, the connection waits."""

    table: ConnectionTable  # one per server: see guarded_protocol()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.address = self.client[0] if self.client else "local"
        self.head_deadline: asyncio.TimerHandle | None = None
        refusal = self.table.admit(self)
        if refusal is not None:
            self.app = _refusal_app(refusal)  # uvicorn runs self.app on each request head, as its own 503 does
        self._wait_for_head()
        self._start_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_request():
            self._stop_waiting()
        elif self.head_deadline is None:  # a next request's first bytes: uvicorn has stopped its keep-alive timer
            self._start_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._in_request() and not self.transport.is_closing():  # not a pipelined request started at once
            self._wait_for_head()  # idle: uvicorn's keep-alive timer closes it unless a next request starts

    def connection_lost(self, exc: Exception | None) -> None:
        self.table.remove(self)
        self._stop_waiting()
        super().connection_lost(exc)

    def close_waiting(self) -> None:
        """Close a connection with no request in flight: its head came too late, or its place is needed."""
        self._stop_waiting()
        self.table.remove(self)
        self.transport.close()

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _wait_for_head(self) -> None:
        self._stop_waiting()  # a connection waiting again goes to the back of the queue
        self.table.wait(self)

    def _start_head_deadline(self) -> None:
        self.head_deadline = self.loop.call_later(self.table.limits.header_timeout_s, self.close_waiting)

    def _stop_waiting(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None
        self.table.stop_waiting(self)


def _refusal_app(message: str):
    """An ASGI app that answers every request 503 with an OpenAI-style body and closes the connection."""
    body = json.dumps(ApiError(503, message, "server_error", code="too_many_connections").body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), (b"retry-after", b"1")]

    async def refuse(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return refuse
