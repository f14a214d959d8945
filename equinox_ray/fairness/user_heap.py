"""A min-heap of users by scheduling key with lazy invalidation: O(log U) to update a key or take the minimum."""

from __future__ import annotations

import heapq


class UserHeap:
    def __init__(self) -> None:
        self._heap: list[tuple[tuple, str]] = []
        self._current: dict[str, tuple] = {}

    def set(self, user: str, key: tuple) -> None:
        if self._current.get(user) == key:
            return
        self._current[user] = key
        heapq.heappush(self._heap, (key, user))
        if len(self._heap) > 2 * len(self._current) + 64:
            self._heap = [(k, u) for u, k in self._current.items()]
            heapq.heapify(self._heap)

    def discard(self, user: str) -> None:
        self._current.pop(user, None)

    def peek(self) -> tuple[str, tuple] | None:
        heap = self._heap
        while heap:
            key, user = heap[0]
            if self._current.get(user) == key:
                return user, key
            heapq.heappop(heap)
        return None

    def __len__(self) -> int:
        return len(self._current)
