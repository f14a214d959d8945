"""The controller's state as `/v1/fairness`, the dashboard and `/metrics` show it."""

from __future__ import annotations

import math
from collections import defaultdict

from equinox_ray.fairness.metrics import percentiles
from equinox_ray.serve.controller import JAIN_WINDOW_S, FairnessController
from equinox_ray.serve.controller_state import ReplicaState


def snapshot(controller: FairnessController, user: str | None = None) -> dict:
    """What `/v1/fairness` shows: per-user queues, counters, usage and latency; per-pool state; Jain's index."""
    users = [user] if user is not None else sorted(set(controller.policy.users) | set(controller.stats))
    running = running_by_user(controller)
    rows = {}
    for name in users:
        s = controller.stats[name]
        rows[name] = {
            "weight": controller.policy.users[name].weight if name in controller.policy.users else None,
            "queue_length": controller.policy.queue_length(name),
            "running": running[name],
            "counters": controller.policy.counters(name) if name in controller.policy.users else {},
            "submitted": s.submitted, "finished": s.finished, "rejected": s.rejected, "cancelled": s.cancelled,
            "retried": s.retried,
            "prompt_tokens": s.prompt_tokens, "output_tokens": s.output_tokens,
            "service": controller.policy_service(s.prompt_tokens, s.output_tokens),
            "ttft_s": _percentiles(s.ttft_s), "e2e_s": _percentiles(s.e2e_s),
        }
    backlog = controller.backlog()
    pools = {name: {"gpu_type": p.config.gpu_type, "replicas": len(p.replicas), "capacity": p.capacity(),
                    "running": p.running, "granted": p.granted, "backlog": backlog[name],
                    "tokens_per_s": sum(r.report.stats.tokens_per_s for r in p.replicas.values() if r.report),
                    "utilization": p.view().utilization if p.replicas else None,
                    "replicas_detail": {name: _replica_detail(r) for name, r in p.replicas.items()}}
             for name, p in controller.pools.items()}
    return {"policy": controller.policy.name, "time_s": controller.now(), "users": rows, "pools": pools,
            "ingress": {name: {"submitted": n} for name, n in controller.submitted_by_ingress.items()},
            "jain": jain(controller, running), "jain_window_s": JAIN_WINDOW_S, "predictor": predictor_status(controller)}


def running_by_user(controller: FairnessController) -> defaultdict[str, int]:
    """Granted and unfinished requests per user (0 for anyone else)."""
    counts: defaultdict[str, int] = defaultdict(int)
    for request in controller.policy.running.values():
        counts[request.user] += 1
    return counts


def jain(controller: FairnessController, running: dict[str, int]) -> float | None:
    """Jain's index of weighted service over the last JAIN_WINDOW_S among users served, waiting or running
    (`running`: `running_by_user`, which the callers have already counted; reading it adds zeros for the others)."""
    active = set(controller.policy.backlogged_users()) | {user for user, n in running.items() if n}
    return controller.service_window.jain(controller.now(), active)


def predictor_status(controller: FairnessController) -> dict:
    predictor = getattr(controller.policy, "predictor", None)
    return {"name": None if predictor is None else type(predictor).__name__,
            "fallbacks": getattr(predictor, "fallbacks", 0), "error": dict(controller.prediction_error.error),
            "observed": controller.prediction_error.count}


def _replica_detail(state: ReplicaState) -> dict:
    detail = {"window": state.window, "running": state.running}
    if state.report is not None:
        r = state.report
        detail.update(in_flight=r.in_flight, local_queue=r.local_queue, engine_running=r.stats.running,
                      engine_waiting=r.stats.waiting, finished=r.finished)
    return detail


def _percentiles(values) -> dict:
    """p50 and p99 for JSON: None where there is nothing to measure yet."""
    return {k: (None if math.isnan(v) else v) for k, v in percentiles(values).items()}
