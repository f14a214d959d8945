"""Equinox: holistic fairness from a User Fairness Counter and a Resource Fairness Counter (docs/design.md).

Per user u, in token units divided by the user's weight:
- service S_u: VTC's counter, with VTC's exact charges (input at admission, output as it is decoded), or with
  `prepaid_output` VTC_predict's (the predicted output at admission, corrected at finish);
- latency deficit l_u: a smoothed, capped slowdown of the user's requests against their predictions after dispatch;
- UFC_u = S_u - alpha * C * l_u: a user whose requests ran slower than predicted gains priority;
- RFC_u: engine busy-seconds the user's requests used (predicted at admission, measured at finish), times the pool's
  cost weight, converted to tokens at `tokens_per_busy_second`;
- H_u = UFC_u + beta * RFC_u, the holistic score: the backlogged user with the smallest H goes next.
With alpha = beta = 0, H_u = S_u and the policy is VTC (with the same predictor and dispatch).

Inside the fairness bound, three switches (`Efficiency`) buy latency without moving service between users:
(a) each user's queue runs cheapest first, c = w_in * prompt + w_out * min(max_tokens, the user's mean output),
    and a request overtaken `max_overtakes` times goes next; a queue deeper than `max_reorder_depth` runs FIFO;
(b) among the backlogged users whose key is within `slack_tokens` (Delta) of the smallest, the one with the
    smallest virtual finish, key + c(head) / weight, goes next, except that a user back from idle ranks by its key
    alone until its first grant (`fresh_first`), and so does a user passed `max_passes` times by grants to larger
    keys: a chosen user's key is at most Delta above the smallest, so the service gap between backlogged users over
    an interval stays within VTC's bound + 2 Delta (the lead can change sides);
(c) on mixed GPU types, among those same users, the head request and free pool with the smallest relative time
    (its time on that pool over its time on the fastest pool of the cluster, from the pools' nominal speeds, in
    bands of `pairing_band`) are paired first: each pool gets the work it is comparatively best at (Melange, arXiv
    2404.14527), and the virtual finish decides within a band.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

from equinox_ray.fairness.pools import UNKNOWN_CONTEXT, PoolView, best_by, fitting_pools, least_loaded
from equinox_ray.fairness.prediction import MovingAveragePredictor, Outcome, Prediction, Predictor
from equinox_ray.fairness.queues import UserQueues
from equinox_ray.fairness.request import Request, User
from equinox_ray.fairness.vtc import VTC


DEFAULT_CONTEXT = 4096  # the model context Delta assumes where no pool says its own


@dataclass(frozen=True)
class EquinoxWeights:
    # alpha and beta default to 0: in `python -m bench suite` neither bought latency, throughput or fairness
    # against VTC (the equinox-holistic row, alpha = beta = 0.5), so by default H_u = S_u, VTC's exact charges.
    latency: float = 0.0  # alpha: weight of the latency deficit in the UFC
    resource: float = 0.0  # beta: weight of the RFC in the holistic score
    latency_scale_tokens: float = 512.0  # C: tokens of priority one unit of slowdown is worth
    latency_cap: float = 2.0  # l_max: the deficit never exceeds this, which bounds its effect
    latency_smoothing: float = 0.3  # gamma: weight of the newest request in the deficit's moving average
    latency_floor_s: float = 0.25  # tau: added to predicted times so that tiny predictions do not explode ratios
    tokens_per_busy_second: float = 1000.0  # kappa: converts busy-seconds into token units

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 0:
                raise ValueError(f"EquinoxWeights.{name} must be >= 0, got {value}")
        if not 0 < self.latency_smoothing <= 1:
            raise ValueError("EquinoxWeights.latency_smoothing must be in (0, 1]")

    @property
    def max_latency_credit(self) -> float:
        return self.latency * self.latency_scale_tokens * self.latency_cap


@dataclass(frozen=True)
class Efficiency:
    """The switches that order work inside the fairness bound (module docstring); zeros turn each off."""

    max_overtakes: int = 16  # (a) 0: each user's queue is FIFO, as VTC's
    # (a) the order applies while the user has at most this many requests waiting; a deeper queue runs FIFO. Its
    # oldest request is already the tail, and passing it there is what made LMSYS's TTFT p99 1.32x VTC's. 0: any
    max_reorder_depth: int = 8
    # (b) Delta, in the key's token units; 0: the smallest key always goes next. None: one whole prompt of the
    # largest model context among the pools (w_in x context; 4,096 tokens for a 4k context), the granularity of
    # VTC's own admission charge, so that the slack scales with the requests a deployment can have
    slack_tokens: float | None = None
    candidates: int = 8  # (b) at most this many users are compared per decision: O(candidates * log U)
    pairing: bool = True  # (c) on mixed GPU types, pair free pools with the requests they suit
    # (c) relative times in the same band of this width count as equally suited, and the virtual finish decides
    # between them: they come from nominal speeds and mean outputs, so finer differences are noise that would
    # override the fair order. 0: the exact relative time ranks first
    pairing_band: float = 0.25
    # (b) a user backlogged from idle, until its first grant, ranks by its key alone (its head's cost waived), and
    # ties go to the oldest head: the slack reorders the owed work of users who were already waiting, and a user
    # back from idle has none. False: every user ranks by its virtual finish
    fresh_first: bool = True
    # (b) a user's virtual finish counts the cost of its oldest waiting request, not of the request (a) put first: a
    # user with a deep queue always has a cheap request, and ranking users by it makes (b) shortest job first across
    # users, which favours the deepest queues over users with one request waiting
    finish_by_oldest: bool = False
    # (b), (c) a user passed by this many grants to users whose key was larger than its own goes next (its key
    # alone ranks it, ahead of pairing): the reordering inside Delta delays no one's head without end. 0: no limit
    max_passes: int = 32

    def __post_init__(self) -> None:
        if (self.max_overtakes < 0 or self.max_reorder_depth < 0 or (self.slack_tokens or 0) < 0
                or self.candidates < 1 or self.pairing_band < 0):
            raise ValueError("Efficiency needs max_overtakes >= 0, max_reorder_depth >= 0, slack_tokens >= 0, "
                             f"candidates >= 1, pairing_band >= 0: {self}")


def slack_tokens(efficiency: Efficiency, input_weight: float, contexts: Iterable[int]) -> float:
    """Delta: as configured, or w_in times the largest of the pools' model contexts (`DEFAULT_CONTEXT` where no
    pool says its context)."""
    if efficiency.slack_tokens is not None:
        return efficiency.slack_tokens
    known = [c for c in contexts if c < UNKNOWN_CONTEXT]
    return input_weight * (max(known) if known else DEFAULT_CONTEXT)


@dataclass(frozen=True)
class _Admission:
    prediction: Prediction | None
    cost_weight: float
    prepaid_resource: float


class Equinox(VTC):
    durable = ("served", "latency_deficit", "resource")
    name = "equinox"

    def __init__(
        self,
        users: Iterable[User] = (),
        *,
        weights: EquinoxWeights = EquinoxWeights(),
        efficiency: Efficiency = Efficiency(),
        predictor: Predictor | None = None,
        dispatch: Literal["fastest", "cost", "least_loaded"] = "fastest",
        e2e_slo_s: float | None = None,
        prepaid_output: bool = False,
        input_weight: float = 1.0,
        output_weight: float = 2.0,
    ) -> None:
        super().__init__(
            users,
            input_weight=input_weight,
            output_weight=output_weight,
            predictor=predictor if predictor is not None else MovingAveragePredictor(),
        )
        self.name = "equinox"
        self.weights = weights
        self.efficiency = efficiency
        self.queues = UserQueues(efficiency.max_overtakes, efficiency.max_reorder_depth)
        # the output each request is assumed to have, for the queue order and pairing: the user's mean output (a
        # benchmark may put the true lengths here to measure what better predictions could buy)
        self.lengths: Predictor = MovingAveragePredictor()
        self.dispatch = dispatch
        self.e2e_slo_s = e2e_slo_s
        self.prepaid_output = prepaid_output
        self.latency_deficit: dict[str, float] = defaultdict(float)
        self.resource: dict[str, float] = defaultdict(float)
        self._admissions: dict[str, _Admission] = {}
        self._fresh: set[str] = set()  # users backlogged from idle and not granted since
        self._passes: dict[str, int] = defaultdict(int)  # grants to larger keys since the user's last grant

    def ufc(self, user: str) -> float:
        w = self.weights
        return self.served[user] - w.latency * w.latency_scale_tokens * self.latency_deficit[user]

    def rfc(self, user: str) -> float:
        return self.resource[user]

    def key(self, user: str) -> float:
        return self.ufc(user) + self.weights.resource * self.rfc(user)

    def counters(self, user: str) -> dict[str, float]:
        return {
            "service": self.served[user],
            "latency_deficit": self.latency_deficit[user],
            "ufc": self.ufc(user),
            "rfc": self.rfc(user),
            "holistic": self.key(user),
        }

    def on_backlogged(self, user: str) -> None:
        super().on_backlogged(user)
        if self.efficiency.fresh_first:
            self._fresh.add(user)
        self._passes.pop(user, None)

    def lift(self, user: str, floor: float) -> None:
        gap = floor - self.key(user)
        if gap > 0:
            self.served[user] += gap

    def order_cost(self, request: Request) -> float:
        return self.input_weight * request.prompt_tokens + self.output_weight * self.lengths.output_tokens(request)

    def slack(self, pools: Sequence[PoolView]) -> float:
        return slack_tokens(self.efficiency, self.input_weight, [p.max_request_tokens for p in pools])

    def next_user(self, pools: Sequence[PoolView]) -> str | None:
        top = self._heap.peek()
        pairing = self._pairing(pools)
        slack = self.slack(pools)
        if top is None or (slack <= 0 and not pairing):
            return None if top is None else top[0]
        best, best_rank, keys = top[0], None, {}
        limit = top[1][0] + slack
        for user, key in self._heap.smallest(self.efficiency.candidates, limit):
            head = self.queues.head(user)
            fitting = fitting_pools(head.kv_demand, pools)
            if not fitting:
                continue
            keys[user] = key[0]
            rank = self._rank(user, head, key[0], fitting, pools, pairing)
            if best_rank is None or rank < best_rank:
                best, best_rank = user, rank
        if self.efficiency.max_passes and best in keys:
            for user, key in keys.items():
                if key < keys[best]:
                    self._passes[user] += 1
        return best

    def _rank(self, user: str, head: Request, key: float, fitting: Sequence[PoolView], pools: Sequence[PoolView],
              pairing: bool) -> tuple:
        """The candidate's place in the decision (`head`: the request it would send); the smallest goes next."""
        if self.efficiency.max_passes and self._passes[user] >= self.efficiency.max_passes:
            return (0, 0.0, key, head.arrival)
        suited = self._suitability(head, fitting, pools) if pairing else 0.0
        cost = self.queues.oldest_cost(user) if self.efficiency.finish_by_oldest else self.queues.head_cost(user)
        finish = key + cost / self.weight(user)
        return (1, suited, key if user in self._fresh else finish, head.arrival)

    def _pairing(self, pools: Sequence[PoolView]) -> bool:
        """Pairing refines the fastest-pool dispatch on mixed GPU types; a configured cost or least-loaded dispatch
        is kept as it is."""
        return self.efficiency.pairing and self.dispatch == "fastest" and len({p.gpu_type for p in pools}) > 1

    def _seconds(self, request: Request, pool: PoolView) -> float:
        """The request's time on the pool from its nominal speeds and the user's mean output."""
        return request.prompt_tokens / pool.prefill_tps + self.lengths.output_tokens(request) / pool.decode_tps

    def _suitability(self, request: Request, fitting: Sequence[PoolView], pools: Sequence[PoolView]) -> float:
        """The request's time on the fitting pool that suits it best over its time on the cluster's fastest pool for
        it (1 when that pool fits), as the index of its band (`Efficiency.pairing_band`); smaller suits better."""
        fastest = min(self._seconds(request, p) for p in pools)
        relative = min(self._seconds(request, p) for p in fitting) / fastest if fastest > 0 else 1.0
        band = self.efficiency.pairing_band
        return (relative - 1.0) // band if band > 0 else round(relative, 3)

    def choose_pool(self, request: Request, candidates: Sequence[PoolView],
                    pools: Sequence[PoolView]) -> tuple[PoolView, Prediction | None]:
        if self._pairing(pools):  # the pool next_user ranked this request by
            pool = best_by(candidates, lambda p: self._seconds(request, p))
            return pool, self._prediction(request, pool)
        if self.dispatch == "least_loaded" or len(candidates) == 1:
            pool = least_loaded(candidates)
            return pool, self._prediction(request, pool)
        predictions = self.predictions(request, candidates)
        if self.dispatch == "cost":
            meeting = [p for p in candidates if self.e2e_slo_s is None or predictions[p.name].e2e_s <= self.e2e_slo_s]
            if meeting:
                pool = best_by(meeting, lambda p: predictions[p.name].busy_seconds(request.prompt_tokens) * p.cost_weight)
                return pool, predictions[pool.name]
        pool = best_by(candidates, lambda p: predictions[p.name].e2e_s)
        return pool, predictions[pool.name]

    def _prediction(self, request: Request, pool: PoolView) -> Prediction | None:
        """A new prediction where a charge or a counter uses it. Otherwise only one already made rides along, for
        the prediction-error telemetry (the Serve controller predicts a sample of queued requests in batches): an
        experts call per grant is most of a decision's cost."""
        if self.prepaid_output or self.weights.latency > 0 or self.weights.resource > 0:
            return self.predict(request, pool)
        return self._predicted.get(request.id, {}).get(pool.name)

    def on_admit(self, request: Request, pool: PoolView, prediction: Prediction | None, now: float) -> None:
        super().on_admit(request, pool, prediction if self.prepaid_output else None, now)
        self._fresh.discard(request.user)
        self._passes.pop(request.user, None)
        resource = 0.0
        if prediction is not None:
            resource = self._resource_tokens(prediction.busy_seconds(request.prompt_tokens), pool.cost_weight, request)
        self._admissions[request.id] = _Admission(prediction, pool.cost_weight, resource)
        self.resource[request.user] += resource

    def on_finish(self, request: Request, outcome: Outcome, now: float) -> None:
        super().on_finish(request, outcome, now)
        self.lengths.observe(outcome)
        admission = self._admissions.pop(request.id)
        measured = self._resource_tokens(outcome.busy_seconds, admission.cost_weight, request)
        self.resource[request.user] += measured - admission.prepaid_resource
        if admission.prediction is not None and not outcome.cancelled:
            self._update_latency(request.user, admission.prediction, outcome)

    def _resource_tokens(self, busy_seconds: float, cost_weight: float, request: Request) -> float:
        tokens = max(0.0, busy_seconds) * cost_weight * self.weights.tokens_per_busy_second
        return tokens / self.weight(request.user)

    def _update_latency(self, user: str, predicted: Prediction, outcome: Outcome) -> None:
        """Slowdown after dispatch only: waiting in the fair queue is the policy's own choice and earns nothing."""
        w = self.weights
        slowdown = max(0.0, outcome.ttft_s - predicted.ttft_s) / (predicted.ttft_s + w.latency_floor_s)
        slowdown += max(0.0, outcome.e2e_s - predicted.e2e_s) / (predicted.e2e_s + w.latency_floor_s)
        sample = min(slowdown, w.latency_cap)
        self.latency_deficit[user] += w.latency_smoothing * (sample - self.latency_deficit[user])
