"""The server side of one HTTP request: its batcher jobs, and the asyncio queue their events reach through
call_soon_threadsafe. A request that ends early (client gone, error) cancels its jobs, freeing their rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import AsyncIterator, Awaitable, Callable

from r1lab.serve.batcher import Batcher, Delta, Done, Event, Failed, Job, SamplingParams
from r1lab.serve.protocol import ApiError

DISCONNECT_POLL_S = 0.25


class ClientGone(Exception):
    pass


class Generation:
    """n completions for each of the prompts; event indices are prompt * n + sample, as OpenAI numbers choices."""

    def __init__(self, batcher: Batcher, prompts: list[list[int]], params: SamplingParams, stream: bool,
                 client: str = ""):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.total = len(prompts) * params.n
        self.jobs = [Job(ids, params, self._deliverer(i * params.n), stream, client) for i, ids in enumerate(prompts)]
        self._finished = 0
        try:
            for job in self.jobs:
                batcher.submit(job)
        except Exception:
            self.cancel()
            raise

    def _deliverer(self, offset: int) -> Callable[[list[Event]], None]:
        def deliver(events: list[Event]) -> None:  # worker thread
            if offset:
                events = [dataclasses.replace(e, index=e.index + offset) if isinstance(e, (Delta, Done)) else e
                          for e in events]
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is going down
                self.loop.call_soon_threadsafe(self._put, events)
        return deliver

    def _put(self, events: list[Event]) -> None:
        for e in events:
            self.queue.put_nowait(e)

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    async def events(self, is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[Event]:
        """Every Delta and Done until all completions are done; a Failed raises an ApiError (500), a client that
        left (is_disconnected) ClientGone."""
        try:
            while self._finished < self.total:
                event = await self._next(is_disconnected)
                if isinstance(event, Failed):
                    raise ApiError(500, event.message, type="server_error")
                if isinstance(event, Done):
                    self._finished += 1
                yield event
        finally:
            if self._finished < self.total:
                self.cancel()

    async def _next(self, is_disconnected) -> Event:
        if is_disconnected is None:
            return await self.queue.get()
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await is_disconnected():
                    raise ClientGone() from None

    async def results(self, is_disconnected=None) -> list[Done]:
        """The Done of every completion, in choice order (for a response that does not stream)."""
        done = [e async for e in self.events(is_disconnected) if isinstance(e, Done)]
        return sorted(done, key=lambda d: d.index)
