"""A workload: users with weights and their requests in arrival order, with the true output lengths."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from equinox_ray.fairness.request import Request, UnknownUser, User


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    user: str
    prompt_tokens: int
    output_tokens: int  # the truth: for the engine that replays it, never for the scheduler


@dataclass
class Workload:
    name: str
    users: dict[str, User]
    requests: list[TraceRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.requests.sort(key=lambda r: r.arrival_s)
        for i, r in enumerate(self.requests):
            if r.user not in self.users:
                raise UnknownUser(f"workload {self.name!r}: request {i} names unknown user {r.user!r}")

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s if self.requests else 0.0

    def compressed(self, factor: float, name: str | None = None) -> "Workload":
        """The same requests arriving `factor` times sooner (a factor under 1 spreads them out)."""
        requests = [TraceRequest(r.arrival_s / factor, r.user, r.prompt_tokens, r.output_tokens)
                    for r in self.requests]
        return Workload(name or self.name, self.users, requests)

    def jittered(self, seed: int, name: str | None = None) -> "Workload":
        """The same requests, each arriving later by a random delay of up to one mean gap between arrivals: the
        trace's shape at every scale above that gap, with its coincidences (which request meets which free slot)
        drawn anew."""
        gap = self.duration_s / max(len(self.requests) - 1, 1)
        delays = np.random.default_rng(seed).uniform(0.0, gap, len(self.requests))
        requests = [TraceRequest(r.arrival_s + float(d), r.user, r.prompt_tokens, r.output_tokens)
                    for r, d in zip(self.requests, delays)]
        return Workload(name or self.name, self.users, requests)

    def scheduler_request(self, index: int, max_tokens_cap: int | None = None) -> Request:
        """The request as the scheduler sees it: the client's cap, never the true output length.

        With no cap given, the cap is the true length, as the VTC artifact's max_new_tokens is; benchmarks that
        test predictors pass a cap so that nothing downstream of the scheduler can read the truth.
        """
        r = self.requests[index]
        cap = r.output_tokens if max_tokens_cap is None else max(max_tokens_cap, 1)
        return Request(id=f"{self.name}-{index}", user=r.user, arrival=r.arrival_s, prompt_tokens=r.prompt_tokens,
                       max_tokens=cap)

    def per_user_counts(self) -> dict[str, int]:
        counts = {name: 0 for name in self.users}
        for r in self.requests:
            counts[r.user] += 1
        return counts
