"""What the controller knows about each pool of replicas when it decides, and where a granted request may go.

The Serve controller and the cluster simulator build their views the same way: each replica is observed as a
`ReplicaObservation` (in serving from its last report, in the simulator from the simulated replica), and
`pool_view` turns a pool's `PoolFacts` and its replicas' observations into the `PoolView` the policy sees. What we
benchmark is what we serve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence


UNKNOWN_CONTEXT = 1 << 30  # a pool whose model context was not given: any request fits


@dataclass(frozen=True)
class PoolView:
    """A snapshot of one GPU pool: free capacity, recent measurements and nominal speeds."""

    name: str
    gpu_type: str = "cpu"
    free_slots: int = 1
    free_kv_tokens: int = 1 << 30
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # the replicas' mean KV-cache use, 0..1
    throughput_tps: float = 1000.0  # tokens/s one replica delivered over a recent window (nominal until measured)
    utilization: float = 1.0  # measured busy fraction over a recent window
    prefill_tps: float = 10_000.0  # nominal prompt tokens/s of one replica
    decode_tps: float = 50.0  # nominal output tokens/s of one sequence
    queue_delay_s: float = 0.0  # expected wait inside the pool before prefill starts
    cost_weight: float = 1.0  # relative price of a busy-second on this GPU type
    max_request_tokens: int = UNKNOWN_CONTEXT  # the model context on this pool: prompt + max_tokens must fit

    def fits(self, kv_demand: int) -> bool:
        return self.free_slots >= 1 and self.free_kv_tokens >= kv_demand and kv_demand <= self.max_request_tokens


def fitting_pools(kv_demand: int, pools: Sequence[PoolView]) -> list[PoolView]:
    return [p for p in pools if p.fits(kv_demand)]


def least_loaded(candidates: Sequence[PoolView]) -> PoolView:
    """The pool with the most free slots; ties go to the first by name, so choices are deterministic."""
    return min(candidates, key=lambda p: (-p.free_slots, p.name))


def best_by(candidates: Sequence[PoolView], cost: Callable[[PoolView], float]) -> PoolView:
    return min(candidates, key=lambda p: (cost(p), -p.free_slots, p.name))


UNKNOWN_KV = 1 << 30  # a replica whose free KV tokens are unknown: its engine has not said its KV cache's size
MIN_UTILIZATION = 0.05  # the resource counter divides by it: a pool that just went idle is not free


@dataclass(frozen=True)
class PoolFacts:
    """What a pool is, as configured: its GPU type, price, model context and nominal speeds (from the GPU's step
    model where it has one; they stand in for measurements until the replicas have some)."""

    name: str
    gpu_type: str = "cpu"
    cost_weight: float = 1.0
    max_request_tokens: int = UNKNOWN_CONTEXT
    prefill_tps: float = 10_000.0
    decode_tps: float = 50.0
    throughput_tps: float = 1000.0  # tokens/s one replica is assumed to deliver before it has measured any


@dataclass(frozen=True)
class ReplicaObservation:
    """One replica as its pool's view is built from it. `tokens_per_s` and `utilization` are None until it has
    measured them; a replica that may not take requests now (starting, lost, unhealthy) has no free slots."""

    free_slots: int
    running: int  # granted to it and not finished
    waiting: int = 0  # in its engine's own queue
    kv_usage: float = 0.0  # the share of its KV cache its engine holds now, 0..1
    tokens_per_s: float | None = None  # prompt + output tokens over its recent window
    utilization: float | None = None  # busy fraction (or GPU utilization) over its recent window
    tpot_s: float | None = None  # mean time per output token of its recent completions
    free_kv_tokens: int = UNKNOWN_KV


def pool_view(facts: PoolFacts, replicas: Sequence[ReplicaObservation]) -> PoolView:
    """The policy's view of a pool: capacity summed over its replicas, measurements averaged per replica."""
    n = len(replicas) or 1
    measured = [r for r in replicas if r.tokens_per_s is not None]
    open_replicas = [r for r in replicas if r.free_slots] or replicas  # a full pool: what frees first is unknown
    tpots = [r.tpot_s for r in replicas if r.tpot_s]
    return PoolView(
        name=facts.name, gpu_type=facts.gpu_type,
        free_slots=sum(r.free_slots for r in replicas),
        free_kv_tokens=max((r.free_kv_tokens for r in open_replicas), default=0),
        running=sum(r.running for r in replicas),
        waiting=sum(r.waiting for r in replicas),
        kv_usage=sum(r.kv_usage for r in replicas) / n,
        throughput_tps=(_mean([r.tokens_per_s for r in measured]) if measured else 0.0) or facts.throughput_tps,
        utilization=max(_mean([r.utilization or 0.0 for r in measured]), MIN_UTILIZATION) if measured else 1.0,
        prefill_tps=facts.prefill_tps,
        decode_tps=1.0 / _mean(tpots) if tpots else facts.decode_tps,
        cost_weight=facts.cost_weight,
        max_request_tokens=facts.max_request_tokens)


def pick_replica(replicas: Mapping[str, ReplicaObservation], kv_demand: int) -> str:
    """The replica of its pool a granted request goes to: among those with a free slot whose free KV cache holds
    it, the one with the most free slots, then the most free KV, then the first by name. Where none does (a view
    older than the replicas' state), the same order over all of them. Serve and the simulator both place by it."""
    names = sorted(replicas)
    fitting = [n for n in names if replicas[n].free_slots and replicas[n].free_kv_tokens >= kv_demand] or names
    return min(fitting, key=lambda n: (-replicas[n].free_slots, -replicas[n].free_kv_tokens, n))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
