"""Equinox: holistic fairness from a User Fairness Counter and a Resource Fairness Counter (docs/design.md).

Per user u, in token units divided by the user's weight:
- service S_u: VTC's counter, charged with the predicted output at admission and corrected at finish;
- latency deficit l_u: a smoothed, capped slowdown of the user's requests against their predictions after dispatch;
- UFC_u = S_u - alpha * C * l_u: a user whose requests ran slower than predicted gains priority;
- RFC_u: engine busy-seconds the user's requests used (predicted at admission, measured at finish), times the pool's
  cost weight, converted to tokens at `tokens_per_busy_second`;
- H_u = UFC_u + beta * RFC_u, the holistic score: the backlogged user with the smallest H goes next.
With alpha = beta = 0, H_u = S_u and the policy is VTC (with the same predictor and dispatch).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

from equinox_ray.fairness.pools import PoolView, best_by, least_loaded
from equinox_ray.fairness.prediction import MovingAveragePredictor, Outcome, Prediction, Predictor
from equinox_ray.fairness.request import Request, User
from equinox_ray.fairness.vtc import VTC


@dataclass(frozen=True)
class EquinoxWeights:
    latency: float = 0.5  # alpha: weight of the latency deficit in the UFC
    resource: float = 0.5  # beta: weight of the RFC in the holistic score
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
        predictor: Predictor | None = None,
        dispatch: Literal["fastest", "cost", "least_loaded"] = "fastest",
        e2e_slo_s: float | None = None,
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
        self.dispatch = dispatch
        self.e2e_slo_s = e2e_slo_s
        self.latency_deficit: dict[str, float] = defaultdict(float)
        self.resource: dict[str, float] = defaultdict(float)
        self._admissions: dict[str, _Admission] = {}

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

    def lift(self, user: str, floor: float) -> None:
        gap = floor - self.key(user)
        if gap > 0:
            self.served[user] += gap

    def choose_pool(self, request: Request, candidates: Sequence[PoolView]) -> tuple[PoolView, Prediction | None]:
        if self.dispatch == "least_loaded":
            pool = least_loaded(candidates)
            return pool, self.predict(request, pool)
        predictions = self.predictions(request, candidates)
        if self.dispatch == "cost":
            meeting = [p for p in candidates if self.e2e_slo_s is None or predictions[p.name].e2e_s <= self.e2e_slo_s]
            if meeting:
                pool = best_by(meeting, lambda p: predictions[p.name].busy_seconds(request.prompt_tokens) * p.cost_weight)
                return pool, predictions[pool.name]
        pool = best_by(candidates, lambda p: predictions[p.name].e2e_s)
        return pool, predictions[pool.name]

    def on_admit(self, request: Request, pool: PoolView, prediction: Prediction | None, now: float) -> None:
        super().on_admit(request, pool, prediction, now)
        resource = 0.0
        if prediction is not None:
            resource = self._resource_tokens(prediction.busy_seconds(request.prompt_tokens), pool.cost_weight, request)
        self._admissions[request.id] = _Admission(prediction, pool.cost_weight, resource)
        self.resource[request.user] += resource

    def on_finish(self, request: Request, outcome: Outcome, now: float) -> None:
        super().on_finish(request, outcome, now)
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
