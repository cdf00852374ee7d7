"""Where event changes go out: listeners called in line (the webhook outbox persists each change
before publish returns) and subscribers with their own queue (Server-Sent Events streams)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

log = logging.getLogger("vad.events")

EVENT_KINDS = ("opened", "updated", "closed")
SUBSCRIBER_QUEUE = 256  # changes a slow SSE client may have waiting; beyond it the oldest are dropped

Listener = Callable[[str, dict[str, Any]], None]
Change = tuple[str, dict[str, Any]] | None  # None: the bus closed (the server is stopping)


class EventBus:
    """In-process fan-out of ``(kind, event)`` changes; kind is one of EVENT_KINDS. Call ``publish``
    on the event loop's thread."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._queues: set[asyncio.Queue[Change]] = set()
        self.closed = False

    def add_listener(self, listener: Listener) -> None:
        """``listener(kind, event)`` runs inside every publish; it must be quick and must not raise."""
        self._listeners.append(listener)

    def publish(self, kind: str, event: dict[str, Any]) -> None:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event change {kind!r}")
        for listener in self._listeners:
            try:
                listener(kind, event)
            except Exception:  # noqa: BLE001 - one broken listener must not stop the others
                log.exception("event listener %r failed on %s", listener, kind)
        self.relay(kind, event)

    def relay(self, kind: str, event: dict[str, Any]) -> None:
        """To the subscribers only: the last step of ``publish``, and the whole of it for a change made
        on another replica (service/events/relay.py), whose listeners (the webhook outbox) have had it."""
        for queue in self._queues:
            self._put(queue, (kind, event))

    def close(self) -> None:
        """The server is stopping: every subscriber gets None (its stream ends) and so will new ones.
        Listeners are kept: events still closing during shutdown reach the webhook outbox."""
        self.closed = True
        for queue in self._queues:
            self._put(queue, None)

    @staticmethod
    def _put(queue: asyncio.Queue[Change], change: Change) -> None:
        if queue.full():
            queue.get_nowait()  # a slow subscriber loses its oldest change, never blocks the rest
        queue.put_nowait(change)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Change]]:
        """A queue receiving every change published while the context is open, then None once the
        bus closes."""
        queue: asyncio.Queue[Change] = asyncio.Queue(SUBSCRIBER_QUEUE)
        if self.closed:
            queue.put_nowait(None)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)
