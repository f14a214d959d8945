"""The cluster simulator and the smoke version of the benchmark suite: orderings that must hold, not numbers."""

from __future__ import annotations

import json

import pytest

from bench.__main__ import main as bench_main
from bench.report import counter_bound, lightest_users, metrics
from bench.scenarios import A10G_TO_A100, MIXED, SCENARIOS, pool
from bench.suite import Run, run_scenario
from equinox_ray.fairness import FCFS, VTC, Efficiency, Equinox, EquinoxWeights, MovingAveragePredictor, Request, User
from equinox_ray.fairness.metrics import service_difference, windowed_service
from equinox_ray.sim import ClusterSim, PoolSpec
from equinox_ray.workloads import synthetic, traces
from equinox_ray.workloads.workload import TraceRequest, Workload

A100 = (PoolSpec("a100", "A100", 1),)


@pytest.fixture(scope="module")
def overload_runs() -> dict[str, Run]:
    """The two-client overload (client-1 asks twice as much as client-0), one A100, loaded as VTC's A10G was."""
    runs = run_scenario(SCENARIOS["vtc-suites"], smoke=True, policies=("fcfs", "vtc", "equinox"), progress=False)
    return {r.label: r for r in runs if r.workload.name == "overload"}


def test_every_request_finishes_once_with_consistent_times(overload_runs):
    for run in overload_runs.values():
        records = run.result.records
        assert sorted(r.request_id for r in records) == sorted(f"overload-{i}" for i in range(len(run.workload.requests)))
        truth = {f"overload-{i}": r.output_tokens for i, r in enumerate(run.workload.requests)}
        assert all(r.output_tokens == truth[r.request_id] for r in records)
        assert all(r.arrival <= r.granted <= r.first_token <= r.finish for r in records)
        assert 0 < run.result.utilization <= 1.0


def test_vtc_service_difference_below_fcfs_on_the_two_client_overload(overload_runs):
    m = {label: metrics(run) for label, run in overload_runs.items()}
    assert m["vtc"]["sd_avg"] < m["fcfs"]["sd_avg"] / 2
    assert m["equinox"]["sd_avg"] < m["fcfs"]["sd_avg"] / 2
    assert m["vtc"]["jain"] > m["fcfs"]["jain"]


def test_fair_policies_cut_the_light_clients_wait(overload_runs):
    light = lightest_users(overload_runs["fcfs"].workload)
    assert light == {"client-0"}
    m = {label: metrics(run) for label, run in overload_runs.items()}
    assert m["vtc"]["light_ttft_p50"] < m["fcfs"]["light_ttft_p50"] / 2
    assert m["equinox"]["light_ttft_p50"] < m["fcfs"]["light_ttft_p50"] / 2


def test_counter_gap_within_the_claimed_bound(overload_runs):
    for label in ("vtc", "equinox"):
        run = overload_runs[label]
        assert run.result.max_counter_gap is not None and run.result.max_counter_gap > 0
        assert run.result.max_counter_gap <= counter_bound(run)
    assert overload_runs["fcfs"].result.max_counter_gap is None


def test_equinox_with_zero_weights_and_efficiency_off_runs_exactly_like_vtc_in_the_simulator():
    workload = synthetic.poisson_short_long(duration=40.0).compressed(A10G_TO_A100)
    users = list(workload.users.values())
    vtc = ClusterSim(A100, VTC(users, predictor=MovingAveragePredictor())).run(workload)
    eq = ClusterSim(A100, Equinox(users, weights=EquinoxWeights(latency=0, resource=0),
                                  efficiency=Efficiency(max_overtakes=0, slack_tokens=0),
                                  prepaid_output=True, predictor=MovingAveragePredictor())).run(workload)
    assert [(r.request_id, r.granted) for r in vtc.records] == [(r.request_id, r.granted) for r in eq.records]
    beta = ClusterSim(A100, Equinox(users, weights=EquinoxWeights(latency=0, resource=5.0),
                                    predictor=MovingAveragePredictor())).run(workload)
    assert [r.request_id for r in beta.records] != [r.request_id for r in vtc.records]


class RecordingVTC(VTC):
    """VTC that keeps what it was told at submit, to check what the scheduler can see."""

    def __init__(self, users):
        super().__init__(users)
        self.seen: list[Request] = []

    def submit(self, request, now):
        self.seen.append(Request(request.id, request.user, request.arrival, request.prompt_tokens,
                                 request.max_tokens))
        super().submit(request, now)


def test_the_policy_never_sees_the_true_output_length():
    workload = traces.lmsys_arena()
    workload = Workload(workload.name, workload.users, workload.requests[:120])
    policy = RecordingVTC(list(workload.users.values()))
    result = ClusterSim(A100, policy, max_tokens_cap=1024).run(workload)
    assert all(r.max_tokens == min(1024, 4096 - r.prompt_tokens) for r in policy.seen)
    truth = {f"{workload.name}-{i}": r.output_tokens for i, r in enumerate(workload.requests)}
    assert any(truth[r.id] != r.max_tokens for r in policy.seen)
    assert all(r.output_tokens == min(truth[r.request_id], 1024) for r in result.records)


def test_heterogeneous_cluster_equinox_dispatches_to_faster_gpus_and_cuts_ttft():
    workload = SCENARIOS["azure-mixed"].workloads(True)[0]
    runs = {}
    for label, policy in (("vtc", VTC(list(workload.users.values()))),
                          ("equinox", Equinox(list(workload.users.values()), predictor=MovingAveragePredictor()))):
        runs[label] = ClusterSim(MIXED, policy, max_tokens_cap=1024).run(workload)
    share = {label: sum(r.pool == "h100" for r in res.records) / len(res.records) for label, res in runs.items()}
    assert share["equinox"] > share["vtc"]
    ttft = {label: sorted(r.ttft for r in res.records)[len(res.records) // 2] for label, res in runs.items()}
    assert ttft["equinox"] < ttft["vtc"]


def test_weighted_users_get_service_in_proportion_under_overload():
    workload = synthetic.overload_weighted(duration=90.0).compressed(A10G_TO_A100)
    result = ClusterSim(A100, VTC(list(workload.users.values()))).run(workload)
    ws = windowed_service(result.records, workload.users, 5.0)
    busy = ws.backlogged.all(axis=0)
    served = (ws.service[:, busy] * [[u.weight] for u in workload.users.values()]).sum(axis=1)
    # weights 1:2:3:4, all backlogged: raw service in the same order
    assert list(served) == sorted(served)
    assert service_difference(ws)[1] >= 0


def test_bad_cluster_configs_are_refused():
    with pytest.raises(ValueError, match="unknown GPU"):
        PoolSpec("x", "B200", 1)
    with pytest.raises(ValueError, match="replicas"):
        PoolSpec("x", "A100", 0)
    with pytest.raises(ValueError, match="distinct"):
        ClusterSim([pool("a", "A100", 1), pool("a", "L4", 1)], FCFS())


def test_bench_suite_smoke_writes_tables_and_plots(tmp_path):
    bench_main(["suite", "--scenario", "lmsys", "--smoke", "--predictor", "moving-average", "--out", str(tmp_path)])
    text = (tmp_path / "lmsys-smoke.md").read_text()
    for label in ("fcfs", "vtc", "vtc-predict", "equinox", "equinox-fifo", "equinox-no-slack", "equinox-holistic"):
        assert f"| {label} |" in text
    assert "| against VTC |" in text
    summary = json.loads((tmp_path / "summary-smoke.json").read_text())["lmsys"]
    assert set(summary) >= {"ttft_p50", "ttft_p99", "light_ttft_p99", "steady_throughput", "jain", "gap_within_bound"}
    for kind in ("service", "ttft", "jain"):
        assert (tmp_path / f"lmsys-{kind}.png").stat().st_size > 10_000


def test_the_real_paths_rounds_rotate_the_policies():
    """`bench real` alternates the policies; over as many rounds as policies each runs once in every position."""
    from bench.real_engine import POLICIES, rounds_in_rotation

    orders = rounds_in_rotation(len(POLICIES))
    assert all(sorted(order) == sorted(POLICIES) for order in orders)
    for position in range(len(POLICIES)):
        assert sorted(order[position] for order in orders) == sorted(POLICIES)


def test_the_real_path_compresses_arrivals_to_ask_for_the_load_times_the_measured_capacity():
    """100 s of arrivals asking for 10,000 output tokens, against a replica measured at 1,000 tokens/s: at a load of
    2 they come 20 times faster, and then ask for 2,000 tokens/s."""
    from bench.real_engine import compression
    from equinox_ray.fairness.request import User
    from equinox_ray.workloads.workload import TraceRequest

    requests = [TraceRequest(t * 100 / 99, "u", 10, 100) for t in range(100)]
    workload = Workload("w", {"u": User("u")}, requests)
    factor = compression(workload, 2.0, 1_000.0)
    assert factor == pytest.approx(20.0)
    span = (requests[-1].arrival_s - requests[0].arrival_s) / factor
    assert sum(r.output_tokens for r in requests) / span == pytest.approx(2_000.0)


def test_the_real_paths_rows_without_a_bound_or_wall_time_render():
    """`bench real` measures no counter bound and no simulator wall time: its table says n/a for them."""
    from bench.report import rows_table

    row = {"steady_throughput": 10.0, "ttft_p50": 1.0, "ttft_p99": 2.0, "light_ttft_p99": 2.0, "jain": 0.9,
           "pair_gap": 5.0, "e2e_mean": 3.0}
    text = rows_table({"vtc": row, "equinox": {**row, "ttft_p50": 0.5}})
    assert "| equinox | 1.00x | 0.50x | 1.00x | 1.00x | 1.000x | n/a |" in text


def test_the_real_paths_jain_windows_are_recomputed_from_kept_records(tmp_path):
    """`bench real --jain-windows` reads a run's kept records: two users who submitted everything at once, served
    one after the other under `vtc` and in turn under `equinox`; Equinox is the fairer at every window."""
    import gzip
    import json

    def record(policy: str, i: int, user: str, start: float) -> dict:
        return {"scenario": "vtc-overload", "round": 1, "policy": policy, "request_id": f"{user}-{i}", "user": user,
                "arrival": 0.0, "granted": start, "first_token": start + 0.1, "finish": start + 1.0,
                "prompt_tokens": 100, "output_tokens": 100}

    kept = [record("vtc", i, user, 10.0 * u + i) for u, user in enumerate(("client-0", "client-1")) for i in range(10)]
    kept += [record("equinox", i, user, i + 0.5 * u) for i in range(10) for u, user in enumerate(("client-0",
                                                                                                  "client-1"))]
    path = tmp_path / "run-records.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    bench_main(["real", "--jain-windows", str(path), "--out", str(tmp_path)])
    text = (tmp_path / "run-jain-windows.md").read_text()
    assert "| Equinox fairer in | 1 of 1 | 1 of 1 | 1 of 1 |" in text


def test_a_missed_light_user_goal_says_how_few_requests_its_p99_is_over():
    """The light users' p99 is often over a few dozen requests, so its slowest one or two; the summary says so."""
    from bench.report import missed_goals

    ratios = {"ttft_p50": 0.8, "ttft_p99": 1.0, "light_ttft_p99": 2.1, "steady_throughput": 1.0, "jain": 1.0,
              "gap_within_bound": True, "wall_time": 1.0}
    missed = missed_goals("lmsys", ratios, {"light_slowest_passed": 0.0, "light_requests": 26, "light_waited": 3})
    assert missed == ["light_ttft_p99 2.100 (goal <= 1.0x; p99 of 26 light requests, 3 of which waited for a grant; "
                      "Equinox's slowest light request was passed by 0 grants)"]


def test_the_light_users_requests_that_waited_are_those_not_granted_on_arrival():
    """Only a light request that found no free slot can be slower under one policy than under another."""
    from bench.report import record_metrics
    from equinox_ray.fairness.metrics import CompletionRecord

    requests = [TraceRequest(0.0, "heavy", 100, 100) for _ in range(8)]
    requests += [TraceRequest(1.0, "light", 10, 10), TraceRequest(2.0, "light", 10, 10)]
    workload = Workload("w", {u: User(u) for u in ("light", "heavy")}, requests)
    assert lightest_users(workload) == {"light"}
    records = [CompletionRecord(f"h{i}", "heavy", 0.0, 0.0, 0.1, 1.0, 100, 100) for i in range(8)]
    records += [CompletionRecord("l0", "light", 1.0, 1.0, 1.1, 1.2, 10, 10),
                CompletionRecord("l1", "light", 2.0, 2.5, 2.6, 2.7, 10, 10)]
    found = record_metrics(records, workload, window_s=1.0)
    assert (found["light_requests"], found["light_waited"]) == (2, 1)


@pytest.mark.parametrize("kv_visible, granted_at_once", [(True, 4), (False, 8)])
def test_the_policy_grants_what_fits_the_kv_cache_only_when_the_replicas_report_it(kv_visible, granted_at_once):
    """Eight requests of 3,000 prompt and 100 output tokens (max_tokens 1,024) at once on one L4 (15,487 KV tokens,
    window 16). Seeing free KV, the policy grants while prompt + max_tokens fits beside what the running ones hold
    (4); seeing slots alone, as the Serve path does, it grants all 8 and the engine queues what does not fit."""
    from equinox_ray.fairness.request import User
    from equinox_ray.workloads.workload import TraceRequest

    requests = [TraceRequest(0.0, "u", 3000, 100) for _ in range(8)]
    workload = Workload("w", {"u": User("u")}, requests)
    sim = ClusterSim((PoolSpec("l4", "L4", 1, max_num_seqs=16),), VTC([User("u")]), max_tokens_cap=1024,
                     kv_visible=kv_visible)
    records = sim.run(workload).records
    assert len(records) == 8
    assert sum(r.granted == 0.0 for r in records) == granted_at_once


def test_the_sign_test_of_pooled_real_rounds():
    from bench.report import sign_test_p
    assert sign_test_p(6, 12) == 1.0
    assert sign_test_p(10, 12) == sign_test_p(2, 12) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert sign_test_p(0, 0) == 1.0


def test_jittered_arrivals_move_each_request_later_by_less_than_one_mean_gap():
    """`bench jitter`'s draws: the same requests, each at most one mean gap later, the same for the same seed."""
    arrivals = [0.0, 0.1, 0.15, 0.9, 1.0, 1.01, 2.5, 3.0]
    workload = Workload("w", {"a": User("a"), "b": User("b")},
                        [TraceRequest(t, "ab"[i % 2], i + 1, 10) for i, t in enumerate(arrivals)])
    gap = 3.0 / 7
    first, again, other = workload.jittered(1), workload.jittered(1), workload.jittered(2)
    assert [r.arrival_s for r in first.requests] == [r.arrival_s for r in again.requests]
    assert [r.arrival_s for r in first.requests] != [r.arrival_s for r in other.requests]
    moved = {r.prompt_tokens: r for r in first.requests}  # each request's prompt length is its own
    assert len(moved) == len(arrivals)
    for origin in workload.requests:
        request = moved[origin.prompt_tokens]
        assert (request.user, request.output_tokens) == (origin.user, origin.output_tokens)
        assert origin.arrival_s <= request.arrival_s < origin.arrival_s + gap


def test_bench_jitter_writes_every_draw_and_the_tally(tmp_path):
    from bench.jitter import main as jitter_main

    assert jitter_main(["--scenario", "lmsys", "--draws", "2", "--load", "0.7", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "jitter-0.7x-lmsys.md").read_text()
    assert "| ttft p50 |" in text and "| pair gap within bound | 2 of 2 |" in text
    assert "Draws that miss each goal:" in text
    numbers = json.loads((tmp_path / "jitter-0.7x-lmsys.json").read_text())["lmsys"]
    assert set(numbers["draws"]) == {"0", "1"}
    first, second = numbers["draws"]["0"], numbers["draws"]["1"]
    assert first["vtc"]["ttft_p99"] != second["vtc"]["ttft_p99"]  # two draws, not one run twice
    assert set(numbers["missed"]) == {"steady_throughput", "ttft_p50", "ttft_p99", "light_ttft_p99", "jain"}
