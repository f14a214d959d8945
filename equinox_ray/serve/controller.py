"""The global fairness controller's state and decisions: per-user queues, the policy and its counters, and the pools'
replicas. Plain Python, no Ray and no asyncio: the controller deployment (`controller_deployment.py`) feeds it
messages and carries its outgoing mail, and tests drive it directly.

One policy object sees every request of every ingress replica. A request enters with `apply(IngressBatch)`, waits
in its user's queue, and is granted a replica of a pool by `_dispatch`, which runs after every event: while the
policy grants and a replica has a free slot, hand out grants. A grant puts a `Grant` in the ingress's mailbox and a
`Dispatch` in the replica's. The ingress reports progress and the measured `Usage` when the request ends.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import fields
from typing import Callable

from equinox_ray.engines.replica import ReplicaReport
from equinox_ray.fairness import Outcome, Request, User
from equinox_ray.fairness.live import PredictionError, SlidingService
from equinox_ray.serve.checkpoint import Checkpoint, UsageTotals
from equinox_ray.serve.completion_records import CompletionRecords
from equinox_ray.serve.config import AppConfig, PolicyConfig
from equinox_ray.serve.controller_state import Mailboxes, PoolState, ReplicaState, Tracked, UserStats
from equinox_ray.serve.errors import Busy
from equinox_ray.serve.policies import make_policy
from equinox_ray.serve.protocol import (
    Abort, Closing, Dispatch, Drain, Finished, FullQueues, Grant, IngressBatch, Refusal, ReplicaHello, ReportAnswer,
    Submission,
)
from equinox_ray.serve.users import UserRegistry
from equinox_ray.telemetry.spans import accounting_span, tracer_of
from equinox_ray.telemetry.tracing import make_provider

log = logging.getLogger("ray.serve")
LOST_GRACE_S = 2.0

JAIN_WINDOW_S = 60.0


class FairnessController:
    def __init__(self, config: AppConfig, clock: Callable[[], float] = time.monotonic, tracer=None) -> None:
        self.config = config
        self.clock = clock
        self._t0 = clock()
        self.registry = UserRegistry(config.users)
        self.policy = make_policy(config.policy, [User(u.name, u.weight) for u in config.users])
        self.pools = {p.name: PoolState(p) for p in config.pools}
        self.stats: dict[str, UserStats] = defaultdict(UserStats)
        self.tracked: dict[str, Tracked] = {}
        self.submitted_by_ingress: dict[str, int] = defaultdict(int)
        self.applied_seq: dict[str, int] = {}  # ingress -> the last batch applied
        self.to_ingress = Mailboxes()
        self.ingresses: set[str] = set()  # those with an open grant stream
        self.full_queues: frozenset[str] = frozenset()  # users at their queue bound, as the ingresses were told
        self._maybe_full: set[str] = set()
        self.closing: Closing | None = None
        self.to_replica = Mailboxes()
        self.service_window = SlidingService(JAIN_WINDOW_S)
        self.prediction_error = PredictionError()
        self.ttft_observers: list[Callable[[str, float], None]] = []  # the TTFT histogram (telemetry)
        self.tracer = tracer if tracer is not None else tracer_of(make_provider(config.telemetry, "controller"))
        self.records = CompletionRecords(config.records_path) if config.records_path else None
        self._backlog: tuple[float, dict[str, int]] | None = None  # (when, counts): see backlog()
        self.version = 0  # grows with every change a checkpoint would hold: a batch applied, a grant made
        self._next_prediction_sample = 0.0

    def now(self) -> float:
        return self.clock() - self._t0

    # -- from the ingress replicas ----------------------------------------------------------------------------
    def apply(self, batch: IngressBatch) -> None:
        if batch.seq and batch.seq <= self.applied_seq.get(batch.ingress, 0):
            return  # sent again after a call that did reach us
        self.applied_seq[batch.ingress] = batch.seq
        self.version += 1
        for replica in batch.lost:
            self.replica_unreachable(replica)
        queued = [request for s in batch.submissions if (request := self._submit(batch.ingress, s)) is not None]
        if queued and self._sample_predictions():
            self.policy.prepare(queued, [p.view() for p in self.pools.values()])
        for request_id, tokens in batch.progress.items():
            self.policy.on_tokens(request_id, tokens)
        for finished in batch.finished:
            self.finish(finished)
        for request_id in batch.withdrawn:
            self.withdraw(request_id)
        for user, refused in batch.refused.items():
            self.stats[user].rejected += refused
        self._dispatch()

    def _sample_predictions(self) -> bool:
        """Whether to predict the requests of this update now. A decision that needs a prediction (a pool choice,
        a prepaid charge) makes it when it needs it, in a batch with other waiting requests; predicting the rest
        only feeds the prediction-error metrics and MoPE's online corrections, and an experts call per update was a
        third of the controller's CPU under load, so those learn from a sample."""
        now = self.now()
        if now < self._next_prediction_sample:
            return False
        self._next_prediction_sample = now + self.config.telemetry.prediction_sample_s
        return True

    def _submit(self, ingress: str, submission: Submission) -> Request | None:
        user, generation = submission.user, submission.generation
        if generation.id in self.tracked:  # sent again by an ingress that could not know it arrived
            return None
        if self.config.auth and user not in self.registry:  # its key was good at the ingress, then removed
            self.to_ingress.put(ingress, Refusal(generation.id, f"unknown user {user!r}", 0.0, 403, "user_removed"))
            return None
        if user not in self.policy.users:
            self.policy.add_user(User(user))  # auth off: demo users appear as they come
        limit = self.config.limits.max_queue_per_user
        if self.policy.queue_length(user) >= limit:
            self.stats[user].rejected += 1
            self.to_ingress.put(ingress, Refusal(generation.id, f"user {user!r} has {limit} requests waiting",
                                                 self.config.limits.retry_after_s))
            return None
        prompt_tokens = len(generation.prompt_token_ids)
        request = Request(generation.id, user, self.now(), prompt_tokens, generation.max_tokens)
        self.tracked[request.id] = Tracked(request, Dispatch(generation, ingress))
        self.policy.submit(request, self.now())
        if self.policy.queue_length(user) >= limit:
            self._maybe_full.add(user)
        if submission.retry_of is not None:
            self.stats[user].retried += 1
        else:
            self.stats[user].submitted += 1
        self.submitted_by_ingress[ingress] += 1
        return request

    def finish(self, finished: Finished) -> None:
        """A granted request ended: correct the counters with what its engine measured, free its slot."""
        tracked = self.tracked.pop(finished.request_id, None)
        if tracked is None or tracked.granted_at is None:
            return
        request, u = tracked.request, finished.usage
        output = u.output_tokens if u is not None else finished.served_tokens
        ttft, e2e, busy = (u.ttft_s, u.e2e_s, u.busy_seconds) if u is not None else (0.0, 0.0, 0.0)
        replica = self.pools[request.pool].replicas.get(tracked.replica)
        if replica is not None:
            replica.running -= 1
            replica.kv_promised -= request.kv_demand
        outcome = Outcome(request.id, request.user, request.pool, request.prompt_tokens, output, ttft, e2e, busy,
                          cancelled=finished.cancelled)
        self.policy.finish(outcome, self.now())
        if tracked.prediction is not None:
            self.prediction_error.observe(tracked.prediction, outcome)
        self.service_window.add(self.now(), request.user,
                                self.policy_service(request.prompt_tokens, output) / self.policy.weight(request.user))
        s = self.stats[request.user]
        s.output_tokens += output
        s.prompt_tokens += request.prompt_tokens
        accounting_span(self.tracer, tracked.dispatch.generation.trace_context, lambda: {
            "equinox.request_id": request.id, "equinox.user": request.user, "equinox.pool": request.pool,
            "equinox.cancelled": finished.cancelled, "equinox.measured.output_tokens": output,
            "equinox.measured.busy_seconds": busy,
            **{f"equinox.counter.after_finish.{k}": float(v) for k, v in self.policy.counters(request.user).items()}})
        if finished.cancelled:
            s.cancelled += 1
            return
        s.finished += 1
        queue_wait = tracked.granted_at - request.arrival
        s.ttft_s.append(queue_wait + ttft)
        s.e2e_s.append(queue_wait + e2e)
        for observe in self.ttft_observers:
            observe(request.user, queue_wait + ttft)
        if self.records is not None and tracked.admission is not None:
            self.records.write(tracked, self.pools[request.pool], output, ttft, e2e, self.now())

    def withdraw(self, request_id: str) -> None:
        """The client went away: a waiting request leaves its queue; a running one is aborted on its replica, and
        its ingress reports the finish with what was served."""
        tracked = self.tracked.get(request_id)
        if tracked is None:
            return
        if tracked.granted_at is not None:
            self.to_replica.put(tracked.replica, Abort(request_id))
            return
        del self.tracked[request_id]
        self.policy.cancel(request_id)
        self.stats[tracked.request.user].cancelled += 1

    def ingress_connected(self, ingress: str) -> None:
        self.ingresses.add(ingress)
        if self.config.auth:
            self.to_ingress.put(ingress, self.registry.table())
        self.to_ingress.put(ingress, self._full_message())
        if self.closing is not None:
            self.to_ingress.put(ingress, self.closing)

    def ingress_gone(self, ingress: str) -> None:
        """An ingress replica's grant stream closed: its clients are gone with it."""
        self.ingresses.discard(ingress)
        self.to_ingress.drop(ingress)
        self.submitted_by_ingress.pop(ingress, None)
        for request_id, tracked in list(self.tracked.items()):
            if tracked.dispatch.ingress != ingress:
                continue
            if tracked.granted_at is None:
                self.withdraw(request_id)
            else:
                self.to_replica.put(tracked.replica, Abort(request_id))
                self.finish(Finished(request_id, None, tracked.request.served_output_tokens, cancelled=True))
        self._dispatch()

    # -- from the pool replicas -------------------------------------------------------------------------------
    def replica_connected(self, hello: ReplicaHello) -> None:
        pool = self.pools[hello.pool]
        if hello.replica not in pool.replicas:
            pool.replicas[hello.replica] = ReplicaState(hello.pool, hello.window, self.now(),
                                                        routable=hello.replica in pool.routable)
        self._dispatch()

    def set_routable(self, pool_name: str, replicas: set[str]) -> None:
        """The replicas Serve routes to now. One it stopped routing to is being stopped: it is drained."""
        pool = self.pools[pool_name]
        pool.routable = set(replicas)
        for name, state in pool.replicas.items():
            routable = name in replicas
            if state.routable and not routable:
                self.to_replica.put(name, Drain())
            state.routable = routable
        self._dispatch()

    def ready(self) -> bool:
        """A pool can serve: one of its replicas is connected, healthy, and Serve routes to it."""
        return any(state.routable and state.lost_at is None and state.healthy
                   for pool in self.pools.values() for state in pool.replicas.values())

    def replica_unreachable(self, replica: str) -> None:
        """An ingress lost its channel to this replica: dispatch nothing more there until it reports again after
        LOST_GRACE_S (a dead one never does; its work stream closes and `replica_gone` forgets it)."""
        for pool in self.pools.values():
            state = pool.replicas.get(replica)
            if state is not None:
                state.lost_at = self.now()

    def replica_gone(self, replica: str) -> None:
        """Its work stream closed. Its requests end as their ingresses see their channels close."""
        self.to_replica.drop(replica)
        for pool in self.pools.values():
            pool.replicas.pop(replica, None)

    def report(self, report: ReplicaReport) -> ReportAnswer:
        pool = self.pools[report.pool]
        state = pool.replicas.get(report.replica)
        if state is not None:
            state.window, state.report, state.seen = report.window, report, self.now()
            if state.lost_at is not None and report.stats.healthy and self.now() - state.lost_at > LOST_GRACE_S:
                state.lost_at = None  # alive after all: the channel broke, not the replica
        self._dispatch()
        return ReportAnswer(self.backlog().get(report.pool, 0), pool.running)

    # -- shutdown ---------------------------------------------------------------------------------------------
    def close(self) -> float:
        """Start the drain: every ingress replica refuses new requests from now on and cuts what is unfinished
        after the configured deadline, which is returned. Waiting requests are still granted meanwhile."""
        if self.closing is None:
            self.closing = Closing(self.config.ingress.drain_timeout_s, self.config.limits.retry_after_s)
            log.warning("draining: new requests are refused; %d accepted ones have %.0f s to finish",
                        len(self.tracked), self.closing.deadline_s)
            for ingress in self.ingresses:
                self.to_ingress.put(ingress, self.closing)
        return self.closing.deadline_s

    def unfinished(self) -> int:
        """Requests accepted and not yet finished, waiting or running."""
        return len(self.tracked)

    # -- what outlives a restart -------------------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        predictor = getattr(self.policy, "predictor", None)
        usage = {user: UsageTotals(**{f.name: getattr(s, f.name) for f in fields(UsageTotals)})
                 for user, s in self.stats.items()}
        return Checkpoint(self.policy.name, self.policy.durable_state(), usage,
                          predictor.online_state() if hasattr(predictor, "online_state") else None, time.time(),
                          self.registry.state())

    def restore(self, checkpoint: Checkpoint) -> None:
        """Counters, usage and predictor corrections as the last checkpoint had them. Requests are not in it:
        the ingress replicas submit their waiting ones again, and a running one's finish (unknown here) is not
        charged again."""
        if checkpoint.users is not None:
            self.registry.restore(checkpoint.users)
            for name, record in self.registry.users.items():
                self.policy.add_user(User(name, record.weight))
        if checkpoint.policy == self.policy.name:
            self.policy.restore(checkpoint.counters)
        else:
            log.warning("checkpoint of policy %s, running %s: its counters are not restored", checkpoint.policy,
                        self.policy.name)
        for user, totals in checkpoint.usage.items():
            self.stats[user].__dict__.update(totals.__dict__)
        predictor = getattr(self.policy, "predictor", None)
        if checkpoint.predictor is not None and hasattr(predictor, "restore_online"):
            predictor.restore_online(checkpoint.predictor)

    # -- admin: users and keys (serve/users.py) ---------------------------------------------------------------
    def add_user(self, name: str, weight: float, key_digest: str) -> None:
        self.registry.add(name, weight, key_digest)
        self.policy.add_user(User(name, weight))
        self._users_changed()

    def set_weight(self, name: str, weight: float) -> None:
        self.registry.set_weight(name, weight)
        self.policy.add_user(User(name, weight))  # applies to charges from now on
        self._users_changed()

    def rotate_key(self, name: str, key_digest: str, keep_old: bool) -> None:
        self.registry.rotate(name, key_digest, keep_old)
        self._users_changed()

    def remove_user(self, name: str) -> None:
        """Its keys stop working and its waiting requests are refused (403); running ones finish. The policy keeps
        its counters, so a user added again under the same name is lifted as any returning user is."""
        self.registry.remove(name)
        for request_id, tracked in list(self.tracked.items()):
            if tracked.request.user == name and tracked.granted_at is None:
                del self.tracked[request_id]
                self.policy.cancel(request_id)
                self.to_ingress.put(tracked.dispatch.ingress, Refusal(request_id, f"user {name!r} was removed",
                                                                      0.0, 403, "user_removed"))
        self._users_changed()

    def _users_changed(self) -> None:
        self.version += 1
        table = self.registry.table()
        for ingress in self.ingresses:
            self.to_ingress.put(ingress, table)

    # -- admin ------------------------------------------------------------------------------------------------
    def set_policy(self, config: PolicyConfig) -> str:
        """Switch policy or weights while idle; counters start afresh, the users and their stats stay."""
        if len(self.policy.queues) or self.policy.running:
            raise Busy("the policy can only change while no request is waiting or running")
        self.policy = make_policy(config, list(self.policy.users.values()))
        self._backlog = None
        self.config = self.config.model_copy(update={"policy": config})
        return self.policy.name

    # -- dispatch ---------------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        views = {name: p.view() for name, p in self.pools.items()}  # only the granted pool's changes per grant
        while True:
            decision = self.policy.schedule(list(views.values()), self.now())
            if decision is None:
                self._tell_full_queues()
                return
            request = decision.request
            tracked, pool = self.tracked[request.id], self.pools[decision.pool]
            replica_name = pool.pick_replica(request.kv_demand)
            pool.replicas[replica_name].running += 1
            pool.replicas[replica_name].kv_promised += request.kv_demand
            pool.granted += 1
            self.version += 1  # a grant charged its user
            tracked.granted_at, tracked.replica, tracked.prediction = self.now(), replica_name, decision.prediction
            tracked.admission = views[decision.pool]
            ingress = tracked.dispatch.ingress
            self.to_replica.put(replica_name, tracked.dispatch)
            self.to_ingress.put(ingress, Grant(request.id, decision.pool, replica_name,
                                               tracked.granted_at - request.arrival, decision.score,
                                               decision.counters_before, decision.counters_after,
                                               decision.prediction))
            views[decision.pool] = pool.view()

    def _tell_full_queues(self) -> None:
        limit = self.config.limits.max_queue_per_user
        full = frozenset(u for u in self.full_queues | self._maybe_full if self.policy.queue_length(u) >= limit)
        self._maybe_full.clear()
        if full != self.full_queues:
            self.full_queues = full
            for ingress in self.ingresses:
                self.to_ingress.put(ingress, self._full_message())

    def _full_message(self) -> FullQueues:
        limit = self.config.limits.max_queue_per_user
        return FullQueues(self.full_queues, f"{limit} requests of this user are waiting",
                          self.config.limits.retry_after_s)

    # -- views ------------------------------------------------------------------------------------------------
    def backlog(self) -> dict[str, int]:
        """Waiting requests per pool they would go to now (the autoscaler's signal). Each waiting request costs a
        pool choice (a prediction under Equinox), so the answer is reused for half a report interval: every
        replica's report asks for it."""
        now = self.now()
        if self._backlog is not None and now - self._backlog[0] < self.config.report_interval_s / 2:
            return self._backlog[1]
        self._backlog = (now, self.policy.waiting_by_pool([p.view() for p in self.pools.values()]))
        return self._backlog[1]

    def policy_service(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.config.policy.input_weight * prompt_tokens + self.config.policy.output_weight * output_tokens
