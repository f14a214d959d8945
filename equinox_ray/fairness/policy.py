"""The scheduling policy interface: per-user queues, a heap of backlogged users, and the events a policy is told.

A policy orders users by a key (smallest first). Subclasses say what the key is and how requests are charged;
this class keeps the queues and the heap, so picking the next user costs O(log U) whatever the policy.
The controller drives it: `submit` on arrival, `schedule` while pools have room, `on_tokens` as tokens stream,
`finish` with the measured outcome, `cancel` for a request that never started.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

from equinox_ray.fairness.pools import PoolView, fitting_pools, least_loaded
from equinox_ray.fairness.prediction import Outcome, Prediction
from equinox_ray.fairness.queues import UserQueues
from equinox_ray.fairness.request import InvalidRequest, Request, UnknownUser, User
from equinox_ray.fairness.user_heap import UserHeap


@dataclass(frozen=True)
class Grant:
    """A scheduling decision: this request may start on this pool now."""

    request: Request
    pool: str
    prediction: Prediction | None
    score: float  # the user's key when it was chosen
    counters_before: dict[str, float] = field(default_factory=dict)
    counters_after: dict[str, float] = field(default_factory=dict)


class Policy:
    name = "policy"
    durable: tuple[str, ...] = ()  # the per-user counter tables (attribute names) that a restart must keep

    def __init__(self, users: Iterable[User] = ()) -> None:
        self.users: dict[str, User] = {}
        self._order: dict[str, int] = {}
        self.queues = UserQueues()
        self.running: dict[str, Request] = {}
        self._heap = UserHeap()
        self._dirty: set[str] = set()
        self._last_left: str | None = None  # the user whose queue emptied most recently
        for user in users:
            self.add_user(user)

    def durable_state(self) -> dict[str, dict[str, float]]:
        """The per-user counters that outlive a restart; queues and running requests do not (their clients
        submit them again)."""
        return {name: dict(getattr(self, name)) for name in self.durable}

    def restore(self, state: dict[str, dict[str, float]]) -> None:
        for name in self.durable:
            getattr(self, name).update(state.get(name, {}))
        self._dirty.update(self.users)

    # -- what subclasses define -------------------------------------------------------------------------------
    def key(self, user: str) -> float:
        raise NotImplementedError

    def counters(self, user: str) -> dict[str, float]:
        return {"score": self.key(user)}

    def on_backlogged(self, user: str) -> None:
        """Called when a user's queue goes from empty to non-empty, before the request joins it."""

    def order_cost(self, request: Request) -> float:
        """Where the request goes in its user's queue when the queue orders by cost (see UserQueues)."""
        return 0.0

    def next_user(self, pools: Sequence[PoolView]) -> str | None:
        """The user whose head request is tried next: the backlogged user with the smallest key."""
        top = self._heap.peek()
        return None if top is None else top[0]

    def lift_floor(self, user: str) -> float | None:
        """The key a newly backlogged user is lifted to (VTC's paper, Algorithm 2): the smallest key among backlogged
        users or, when nobody waits, the key of the user whose queue emptied last. None: nobody to compare with."""
        floor = self.min_backlogged_key()
        if floor is None and self._last_left is not None and self._last_left != user:
            floor = self.key(self._last_left)
        return floor

    def choose_pool(self, request: Request, candidates: Sequence[PoolView],
                    pools: Sequence[PoolView]) -> tuple[PoolView, Prediction | None]:
        return least_loaded(candidates), None

    def on_admit(self, request: Request, pool: PoolView, prediction: Prediction | None, now: float) -> None:
        pass

    def on_output(self, request: Request, new_tokens: int) -> None:
        pass

    def on_finish(self, request: Request, outcome: Outcome, now: float) -> None:
        pass

    def on_cancel(self, request: Request) -> None:
        pass

    def prepare(self, requests: Sequence[Request], pools: Sequence[PoolView]) -> None:
        """Newly queued requests, all at once: a policy that predicts does it here, in one batch."""

    # -- users ----------------------------------------------------------------------------------------------
    def add_user(self, user: User) -> None:
        """Register a user, or change its weight (it applies to charges from now on)."""
        self.users[user.name] = user
        self._order.setdefault(user.name, len(self._order))

    def weight(self, user: str) -> float:
        return self.users[user].weight

    # -- events ---------------------------------------------------------------------------------------------
    def submit(self, request: Request, now: float) -> None:
        if request.user not in self.users:
            raise UnknownUser(f"request {request.id!r}: unknown user {request.user!r}")
        if request.id in self.queues or request.id in self.running:
            raise InvalidRequest(f"request {request.id!r} was submitted twice")
        if not self.queues.backlogged(request.user):
            self._flush()
            self.on_backlogged(request.user)
        self.queues.push(request, self.order_cost(request))
        self._dirty.add(request.user)

    def schedule(self, pools: Sequence[PoolView], now: float) -> Grant | None:
        """Pick the next request and its pool, or None. Never skips past a head request that fits no pool."""
        self._flush()
        user = self.next_user(pools)
        if user is None:
            return None
        request = self.queues.head(user)
        candidates = fitting_pools(request.kv_demand, pools)
        if not candidates:
            return None
        pool, prediction = self.choose_pool(request, candidates, pools)
        score, before = self.key(user), self.counters(user)
        self.queues.pop(user)
        self._note_left(user)
        request.granted_at, request.pool = now, pool.name
        self.running[request.id] = request
        self.on_admit(request, pool, prediction, now)
        self._dirty.add(user)
        return Grant(request, pool.name, prediction, score, before, self.counters(user))

    def on_tokens(self, request_id: str, new_tokens: int) -> None:
        """Tokens streamed for a running request (ids that are not running are ignored: they already finished)."""
        request = self.running.get(request_id)
        if request is None or new_tokens <= 0:
            return
        request.served_output_tokens += new_tokens
        self.on_output(request, new_tokens)
        self._dirty.add(request.user)

    def finish(self, outcome: Outcome, now: float) -> Request:
        request = self.running.pop(outcome.request_id, None)
        if request is None:
            raise KeyError(f"request {outcome.request_id!r} is not running")
        missing = outcome.output_tokens - request.served_output_tokens
        if missing > 0:  # tokens the stream did not report one by one are charged now
            request.served_output_tokens += missing
            self.on_output(request, missing)
        self.on_finish(request, outcome, now)
        self._dirty.add(request.user)
        return request

    def cancel(self, request_id: str) -> Request | None:
        """Drop a request that is still waiting. A running one is ended through `finish` with what it served."""
        request = self.queues.remove(request_id)
        if request is not None:
            self._dirty.add(request.user)
            self._note_left(request.user)
            self.on_cancel(request)
        return request

    # -- views ----------------------------------------------------------------------------------------------
    def backlogged_users(self) -> list[str]:
        return self.queues.backlogged_users()

    def queue_length(self, user: str) -> int:
        return self.queues.length(user)

    def waiting_by_pool(self, pools: Sequence[PoolView]) -> dict[str, int]:
        """Waiting requests per pool this policy would send them to now (an autoscaler's backlog). Every pool counts
        as having a free slot, so that a full pool still counts the requests that suit it."""
        open_pools = [replace(p, free_slots=max(p.free_slots, 1)) for p in pools]
        counts = {p.name: 0 for p in pools}
        for request in self.queues.waiting():
            candidates = fitting_pools(request.kv_demand, open_pools)
            if candidates:
                pool, _ = self.choose_pool(request, candidates, open_pools)
                counts[pool.name] += 1
        return counts

    def min_backlogged_key(self) -> float | None:
        top = self._heap.peek()
        return None if top is None else top[1][0]

    def _note_left(self, user: str) -> None:
        if not self.queues.backlogged(user):
            self._last_left = user

    def _flush(self) -> None:
        for user in self._dirty:
            if self.queues.backlogged(user):
                self._heap.set(user, self._heap_key(user))
            else:
                self._heap.discard(user)
        self._dirty.clear()

    def _heap_key(self, user: str) -> tuple:
        return (self.key(user), self._order[user])
