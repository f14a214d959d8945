"""Shared set-up for the fairness-core tests: requests, users, one pool, and draining a policy's grants."""

from equinox_ray.fairness import PoolView, Request, User

POOL = [PoolView("p", free_slots=8, free_kv_tokens=10_000)]


def req(rid, user, arrival=0.0, prompt=10, max_tokens=10):
    return Request(rid, user, arrival, prompt, max_tokens)


def users(*names, weights=None):
    return [User(n, (weights or {}).get(n, 1.0)) for n in names]


def drain(policy, pools=POOL, now=0.0):
    order = []
    while (grant := policy.schedule(pools, now)) is not None:
        order.append(grant.request.id)
    return order
