"""Live fairness figures for metrics and the dashboard, under any clock: Jain's index of the weighted service users
received over a sliding window, and the predictor's recent error."""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Iterable

from equinox_ray.fairness.metrics import jain_index
from equinox_ray.fairness.prediction import Outcome, Prediction


class SlidingService:
    def __init__(self, window_s: float = 60.0) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self._events: deque[tuple[float, str, float]] = deque()
        self._totals: dict[str, float] = defaultdict(float)

    def add(self, now: float, user: str, weighted_service: float) -> None:
        self._events.append((now, user, weighted_service))
        self._totals[user] += weighted_service
        self._trim(now)

    def service(self, now: float) -> dict[str, float]:
        self._trim(now)
        return {u: s for u, s in self._totals.items() if s > 1e-9}

    def jain(self, now: float, active: Iterable[str]) -> float | None:
        """Among the users active in the window (served in it, or waiting or running now); None if fewer than two."""
        served = self.service(now)
        users = set(served) | set(active)
        if len(users) < 2:
            return None
        return jain_index([served.get(u, 0.0) for u in users])

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            _, user, amount = self._events.popleft()
            self._totals[user] -= amount
            if self._totals[user] <= 1e-9:
                del self._totals[user]


class PredictionError:
    """Smoothed absolute relative error of predictions against outcomes, per target."""

    TARGETS = ("output_tokens", "ttft_s", "e2e_s")

    def __init__(self, smoothing: float = 0.05) -> None:
        self.smoothing = smoothing
        self.error: dict[str, float] = {}
        self.count = 0

    def observe(self, prediction: Prediction, outcome: Outcome) -> None:
        if outcome.cancelled:
            return
        self.count += 1
        for target in self.TARGETS:
            predicted, measured = getattr(prediction, target), getattr(outcome, target)
            sample = abs(predicted - measured) / max(abs(measured), 1e-3 if target != "output_tokens" else 1.0)
            previous = self.error.get(target)
            self.error[target] = sample if previous is None else previous + self.smoothing * (sample - previous)
