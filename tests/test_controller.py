"""The fairness controller's logic, driven directly (it is a plain class; Serve hosts it as an actor)."""

import asyncio

import pytest

from equinox_ray.serve.controller import FairnessController
from equinox_ray.serve.errors import Busy, Cancelled, QueueFull


def config(**policy):
    return {
        "model": {"name": "m", "tokenizer": None},
        "users": [{"name": "a", "api_key": "key-aaaaaaaa"}, {"name": "b", "api_key": "key-bbbbbbbb"}],
        "limits": {"max_queue_per_user": 3},
        "policy": policy or {"name": "vtc"},
        "pools": [
            {"name": "h100", "gpu_type": "H100", "engine": "sim", "cost_weight": 8.0,
             "sim": {"gpu": "H100", "max_model_len": 8192}, "admission": {"max_window": 2, "initial_window": 2}},
            {"name": "l4", "gpu_type": "L4", "engine": "sim", "cost_weight": 1.0,
             "sim": {"gpu": "L4", "max_model_len": 2048}, "admission": {"max_window": 2, "initial_window": 2}},
        ],
    }


def run(coro):
    return asyncio.run(coro)


def test_grants_wait_for_free_slots_and_a_finish_releases_the_next():
    async def main():
        ctl = FairnessController(config())
        grants = [asyncio.create_task(ctl.submit(f"r{i}", "a", 10, 10)) for i in range(5)]
        await asyncio.sleep(0)
        granted = [g for g in grants if g.done()]
        assert len(granted) == 4  # two pools, two slots each
        pool = granted[0].result()["pool"]
        ctl.finish("r0", "a", pool, 10, 10, 0.1, 0.5, 0.2)
        await asyncio.sleep(0)
        assert all(g.done() for g in grants)
        assert ctl.snapshot()["users"]["a"]["finished"] == 1

    run(main())


def test_a_full_user_queue_is_refused_and_other_users_are_not():
    async def main():
        ctl = FairnessController(config())
        for i in range(4):  # fill the four slots
            await ctl.submit(f"fill{i}", "a", 10, 10)
        waiting = [asyncio.create_task(ctl.submit(f"w{i}", "a", 10, 10)) for i in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await ctl.submit("over", "a", 10, 10)
        other = asyncio.create_task(ctl.submit("b0", "b", 10, 10))
        await asyncio.sleep(0)
        assert ctl.policy.queue_length("b") == 1 and not other.done()
        assert ctl.snapshot()["users"]["a"]["rejected"] == 1
        for t in waiting + [other]:
            t.cancel()

    run(main())


def test_cancel_while_waiting_removes_the_request_and_fails_its_waiter():
    async def main():
        ctl = FairnessController(config())
        for i in range(4):
            await ctl.submit(f"fill{i}", "a", 10, 10)
        waiter = asyncio.create_task(ctl.submit("w", "b", 10, 10))
        await asyncio.sleep(0)
        assert ctl.cancel("w") is True
        with pytest.raises(Cancelled):
            await waiter
        assert ctl.policy.queue_length("b") == 0 and ctl.snapshot()["users"]["b"]["cancelled"] == 1

    run(main())


def test_a_request_too_long_for_a_pool_only_goes_where_it_fits():
    async def main():
        ctl = FairnessController(config())
        grant = await ctl.submit("long", "a", 3000, 1000)  # over the L4 pool's 2,048-token context
        return grant["pool"]

    assert run(main()) == "h100"


def test_backlog_goes_to_the_pool_that_suits_the_work():
    """Cost dispatch: the cheapest pool meeting the SLO. With the H100 5x faster at 8x the price, short requests
    suit the L4s; long ones only fit
    the H100s. The backlog the autoscaler sees follows that split."""
    async def main():
        ctl = FairnessController(config(name="equinox", dispatch="cost", e2e_slo_s=30.0))
        ctl.report("h100", "h0", 2, 0, 4000.0, 1.0, 0.5, tpot_s=0.015)
        ctl.report("l4", "l0", 2, 0, 800.0, 1.0, 0.5, tpot_s=0.06)
        ctl.pools["h100"].running = ctl.pools["l4"].running = 2  # both full: everything waits
        tasks = [asyncio.create_task(ctl.submit("short0", "a", 50, 50)),
                 asyncio.create_task(ctl.submit("short1", "b", 60, 40)),
                 asyncio.create_task(ctl.submit("long0", "a", 3000, 1000))]
        await asyncio.sleep(0)
        stale = ctl.backlog()  # still the answer the reports above computed: reused for half an interval
        await asyncio.sleep(ctl.config.report_interval_s / 2)
        backlog = ctl.backlog()
        for t in tasks:
            t.cancel()
        return stale, backlog

    assert run(main()) == ({"h100": 0, "l4": 0}, {"h100": 1, "l4": 2})


def test_a_request_cancelled_while_waiting_leaves_no_prediction_behind():
    async def main():
        ctl = FairnessController(config(name="vtc-predict", predictor="mope"))
        ctl.pools["h100"].running = ctl.pools["l4"].running = 2  # full: requests wait
        waiting = asyncio.create_task(ctl.submit("w0", "a", 50, 50))
        await asyncio.sleep(0)
        ctl.backlog()  # a pool choice, hence a prediction, for the waiting request
        assert "w0" in ctl.policy.predictor._pending
        waiting.cancel()
        await asyncio.sleep(0)
        assert ctl.policy.queue_length("a") == 0 and "w0" not in ctl.policy.predictor._pending

    run(main())


def test_replicas_that_stop_reporting_are_dropped():
    ctl = FairnessController(config())
    ctl.report("l4", "gone", 2, 2, 100.0, 0.5, 0.1)
    ctl.pools["l4"].replicas["gone"].seen -= 60
    ctl.report("l4", "alive", 3, 3, 100.0, 0.5, 0.1)
    assert set(ctl.pools["l4"].replicas) == {"alive"} and ctl.pools["l4"].capacity() == 3


def test_policy_changes_only_while_idle():
    async def main():
        ctl = FairnessController(config())
        assert ctl.set_policy({"name": "fcfs"}) == "fcfs"
        await ctl.submit("x", "a", 10, 10)
        with pytest.raises(Busy):
            ctl.set_policy({"name": "vtc"})

    run(main())


def test_with_auth_off_the_user_field_names_the_user_and_new_users_are_admitted():
    async def main():
        raw = config()
        raw.update(auth=False, users=[])
        ctl = FairnessController(raw)
        grant = await ctl.submit("r", "demo-user", 10, 10)
        return grant["pool"], ctl.policy.users["demo-user"].weight

    pool, weight = run(main())
    assert pool in ("h100", "l4") and weight == 1.0


def test_with_auth_on_unknown_users_are_refused():
    from equinox_ray.fairness import InvalidRequest

    async def main():
        await FairnessController(config()).submit("r", "mallory", 10, 10)

    with pytest.raises(InvalidRequest, match="mallory"):
        run(main())


def test_the_serving_path_writes_completion_records_that_training_reads(tmp_path):
    from predictors import records

    path = tmp_path / "records.jsonl"

    async def main():
        ctl = FairnessController({**config(name="equinox"), "records_path": str(path)})
        for i in range(3):
            grant = await ctl.submit(f"r{i}", "a", 40 + i, 20)
            ctl.finish(f"r{i}", "a", grant["pool"], 40 + i, 15, 0.1, 0.9, 0.4)
        grant = await ctl.submit("gone", "b", 10, 10)
        ctl.finish("gone", "b", grant["pool"], 10, 3, 0.0, 0.0, 0.0, cancelled=True)
        return ctl.policy.predictor

    predictor = run(main())
    rows = records.read(path)
    assert [r["prompt_tokens"] for r in rows] == [40, 41, 42]  # the cancelled one is not training data
    assert all(r["output_tokens"] == 15 and r["gpu"] in ("H100", "L4") for r in rows)
    assert type(predictor).__name__ == "MoPE" and predictor.experts  # the shipped models were loaded


def test_a_caller_cancelled_at_the_moment_of_its_grant_releases_the_slot():
    async def main():
        ctl = FairnessController(config())
        pools = [(await ctl.submit(f"fill{i}", "a", 10, 10))["pool"] for i in range(4)]  # all four slots
        last = asyncio.create_task(ctl.submit("last", "b", 10, 10))
        await asyncio.sleep(0)  # queued, awaiting its grant
        ctl.finish("fill0", "a", pools[0], 10, 5, 0.1, 0.5, 0.1)  # frees a slot: "last" is granted...
        last.cancel()  # ...and its caller goes away before it resumes
        with pytest.raises(asyncio.CancelledError):
            await last
        snapshot = ctl.snapshot()
        return sum(p["running"] for p in snapshot["pools"].values()), snapshot["users"]["b"]

    running, b = run(main())
    assert running == 3  # the three fills still running; the grant to "last" was released
    assert b["cancelled"] == 1 and b["running"] == 0 and b["queue_length"] == 0
