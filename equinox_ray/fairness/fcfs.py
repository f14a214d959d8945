"""First come, first served across all users: the request that arrived first goes first."""

from __future__ import annotations

from equinox_ray.fairness.policy import Policy


class FCFS(Policy):
    name = "fcfs"

    def key(self, user: str) -> float:
        return self.queues.head(user).arrival

    def counters(self, user: str) -> dict[str, float]:
        return {}
