"""One replica: an engine, its admission window and what it reports back to the controller.

The controller decides whose request goes next; the replica decides how many run in its engine at once. A request
beyond the window waits here, in arrival order, until a slot frees. `free_slots` tells the controller how many it
may send without queueing, so the order the controller chose is not lost in an engine queue. Plain asyncio, no Ray:
the Serve deployment (`equinox_ray.serve`) hosts it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator

from equinox_ray.engines.admission import AdmissionWindow
from equinox_ray.engines.types import Engine, EngineError, EngineStats, GenerationRequest, TokenChunk


@dataclass(frozen=True)
class ReplicaReport:
    """The periodic report (every second or less)."""

    replica: str
    pool: str
    stats: EngineStats
    window: int
    in_flight: int
    local_queue: int
    free_slots: int
    tpot_s: float | None
    finished: int
    extra: dict = field(default_factory=dict)


class Replica:
    def __init__(self, engine: Engine, window: AdmissionWindow, name: str = "replica", pool: str = "default") -> None:
        self.engine = engine
        self.window = window
        self.name = name
        self.pool = pool
        self.in_flight = 0
        self.local_queue = 0
        self.finished = 0
        self._in_engine: set[str] = set()
        self._slot_freed = asyncio.Condition()

    async def start(self) -> None:
        await self.engine.start()

    def free_slots(self) -> int:
        return max(0, self.window.size - self.in_flight - self.local_queue)

    def healthy(self) -> bool:
        return self.engine.stats().healthy

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        await self._acquire()
        self._in_engine.add(request.id)
        try:
            async for chunk in self.engine.generate(request):
                if chunk.usage is not None:
                    self.finished += 1
                    if chunk.finish_reason != "abort":
                        self.window.observe(chunk.usage.output_tokens, chunk.usage.ttft_s, chunk.usage.e2e_s)
                yield chunk
        finally:
            self._in_engine.discard(request.id)
            await self._release()

    async def abort(self, request_id: str) -> bool:
        """Abort a request in the engine, whose stream then ends with an "abort" chunk and its usage. False if it
        is not in the engine (still waiting for a slot here, or already done)."""
        if request_id not in self._in_engine:
            return False
        await self.engine.abort(request_id)
        return True

    def report(self) -> ReplicaReport:
        return ReplicaReport(self.name, self.pool, self.engine.stats(), self.window.size, self.in_flight,
                             self.local_queue, self.free_slots(), self.window.tpot_s, self.finished)

    async def _acquire(self) -> None:
        async with self._slot_freed:
            self.local_queue += 1
            try:
                await self._slot_freed.wait_for(lambda: self.in_flight < self.window.size)
            finally:
                self.local_queue -= 1
            if not self.engine.stats().healthy:
                raise EngineError(f"replica {self.name} is unhealthy")
            self.in_flight += 1

    async def _release(self) -> None:
        async with self._slot_freed:
            self.in_flight -= 1
            self._slot_freed.notify(max(1, self.window.size - self.in_flight))  # no thundering herd
