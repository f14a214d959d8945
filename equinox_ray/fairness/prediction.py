"""Predictions of what a request will cost before it runs, and the simple estimate used when no model is loaded.

The mixture-of-experts predictor (`equinox_ray.mope`) implements the same `Predictor` protocol; the fairness core
only depends on the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from equinox_ray.fairness.pools import PoolView
from equinox_ray.fairness.request import Request


@dataclass(frozen=True)
class Prediction:
    output_tokens: float
    ttft_s: float
    e2e_s: float
    throughput_tps: float  # tokens/s the pool delivers while it serves this request
    utilization: float  # the pool's busy fraction in [0, 1]
    source: str = "unknown"  # which expert or fallback produced it

    def busy_seconds(self, prompt_tokens: int) -> float:
        """Engine busy time the request will use: at T tokens/s and busy fraction U, a token costs U/T busy-seconds.

        Never more than U times the predicted end-to-end time: a request cannot keep its engine busy for longer than
        it is in it. The cap keeps a poor throughput prediction (a few tokens/s) from prepaying hours of busy time."""
        tokens = prompt_tokens + self.output_tokens
        by_rate = tokens * self.utilization / max(self.throughput_tps, 1e-9)
        if self.e2e_s > 0:
            return min(by_rate, self.e2e_s * self.utilization)
        return by_rate


@dataclass(frozen=True)
class Outcome:
    """What was measured once a request ended, as the replica reports it."""

    request_id: str
    user: str
    pool: str
    prompt_tokens: int
    output_tokens: int
    ttft_s: float  # from dispatch to first token
    e2e_s: float  # from dispatch to the last token
    busy_seconds: float  # the request's share of engine busy time
    utilization: float | None = None  # the pool's busy fraction while it ran, where measured
    cancelled: bool = False


class Predictor(Protocol):
    def predict(self, request: Request, pool: PoolView) -> Prediction: ...

    def predict_batch(self, items: list[tuple[Request, PoolView]]) -> list[Prediction]: ...

    def observe(self, outcome: Outcome) -> None: ...

    def forget(self, request_id: str) -> None:
        """The request will never run: drop whatever was kept for it."""


class _OneByOne:
    """A predictor whose batch is its single predictions in turn, and that keeps nothing per request."""

    def predict(self, request: Request, pool: PoolView) -> Prediction:
        raise NotImplementedError

    def predict_batch(self, items: list[tuple[Request, PoolView]]) -> list[Prediction]:
        return [self.predict(request, pool) for request, pool in items]

    def forget(self, request_id: str) -> None:
        pass


class ZeroOutputPredictor(_OneByOne):
    """Predicts no output at all: VTC charged through the predicted-length path behaves exactly like plain VTC."""

    def predict(self, request: Request, pool: PoolView) -> Prediction:
        return Prediction(0.0, 0.0, 0.0, pool.throughput_tps, pool.utilization, source="zero")

    def observe(self, outcome: Outcome) -> None:
        pass


class MovingAveragePredictor(_OneByOne):
    """The documented fallback: VTC_predict's per-user moving average of output lengths, plus pool-profile latency.

    Output tokens follow the VTC artifact (`pred = (pred * (w - 1) + actual) / w`, w = 5; the first prediction is 0,
    then the first observed length), capped by max_tokens. Latency comes from the pool's nominal prefill and decode
    speeds; throughput and utilization are the pool's recent measured values.
    """

    def __init__(self, window: int = 5) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.average: dict[str, float] = {}

    def output_tokens(self, request: Request) -> float:
        return min(float(request.max_tokens), self.average.get(request.user, 0.0))

    def predict(self, request: Request, pool: PoolView) -> Prediction:
        out = self.output_tokens(request)
        ttft = pool.queue_delay_s + request.prompt_tokens / pool.prefill_tps
        e2e = ttft + out / pool.decode_tps
        return Prediction(out, ttft, e2e, pool.throughput_tps, pool.utilization, source="moving-average")

    def observe(self, outcome: Outcome) -> None:
        if outcome.cancelled:
            return
        previous = self.average.get(outcome.user)
        if previous is None:
            self.average[outcome.user] = float(outcome.output_tokens)
        else:
            self.average[outcome.user] = (previous * (self.window - 1) + outcome.output_tokens) / self.window
