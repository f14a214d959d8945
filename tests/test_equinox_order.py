"""Equinox's order inside the fairness bound (equinox_ray/fairness/equinox.py, queues.py): each user's queue
cheapest first with its cap and depth limit, the virtual finish within the slack, a user back from idle first, and
pairing on mixed GPU types. The bound itself is property-tested in test_policies.py."""

from hypothesis import given, settings, strategies as st

from equinox_ray.fairness import Efficiency, Equinox, Outcome, PoolView
from equinox_ray.fairness.queues import UserQueues
from policy_helpers import POOL, drain, req, users


def test_a_users_queue_runs_cheapest_first_and_a_request_is_overtaken_at_most_the_cap():
    policy = Equinox(users("a"), efficiency=Efficiency(max_overtakes=2, slack_tokens=0.0), dispatch="least_loaded")
    policy.submit(req("long", "a", prompt=900), 0)
    for i in range(4):
        policy.submit(req(f"s{i}", "a", prompt=10 + i), 0)
    assert drain(policy) == ["s0", "s1", "long", "s2", "s3"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 500), st.booleans()), min_size=1, max_size=60), st.integers(0, 6))
def test_no_request_is_overtaken_more_than_the_cap(ops, cap):
    """Arrivals interleaved with grants and cancellations; FIFO when the cap is 0."""
    policy = Equinox(users("a"), efficiency=Efficiency(max_overtakes=cap, slack_tokens=0.0), dispatch="least_loaded")
    arrived, granted = [], []
    for i, (prompt, grant) in enumerate(ops):
        policy.submit(req(f"r{i}", "a", prompt=prompt), 0)
        arrived.append(f"r{i}")
        if i % 7 == 3:
            policy.cancel(arrived[i // 2])
        if grant and (g := policy.schedule(POOL, 0)) is not None:
            granted.append(g.request.id)
    granted += drain(policy)
    order = {rid: n for n, rid in enumerate(granted)}
    for rid in granted:
        overtaken = sum(1 for other in arrived[arrived.index(rid) + 1:] if other in order and order[other] < order[rid])
        assert overtaken <= cap


def test_the_slack_lets_a_user_with_a_cheap_head_go_first_and_only_within_the_slack():
    for slack, first in [(0.0, "big"), (200.0, "small"), (50.0, "big")]:
        policy = Equinox(users("big", "small"), efficiency=Efficiency(slack_tokens=slack, fresh_first=False),
                         dispatch="least_loaded")
        policy.served["small"] = 100.0
        policy.submit(req("big1", "big", prompt=500), 0)
        policy.submit(req("small1", "small", prompt=10), 0)
        assert drain(policy)[0] == f"{first}1", slack


def test_a_user_passed_by_the_cap_of_grants_to_larger_keys_goes_next():
    for cap, passed in [(3, 3), (0, 20)]:
        policy = Equinox(users("big", "small"), dispatch="least_loaded",
                         efficiency=Efficiency(slack_tokens=10_000.0, fresh_first=False, max_passes=cap))
        policy.served["small"] = 100.0  # big's key is the smaller, its head far the dearer
        policy.submit(req("big1", "big", prompt=5_000), 0)
        for i in range(20):
            policy.submit(req(f"s{i}", "small", prompt=10), 0)
        assert drain(policy).index("big1") == passed, cap


def test_the_default_slack_is_one_whole_prompt_of_the_pools_largest_context():
    """Delta follows the model: a user 1,200 tokens above the smallest counter competes by its virtual finish beside
    4k-context pools and not beside 1k-context ones; pools that do not say their context get 4,096."""
    def first(context: int | None) -> str:
        pool = PoolView("p", free_slots=8, free_kv_tokens=10_000,
                        **({} if context is None else {"max_request_tokens": context}))
        policy = Equinox(users("big", "small"), efficiency=Efficiency(fresh_first=False), dispatch="least_loaded")
        policy.lengths.observe(Outcome("earlier", "big", "p", 10, 500, 0.1, 1.0, 1.0))  # big's outputs: 500
        policy.served["small"] = 1200.0
        policy.submit(req("big1", "big", prompt=500, max_tokens=500), 0)  # cost 500 + 2 x 500, fits 1k
        policy.submit(req("small1", "small", prompt=10), 0)  # virtual finish 1,210
        assert policy.slack([pool]) == (4096.0 if context is None else float(context))
        return drain(policy, [pool])[0]

    assert [first(1024), first(4096), first(None)] == ["big1", "small1", "small1"]


def _first_after_busy_then_idle(efficiency: Efficiency, idle_owes: float = 0.0) -> str:
    """busy queues two cheap requests and is granted one; then idle, whose queue was empty, queues an expensive one
    and is lifted to busy's counter (plus `idle_owes`): which request goes next?"""
    policy = Equinox(users("busy", "idle"), efficiency=efficiency, dispatch="least_loaded")
    for rid in ("busy1", "busy2"):
        policy.submit(req(rid, "busy", prompt=10), 0)
    assert policy.schedule(POOL, 0).request.id == "busy1"
    policy.submit(req("idle1", "idle", prompt=500), 1)
    policy.served["idle"] += idle_owes
    policy.restore({})
    return drain(policy, now=1)[0]


def test_a_user_back_from_idle_goes_first_within_the_slack_and_only_within_it():
    assert _first_after_busy_then_idle(Efficiency(slack_tokens=200.0, fresh_first=True)) == "idle1"
    assert _first_after_busy_then_idle(Efficiency(slack_tokens=200.0, fresh_first=False)) == "busy2"  # cheaper
    assert _first_after_busy_then_idle(Efficiency(slack_tokens=200.0, fresh_first=True), idle_owes=300.0) == "busy2"


def test_a_deep_queues_cheapest_request_wins_the_virtual_finish_unless_it_counts_the_oldest():
    """deep has an expensive request and then a cheap one waiting, single one request between the two; counters are
    equal. Ranked by the request (a) puts first, deep's cheap one beats single's (shortest job first across users,
    which favours whoever has the most waiting); ranked by each user's oldest, single's cheaper request goes first."""
    def first(finish_by_oldest: bool) -> str:
        efficiency = Efficiency(slack_tokens=4096.0, fresh_first=False, finish_by_oldest=finish_by_oldest)
        policy = Equinox(users("deep", "single"), efficiency=efficiency, dispatch="least_loaded")
        policy.submit(req("deep-long", "deep", prompt=400), 0)
        policy.submit(req("deep-short", "deep", prompt=10), 0)
        policy.submit(req("single", "single", prompt=200), 0)
        return drain(policy, now=0)[0]

    assert first(finish_by_oldest=False) == "deep-short"
    assert first(finish_by_oldest=True) == "single"


def _doc_and_chat_waiting(efficiency: Efficiency, slow: PoolView, doc: tuple[int, int],
                          chat: tuple[int, int]) -> Equinox:
    """Users doc and chat, each with one (prompt, output) request waiting and that output as their mean (taught by
    one finished request on `slow`); doc is owed more, within the slack."""
    policy = Equinox(users("doc", "chat"), efficiency=efficiency)
    for user, (prompt, output) in [("doc", doc), ("chat", chat)]:
        policy.submit(req(f"{user}0", user, prompt=prompt, max_tokens=output), 0)
        policy.schedule([slow], 0)
        policy.finish(Outcome(f"{user}0", user, slow.name, prompt, output, 0.1, 1.0, 1.0), 1)
    for user, (prompt, output) in [("doc", doc), ("chat", chat)]:
        policy.submit(req(f"{user}1", user, prompt=prompt, max_tokens=output), 2)
    policy.restore({"served": {"doc": 0.0, "chat": 1500.0}})  # after the lifts
    return policy


def test_pairing_treats_relative_times_within_a_band_as_equal_and_lets_the_fair_order_decide():
    """On the free slower pool, chat's request takes 1.12x its time on the fast pool and doc's 1.24x: one band of
    0.25, so doc, who is owed more, goes first; ranked by the exact relative time, chat would."""
    fast = PoolView("h100", gpu_type="H100", free_slots=0, prefill_tps=1_000.0, decode_tps=100.0)
    slow = PoolView("a100", gpu_type="A100", free_slots=4, prefill_tps=800.0, decode_tps=90.0)
    for band, first in [(0.25, "doc1"), (0.0, "chat1")]:
        efficiency = Efficiency(pairing_band=band, slack_tokens=4096.0)
        policy = _doc_and_chat_waiting(efficiency, slow, doc=(1000, 10), chat=(100, 100))
        assert policy.schedule([fast, slow], 2).request.id == first, band


def test_pairing_gives_a_free_slow_pool_the_request_it_slows_least():
    """Fast pool full, slow pool free: the slow pool prefills 10x slower but decodes only 2x slower, so it goes to
    the decode-heavy request even though the other user's counter is smaller (both are within the slack)."""
    fast = PoolView("h100", gpu_type="H100", free_slots=0, prefill_tps=20_000.0, decode_tps=80.0)
    slow = PoolView("l4", gpu_type="L4", free_slots=4, prefill_tps=2_000.0, decode_tps=40.0)
    for pairing, first in [(True, "chat1"), (False, "doc1")]:
        efficiency = Efficiency(pairing=pairing, slack_tokens=4096.0)
        policy = _doc_and_chat_waiting(efficiency, slow, doc=(2000, 10), chat=(20, 400))
        grant = policy.schedule([fast, slow], 2)
        assert (grant.request.id, grant.pool) == (first, "l4"), pairing


def test_a_queue_deeper_than_the_reorder_depth_runs_fifo_and_cheapest_first_once_it_is_not():
    def order(max_depth: int) -> list[str]:
        queues = UserQueues(max_overtakes=16, max_depth=max_depth)
        for rid, cost in [("long", 100.0), ("short1", 1.0), ("short2", 2.0)]:
            queues.push(req(rid, "u"), cost)
        return [queues.pop("u").id for _ in range(3)]

    assert order(max_depth=0) == ["short1", "short2", "long"]
    assert order(max_depth=2) == ["long", "short1", "short2"]
