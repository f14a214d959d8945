import numpy as np
import pytest

from equinox_ray.fairness import User
from equinox_ray.fairness.metrics import (
    CompletionRecord, jain_index, jain_per_window, latency_by_user, service_difference, throughput, windowed_service,
)


def rec(rid, user, arrival, granted, first, finish, prompt=10, output=10):
    return CompletionRecord(rid, user, arrival, granted, first, finish, prompt, output)


def test_jain_index_extremes():
    assert jain_index([3, 3, 3]) == 1.0
    assert jain_index([1, 0, 0, 0]) == pytest.approx(0.25)
    assert jain_index([1, 2]) == pytest.approx(9 / 10)


def test_service_is_spread_over_first_token_to_finish():
    users = {"a": User("a"), "b": User("b", 2.0)}
    records = [rec("1", "a", 0, 0, 0, 10, prompt=10, output=5), rec("2", "b", 0, 0, 5, 10, prompt=20, output=0)]
    ws = windowed_service(records, users, window_s=5, start=0, end=10)
    assert ws.service[0].tolist() == [10.0, 10.0]  # 20 service over 10 s
    assert ws.service[1].tolist() == [0.0, 10.0]  # 20 service, weight 2, all in [5, 10]
    assert ws.demand[0].tolist() == [20.0, 0.0]


def test_jain_counts_only_backlogged_users():
    users = {"a": User("a"), "b": User("b")}
    # a waited in window 0 and got service; b never waited (no backlog), so window 0 is judged on a alone
    records = [rec("1", "a", 0, 4, 4, 5), rec("2", "b", 0, 0, 0, 1)]
    ws = windowed_service(records, users, window_s=5, start=0, end=5)
    assert ws.backlogged[:, 0].tolist() == [True, False]
    assert jain_per_window(ws)[0] == 1.0


def test_service_difference_ignores_users_that_asked_for_less():
    users = {"a": User("a"), "b": User("b")}
    fair = [rec("1", "a", 0, 0, 0, 10, 50, 25), rec("2", "b", 0, 0, 0, 10, 50, 25)]
    light = [rec("1", "a", 0, 0, 0, 10, 50, 25), rec("2", "b", 0, 0, 0, 10, 10, 5)]
    unfair = [rec("1", "a", 0, 0, 0, 10, 50, 25), rec("2", "b", 0, 0, 9, 10, 50, 25)]
    diff = lambda rs: service_difference(windowed_service(rs, users, 10, start=0, end=10))  # noqa: E731
    assert diff(fair) == (0.0, 0.0)
    assert diff(light) == (0.0, 0.0)  # b got all it asked for
    assert diff(unfair)[0] == 0.0  # all inside one window: b got its whole demand in the window too
    split = windowed_service(unfair, users, 5, start=0, end=10)
    assert service_difference(split)[0] > 0


def test_latency_percentiles_and_throughput():
    records = [rec(str(i), "a", 0, 0, float(i), float(i) + 1) for i in range(1, 101)]
    lat = latency_by_user(records)["a"]
    assert lat["count"] == 100
    assert lat["ttft_p50"] == pytest.approx(50.5)
    assert lat["e2e_p99"] == pytest.approx(np.percentile(np.arange(2, 102), 99))
    assert throughput(records) == pytest.approx(100 * 20 / 101)


def test_record_times_must_be_ordered():
    with pytest.raises(ValueError, match="arrival <= granted"):
        rec("x", "a", 5, 4, 6, 7)


def test_backlogged_pair_gap_counts_only_runs_where_both_stayed_backlogged():
    from equinox_ray.fairness.metrics import WindowedService, backlogged_pair_gap

    service = np.array([[1, 5, 5, 1, 9], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0.0]])
    backlogged = np.array([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=bool)
    ws = WindowedService(np.arange(6.0), ["a", "b", "c"], service, service, backlogged)
    assert backlogged_pair_gap(ws) == 9.0  # windows 0-2 give 8; window 4 alone gives 9; window 3 breaks the run
    backlogged[0, 4] = False
    assert backlogged_pair_gap(ws) == 8.0


def test_steady_throughput_leaves_out_the_drain_tail_after_the_last_arrival():
    from equinox_ray.fairness.metrics import CompletionRecord, steady_throughput, throughput

    records = [CompletionRecord("a", "u", 0.0, 0.0, 0.0, 10.0, 0, 100),  # 10 tokens/s inside [0, 10]
               CompletionRecord("b", "u", 10.0, 10.0, 10.0, 110.0, 0, 100)]  # starts at the last arrival
    assert steady_throughput(records) == 10.0
    assert throughput(records) < 2.0


def test_passed_by_counts_other_users_grants_while_a_request_waited():
    from equinox_ray.fairness.metrics import passed_by

    waiting = rec("w", "light", 1.0, 5.0, 5.1, 6.0)
    records = [waiting,
               rec("1", "heavy", 0.0, 2.0, 2.1, 9.0),  # granted while it waited
               rec("2", "heavy", 0.5, 4.9, 5.0, 9.0),  # granted while it waited
               rec("3", "heavy", 0.0, 0.5, 0.6, 9.0),  # granted before it arrived
               rec("4", "light", 1.5, 3.0, 3.1, 4.0),  # its own user's: not another user's choice
               rec("5", "heavy", 2.0, 5.5, 5.6, 9.0)]  # granted after it
    assert passed_by(records, waiting) == 2
    assert passed_by(records, records[3]) == 0
