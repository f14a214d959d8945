"""Measured engine busy time: per-step durations split among the requests in the step, and windowed rates.

Each engine step reports how long it took and how many tokens each request had in it; the step's time is split
among those requests in proportion to their tokens. The sums over a request's steps are its busy-seconds, which the
Resource Fairness Counter is corrected to. The tracker takes time as an argument so it runs under any clock.
"""

from __future__ import annotations

from collections import deque
from typing import Mapping


class BusyTracker:
    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._per_request: dict[str, float] = {}
        self._steps: deque[tuple[float, float, int, int]] = deque()  # (end time, duration, tokens, output tokens)
        self._sums = [0.0, 0, 0]  # running totals over the window: busy seconds, tokens, output tokens

    def record_step(self, end: float, duration: float, tokens: Mapping[str, int], output_tokens: int) -> None:
        total = sum(tokens.values())
        if total > 0:
            for request_id, n in tokens.items():
                self._per_request[request_id] = self._per_request.get(request_id, 0.0) + duration * n / total
        self._steps.append((end, duration, total, output_tokens))
        self._add(duration, total, output_tokens, +1)
        self._trim(end)

    def pop_request(self, request_id: str) -> float:
        """The request's busy-seconds so far; forgets it."""
        return self._per_request.pop(request_id, 0.0)

    def rates(self, now: float) -> tuple[float, float, float]:
        """(tokens/s, output tokens/s, busy fraction) over the last window."""
        self._trim(now)
        busy, tokens, output = self._sums
        return tokens / self.window_s, output / self.window_s, min(max(busy, 0.0), self.window_s) / self.window_s

    def _add(self, duration: float, tokens: int, output_tokens: int, sign: int) -> None:
        self._sums[0] += sign * duration
        self._sums[1] += sign * tokens
        self._sums[2] += sign * output_tokens

    def _trim(self, now: float) -> None:
        while self._steps and self._steps[0][0] < now - self.window_s:
            _, duration, tokens, output = self._steps.popleft()
            self._add(duration, tokens, output, -1)
        if not self._steps:
            self._sums = [0.0, 0, 0]  # no float drift survives an empty window
