"""A minimal continuous-batching loop for policy tests: one pool with a KV capacity in tokens, one token per running
request per step, admission while the policy grants. It drives the real policies and records service per step."""

from __future__ import annotations

from dataclasses import dataclass, field

from equinox_ray.fairness import Outcome, Policy, PoolView, Request


@dataclass
class LoopResult:
    grants: list[tuple[str, str]] = field(default_factory=list)  # (request id, pool) in grant order
    service: dict[str, list[float]] = field(default_factory=dict)  # user -> cumulative raw service after each step
    backlogged: dict[str, list[bool]] = field(default_factory=dict)  # user -> queue non-empty after each step
    finished: list[str] = field(default_factory=list)


def run(policy: Policy, arrivals: list[tuple[int, Request, int]], capacity: int, steps: int, pools: int = 1,
        w_in: float = 1.0, w_out: float = 2.0, slow_users: dict[str, float] | None = None) -> LoopResult:
    """arrivals: (step, request, true output length). `slow_users` stretches reported latency and busy time."""
    slow_users = slow_users or {}
    arrivals = sorted(arrivals, key=lambda a: a[0])
    truth = {r.id: n for _, r, n in arrivals}
    names = [f"pool-{i}" for i in range(pools)]
    running: dict[str, list] = {}  # id -> [request, pool, generated, granted step, first token step, busy]
    result = LoopResult(service={u: [] for u in policy.users}, backlogged={u: [] for u in policy.users})
    totals = {u: 0.0 for u in policy.users}
    nxt = 0
    for step in range(steps):
        while nxt < len(arrivals) and arrivals[nxt][0] <= step:
            policy.submit(arrivals[nxt][1], now=step)
            nxt += 1
        while True:
            views = []
            for name in names:
                used = sum(r.kv_demand for r, p, *_ in running.values() if p == name)
                views.append(PoolView(name=name, free_slots=64, free_kv_tokens=capacity - used))
            grant = policy.schedule(views, now=step)
            if grant is None:
                break
            request = grant.request
            running[request.id] = [request, grant.pool, 0, step, None, 0.0]
            totals[request.user] += w_in * request.prompt_tokens
            result.grants.append((request.id, grant.pool))
        batch = list(running.values())
        for entry in batch:
            request = entry[0]
            entry[2] += 1
            entry[5] += slow_users.get(request.user, 1.0) / len(batch)
            if entry[4] is None:
                entry[4] = step + 1
            policy.on_tokens(request.id, 1)
            totals[request.user] += w_out
            if entry[2] >= truth[request.id]:
                stretch = slow_users.get(request.user, 1.0)
                del running[request.id]
                policy.finish(Outcome(request.id, request.user, entry[1], request.prompt_tokens, entry[2],
                                      ttft_s=(entry[4] - entry[3]) * stretch, e2e_s=(step + 1 - entry[3]) * stretch,
                                      busy_seconds=entry[5]), now=step + 1)
                result.finished.append(request.id)
        for user in policy.users:
            result.service[user].append(totals[user])
            result.backlogged[user].append(policy.queue_length(user) > 0)
    return result


def max_gap_while_backlogged(result: LoopResult, f: str, g: str) -> float:
    """max over t1 < t2 inside a run of steps where both users stay backlogged of |W_f(t1,t2) - W_g(t1,t2)|."""
    worst, start = 0.0, None
    both = [a and b for a, b in zip(result.backlogged[f], result.backlogged[g])] + [False]
    for t, on in enumerate(both):
        if on and start is None:
            start = t
        elif not on and start is not None:
            diff = [result.service[f][s] - result.service[g][s] for s in range(start, t)]
            worst = max(worst, max(diff) - min(diff))
            start = None
    return worst
