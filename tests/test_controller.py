"""The fairness controller's logic, driven with the messages of the serving path (it is plain Python; Serve hosts it
in its own deployment, controller_deployment.py)."""

import os

import pytest
from hypothesis import given, settings, strategies as st

from equinox_ray.engines.types import EngineStats, GenerationRequest, Usage
from equinox_ray.engines.replica import ReplicaReport
from equinox_ray.serve.config import AppConfig, PolicyConfig
from equinox_ray.serve.controller import FairnessController
from equinox_ray.serve.errors import Busy
from equinox_ray.serve.fairness_view import snapshot
from equinox_ray.serve.protocol import (
    Abort, Closing, Dispatch, Drain, Finished, FullQueues, Grant, IngressBatch, Refusal, ReplicaHello, Submission,
)


os.environ.setdefault("KEY_A", "sk-key-of-a")  # the config names its users' keys by env var
os.environ.setdefault("KEY_B", "sk-key-of-b")


def config(**policy) -> AppConfig:
    return AppConfig.model_validate({
        "model": {"name": "m", "tokenizer": None},
        "users": [{"name": "a", "key": {"env": "KEY_A"}}, {"name": "b", "key": {"env": "KEY_B"}}],
        "limits": {"max_queue_per_user": 3},
        "telemetry": {"exporter": "none"},
        "policy": policy or {"name": "vtc"},
        "pools": [
            {"name": "h100", "gpu_type": "H100", "engine": "sim", "cost_weight": 8.0,
             "sim": {"gpu": "H100", "max_model_len": 8192}, "admission": {"max_window": 2, "initial_window": 2}},
            {"name": "l4", "gpu_type": "L4", "engine": "sim", "cost_weight": 1.0,
             "sim": {"gpu": "L4", "max_model_len": 2048}, "admission": {"max_window": 2, "initial_window": 2}},
        ],
    })


def controller(cfg: AppConfig | None = None, replicas=(("h100", "h0"), ("l4", "l0"))) -> FairnessController:
    ctl = FairnessController(cfg or config())
    for pool, name in replicas:
        ctl.replica_connected(ReplicaHello(pool, name, 2))
    for pool in ctl.pools:
        ctl.set_routable(pool, {name for p, name in replicas if p == pool})
    return ctl


def submit(ctl, rid: str, user: str, prompt: int = 10, max_tokens: int = 10, ingress: str = "i0") -> None:
    generation = GenerationRequest(rid, max_tokens, prompt_token_ids=[1] * prompt)
    ctl.apply(IngressBatch(ingress, submissions=[Submission(user, generation)]))


def finish(ctl, rid: str, output: int = 10, cancelled: bool = False, ingress: str = "i0") -> None:
    usage = Usage(10, output, 0.1, 0.5, 0.2)
    ctl.apply(IngressBatch(ingress, finished=[Finished(rid, usage, output, cancelled)]))


def grants(ctl, ingress: str = "i0") -> dict[str, Grant | Refusal]:
    return {m.request_id: m for m in ctl.to_ingress.take(ingress) if isinstance(m, (Grant, Refusal))}


def test_grants_wait_for_free_slots_and_a_finish_releases_the_next():
    ctl = controller()
    for i in range(5):
        submit(ctl, f"r{i}", "a")
    granted = grants(ctl)
    assert sorted(granted) == ["r0", "r1", "r2", "r3"]  # two replicas, two slots each
    work = ctl.to_replica.take("h0") + ctl.to_replica.take("l0")
    assert sorted(d.generation.id for d in work) == ["r0", "r1", "r2", "r3"]
    assert all(isinstance(d, Dispatch) and d.ingress == "i0" for d in work)
    finish(ctl, "r0")
    assert list(grants(ctl)) == ["r4"]
    assert snapshot(ctl)["users"]["a"]["finished"] == 1


def test_one_policy_serves_every_ingress_and_answers_each_on_its_own_stream():
    ctl = controller()
    submit(ctl, "x1", "a", ingress="i1")
    submit(ctl, "y1", "b", ingress="i2")
    assert list(grants(ctl, "i1")) == ["x1"] and list(grants(ctl, "i2")) == ["y1"]
    assert snapshot(ctl)["users"]["a"]["submitted"] == snapshot(ctl)["users"]["b"]["submitted"] == 1


def test_a_full_user_queue_is_refused_and_other_users_are_not():
    ctl = controller()
    for i in range(4):  # fill the four slots
        submit(ctl, f"fill{i}", "a")
    for i in range(3):
        submit(ctl, f"w{i}", "a")
    grants(ctl)
    submit(ctl, "over", "a")
    refused = grants(ctl)["over"]
    assert isinstance(refused, Refusal) and "3 requests waiting" in refused.message and refused.retry_after_s >= 1
    submit(ctl, "b0", "b")
    assert ctl.policy.queue_length("b") == 1 and not grants(ctl)
    assert snapshot(ctl)["users"]["a"]["rejected"] == 1


def test_the_ingresses_hear_which_users_queues_are_full_and_count_what_they_refused_at_the_door():
    ctl = controller(replicas=(("h100", "h0"),))
    ctl.ingress_connected("i0")
    assert [m.users for m in ctl.to_ingress.take("i0") if isinstance(m, FullQueues)] == [frozenset()]
    for i in range(5):
        submit(ctl, f"r{i}", "a")  # two granted, three wait: the bound
    assert [m.users for m in ctl.to_ingress.take("i0") if isinstance(m, FullQueues)] == [frozenset({"a"})]
    finish(ctl, "r0")  # r2 is granted: two wait
    assert [m.users for m in ctl.to_ingress.take("i0") if isinstance(m, FullQueues)] == [frozenset()]
    ctl.apply(IngressBatch("i0", refused={"a": 4}))
    assert snapshot(ctl)["users"]["a"]["rejected"] == 4


def test_withdrawn_while_waiting_leaves_the_queue():
    ctl = controller()
    for i in range(4):
        submit(ctl, f"fill{i}", "a")
    submit(ctl, "w", "b")
    ctl.apply(IngressBatch("i0", withdrawn=["w"]))
    assert ctl.policy.queue_length("b") == 0 and snapshot(ctl)["users"]["b"]["cancelled"] == 1
    assert "w" not in ctl.tracked


def test_withdrawn_while_running_is_aborted_on_its_replica_and_charged_what_it_was_served():
    ctl = controller()
    submit(ctl, "r", "a")
    replica = grants(ctl)["r"].replica
    ctl.to_replica.take(replica)
    ctl.apply(IngressBatch("i0", progress={"r": 4}, withdrawn=["r"]))
    assert ctl.to_replica.take(replica) == [Abort("r")]
    finish(ctl, "r", output=5, cancelled=True)  # the replica's abort chunk carried its usage
    row = snapshot(ctl)["users"]["a"]
    assert row["cancelled"] == 1 and row["running"] == 0 and row["output_tokens"] == 5
    assert ctl.policy.counters("a")["service"] == 10 + 2 * 5


def test_a_request_too_long_for_a_pool_only_goes_where_it_fits():
    ctl = controller()
    submit(ctl, "long", "a", prompt=3000, max_tokens=1000)  # over the L4 pool's 2,048-token context
    assert grants(ctl)["long"].pool == "h100"


def test_grants_spread_over_a_pool_s_replicas_by_free_slots():
    ctl = controller(replicas=(("h100", "h0"), ("h100", "h1")))
    for i in range(4):
        submit(ctl, f"r{i}", "a")
    by_replica = [m.replica for m in grants(ctl).values()]
    assert sorted(by_replica) == ["h0", "h0", "h1", "h1"]


def report(ctl, pool: str, replica: str, tokens_per_s: float = 1000.0, tpot_s: float = 0.02,
           healthy: bool = True) -> None:
    stats = EngineStats(running=0, waiting=0, kv_cache_usage=0.5, tokens_per_s=tokens_per_s,
                        output_tokens_per_s=tokens_per_s / 2, busy_fraction=1.0, utilization=1.0,
                        utilization_source="simulated", healthy=healthy)
    ctl.report(ReplicaReport(replica, pool, stats, 2, 0, 0, 2, tpot_s, 0))


def test_backlog_goes_to_the_pool_that_suits_the_work():
    """Cost dispatch: the cheapest pool meeting the SLO. With the H100 5x faster at 8x the price, short requests
    suit the L4s; long ones only fit the H100s. The backlog the autoscaler sees follows that split."""
    ctl = controller(config(name="equinox", dispatch="cost", e2e_slo_s=30.0))
    report(ctl, "h100", "h0", 4000.0, 0.015)
    report(ctl, "l4", "l0", 800.0, 0.06)
    for pool in ctl.pools.values():
        for replica in pool.replicas.values():
            replica.running = 2  # both full: everything waits
    submit(ctl, "short0", "a", 50, 50)
    submit(ctl, "short1", "b", 60, 40)
    submit(ctl, "long0", "a", 3000, 1000)
    ctl._backlog = None
    assert ctl.backlog() == {"h100": 1, "l4": 2}


def test_a_request_withdrawn_while_waiting_leaves_no_prediction_behind():
    ctl = controller(config(name="vtc-predict", predictor="mope"))
    for pool in ctl.pools.values():
        for replica in pool.replicas.values():
            replica.running = 2  # full: requests wait
    submit(ctl, "w0", "a", 50, 50)
    ctl._backlog = None
    ctl.backlog()  # a pool choice, hence a prediction, for the waiting request
    assert "w0" in ctl.policy.predictor._pending
    ctl.apply(IngressBatch("i0", withdrawn=["w0"]))
    assert ctl.policy.queue_length("a") == 0 and "w0" not in ctl.policy.predictor._pending


def test_a_replica_serve_stops_routing_to_is_drained_and_takes_no_more_grants():
    ctl = controller(replicas=(("l4", "l0"), ("l4", "l1")))
    submit(ctl, "r0", "a")
    ctl.to_replica.take("l0"), ctl.to_replica.take("l1")
    ctl.set_routable("l4", {"l1"})
    assert ctl.to_replica.take("l0") == [Drain()] and ctl.pools["l4"].view().free_slots <= 2
    for i in range(1, 4):
        submit(ctl, f"r{i}", "a")
    assert all(m.replica == "l1" for m in grants(ctl).values() if m.request_id != "r0")


def test_a_replica_is_granted_to_only_once_serve_routes_to_it():
    ctl = controller(replicas=(("l4", "l0"),))
    ctl.replica_connected(ReplicaHello("l4", "new", 2))
    for i in range(4):
        submit(ctl, f"r{i}", "a")
    assert {m.replica for m in grants(ctl).values()} == {"l0"}
    ctl.set_routable("l4", {"l0", "new"})
    assert {m.replica for m in grants(ctl).values()} == {"new"}


def test_a_gone_replica_takes_no_more_grants():
    ctl = controller(replicas=(("l4", "l0"), ("l4", "l1")))
    ctl.replica_gone("l0")
    assert set(ctl.pools["l4"].replicas) == {"l1"} and ctl.pools["l4"].capacity() == 2
    for i in range(3):
        submit(ctl, f"r{i}", "a")
    assert [m.replica for m in grants(ctl).values()] == ["l1", "l1"]


def test_a_replica_whose_engine_reports_unhealthy_gets_no_grants_and_the_app_is_not_ready_without_it():
    ctl = controller(replicas=(("h100", "h0"),))
    report(ctl, "h100", "h0", healthy=False)
    submit(ctl, "r0", "a")
    assert not grants(ctl) and not ctl.ready()
    ctl.replica_connected(ReplicaHello("h100", "h1", 2))
    ctl.set_routable("h100", {"h0", "h1"})
    assert [g.replica for g in grants(ctl).values()] == ["h1"] and ctl.ready()


def test_a_gone_ingress_is_withdrawn_everywhere():
    ctl = controller()
    for i in range(5):
        submit(ctl, f"r{i}", "a", ingress="dead")
    submit(ctl, "other", "b", ingress="alive")
    granted = grants(ctl, "dead")
    ctl.ingress_gone("dead")
    aborted = [m.request_id for r in ("h0", "l0") for m in ctl.to_replica.take(r) if isinstance(m, Abort)]
    assert sorted(aborted) == sorted(granted)
    assert not any(t.dispatch.ingress == "dead" for t in ctl.tracked.values())
    assert "other" in grants(ctl, "alive")  # the slots the dead ingress held are free again
    assert snapshot(ctl)["users"]["a"]["cancelled"] == 5


def test_closing_tells_every_ingress_even_one_that_connects_later_and_waiting_requests_are_still_granted():
    ctl = controller()
    ctl.ingress_connected("i0")
    for i in range(6):
        submit(ctl, f"r{i}", "a" if i % 2 else "b")
    assert len(grants(ctl)) == 4 and ctl.unfinished() == 6
    assert ctl.close() == ctl.config.ingress.drain_timeout_s
    assert [m for m in ctl.to_ingress.take("i0") if isinstance(m, Closing)]
    ctl.ingress_connected("i1")  # a replica that reconnects while draining hears it too
    assert [m for m in ctl.to_ingress.take("i1") if isinstance(m, Closing)]
    finish(ctl, "r0")
    finish(ctl, "r1")
    assert sorted(grants(ctl)) == ["r4", "r5"]  # the accepted ones are served during the drain
    assert ctl.unfinished() == 4


def test_policy_changes_only_while_idle():
    ctl = controller()
    assert ctl.set_policy(PolicyConfig(name="fcfs")) == "fcfs"
    submit(ctl, "x", "a")
    with pytest.raises(Busy):
        ctl.set_policy(PolicyConfig(name="vtc"))


def test_with_auth_off_the_user_field_names_the_user_and_new_users_are_admitted():
    cfg = config().model_copy(update={"auth": False, "users": []})
    ctl = controller(cfg)
    submit(ctl, "r", "demo-user")
    assert isinstance(grants(ctl)["r"], Grant) and ctl.policy.users["demo-user"].weight == 1.0


def test_with_auth_on_unknown_users_are_refused():
    ctl = controller()
    submit(ctl, "r", "mallory")
    refused = grants(ctl)["r"]
    assert isinstance(refused, Refusal) and "mallory" in refused.message


def test_the_serving_path_writes_completion_records_that_training_reads(tmp_path):
    from predictors import records

    path = tmp_path / "records.jsonl"
    ctl = controller(config(name="equinox").model_copy(update={"records_path": str(path)}))
    for i in range(3):
        submit(ctl, f"r{i}", "a", 40 + i, 20)
        finish(ctl, f"r{i}", output=15)
    submit(ctl, "gone", "b")
    finish(ctl, "gone", output=3, cancelled=True)
    rows = records.read(path)
    assert [r["prompt_tokens"] for r in rows] == [40, 41, 42]  # the cancelled one is not training data
    assert all(r["output_tokens"] == 15 and r["gpu"] in ("H100", "L4") for r in rows)
    predictor = ctl.policy.predictor
    assert type(predictor).__name__ == "MoPE" and predictor.experts  # the shipped models were loaded


LONG = st.lists(st.tuples(st.integers(1, 60), st.integers(20, 200)), min_size=10, max_size=25)


def gap_with_chunked_progress(policy: str, requests: list[tuple[str, int, int]], chunk: int) -> tuple[float, float]:
    """(the largest service gap while both users stay backlogged, VTC's bound for this workload)."""
    window = 4
    cfg = config(name=policy).model_copy(update={"limits": config().limits.model_copy(
        update={"max_queue_per_user": 1000})})
    cfg.pools[1].admission.max_window = window
    ctl = controller(cfg, replicas=(("l4", "l0"),))
    ctl.pools["l4"].replicas["l0"].window = window
    truth = {}
    for i, (user, prompt, output) in enumerate(requests):
        truth[f"r{i}"] = output
        submit(ctl, f"r{i}", user, prompt, output)
    running: dict[str, list] = {}  # id -> [user, generated, unreported]
    served = {"a": [], "b": []}
    total = {"a": 0.0, "b": 0.0}
    backlogged = []
    for step in range(20_000):
        for grant in grants(ctl).values():
            user = ctl.tracked[grant.request_id].request.user
            total[user] += ctl.tracked[grant.request_id].request.prompt_tokens
            running[grant.request_id] = [user, 0, 0]
        for entry in running.values():
            entry[1] += 1
            entry[2] += 1
            total[entry[0]] += 2
        done = [rid for rid, e in running.items() if e[1] >= truth[rid]]
        if step % chunk == 0 or done:
            progress = {rid: e[2] for rid, e in running.items() if e[2] and rid not in done}
            finished = [Finished(rid, Usage(1, running[rid][1], 0.1, 0.5, 0.1), running[rid][1], False) for rid in done]
            for rid in progress:
                running[rid][2] = 0
            for rid in done:
                del running[rid]
            ctl.apply(IngressBatch("i0", progress=progress, finished=finished))
        for user in ("a", "b"):
            served[user].append(total[user])
        backlogged.append(ctl.policy.queue_length("a") > 0 and ctl.policy.queue_length("b") > 0)
        if not running and not ctl.policy.queue_length("a") and not ctl.policy.queue_length("b"):
            break
    worst, start = 0.0, None
    for t, on in enumerate(backlogged + [False]):
        if on and start is None:
            start = t
        elif not on and start is not None:
            diff = [served["a"][s] - served["b"][s] for s in range(start, t)]
            worst, start = max(worst, max(diff) - min(diff)), None
    longest_input = max(p for _, p, _ in requests)
    most_in_batch = window * max(p + o for _, p, o in requests)
    return worst, 2 * max(longest_input, 2 * most_in_batch)


@settings(max_examples=25, deadline=None)
@given(LONG, LONG, st.integers(1, 12))
def test_vtc_gap_stays_within_its_bound_when_tokens_are_reported_in_chunks(a, b, chunk):
    """The ingress reports tokens once per channel message, not one by one: charges lag by up to `chunk` steps.
    User a floods long requests, then b does; while both stay backlogged their service gap stays within VTC's
    bound 2 * max(w_in * L_input, w_out * M), M the most tokens a batch holds."""
    requests = [("a", *r) for r in a] + [("b", *r) for r in b]
    worst, bound = gap_with_chunked_progress("vtc", requests, chunk)
    assert worst <= bound


def test_the_chunked_gap_bound_is_not_vacuous_fcfs_breaks_it():
    requests = [("a", 30, 150)] * 20 + [("b", 30, 150)] * 20
    worst, bound = gap_with_chunked_progress("fcfs", requests, chunk=8)
    assert worst > bound


@pytest.mark.parametrize("policy", ["vtc", "equinox"])
def test_a_restarted_controller_restores_counters_and_usage_and_charges_no_request_twice(tmp_path, policy):
    from equinox_ray.serve.checkpoint import CheckpointStore

    cfg = config(name=policy, predictor="moving-average")
    store = CheckpointStore(cfg.checkpoint.model_copy(update={"store": "file", "path": str(tmp_path / "c.json")}),
                            "app")
    ctl = controller(cfg)
    for i in range(4):
        submit(ctl, f"r{i}", "a" if i % 2 else "b", prompt=20 + i)
    granted = grants(ctl)
    finish(ctl, "r0", output=7)
    store.save(ctl.checkpoint())
    before = {user: ctl.policy.counters(user) for user in ("a", "b")}
    usage = {user: (s.finished, s.prompt_tokens, s.output_tokens) for user, s in ctl.stats.items()}

    restarted = controller(cfg)
    restarted.restore(store.load())
    assert {user: restarted.policy.counters(user) for user in ("a", "b")} == before
    assert {user: (s.finished, s.prompt_tokens, s.output_tokens) for user, s in restarted.stats.items()} == usage
    # a request granted before the restart finishes after it: not charged again
    running = [rid for rid in granted if rid != "r0" and isinstance(granted[rid], Grant)]
    finish(restarted, running[0], output=9)
    assert {user: restarted.policy.counters(user) for user in ("a", "b")} == before
    # an ingress resubmits what waited; sent twice, it is queued once
    submit(restarted, "r9", "a")
    submit(restarted, "r9", "a")
    assert restarted.stats["a"].submitted == ctl.stats["a"].submitted + 1


def test_a_checkpoint_of_another_policy_restores_usage_but_not_its_counters():
    ctl = controller(config(name="vtc"))
    submit(ctl, "r0", "a", prompt=50)
    checkpoint = ctl.checkpoint()
    assert checkpoint.counters["served"]["a"] > 0
    restarted = controller(config(name="equinox", predictor="moving-average"))
    restarted.restore(checkpoint)
    assert restarted.stats["a"].submitted == 1 and restarted.policy.counters("a")["service"] == 0


def test_users_and_keys_change_at_run_time_reach_every_ingress_and_survive_a_restart():
    from equinox_ray.serve.keys import digest
    from equinox_ray.serve.users import KeyInUse, UserExists, UserNotFound, UserTable

    ctl = controller()
    ctl.ingress_connected("i0")
    seeded = [m for m in ctl.to_ingress.take("i0") if isinstance(m, UserTable)][-1]
    assert seeded.users == {digest("sk-key-of-a"): "a", digest("sk-key-of-b"): "b"}
    ctl.add_user("c", 3.0, digest("sk-c-1"))
    with pytest.raises(UserExists):
        ctl.add_user("c", 1.0, digest("sk-c-9"))
    with pytest.raises(KeyInUse):
        ctl.add_user("d", 1.0, digest("sk-c-1"))
    ctl.rotate_key("c", digest("sk-c-2"), keep_old=False)
    ctl.set_weight("a", 2.0)
    table = [m for m in ctl.to_ingress.take("i0") if isinstance(m, UserTable)][-1]
    assert table.users[digest("sk-c-2")] == "c" and digest("sk-c-1") not in table.users
    assert table.weights == {"a": 2.0, "b": 1.0, "c": 3.0} and ctl.policy.weight("a") == 2.0
    submit(ctl, "r0", "b")
    submit(ctl, "r1", "b")
    submit(ctl, "r2", "b")
    assert len(grants(ctl)) == 3  # two slots per pool: all granted
    for i in range(3, 8):
        submit(ctl, f"r{i}", "b")
    grants(ctl)
    ctl.remove_user("b")  # its waiting requests are refused; its key stops working
    refused = [m for m in ctl.to_ingress.take("i0") if isinstance(m, Refusal)]
    assert refused and all(r.status == 403 for r in refused) and not ctl.policy.queue_length("b")
    with pytest.raises(UserNotFound):
        ctl.set_weight("b", 1.0)
    submit(ctl, "late", "b")
    assert [m.status for m in ctl.to_ingress.take("i0") if isinstance(m, Refusal)] == [403]

    restarted = controller()  # the same config seeds a and b; the checkpoint's registry wins
    restarted.restore(ctl.checkpoint())
    assert restarted.registry.listing() == {"a": {"weight": 2.0, "keys": 1}, "c": {"weight": 3.0, "keys": 1}}
    assert restarted.policy.weight("c") == 3.0


def test_a_batch_sent_again_after_a_lost_answer_is_applied_once():
    ctl = controller()
    generation = GenerationRequest("r0", 10, prompt_token_ids=[1] * 10)
    first = IngressBatch("i0", submissions=[Submission("a", generation)], seq=1)
    ctl.apply(first)
    grants(ctl)
    progress = IngressBatch("i0", progress={"r0": 5}, seq=2)
    ctl.apply(progress)
    served = ctl.policy.counters("a")["service"]
    ctl.apply(progress)  # the ingress timed out waiting for the answer and sent it again
    ctl.apply(first)
    assert ctl.policy.counters("a")["service"] == served and ctl.stats["a"].submitted == 1
    ctl.apply(IngressBatch("i0", progress={"r0": 5}, seq=3))
    assert ctl.policy.counters("a")["service"] > served
