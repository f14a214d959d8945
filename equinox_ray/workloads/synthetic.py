"""Seeded workload generators: VTC's synthetic suites (Sheng et al., OSDI 2024, artifact `fair_bench/exp_suite.py`)
and multi-user workloads built from real length distributions with a Zipf-skewed user mix.

"uniform" arrivals are deterministic at 1/rate with a random phase, as in the artifact; "poisson" arrivals are
exponential gaps. The same seed always gives the same workload.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from equinox_ray.fairness.request import User
from equinox_ray.workloads.workload import TraceRequest, Workload

RateFn = Callable[[float], float]


def uniform_arrivals(rate: float, start: float, end: float, rng: np.random.Generator) -> np.ndarray:
    if rate <= 0 or end <= start:
        return np.empty(0)
    gap = 1.0 / rate
    return np.arange(start + rng.uniform(0, gap), end, gap)


def poisson_arrivals(rate: float, start: float, end: float, rng: np.random.Generator) -> np.ndarray:
    if rate <= 0 or end <= start:
        return np.empty(0)
    n = rng.poisson(rate * (end - start) * 1.2) + 16
    times = start + np.cumsum(rng.exponential(1.0 / rate, size=n))
    while times[-1] < end:  # rarely needed: draw more gaps
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, size=n))])
    return times[times < end]


def varying_poisson_arrivals(rate: RateFn, peak: float, start: float, end: float,
                             rng: np.random.Generator) -> np.ndarray:
    """An inhomogeneous Poisson process by thinning: rate(t) must stay within [0, peak]."""
    candidates = poisson_arrivals(peak, start, end, rng)
    keep = rng.uniform(0, peak, size=len(candidates)) < np.array([rate(t) for t in candidates])
    return candidates[keep]


def on_off(rate: float, period: float, start: float, end: float, rng: np.random.Generator) -> np.ndarray:
    """Uniform arrivals during the first half of each period, none during the second half."""
    times = uniform_arrivals(rate, start, end, rng)
    return times[((times - start) % period) < period / 2]


def _client(i: int) -> str:
    return f"client-{i}"


def _fixed_lengths(name: str, arrivals: Sequence[np.ndarray], lengths: Sequence[tuple[int, int]],
                   weights: Sequence[float] | None = None) -> Workload:
    weights = weights or [1.0] * len(arrivals)
    users = {_client(i): User(_client(i), w) for i, w in enumerate(weights)}
    requests = [TraceRequest(float(t), _client(i), lengths[i][0], lengths[i][1])
                for i, times in enumerate(arrivals) for t in times]
    return Workload(name, users, requests)


def overload(seed: int = 0, duration: float = 360.0, length: int = 256) -> Workload:
    rng = np.random.default_rng(seed)
    arrivals = [uniform_arrivals(r, 0, duration, rng) for r in (1.5, 3.0)]
    return _fixed_lengths("overload", arrivals, [(length, length)] * 2)


def overload_multi(seed: int = 0, duration: float = 360.0, length: int = 256) -> Workload:
    rng = np.random.default_rng(seed)
    arrivals = [uniform_arrivals(r, 0, duration, rng) for r in [0.4] * 3 + [0.6] * 5]
    return _fixed_lengths("overload-multi", arrivals, [(length, length)] * 8)


def overload_weighted(seed: int = 0, duration: float = 360.0, length: int = 256) -> Workload:
    rng = np.random.default_rng(seed)
    arrivals = [uniform_arrivals(r, 0, duration, rng) for r in (0.8, 0.8, 1.2, 1.6)]
    return _fixed_lengths("overload-weighted", arrivals, [(length, length)] * 4, weights=[1, 2, 3, 4])


def proportional(seed: int = 0, duration: float = 600.0, length: int = 256) -> Workload:
    rng = np.random.default_rng(seed)
    arrivals = [uniform_arrivals(r, 0, duration, rng) for r in (0.25, 0.5, 1.5)]
    return _fixed_lengths("proportional", arrivals, [(length, length)] * 3)


def on_off_less(seed: int = 0, duration: float = 600.0, length: int = 256, period: float = 60.0) -> Workload:
    rng = np.random.default_rng(seed)
    arrivals = [on_off(0.5, period, 0, duration, rng), uniform_arrivals(2.0, 0, duration, rng)]
    return _fixed_lengths("on-off-less", arrivals, [(length, length)] * 2)


def on_off_overload(seed: int = 0, duration: float = 600.0, length: int = 256, period: float = 60.0) -> Workload:
    rng = np.random.default_rng(seed)
    arrivals = [on_off(2.0, period, 0, duration, rng), uniform_arrivals(3.0, 0, duration, rng)]
    return _fixed_lengths("on-off-overload", arrivals, [(length, length)] * 2)


def poisson_short_long(seed: int = 0, duration: float = 600.0) -> Workload:
    rng = np.random.default_rng(seed)
    arrivals = [poisson_arrivals(r, 0, duration, rng) for r in (8.0, 1.5)]
    return _fixed_lengths("poisson-short-long", arrivals, [(64, 64), (256, 256)])


def poisson_short_long_2(seed: int = 0, duration: float = 600.0) -> Workload:
    rng = np.random.default_rng(seed)
    arrivals = [poisson_arrivals(r, 0, duration, rng) for r in (8.0, 1.5)]
    return _fixed_lengths("poisson-short-long-2", arrivals, [(512, 32), (32, 512)])


def increase(seed: int = 0, duration: float = 600.0, length: int = 256) -> Workload:
    """Client 0 steady at 0.5 req/s; client 1 ramps linearly from 0.2 to 2 req/s."""
    rng = np.random.default_rng(seed)
    ramp = lambda t: 0.2 + (2.0 - 0.2) * t / duration  # noqa: E731
    arrivals = [uniform_arrivals(0.5, 0, duration, rng), varying_poisson_arrivals(ramp, 2.0, 0, duration, rng)]
    return _fixed_lengths("increase", arrivals, [(length, length)] * 2)


def dist_shift(seed: int = 0, phase: float = 300.0, length: int = 256) -> Workload:
    """Three phases: client 0 on/off at 0.5 with client 1 at 2; both at 1; then 0.5 and 1.5."""
    rng = np.random.default_rng(seed)
    c0 = [on_off(0.5, 60.0, 0, phase, rng), uniform_arrivals(1.0, phase, 2 * phase, rng),
          uniform_arrivals(0.5, 2 * phase, 3 * phase, rng)]
    c1 = [uniform_arrivals(2.0, 0, phase, rng), uniform_arrivals(1.0, phase, 2 * phase, rng),
          uniform_arrivals(1.5, 2 * phase, 3 * phase, rng)]
    return _fixed_lengths("dist-shift", [np.concatenate(c0), np.concatenate(c1)], [(length, length)] * 2)


VTC_SUITES: dict[str, Callable[..., Workload]] = {
    "overload": overload,
    "overload-multi": overload_multi,
    "overload-weighted": overload_weighted,
    "proportional": proportional,
    "on-off-less": on_off_less,
    "on-off-overload": on_off_overload,
    "poisson-short-long": poisson_short_long,
    "poisson-short-long-2": poisson_short_long_2,
    "increase": increase,
    "dist-shift": dist_shift,
}


def zipf_users(
    lengths: Sequence[tuple[int, int]],
    *,
    n_users: int,
    n_requests: int,
    rate: float | None = None,
    arrivals: Sequence[float] | None = None,
    zipf_s: float = 1.1,
    weights: Sequence[float] = (1.0,),
    seed: int = 0,
    name: str = "zipf",
) -> Workload:
    """`n_requests` requests with lengths sampled from `lengths`, each owned by one of `n_users` users drawn from a
    Zipf law (user k has probability proportional to 1 / k^zipf_s). Arrivals are the given times (for example a
    real trace's) or Poisson at `rate`. User k's weight is weights[k % len(weights)]."""
    if n_users < 1 or n_requests < 1:
        raise ValueError("n_users and n_requests must be >= 1")
    if not lengths:
        raise ValueError("no lengths to sample from")
    if any(w <= 0 for w in weights):
        raise ValueError("user weights must be > 0")
    rng = np.random.default_rng(seed)
    if arrivals is not None:
        if len(arrivals) < n_requests:
            raise ValueError(f"only {len(arrivals)} arrival times for {n_requests} requests")
        times = np.asarray(arrivals[:n_requests], dtype=float)
    elif rate is not None and rate > 0:
        times = np.cumsum(rng.exponential(1.0 / rate, size=n_requests))
    else:
        raise ValueError("give arrival times or a positive rate")
    share = 1.0 / np.arange(1, n_users + 1) ** zipf_s
    owners = rng.choice(n_users, size=n_requests, p=share / share.sum())
    picks = rng.integers(0, len(lengths), size=n_requests)
    users = {f"user-{k:03d}": User(f"user-{k:03d}", float(weights[k % len(weights)])) for k in range(n_users)}
    requests = [TraceRequest(float(t), f"user-{k:03d}", lengths[i][0], lengths[i][1])
                for t, k, i in zip(times, owners, picks)]
    return Workload(name, users, requests)
