"""Custom Serve autoscaling policy for the pools: scale to the work that suits this pool.

Demand = requests in flight on the pool's replicas + the pool's backlog (waiting requests the controller would send
to this pool now, `backlog_by_pool`, reported through the replicas). Desired replicas = ceil(demand / target_ongoing_requests), within
the bounds. Serve then applies the config's upscale and downscale delays to what this returns.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

from equinox_ray.fairness.policy import Policy
from equinox_ray.fairness.pools import PoolView, fitting_pools


def backlog_policy(ctx) -> tuple[int, dict]:
    metrics = ctx.aggregated_metrics or {}
    if not metrics.get("in_flight") and not metrics.get("backlog"):
        # No replica reported within the look-back window (it is shorter than their metrics interval, or they are
        # starting): no data is not zero demand, so the target stays. Read as zero, it scaled a busy pool to its
        # minimum and stopped replicas with requests running.
        return ctx.target_num_replicas, dict(ctx.policy_state or {})
    in_flight = sum((metrics.get("in_flight") or {}).values())
    backlog = max((metrics.get("backlog") or {}).values(), default=0.0)  # every replica reports the pool's backlog
    demand = in_flight + backlog
    desired = math.ceil(demand / max(ctx.config.target_ongoing_requests, 1e-9)) if demand > 0 else 0
    desired = min(max(desired, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas)
    return desired, dict(ctx.policy_state or {})


def backlog_by_pool(policy: Policy, views: Sequence[PoolView]) -> dict[str, int]:
    """Waiting requests per pool the policy would send them to now: the backlog each pool's replicas report to
    `backlog_policy`. Every pool counts as having a free slot, so that a full pool still counts the requests that
    suit it."""
    open_views = [replace(v, free_slots=max(v.free_slots, 1)) for v in views]
    counts = {v.name: 0 for v in views}
    for request in policy.queues.waiting():
        candidates = fitting_pools(request.kv_demand, open_views)
        if candidates:
            pool, _ = policy.choose_pool(request, candidates, open_views)
            counts[pool.name] += 1
    return counts
