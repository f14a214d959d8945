"""Seeded random multi-user workloads shaped like no vendored trace, to test that a policy's gains are not the
traces': every user draws its own length profile (log-normal prompt and output around medians of its own), its own
share of the requests (a Zipf law of random skew) and its own arrival process (Poisson, bursty or on/off)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from equinox_ray.fairness.request import User
from equinox_ray.workloads.workload import TraceRequest, Workload

ARRIVALS = ("poisson", "bursty", "on-off")
MAX_PROMPT, MAX_OUTPUT = 3500, 2048


@dataclass(frozen=True)
class UserProfile:
    name: str
    weight: float
    share: float  # of all requests
    prompt_median: float
    output_median: float
    sigma: float  # of log lengths
    arrivals: str  # one of ARRIVALS
    burstiness: float  # coefficient of variation of bursty gaps; the on-off period's on share for on-off


def user_profiles(rng: np.random.Generator, n_users: int, weighted: bool) -> list[UserProfile]:
    skew = rng.uniform(0.0, 1.5)
    share = 1.0 / np.arange(1, n_users + 1) ** skew
    share = rng.permutation(share / share.sum())
    return [UserProfile(f"user-{k:03d}", float(rng.choice([1.0, 2.0, 4.0])) if weighted else 1.0, float(share[k]),
                        float(np.exp(rng.uniform(np.log(16), np.log(2048)))),
                        float(np.exp(rng.uniform(np.log(8), np.log(768)))),
                        float(rng.uniform(0.3, 1.2)), str(rng.choice(ARRIVALS)), float(rng.uniform(1.5, 4.0)))
            for k in range(n_users)]


def arrival_times(profile: UserProfile, count: int, duration: float, rng: np.random.Generator) -> np.ndarray:
    """`count` arrivals of the user's process over [0, duration]."""
    if count == 0:
        return np.empty(0)
    if profile.arrivals == "poisson":
        gaps = rng.exponential(1.0, size=count)
    elif profile.arrivals == "bursty":  # gamma gaps with the profile's coefficient of variation
        shape = 1.0 / profile.burstiness ** 2
        gaps = rng.gamma(shape, 1.0 / shape, size=count)
    else:  # on-off: Poisson inside on periods of random length, silent in between
        gaps = rng.exponential(1.0, size=count)
        off = rng.random(count) < 0.02  # about one in 50 gaps is a silence of 20 to 100 ordinary gaps
        gaps[off] += rng.uniform(20, 100, size=int(off.sum()))
    times = np.cumsum(gaps)
    return (times - times[0]) / max(times[-1] - times[0], 1e-9) * duration * rng.uniform(0.6, 0.9) \
        + rng.uniform(0, duration * 0.1)


def random_workload(seed: int, n_users: int, n_requests: int, duration: float, weighted: bool = True,
                    name: str | None = None) -> Workload:
    rng = np.random.default_rng(seed)
    profiles = user_profiles(rng, n_users, weighted)
    counts = rng.multinomial(n_requests, [p.share for p in profiles])
    requests = []
    for profile, count in zip(profiles, counts):
        times = arrival_times(profile, int(count), duration, rng)
        prompts = np.clip(rng.lognormal(np.log(profile.prompt_median), profile.sigma, size=count), 1, MAX_PROMPT)
        outputs = np.clip(rng.lognormal(np.log(profile.output_median), profile.sigma, size=count), 1, MAX_OUTPUT)
        requests += [TraceRequest(float(t), profile.name, int(p), int(o)) for t, p, o in zip(times, prompts, outputs)]
    users = {p.name: User(p.name, p.weight) for p in profiles}
    return Workload(name or f"random-{seed}", users, requests)
