"""The ``EventQueue`` handed to the executor: a bounded buffer the runner's forwarder drains.

Design decision: ``enqueue_event`` only buffers (in order) and never talks to the bus, so the
executor is not slowed by the gateway's latency and a bus failure never surfaces inside the
executor; a full buffer (the gateway is slow) blocks the executor, as the SDK's bounded queue
does. Events enqueued after the queue was closed (the task was cancelled, or refused as
terminal or stale) are dropped, as the SDK drops events on a closed queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from a2a.server.events.event_queue import Event, EventQueue

log = logging.getLogger(__name__)


class ForwardingEventQueue(EventQueue):
    """Producer side for the executor; ``next_event`` is the forwarder's consumer side."""

    def __init__(self, max_size: int = 256) -> None:
        self._items: collections.deque[Event] = collections.deque()
        self._space = asyncio.Semaphore(max_size)
        self._wake = asyncio.Event()
        self._closed = False

    async def enqueue_event(self, event: Event) -> None:
        await self._space.acquire()
        if self._closed:
            self._space.release()
            log.debug("event queue closed; dropping %s", type(event).__name__)
            return
        self._items.append(event)
        self._wake.set()

    def is_closed(self) -> bool:
        return self._closed

    async def close(self, immediate: bool = False) -> None:
        """No more events; the forwarder ends after the buffered ones (all dropped if immediate)."""
        self._closed = True
        if immediate:
            while self._items:
                self._items.popleft()
                self._space.release()
        self._wake.set()

    async def next_event(self) -> Event | None:
        """The next enqueued event, or None once the queue is closed and drained."""
        while True:
            if self._items:
                self._space.release()
                return self._items.popleft()
            if self._closed:
                return None
            self._wake.clear()
            await self._wake.wait()
