"""Per-user FIFO queues of waiting requests."""

from __future__ import annotations

from collections import deque

from equinox_ray.fairness.request import Request


class UserQueues:
    def __init__(self) -> None:
        self._queues: dict[str, deque[Request]] = {}
        self._where: dict[str, str] = {}  # request id -> user, for cancellation

    def push(self, request: Request) -> None:
        if request.id in self._where:
            raise ValueError(f"request {request.id!r} is already queued")
        self._queues.setdefault(request.user, deque()).append(request)
        self._where[request.id] = request.user

    def head(self, user: str) -> Request:
        return self._queues[user][0]

    def pop(self, user: str) -> Request:
        request = self._queues[user].popleft()
        del self._where[request.id]
        return request

    def remove(self, request_id: str) -> Request | None:
        """Take a waiting request out of its queue (O(queue length): cancellations are rare)."""
        user = self._where.pop(request_id, None)
        if user is None:
            return None
        queue = self._queues[user]
        for i, request in enumerate(queue):
            if request.id == request_id:
                del queue[i]
                return request
        raise AssertionError(f"request {request_id!r} indexed but not in its queue")

    def backlogged(self, user: str) -> bool:
        return bool(self._queues.get(user))

    def length(self, user: str) -> int:
        return len(self._queues.get(user, ()))

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    def waiting(self) -> list[Request]:
        return [r for queue in self._queues.values() for r in queue]

    def backlogged_users(self) -> list[str]:
        return [user for user, queue in self._queues.items() if queue]
