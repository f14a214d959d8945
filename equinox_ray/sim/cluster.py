"""The cluster simulator: a discrete-event run of a workload through a policy and pools of simulated GPUs.

The policy is the very object the Ray controller drives (`equinox_ray.fairness`), told the same events in the same
order: `submit` on arrival, `schedule` while a pool has a free slot, `on_tokens` as tokens stream, `finish` with
the measured outcome. The replicas are the `SimBatcher` the real-time `SimEngine` runs, stepped under a virtual
clock. A step's scheduling happens when it starts and its tokens appear when it ends, as in a real engine loop.

Only the scheduler's view of a request reaches the policy (prompt and `max_tokens`); the true output length goes to
the replica alone, as in trace replay through the real engine.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from equinox_ray.fairness.metrics import CompletionRecord
from equinox_ray.fairness.fcfs import FCFS
from equinox_ray.fairness.policy import Policy
from equinox_ray.fairness.pools import UNKNOWN_KV, PoolView, ReplicaObservation, pick_replica, pool_view
from equinox_ray.fairness.prediction import Outcome
from equinox_ray.fairness.request import Request
from equinox_ray.sim.replica import PoolSpec, SimReplica
from equinox_ray.workloads.workload import Workload


@dataclass
class _Live:
    request: Request
    output_tokens: int  # the truth, for the replica
    replica: SimReplica
    granted: float
    admission: PoolView  # the pool as the policy saw it when it granted the request
    first_token: float | None = None


@dataclass(frozen=True)
class SimCompletion:
    """What an observer of the run is told when a request finishes."""

    request: Request
    record: CompletionRecord
    admission: PoolView  # its pool as the policy saw it at the grant
    at_finish: PoolView  # its pool when it finished


@dataclass
class SimResult:
    workload: str
    policy: str
    records: list[CompletionRecord]
    pools: list[PoolSpec]
    busy_seconds: dict[str, float]  # per replica
    makespan_s: float  # first arrival to last finish
    max_counter_gap: float | None  # largest (max - min) of the policy's key among backlogged users; None for FCFS
    largest_charge: float  # the largest single admission charge seen, for the bound
    truncated: int  # requests whose prompt or output was cut to fit the model context
    wall_s: float = 0.0

    @property
    def utilization(self) -> float:
        """Busy fraction of all replicas from the first arrival to the last finish."""
        if self.makespan_s <= 0:
            return 0.0
        return sum(self.busy_seconds.values()) / (len(self.busy_seconds) * self.makespan_s)


def scheduler_view(workload: Workload, pools: Sequence[PoolSpec],
                   max_tokens_cap: int | None) -> tuple[list[Request], list[int], int]:
    """The workload's requests as the policy sees them (prompt and max_tokens cut to fit the smallest model context
    of the pools and the client's cap), the true output length of each, as its replica runs it, and how many were
    cut."""
    context = min(p.max_model_len for p in pools)
    requests, truth, truncated = [], [], 0
    for i, r in enumerate(workload.requests):
        request = workload.scheduler_request(i, max_tokens_cap)
        prompt = min(request.prompt_tokens, context - 1)
        cap = min(request.max_tokens, context - prompt)
        output = max(1, min(r.output_tokens, cap))
        truncated += prompt != request.prompt_tokens or output != r.output_tokens
        request.prompt_tokens, request.max_tokens = prompt, cap
        requests.append(request)
        truth.append(output)
    return requests, truth, truncated


@dataclass
class ClusterSim:
    pools: Sequence[PoolSpec]
    policy: Policy
    max_tokens_cap: int | None = None  # the client's max_tokens; None: the true length, as the VTC artifact does
    gap_sample_s: float = 1.0
    stats_window_s: float = 5.0
    on_completion: Callable[[SimCompletion], None] | None = None  # e.g. a writer of MoPE's training records
    # whether the replicas tell the policy their free KV cache, so that it grants only what fits; False is the Serve
    # path as it was before its engines reported their KV cache's size: the engines queue what does not fit
    kv_visible: bool = True
    _replicas: dict[str, list[SimReplica]] = field(init=False, default_factory=dict)
    _ran: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        names = [p.name for p in self.pools]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"pools need distinct names, got {names}")
        self._views: dict[str, PoolView] = {}  # a pool's view until one of its replicas changes
        self._replicas = {p.name: [SimReplica(f"{p.name}-{i}", p, self.stats_window_s,
                                              on_change=lambda pool=p.name: self._views.pop(pool, None))
                                   for i in range(p.replicas)]
                          for p in self.pools}
        self._facts = {p.name: p.facts() for p in self.pools}
        self._counted = not isinstance(self.policy, FCFS)  # FCFS orders by arrival: it has no counters

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self, workload: Workload, progress: Callable[[int], None] | None = None) -> SimResult:
        """Simulate the workload to the last finish. One run per simulator: replicas and policy keep their state."""
        if self._ran:
            raise RuntimeError("this ClusterSim has already run: build a new one (and a new policy)")
        self._ran = True
        started = time.perf_counter()
        for user in workload.users.values():
            if user.name not in self.policy.users:
                self.policy.add_user(user)
        requests, truth, truncated = scheduler_view(workload, self.pools, self.max_tokens_cap)
        self._truth = dict(zip((r.id for r in requests), truth))
        self._live: dict[str, _Live] = {}
        self._records: list[CompletionRecord] = []
        self._events: list[tuple[float, int, SimReplica]] = []  # step ends
        self._seq = 0
        self._gap: float | None = None
        self._next_sample = 0.0
        self._largest_charge = 0.0
        nxt = 0
        while nxt < len(requests) or self._events:
            arrival = requests[nxt].arrival if nxt < len(requests) else float("inf")
            if self._events and self._events[0][0] <= arrival:
                now, _, replica = heapq.heappop(self._events)
                done = self._end_step(replica, now)
                if progress and done:
                    progress(done)
            else:
                self.policy.submit(requests[nxt], arrival)
                nxt += 1
                self._dispatch(arrival)
        if self._live or self.policy.backlogged_users():
            raise RuntimeError(f"simulation ended with {len(self._live)} running and "
                               f"{sum(map(self.policy.queue_length, self.policy.backlogged_users()))} waiting: "
                               "a request fits no pool")
        first = min((r.arrival for r in self._records), default=0.0)
        last = max((r.finish for r in self._records), default=0.0)
        return SimResult(
            workload=workload.name, policy=self.policy.name, records=self._records, pools=list(self.pools),
            busy_seconds={r.name: r.busy_seconds for rs in self._replicas.values() for r in rs},
            makespan_s=last - first, max_counter_gap=self._gap,
            largest_charge=self._largest_charge, truncated=truncated,
            wall_s=time.perf_counter() - started)

    # -- dispatch ---------------------------------------------------------------------------------------------
    def _dispatch(self, now: float) -> None:
        self._sample_counters(now)
        kicked: list[SimReplica] = []
        while True:
            views = [self._view(p.name) for p in self.pools]
            grant = self.policy.schedule(views, now)
            if grant is None:
                break
            request = grant.request
            if self._counted:  # the admission charge: how far the grant moved the user's key
                self._largest_charge = max(self._largest_charge, self.policy.key(request.user) - grant.score)
            replica = self._pick_replica(grant.pool, request)
            output = self._truth.pop(request.id)
            replica.add(request.id, request.prompt_tokens, output)
            admission = next(v for v in views if v.name == grant.pool)
            self._live[request.id] = _Live(request, output, replica, now, admission)
            if replica.stepping is None and replica not in kicked:
                kicked.append(replica)
        for replica in kicked:
            self._start_step(replica, now)

    def _pick_replica(self, pool: str, request: Request) -> SimReplica:
        replicas = {r.name: r for r in self._replicas[pool]}
        return replicas[pick_replica({name: self._observe(r) for name, r in replicas.items()}, request.kv_demand)]

    def _observe(self, replica: SimReplica) -> ReplicaObservation:
        observed = replica.observation()
        if not self.kv_visible:  # the policy saw free slots alone: the replica's engine queues what does not fit
            observed = replace(observed, free_kv_tokens=UNKNOWN_KV)
        return observed

    def _view(self, pool: str) -> PoolView:
        view = self._views.get(pool)
        if view is None:
            observed = [self._observe(r) for r in self._replicas[pool]]
            view = self._views[pool] = pool_view(self._facts[pool], observed)
        return view

    # -- engine steps -----------------------------------------------------------------------------------------
    def _start_step(self, replica: SimReplica, now: float) -> None:
        duration = replica.start_step()
        if duration <= 0:
            raise RuntimeError(f"replica {replica.name} has work but cannot run a step (KV cache exhausted)")
        self._seq += 1
        heapq.heappush(self._events, (now + duration, self._seq, replica))

    def _end_step(self, replica: SimReplica, now: float) -> int:
        step = replica.end_step(now)
        for request_id in step.emitted:
            live = self._live[request_id]
            if live.first_token is None:
                live.first_token = now
            self.policy.on_tokens(request_id, 1)
        for request_id in step.finished:
            self._finish(self._live.pop(request_id), now)
        if step.finished:
            self._dispatch(now)
        if replica.stepping is None and replica.batcher.has_work():
            self._start_step(replica, now)
        return len(step.finished)

    def _finish(self, live: _Live, now: float) -> None:
        request, replica = live.request, live.replica
        ttft, e2e = live.first_token - live.granted, now - live.granted
        busy = replica.finished(request.id, request.prompt_tokens, live.output_tokens, ttft, e2e)
        self.policy.finish(Outcome(request.id, request.user, replica.spec.name, request.prompt_tokens,
                                   live.output_tokens, ttft, e2e, busy, replica.last_rates[2]), now)
        record = CompletionRecord(request.id, request.user, request.arrival, live.granted, live.first_token, now,
                                  request.prompt_tokens, live.output_tokens, replica.spec.name)
        self._records.append(record)
        if self.on_completion is not None:
            self.on_completion(SimCompletion(request, record, live.admission, self._view(replica.spec.name)))

    def _sample_counters(self, now: float) -> None:
        if now < self._next_sample or not self._counted:
            return
        self._next_sample = now + self.gap_sample_s
        users = self.policy.backlogged_users()
        if len(users) < 2:
            return
        keys = [self.policy.key(u) for u in users]
        gap = max(keys) - min(keys)
        self._gap = gap if self._gap is None else max(self._gap, gap)

