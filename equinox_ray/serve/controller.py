"""The global fairness controller: per-user queues, the policy and its counters, and the pools' capacity.

One instance serves the whole application, inside the ingress replica (see docs/design.md for why it is not a
separate actor), and is driven only from that replica's event loop. The ingress `submit`s each request and awaits
its grant, which names the pool; tokens then stream from the pool straight to the client. The ingress reports
progress and the finish; each replica reports its state every `report_interval_s`. Every event runs the dispatch
loop: while the policy grants and a pool has a free slot, hand out grants.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from equinox_ray.fairness import InvalidRequest, Outcome, PoolView, Prediction, Request, User
from equinox_ray.fairness.live import PredictionError, SlidingService
from equinox_ray.fairness.metrics import percentiles
from equinox_ray.fairness.pools import fitting_pools
from equinox_ray.serve.config import AppConfig, PolicyConfig, PoolConfig
from equinox_ray.serve.errors import Busy, Cancelled, QueueFull
from equinox_ray.serve.policies import make_policy


JAIN_WINDOW_S = 60.0


@dataclass
class ReplicaState:
    window: int
    free_slots: int
    tokens_per_s: float
    utilization: float
    kv_cache_usage: float
    tpot_s: float | None
    seen: float
    detail: dict = field(default_factory=dict)  # in flight, local queue, engine running and waiting


@dataclass
class PoolState:
    config: PoolConfig
    replicas: dict[str, ReplicaState] = field(default_factory=dict)
    running: int = 0
    granted: int = 0

    def capacity(self) -> int:
        if not self.replicas:  # no report yet: assume the starting replicas at their initial window
            n = self.config.autoscaling.initial_replicas or max(self.config.autoscaling.min_replicas, 1)
            return n * min(self.config.admission.initial_window, self.config.admission.max_window)
        return sum(r.window for r in self.replicas.values())

    def view(self) -> PoolView:
        """Per-replica measured speeds (nominal until the first reports), the pool's free slots and context."""
        replicas = list(self.replicas.values())
        n = max(len(replicas), 1)
        throughput = sum(r.tokens_per_s for r in replicas) / n or 1000.0
        utilization = sum(r.utilization for r in replicas) / n if replicas else 1.0
        tpots = [r.tpot_s for r in replicas if r.tpot_s]
        c = self.config
        return PoolView(name=c.name, gpu_type=c.gpu_type, free_slots=max(0, self.capacity() - self.running),
                        running=self.running, throughput_tps=throughput, utilization=max(utilization, 0.05),
                        decode_tps=1.0 / (sum(tpots) / len(tpots)) if tpots else 50.0, cost_weight=c.cost_weight,
                        kv_usage=sum(r.kv_cache_usage for r in replicas) / n,
                        max_request_tokens=c.max_model_len)


@dataclass
class UserStats:
    submitted: int = 0
    finished: int = 0
    rejected: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: deque = field(default_factory=lambda: deque(maxlen=256))
    e2e_s: deque = field(default_factory=lambda: deque(maxlen=256))


class FairnessController:
    def __init__(self, config: dict) -> None:
        self.config = AppConfig.model_validate(config)
        users = [User(u.name, u.weight) for u in self.config.users]
        self.policy = make_policy(self.config.policy, users)
        self.pools = {p.name: PoolState(p) for p in self.config.pools}
        self.stats: dict[str, UserStats] = defaultdict(UserStats)
        self._waiters: dict[str, asyncio.Future] = {}
        self._granted_at: dict[str, float] = {}
        self._admitted: dict[str, dict] = {}  # request id -> pool state at the grant, for completion records
        self._records = open(self.config.records_path, "a") if self.config.records_path else None
        self._t0 = time.monotonic()
        self.service_window = SlidingService(JAIN_WINDOW_S)
        self.prediction_error = PredictionError()
        self._predictions: dict[str, Prediction] = {}
        self._backlog: tuple[float, dict[str, int]] | None = None  # (when, counts): see backlog()

    def now(self) -> float:
        return time.monotonic() - self._t0

    # -- from the ingress -------------------------------------------------------------------------------------
    async def submit(self, request_id: str, user: str, prompt_tokens: int, max_tokens: int) -> dict:
        """Queue a request and wait for its grant: {"pool", "score", "counters_before", "counters_after", ...}."""
        if user not in self.policy.users:
            if self.config.auth:
                raise InvalidRequest(f"unknown user {user!r}")
            self.policy.add_user(User(user))  # auth off: demo users appear as they come
        if self.policy.queue_length(user) >= self.config.limits.max_queue_per_user:
            self.stats[user].rejected += 1
            raise QueueFull(f"user {user!r} has {self.config.limits.max_queue_per_user} requests waiting")
        request = Request(request_id, user, self.now(), prompt_tokens, max_tokens)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = waiter
        self.policy.submit(request, self.now())
        self.stats[user].submitted += 1
        self._dispatch()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # granted just as the caller went away: release the grant, nothing was served
                self.finish(request_id, user, waiter.result()["pool"], prompt_tokens, 0, 0.0, 0.0, 0.0,
                            cancelled=True)
            else:
                self.cancel(request_id)
            raise

    def progress(self, request_id: str, new_tokens: int) -> None:
        self.policy.on_tokens(request_id, new_tokens)

    def finish(self, request_id: str, user: str, pool: str, prompt_tokens: int, output_tokens: int, ttft_s: float,
               e2e_s: float, busy_seconds: float, cancelled: bool = False) -> dict:
        """The measured outcome of a granted request; corrects the counters and frees the pool slot."""
        if request_id not in self.policy.running:
            return {}
        self.pools[pool].running -= 1
        granted = self._granted_at.pop(request_id, self.now())
        outcome = Outcome(request_id, user, pool, prompt_tokens, output_tokens, ttft_s, e2e_s, busy_seconds,
                          cancelled=cancelled)
        request = self.policy.finish(outcome, self.now())
        self._record(request, pool, output_tokens, ttft_s, e2e_s, cancelled)
        prediction = self._predictions.pop(request_id, None)
        if prediction is not None:
            self.prediction_error.observe(prediction, outcome)
        self.service_window.add(self.now(), user, self.policy_service(prompt_tokens, output_tokens)
                                / self.policy.weight(user))
        s = self.stats[user]
        s.output_tokens += output_tokens
        s.prompt_tokens += prompt_tokens
        if cancelled:
            s.cancelled += 1
        else:
            s.finished += 1
            queue_wait = granted - request.arrival
            s.ttft_s.append(queue_wait + ttft_s)
            s.e2e_s.append(queue_wait + e2e_s)
        self._dispatch()
        return self.policy.counters(user)

    def _record(self, request: Request, pool: str, output_tokens: int, ttft_s: float, e2e_s: float,
                cancelled: bool) -> None:
        """One completion record (predictors/records.py's schema) per finished request, when configured."""
        admitted = self._admitted.pop(request.id, None)
        if self._records is None or admitted is None or cancelled:
            return
        state = self.pools[pool]
        view = state.view()
        self._records.write(json.dumps({
            "arrival_s": request.arrival, "user": request.user, "prompt_tokens": request.prompt_tokens,
            "max_tokens": request.max_tokens, "gpu": state.config.gpu_type, **admitted,
            "output_tokens": output_tokens, "ttft_s": ttft_s, "e2e_s": e2e_s,
            "throughput_tps": view.throughput_tps, "utilization": view.utilization, "finish_s": self.now()}) + "\n")
        self._records.flush()

    def cancel(self, request_id: str) -> bool:
        """Drop a request that has not been granted (the client went away)."""
        request = self.policy.cancel(request_id)
        waiter = self._waiters.pop(request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(Cancelled(request_id))
            waiter.exception()  # retrieved: nobody may be awaiting it any more
        if request is not None:
            self.stats[request.user].cancelled += 1
            forget = getattr(getattr(self.policy, "predictor", None), "forget", None)
            if forget is not None:  # the predictions made while it waited (pool choices for the backlog)
                forget(request_id)
            self._dispatch()
        return request is not None

    # -- from the replicas ------------------------------------------------------------------------------------
    def report(self, pool: str, replica: str, window: int, free_slots: int, tokens_per_s: float, utilization: float,
               kv_cache_usage: float, tpot_s: float | None = None, detail: dict | None = None) -> dict:
        state = self.pools[pool]
        now = self.now()
        state.replicas[replica] = ReplicaState(window, free_slots, tokens_per_s, utilization, kv_cache_usage, tpot_s,
                                               now, detail or {})
        stale = now - 5 * self.config.report_interval_s
        for name in [r for r, s in state.replicas.items() if s.seen < stale]:
            del state.replicas[name]  # a replica that stopped reporting is gone
        self._dispatch()
        return {"backlog": self.backlog().get(pool, 0), "running": state.running}

    def set_policy(self, policy: dict) -> str:
        """Switch policy or weights while idle; counters start afresh, the users and their stats stay."""
        if len(self.policy.queues) or self.policy.running:
            raise Busy("the policy can only change while no request is waiting or running")
        config = PolicyConfig.model_validate(policy)
        self.policy = make_policy(config, list(self.policy.users.values()))
        self._backlog = None
        self.config = self.config.model_copy(update={"policy": config})
        return self.policy.name

    # -- views ------------------------------------------------------------------------------------------------
    def backlog(self) -> dict[str, int]:
        """Waiting requests per pool they would go to now (the autoscaler's signal). Each waiting request costs a
        pool choice (a prediction under Equinox), so the answer is reused for half a report interval: every
        replica's report asks for it."""
        now = self.now()
        if self._backlog is not None and now - self._backlog[0] < self.config.report_interval_s / 2:
            return self._backlog[1]
        self._backlog = (now, self._count_backlog())
        return self._backlog[1]

    def _count_backlog(self) -> dict[str, int]:
        views = [p.view() for p in self.pools.values()]
        open_views = [PoolView(**{**v.__dict__, "free_slots": max(v.free_slots, 1)}) for v in views]
        counts = {name: 0 for name in self.pools}
        for request in self.policy.queues.waiting():
            candidates = fitting_pools(request.kv_demand, open_views)
            if candidates:
                pool, _ = self.policy.choose_pool(request, candidates)
                counts[pool.name] += 1
        return counts

    def snapshot(self, user: str | None = None) -> dict:
        users = [user] if user is not None else sorted(set(self.policy.users) | set(self.stats))
        running = self.running_by_user()
        rows = {}
        for name in users:
            s = self.stats[name]
            rows[name] = {
                "weight": self.policy.users[name].weight if name in self.policy.users else None,
                "queue_length": self.policy.queue_length(name),
                "running": running[name],
                "counters": self.policy.counters(name) if name in self.policy.users else {},
                "submitted": s.submitted, "finished": s.finished, "rejected": s.rejected, "cancelled": s.cancelled,
                "prompt_tokens": s.prompt_tokens, "output_tokens": s.output_tokens,
                "service": self.policy_service(s.prompt_tokens, s.output_tokens),
                "ttft_s": _percentiles(s.ttft_s), "e2e_s": _percentiles(s.e2e_s),
            }
        backlog = self.backlog()
        pools = {name: {"gpu_type": p.config.gpu_type, "replicas": len(p.replicas), "capacity": p.capacity(),
                        "running": p.running, "granted": p.granted, "backlog": backlog[name],
                        "tokens_per_s": sum(r.tokens_per_s for r in p.replicas.values()),
                        "utilization": p.view().utilization if p.replicas else None,
                        "replicas_detail": {r: {"window": s.window, **s.detail} for r, s in p.replicas.items()}}
                 for name, p in self.pools.items()}
        return {"policy": self.policy.name, "time_s": self.now(), "users": rows, "pools": pools,
                "jain": self.jain(), "jain_window_s": JAIN_WINDOW_S, "predictor": self.predictor_status()}

    def policy_service(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.config.policy.input_weight * prompt_tokens + self.config.policy.output_weight * output_tokens

    def jain(self) -> float | None:
        """Jain's index of weighted service over the last JAIN_WINDOW_S among users served, waiting or running."""
        return self.service_window.jain(self.now(), set(self.policy.backlogged_users()) | set(self.running_by_user()))

    def running_by_user(self) -> defaultdict[str, int]:
        """Granted and unfinished requests per user (0 for anyone else)."""
        counts: defaultdict[str, int] = defaultdict(int)
        for request in self.policy.running.values():
            counts[request.user] += 1
        return counts

    def predictor_status(self) -> dict:
        predictor = getattr(self.policy, "predictor", None)
        return {"name": None if predictor is None else type(predictor).__name__,
                "fallbacks": getattr(predictor, "fallbacks", 0), "error": dict(self.prediction_error.error),
                "observed": self.prediction_error.count}

    # -- dispatch ---------------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        while True:
            views = [p.view() for p in self.pools.values()]
            grant = self.policy.schedule(views, self.now())
            if grant is None:
                return
            request = grant.request
            pool_state = self.pools[grant.pool]
            if self._records is not None:
                view = pool_state.view()
                self._admitted[request.id] = {"running": view.running, "waiting": view.waiting,
                                              "kv_usage": view.kv_usage, "window": pool_state.capacity()}
            pool_state.running += 1
            pool_state.granted += 1
            self._granted_at[request.id] = self.now()
            waiter = self._waiters.pop(request.id, None)
            if grant.prediction is not None:
                self._predictions[request.id] = grant.prediction
            prediction = grant.prediction.__dict__ if grant.prediction is not None else None
            if waiter is not None and not waiter.done():
                waiter.set_result({"pool": grant.pool, "score": grant.score, "prediction": prediction,
                                   "counters_before": grant.counters_before, "counters_after": grant.counters_after,
                                   "queue_wait_s": self.now() - request.arrival})
            else:  # its client is gone: end it at once so the slot and the counters are right
                self.finish(request.id, request.user, grant.pool, request.prompt_tokens, 0, 0.0, 0.0, 0.0,
                            cancelled=True)


def _percentiles(values) -> dict:
    """p50 and p99 for JSON: None where there is nothing to measure yet."""
    return {k: (None if math.isnan(v) else v) for k, v in percentiles(values).items()}
