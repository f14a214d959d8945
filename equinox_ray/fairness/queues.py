"""Per-user queues of waiting requests: FIFO, or cheapest first with a cap on how often one request is overtaken.

Ordering a user's own queue moves no service between users (every request is charged the same whenever it runs),
so it is free of fairness cost; it only changes which of the user's requests waits. Cheapest first cuts the median
wait, and the cap keeps a long request from starving behind a stream of short ones: a request that younger ones have
overtaken `max_overtakes` times goes next. With `max_overtakes = 0` the queue is exactly FIFO.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from equinox_ray.fairness.request import Request


@dataclass(eq=False)
class _Waiting:
    request: Request
    cost: float
    ahead: int  # departures from the queue needed before this is the oldest waiting request
    gone: bool = False


class _UserQueue:
    """One user's waiting requests. The oldest waiting request has been overtaken at least as often as any other
    (every younger grant that passed another request passed it too), so checking the oldest enforces the cap for
    all. Its count is the departures since it arrived beyond those that were ahead of it (a cancelled younger
    request counts too: rare, and it only makes the cap stricter)."""

    def __init__(self, max_overtakes: int, max_depth: int = 0) -> None:
        self.max_overtakes = max_overtakes
        self.max_depth = max_depth
        self.fifo: deque[_Waiting] = deque()
        self.by_cost: list[tuple[float, int, _Waiting]] = []
        self.departures = 0
        self.size = 0
        self._seq = 0

    def push(self, request: Request, cost: float) -> _Waiting:
        entry = _Waiting(request, cost, self.departures + self.size)
        self.fifo.append(entry)
        if self.max_overtakes:
            self._seq += 1
            heapq.heappush(self.by_cost, (cost, self._seq, entry))
        self.size += 1
        return entry

    def oldest(self) -> _Waiting:
        fifo = self.fifo
        while fifo[0].gone:
            fifo.popleft()
        return fifo[0]

    def head(self) -> _Waiting:
        oldest = self.oldest()
        if (not self.max_overtakes or self.departures - oldest.ahead >= self.max_overtakes
                or (self.max_depth and self.size > self.max_depth)):
            return oldest
        by_cost = self.by_cost
        while by_cost[0][2].gone:
            heapq.heappop(by_cost)
        return by_cost[0][2]

    def take(self, entry: _Waiting) -> None:
        entry.gone = True
        self.departures += 1
        self.size -= 1


class UserQueues:
    def __init__(self, max_overtakes: int = 0, max_depth: int = 0) -> None:
        if max_overtakes < 0 or max_depth < 0:
            raise ValueError(f"max_overtakes and max_depth must be >= 0, got {max_overtakes}, {max_depth}")
        self.max_overtakes = max_overtakes
        self.max_depth = max_depth
        self._queues: dict[str, _UserQueue] = {}
        self._where: dict[str, tuple[_UserQueue, _Waiting]] = {}  # request id -> its queue and entry

    def push(self, request: Request, cost: float = 0.0) -> None:
        if request.id in self._where:
            raise ValueError(f"request {request.id!r} is already queued")
        queue = self._queues.get(request.user)
        if queue is None:
            queue = self._queues[request.user] = _UserQueue(self.max_overtakes, self.max_depth)
        self._where[request.id] = (queue, queue.push(request, cost))

    def head(self, user: str) -> Request:
        return self._queues[user].head().request

    def head_cost(self, user: str) -> float:
        return self._queues[user].head().cost

    def oldest_cost(self, user: str) -> float:
        return self._queues[user].oldest().cost

    def pop(self, user: str) -> Request:
        queue = self._queues[user]
        entry = queue.head()
        queue.take(entry)
        del self._where[entry.request.id]
        return entry.request

    def remove(self, request_id: str) -> Request | None:
        """Take a waiting request out of its queue, wherever it is."""
        found = self._where.pop(request_id, None)
        if found is None:
            return None
        queue, entry = found
        queue.take(entry)
        return entry.request

    def backlogged(self, user: str) -> bool:
        queue = self._queues.get(user)
        return queue is not None and queue.size > 0

    def length(self, user: str) -> int:
        queue = self._queues.get(user)
        return 0 if queue is None else queue.size

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    def waiting(self) -> list[Request]:
        return [entry.request for queue in self._queues.values() for entry in queue.fifo if not entry.gone]

    def backlogged_users(self) -> list[str]:
        return [user for user, queue in self._queues.items() if queue.size]
