"""Custom Serve autoscaling policy for the pools: scale to the work that suits this pool.

Demand = requests in flight on the pool's replicas + the pool's backlog (waiting requests the controller would send
to this pool now, reported through the replicas). Desired replicas = ceil(demand / target_ongoing_requests),
within the bounds, applied only once the wish has held for upscale_delay_s (up) or downscale_delay_s (down).
"""

from __future__ import annotations

import math


def backlog_policy(ctx) -> tuple[int, dict]:
    config = ctx.config
    metrics = ctx.aggregated_metrics or {}
    in_flight = sum((metrics.get("in_flight") or {}).values())
    backlog = max((metrics.get("backlog") or {}).values(), default=0.0)
    demand = in_flight + backlog
    desired = math.ceil(demand / max(config.target_ongoing_requests, 1e-9)) if demand > 0 else 0
    desired = min(max(desired, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas)
    state = dict(ctx.policy_state or {})
    current = ctx.current_num_replicas
    now = ctx.current_time
    if desired == current:
        state.pop("since", None)
        return current, state
    direction = "up" if desired > current else "down"
    if state.get("direction") != direction or "since" not in state:
        state.update(direction=direction, since=now)
    delay = config.upscale_delay_s if direction == "up" else config.downscale_delay_s
    if now - state["since"] >= delay:
        state.pop("since", None)
        return desired, state
    return current, state
