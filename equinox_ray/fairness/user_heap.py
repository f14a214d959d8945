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

    def smallest(self, n: int, up_to: float) -> list[tuple[str, tuple]]:
        """Up to n users in key order whose key's first element is at most `up_to`: O(n log U)."""
        heap, found, taken = self._heap, [], []
        while heap and len(found) < n:
            key, user = heapq.heappop(heap)
            if self._current.get(user) != key:
                continue  # stale: dropped for good
            taken.append((key, user))
            if key[0] > up_to:
                break
            found.append((user, key))
        for item in taken:
            heapq.heappush(heap, item)
        return found

    def __len__(self) -> int:
        return len(self._current)
