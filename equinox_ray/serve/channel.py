"""One ingress replica's tokens on one pool replica: the chunks of all its requests, sent as one message.

A message goes out `interval_s` after the previous one, carrying everything produced since, merged per request; a
request's first token and its last chunk go out at once (time to first token and the end of a request are never
held back). With an interval of 0 every engine step that produced something is sent. The cost of a Serve stream
message is then paid per interval, not per request or per token (docs/design.md, "The serving path").
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from equinox_ray.engines.types import TokenChunk, merge_chunks


class Channel:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._pending: dict[str, list[TokenChunk]] = {}
        self._ready = asyncio.Event()
        self._urgent = asyncio.Event()
        self._last_sent = 0.0
        self._closed = False

    def close(self) -> None:
        """No more chunks will come: `batches` sends what is pending and ends."""
        self._closed = True
        self._ready.set()
        self._urgent.set()

    def push(self, chunk: TokenChunk, urgent: bool = False) -> None:
        self._pending.setdefault(chunk.request_id, []).append(chunk)
        self._ready.set()
        if urgent or self.interval_s <= 0:
            self._urgent.set()

    def __len__(self) -> int:
        return len(self._pending)

    async def batches(self) -> AsyncIterator[list[TokenChunk]]:
        loop = asyncio.get_running_loop()
        while True:
            await self._ready.wait()
            delay = self._last_sent + self.interval_s - loop.time()
            if delay > 0 and not self._urgent.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), delay)
            self._ready.clear()
            self._urgent.clear()
            batch = [merge_chunks(chunks) for chunks in self._pending.values()]
            self._pending = {}
            self._last_sent = loop.time()
            if batch:
                yield batch
            # chunks pushed while that batch was out (a draining replica closes a channel right after its last
            # request's last chunk) go before the end
            if self._closed and not self._pending:
                return
