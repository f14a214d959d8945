"""Controller overhead: scheduling decisions per second of the fairness core alone, with 10 to 10,000 backlogged
users. One decision is what the controller does per request: `schedule` (pick the user, the pool, charge), then
`finish` with the measured outcome and a `submit` that keeps the user backlogged. The cost should grow as
O(log users) (the user heap); the curve is printed against log2(users).

    python -m bench overhead
"""

from __future__ import annotations

import math
import time

import numpy as np

from equinox_ray.fairness import VTC, Equinox, MovingAveragePredictor, Outcome, PoolView, Request, User

USERS = (10, 100, 1_000, 10_000)
POOLS = [PoolView("a100", "A100", free_slots=1 << 20), PoolView("l4", "L4", free_slots=1 << 20, cost_weight=0.5)]


def decisions_per_second(make_policy, n_users: int, seconds: float = 1.5) -> float:
    users = [User(f"u{i}", weight=1.0 + i % 3) for i in range(n_users)]
    policy = make_policy(users)
    serial = 0
    for user in users:
        for _ in range(2):
            policy.submit(Request(f"r{serial}", user.name, 0.0, 100 + serial % 400, 256), 0.0)
            serial += 1
    done, started, now = 0, time.perf_counter(), 0.0
    while True:
        for _ in range(500):
            now += 1e-3
            grant = policy.schedule(POOLS, now)
            request = grant.request
            policy.finish(Outcome(request.id, request.user, grant.pool, request.prompt_tokens, 200, 0.1, 2.0, 0.5),
                          now)
            policy.submit(Request(f"r{serial}", request.user, now, 100 + serial % 400, 256), now)
            serial += 1
        done += 500
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed


def main() -> None:
    policies = {
        "vtc": lambda users: VTC(users),
        "equinox (moving-average predictor)": lambda users: Equinox(users, predictor=MovingAveragePredictor()),
    }
    print("scheduling decisions per second (schedule + finish + submit), one process, this machine\n")
    print(f"| policy | {' | '.join(f'{n:,} users' for n in USERS)} |")
    print("|---|" + "---:|" * len(USERS))
    curves = {}
    for name, make in policies.items():
        curves[name] = [decisions_per_second(make, n) for n in USERS]
        print(f"| {name} | {' | '.join(f'{r:,.0f}/s' for r in curves[name])} |")
    print("\ncost per decision against log2(users): O(log U) means the last column stays about flat")
    print("| policy | users | log2(users) | us/decision | us per log2 unit |")
    print("|---|---:|---:|---:|---:|")
    for name, rates in curves.items():
        for n, rate in zip(USERS, rates):
            us = 1e6 / rate
            print(f"| {name} | {n:,} | {math.log2(n):.1f} | {us:.1f} | {us / math.log2(n):.2f} |")
    for name, rates in curves.items():
        slope, intercept = np.polyfit(np.log2(USERS), [1e6 / r for r in rates], 1)
        print(f"{name}: fit us/decision = {intercept:.1f} + {slope:.2f} * log2(users)")
    from equinox_ray.mope.predictor import MoPE
    from predictors.train import DEFAULT_MODELS

    mope = decisions_per_second(lambda users: Equinox(users, predictor=MoPE(DEFAULT_MODELS)), 1_000)
    print(f"equinox with MoPE (one batched prediction for the 2 candidate pools), 1,000 users: {mope:,.0f}/s")
    target = curves["equinox (moving-average predictor)"][USERS.index(1_000)]
    print(f"\nEquinox at 1,000 users: {target:,.0f} decisions/s (target >= 20,000): "
          f"{'met' if target >= 20_000 else 'NOT met'}")


if __name__ == "__main__":
    main()
