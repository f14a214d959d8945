"""Fairness and performance metrics over finished requests.

Service follows the VTC artifact: a request's service `w_in * prompt + w_out * output` is spread uniformly over
[first token, finish]. A user is backlogged in a window if one of its requests waited in the fair queue (between
arrival and grant, longer than `min_wait_s`) during that window: a request granted on arrival never waited.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from equinox_ray.fairness.request import User


@dataclass(frozen=True)
class CompletionRecord:
    request_id: str
    user: str
    arrival: float
    granted: float
    first_token: float
    finish: float
    prompt_tokens: int
    output_tokens: int
    pool: str = ""

    def __post_init__(self) -> None:
        if not self.arrival <= self.granted <= self.first_token <= self.finish:
            raise ValueError(f"record {self.request_id!r}: times must satisfy arrival <= granted <= first_token "
                             f"<= finish, got {self.arrival}, {self.granted}, {self.first_token}, {self.finish}")

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def e2e(self) -> float:
        return self.finish - self.arrival


@dataclass(frozen=True)
class WindowedService:
    edges: np.ndarray  # window boundaries, len = windows + 1
    users: list[str]
    service: np.ndarray  # [user, window] service received, divided by the user's weight
    demand: np.ndarray  # [user, window] service of the requests that arrived, divided by weight
    backlogged: np.ndarray  # [user, window] bool


def _columns(records: Sequence[CompletionRecord], users: list[str], w_in: float, w_out: float):
    index = {u: i for i, u in enumerate(users)}
    owner = np.array([index[r.user] for r in records], dtype=int)
    cols = {name: np.array([getattr(r, name) for r in records], dtype=float)
            for name in ("arrival", "granted", "first_token", "finish", "prompt_tokens", "output_tokens")}
    cost = w_in * cols["prompt_tokens"] + w_out * cols["output_tokens"]
    return owner, cols, cost


def windowed_service(records: Sequence[CompletionRecord], users: Mapping[str, User], window_s: float,
                     w_in: float = 1.0, w_out: float = 2.0, start: float | None = None,
                     end: float | None = None, min_wait_s: float = 0.0) -> WindowedService:
    if window_s <= 0:
        raise ValueError("window_s must be > 0")
    names = list(users)
    if not records:
        empty = np.zeros((len(names), 0))
        return WindowedService(np.array([0.0]), names, empty, empty, empty.astype(bool))
    owner, cols, cost = _columns(records, names, w_in, w_out)
    start = cols["arrival"].min() if start is None else start
    end = cols["finish"].max() if end is None else end
    edges = start + window_s * np.arange(int(np.ceil(max(end - start, 1e-9) / window_s)) + 1)
    weights = np.array([users[u].weight for u in names])
    a, b = cols["first_token"], cols["finish"]
    span = np.maximum(b - a, 1e-12)
    # cumulative service of each request at each edge, then differences between edges
    cum = np.stack([np.bincount(owner, cost * np.clip((e - a) / span, 0, 1), len(names)) for e in edges], axis=1)
    service = np.diff(cum, axis=1) / weights[:, None]
    window_of_arrival = np.clip(((cols["arrival"] - start) // window_s).astype(int), 0, len(edges) - 2)
    demand = np.zeros_like(service)
    np.add.at(demand, (owner, window_of_arrival), cost)
    demand /= weights[:, None]
    backlogged = np.zeros(service.shape, dtype=bool)
    waited = cols["granted"] - cols["arrival"] > min_wait_s
    for w in range(service.shape[1]):
        lo, hi = edges[w], edges[w + 1]
        waiting = waited & (cols["arrival"] < hi) & (cols["granted"] > lo)
        backlogged[np.unique(owner[waiting]), w] = True
    return WindowedService(edges, names, service, demand, backlogged)


def jain_index(values: Sequence[float]) -> float:
    """(sum x)^2 / (n * sum x^2): 1 when all equal, 1/n when one user gets everything."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan")
    square_sum = float(np.sum(x * x))
    return 1.0 if square_sum == 0 else float(np.sum(x) ** 2 / (x.size * square_sum))


def jain_per_window(ws: WindowedService) -> np.ndarray:
    """Jain's index of weight-normalised service among the users backlogged in each window (NaN if none)."""
    return np.array([jain_index(ws.service[ws.backlogged[:, w], w]) if ws.backlogged[:, w].any() else np.nan
                     for w in range(ws.service.shape[1])])


def service_difference(ws: WindowedService) -> tuple[float, float]:
    """VTC's windowed service difference, (max, average) over windows: in each window,
    sum over users of min(max service - own service, |own demand - own service|), so that a user who asked for
    less than the others is not counted as treated unfairly."""
    if ws.service.shape[1] == 0:
        return 0.0, 0.0
    top = ws.service.max(axis=0, keepdims=True)
    per_window = np.minimum(top - ws.service, np.abs(ws.demand - ws.service)).sum(axis=0)
    return float(per_window.max()), float(per_window.mean())


def backlogged_pair_gap(ws: WindowedService) -> float:
    """The largest |W_u(t1, t2) - W_v(t1, t2)| of weight-normalised service between two users over windows t1..t2
    in which both stayed backlogged: the quantity VTC's bound limits. O(U^2 * windows), vectorised per user."""
    worst = 0.0
    service, backlogged = ws.service, ws.backlogged
    for i in range(len(ws.users) - 1):
        both = backlogged[i] & backlogged[i + 1:]  # [other users, windows]
        if not both.any():
            continue
        diff = np.where(both, service[i] - service[i + 1:], 0.0)
        # cumulative difference restarted at each window where the pair is not both backlogged
        run_id = np.cumsum(~both, axis=1)
        for row in np.flatnonzero(both.any(axis=1)):
            d, r = diff[row][both[row]], run_id[row][both[row]]
            starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
            cum = np.cumsum(d)
            base = np.r_[0.0, cum][starts]  # the cumulative difference just before each run
            high = np.maximum(np.maximum.reduceat(cum, starts), base)
            low = np.minimum(np.minimum.reduceat(cum, starts), base)
            worst = max(worst, float((high - low).max()))
    return worst


def steady_throughput(records: Sequence[CompletionRecord]) -> float:
    """(prompt + output) tokens per second delivered between the first and the last arrival, each request's tokens
    spread over [first token, finish]: what the cluster sustains while work keeps coming, without the drain tail
    that the slowest pool sets after the last arrival."""
    if not records:
        return 0.0
    start, end = min(r.arrival for r in records), max(r.arrival for r in records)
    if end <= start:
        return throughput(records)
    a = np.array([r.first_token for r in records])
    b = np.array([r.finish for r in records])
    tokens = np.array([r.prompt_tokens + r.output_tokens for r in records], dtype=float)
    span = np.maximum(b - a, 1e-12)
    inside = np.clip(np.minimum(b, end) - np.maximum(a, start), 0, None) / span
    inside = np.where(b - a > 1e-12, inside, ((a >= start) & (a <= end)).astype(float))
    return float((tokens * inside).sum() / (end - start))


def passed_by(records: Sequence[CompletionRecord], waiting: CompletionRecord) -> int:
    """How many requests of other users were granted while `waiting` waited (after it arrived, before its grant).
    0 says its wait was for capacity (every slot busy), not the policy's choice of someone else."""
    return sum(1 for r in records
               if r.user != waiting.user and waiting.arrival < r.granted < waiting.granted)


def percentiles(values: Sequence[float], qs=(50, 99)) -> dict[str, float]:
    x = np.asarray(values, dtype=float)
    return {f"p{q}": (float(np.percentile(x, q)) if x.size else float("nan")) for q in qs}


def latency_by_user(records: Sequence[CompletionRecord]) -> dict[str, dict[str, float]]:
    """Per user: request count and p50/p99 of time to first token and end-to-end latency (from arrival)."""
    out: dict[str, dict[str, float]] = {}
    for user in sorted({r.user for r in records}):
        mine = [r for r in records if r.user == user]
        ttft, e2e = percentiles([r.ttft for r in mine]), percentiles([r.e2e for r in mine])
        out[user] = {"count": len(mine), **{f"ttft_{k}": v for k, v in ttft.items()},
                     **{f"e2e_{k}": v for k, v in e2e.items()}}
    return out


def throughput(records: Sequence[CompletionRecord]) -> float:
    """(prompt + output tokens) per second from the first arrival to the last finish."""
    if not records:
        return 0.0
    elapsed = max(r.finish for r in records) - min(r.arrival for r in records)
    tokens = sum(r.prompt_tokens + r.output_tokens for r in records)
    return tokens / elapsed if elapsed > 0 else float("inf")
