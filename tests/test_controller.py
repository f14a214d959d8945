"""The fairness controller's logic, driven with the messages of the serving path (it is plain Python; Serve hosts it
in its own deployment, controller_deployment.py): grants, withdrawals, replicas and pools. Restarts, shutdown and
users are in test_controller_lifecycle.py."""

from hypothesis import given, settings, strategies as st

from controller_helpers import config, controller, finish, grants, report, submit
from equinox_ray.engines.types import Usage
from equinox_ray.serve.fairness_view import snapshot
from equinox_ray.serve.protocol import Abort, Dispatch, Drain, Finished, IngressBatch, Refusal, ReplicaHello


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


def test_backlog_goes_to_the_pool_that_suits_the_work():
    """Cost dispatch: the cheapest pool meeting the SLO. With the H100 5x faster at 8x the price, short requests
    suit the L4s; long ones only fit the H100s. The backlog the autoscaler sees follows that split. (The moving
    average predicts from the reported speeds: the split does not hang on what the shipped models learned.)"""
    ctl = controller(config(name="equinox", dispatch="cost", e2e_slo_s=30.0, predictor="moving-average"))
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


def test_the_serving_path_writes_completion_records_that_training_reads(tmp_path):
    """Training reads the records into the very feature rows MoPE predicted with: same request, same history, same
    pool state (each request is predicted and granted in one update here, so on one view of its pool)."""
    import numpy as np

    from equinox_ray.mope import records
    from equinox_ray.mope.features import record_features

    path = tmp_path / "records.jsonl"
    cfg = config(name="equinox")
    telemetry = cfg.telemetry.model_copy(update={"prediction_sample_s": 0.0})  # predict every request
    ctl = controller(cfg.model_copy(update={"records_path": str(path), "telemetry": telemetry}))
    report(ctl, "h100", "h0", tpot_s=0.01)
    for i in range(3):
        submit(ctl, f"r{i}", "a", 40 + i, 20)
        finish(ctl, f"r{i}", output=15)
    submit(ctl, "gone", "b")
    finish(ctl, "gone", output=3, cancelled=True)
    rows = records.read(path)
    assert [r.prompt_tokens for r in rows] == [40, 41, 42]  # the cancelled one is not training data
    assert all(r.output_tokens == 15 and r.admission.gpu in ("H100", "L4") and r.admission.window == 2
               and r.admission.running == 0 for r in rows)
    first = rows[0].admission
    assert first.kv_usage == 0.5 if first.gpu == "H100" else first.kv_usage == 0.0  # h100 reported 0.5
    predictor = ctl.policy.predictor
    assert type(predictor).__name__ == "MoPE" and predictor.experts  # the shipped models were loaded
    predicted_with = np.stack([features for features, _ in predictor.records])
    assert np.array_equal(record_features(rows), predicted_with)


def test_requests_no_decision_needs_a_prediction_for_are_predicted_in_a_sample():
    """Equinox pairing two GPU types decides without MoPE: the controller predicts the requests of one update per
    `telemetry.prediction_sample_s` (for the prediction-error metrics), not every update's."""
    from equinox_ray.serve.controller import FairnessController

    now = [0.0]
    ctl = FairnessController(config(name="equinox"), clock=lambda: now[0])
    for pool, name in (("h100", "h0"), ("l4", "l0")):
        ctl.replica_connected(ReplicaHello(pool, name, 2))
        ctl.set_routable(pool, {name})
    predicted = []
    ctl.policy.predictor.predict_batch = lambda items: predicted.extend(r.id for r, _ in items) or [
        ctl.policy.predictor.fallback.predict(r, p) for r, p in items]
    for i, at in enumerate((0.0, 0.05, 0.09, 0.11, 0.15)):
        now[0] = at
        submit(ctl, f"r{i}", "a")
        finish(ctl, f"r{i}")
    assert sorted(set(predicted)) == ["r0", "r3"]


def test_a_simulated_pools_view_starts_from_its_gpus_step_model_as_the_simulators_does():
    """One view of the cluster: before any report, a serving pool of simulated H100s has the nominal speeds the
    cluster simulator gives the same pool; a report's measured TPOT then replaces the nominal decode speed."""
    from equinox_ray.sim import PoolSpec

    ctl = controller()
    served = ctl.pools["h100"].view()
    simulated = PoolSpec("h100", "H100", 1, max_num_seqs=2, cost_weight=8.0, max_model_len=8192).facts()
    assert (served.prefill_tps, served.decode_tps, served.throughput_tps) == (
        simulated.prefill_tps, simulated.decode_tps, simulated.throughput_tps)
    assert served.prefill_tps > 20_000  # not the 10,000 a pool without a step model assumes
    report(ctl, "h100", "h0", tpot_s=0.04)
    assert ctl.pools["h100"].view().decode_tps == 25.0
    assert ctl.pools["h100"].view().prefill_tps == served.prefill_tps


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


def test_a_grant_goes_only_where_prompt_and_max_tokens_fit_the_kv_cache_the_engine_reported():
    """Two L4 replicas of two slots whose engines hold 1,000 KV tokens: requests of 10 + 600 tokens fit one per
    replica, as in the simulator; the other two wait in the fair queue, and a finish lets the next one in."""
    ctl = controller(replicas=(("l4", "l0"), ("l4", "l1")))
    for name in ("l0", "l1"):
        report(ctl, "l4", name, kv_capacity_tokens=1000)
    for rid, user in (("a1", "a"), ("b1", "b"), ("a2", "a"), ("b2", "b")):
        submit(ctl, rid, user, prompt=10, max_tokens=600)
    first = grants(ctl)
    assert len(first) == 2 and {g.replica for g in first.values()} == {"l0", "l1"}
    finish(ctl, next(iter(first)))
    assert len(grants(ctl)) == 1


def test_an_engine_that_does_not_say_its_kv_cache_leaves_only_the_slots_to_decide():
    ctl = controller(replicas=(("l4", "l0"), ("l4", "l1")))
    for name in ("l0", "l1"):
        report(ctl, "l4", name)
    for rid, user in (("a1", "a"), ("b1", "b"), ("a2", "a"), ("b2", "b")):
        submit(ctl, rid, user, prompt=10, max_tokens=600)
    assert len(grants(ctl)) == 4
