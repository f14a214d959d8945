"""What the controller knows about each pool of replicas when it decides, and where a granted request may go."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


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
    max_request_tokens: int = 1 << 30  # the model context on this pool: prompt + max_tokens must fit

    def fits(self, kv_demand: int) -> bool:
        return self.free_slots >= 1 and self.free_kv_tokens >= kv_demand and kv_demand <= self.max_request_tokens


def fitting_pools(kv_demand: int, pools: Sequence[PoolView]) -> list[PoolView]:
    return [p for p in pools if p.fits(kv_demand)]


def least_loaded(candidates: Sequence[PoolView]) -> PoolView:
    """The pool with the most free slots; ties go to the first by name, so choices are deterministic."""
    return min(candidates, key=lambda p: (-p.free_slots, p.name))


def best_by(candidates: Sequence[PoolView], cost: Callable[[PoolView], float]) -> PoolView:
    return min(candidates, key=lambda p: (cost(p), -p.free_slots, p.name))
