"""Custom Serve autoscaling policy for the pools: scale to the work that suits this pool.

Demand = requests in flight on the pool's replicas + the pool's backlog (waiting requests the controller would send
to this pool now, reported through the replicas). Desired replicas = ceil(demand / target_ongoing_requests), within
the bounds. Serve then applies the config's upscale and downscale delays to what this returns.
"""

from __future__ import annotations

import math


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
