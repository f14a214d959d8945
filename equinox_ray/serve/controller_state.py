"""The controller's records: one per request (`Tracked`), per pool and replica (`PoolState`, `ReplicaState`), per
user (`UserStats`), and the outgoing mail (`Mailboxes`). Plain data with the small views the controller needs."""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable

from equinox_ray.engines.replica import ReplicaReport
from equinox_ray.fairness import PoolFacts, PoolView, Prediction, ReplicaObservation, Request, pick_replica, pool_view
from equinox_ray.fairness.pools import UNKNOWN_KV
from equinox_ray.serve.checkpoint import UsageTotals
from equinox_ray.serve.config import PoolConfig
from equinox_ray.serve.protocol import Dispatch


@dataclass
class Tracked:
    """The controller's one record of a request, from submission to finish."""

    request: Request
    dispatch: Dispatch
    granted_at: float | None = None
    replica: str | None = None
    prediction: Prediction | None = None
    admission: PoolView | None = None  # its pool as the policy saw it at the grant


@dataclass
class ReplicaState:
    pool: str
    window: int
    seen: float
    running: int = 0  # granted here and not finished, as the controller counts it
    routable: bool = False  # Serve routes to it: it has started and is not being stopped
    report: ReplicaReport | None = None
    lost_at: float | None = None  # when an ingress lost its channel to it; a report after the controller's LOST_GRACE_S clears it
    kv_promised: int = 0  # prompt + max_tokens of the requests granted here and not finished

    @property
    def healthy(self) -> bool:
        return self.report is None or self.report.stats.healthy

    @property
    def free_slots(self) -> int:
        return max(0, self.window - self.running) if self.routable and self.lost_at is None and self.healthy else 0

    @property
    def free_kv_tokens(self) -> int:
        """KV-cache tokens not promised to what was granted here, as the simulator's replicas count them, once the
        engine has said how many it holds."""
        capacity = self.report.stats.kv_capacity_tokens if self.report is not None else None
        return UNKNOWN_KV if capacity is None else capacity - self.kv_promised

    def observation(self) -> ReplicaObservation:
        r = self.report
        if r is None:
            return ReplicaObservation(self.free_slots, self.running)
        return ReplicaObservation(self.free_slots, self.running, r.stats.waiting, r.stats.kv_cache_usage,
                                  r.stats.tokens_per_s, r.stats.utilization, r.tpot_s, self.free_kv_tokens)


@dataclass
class PoolState:
    config: PoolConfig
    replicas: dict[str, ReplicaState] = field(default_factory=dict)
    routable: set[str] = field(default_factory=set)  # as Serve last said, connected or not
    granted: int = 0
    facts: PoolFacts = field(init=False)

    def __post_init__(self) -> None:
        self.facts = self.config.facts()

    @property
    def running(self) -> int:
        return sum(r.running for r in self.replicas.values())

    def capacity(self) -> int:
        return sum(r.window for r in self.replicas.values())

    def view(self) -> PoolView:
        return pool_view(self.facts, [r.observation() for r in self.replicas.values()])

    def pick_replica(self, kv_demand: int) -> str:
        return pick_replica({name: r.observation() for name, r in self.replicas.items()}, kv_demand)


@dataclass
class UserStats(UsageTotals):
    """The totals a checkpoint keeps, and recent latencies it does not."""

    ttft_s: deque = field(default_factory=lambda: deque(maxlen=256))
    e2e_s: deque = field(default_factory=lambda: deque(maxlen=256))


class Mailboxes:
    """Outgoing messages per destination (an ingress or a replica); `notify` wakes whoever delivers them."""

    def __init__(self) -> None:
        self.items: dict[str, list] = defaultdict(list)
        self.notify: Callable[[str], None] = lambda destination: None

    def put(self, destination: str, message) -> None:
        self.items[destination].append(message)
        self.notify(destination)

    def take(self, destination: str) -> list:
        return self.items.pop(destination, [])

    def drop(self, destination: str) -> None:
        self.items.pop(destination, None)
