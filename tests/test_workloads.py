import numpy as np
import pytest

from equinox_ray.fairness import UnknownUser, User
from equinox_ray.workloads import synthetic, traces
from equinox_ray.workloads.traces import TraceError
from equinox_ray.workloads.workload import TraceRequest, Workload


def test_vendored_lmsys_trace_loads_with_its_27_clients():
    workload = traces.lmsys_arena()
    assert len(workload.requests) == 1500
    assert len(workload.users) == 27
    counts = sorted(workload.per_user_counts().values(), reverse=True)
    assert counts[:3] == [296, 262, 199]
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(workload.requests, workload.requests[1:]))


def test_vendored_length_traces_load():
    assert len(traces.sharegpt_lengths()) == 30_731
    azure = traces.azure_conversations()
    assert len(azure) == 19_366 and azure[0][0] == 0.0


@pytest.mark.parametrize("body, message", [
    ("arrival_s,user,prompt_tokens,output_tokens\n0.0,a,10,5\n1.0,a,0,5\n", ":3: prompt_tokens must be > 0"),
    ("arrival_s,user,prompt_tokens,output_tokens\n0.0,a,10,-5\n", ":2: output_tokens must be > 0"),
    ("arrival_s,user,prompt_tokens,output_tokens\n0.0,a,ten,5\n", ":2: prompt_tokens must be an integer"),
    ("arrival_s,user,prompt_tokens,output_tokens\nsoon,a,10,5\n", ":2: arrival_s must be a number"),
    ("arrival_s,user,prompt_tokens,output_tokens\n0.0,a,10\n", ":2: expected 4 fields"),
    ("arrival_s,user,prompt_tokens\n0.0,a,10\n", ":1: missing column(s) output_tokens"),
    ("arrival_s,user,prompt_tokens,output_tokens\n0.0,,10,5\n", ":2: empty user"),
])
def test_malformed_trace_names_file_and_line(tmp_path, body, message):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(TraceError) as err:
        traces.read_user_trace(path)
    assert str(path) + message in str(err.value)


def test_unknown_user_in_trace_is_an_error_when_users_are_declared(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrival_s,user,prompt_tokens,output_tokens\n0.0,alice,10,5\n0.5,mallory,10,5\n")
    with pytest.raises(TraceError, match=r"t.csv:3: unknown user 'mallory'"):
        traces.read_user_trace(path, users={"alice": User("alice")})
    assert set(traces.read_user_trace(path).users) == {"alice", "mallory"}


def test_workload_refuses_requests_of_unknown_users():
    with pytest.raises(UnknownUser, match="ghost"):
        Workload("w", {"a": User("a")}, [TraceRequest(0.0, "ghost", 1, 1)])


@pytest.mark.parametrize("name", sorted(synthetic.VTC_SUITES))
def test_vtc_suites_are_seeded(name):
    make = synthetic.VTC_SUITES[name]
    a, b, c = make(seed=1), make(seed=1), make(seed=2)
    assert a.requests == b.requests
    assert a.requests != c.requests
    assert len(a.requests) > 50


def test_overload_suite_rates_match_the_vtc_definition():
    w = synthetic.overload(seed=0, duration=360)
    counts = w.per_user_counts()
    assert abs(counts["client-0"] - 1.5 * 360) <= 1 and abs(counts["client-1"] - 3 * 360) <= 1
    assert {(r.prompt_tokens, r.output_tokens) for r in w.requests} == {(256, 256)}


def test_on_off_client_is_silent_in_off_halves():
    w = synthetic.on_off_less(seed=3, duration=600, period=60)
    off = [r for r in w.requests if r.user == "client-0" and (r.arrival_s % 60) >= 30]
    assert not off and w.per_user_counts()["client-0"] > 0


def test_increase_suite_ramps_client_1():
    w = synthetic.increase(seed=0)
    late = sum(1 for r in w.requests if r.user == "client-1" and r.arrival_s > 400)
    early = sum(1 for r in w.requests if r.user == "client-1" and r.arrival_s < 200)
    assert late > 2 * early


def test_zipf_users_are_skewed_seeded_and_weighted():
    lengths = traces.sharegpt_lengths()
    w = synthetic.zipf_users(lengths, n_users=50, n_requests=5000, rate=10.0, weights=(1, 2, 4), seed=7)
    again = synthetic.zipf_users(lengths, n_users=50, n_requests=5000, rate=10.0, weights=(1, 2, 4), seed=7)
    assert w.requests == again.requests
    counts = sorted(w.per_user_counts().values(), reverse=True)
    assert counts[0] > 10 * counts[-1]
    assert {u.weight for u in w.users.values()} == {1.0, 2.0, 4.0}
    assert np.mean([r.arrival_s for r in w.requests[-10:]]) == pytest.approx(500, rel=0.1)


def test_zipf_users_on_real_arrival_times():
    azure = traces.azure_conversations()
    w = synthetic.zipf_users([(p, o) for _, p, o in azure], n_users=10, n_requests=100,
                             arrivals=[t for t, _, _ in azure], seed=0)
    assert [r.arrival_s for r in w.requests] == [t for t, _, _ in azure[:100]]
    with pytest.raises(ValueError, match="weights"):
        synthetic.zipf_users([(1, 1)], n_users=2, n_requests=2, rate=1.0, weights=(1, 0))


def test_scheduler_request_hides_the_true_length_behind_a_cap():
    w = traces.lmsys_arena()
    request = w.scheduler_request(0, max_tokens_cap=1024)
    assert request.max_tokens == 1024 != w.requests[0].output_tokens
    assert not hasattr(request, "output_tokens")


def test_random_workloads_are_seeded_and_give_each_user_its_own_lengths_and_arrivals():
    from equinox_ray.workloads.random_mix import MAX_OUTPUT, MAX_PROMPT, random_workload
    a = random_workload(7, n_users=12, n_requests=3000, duration=500.0)
    assert a.requests == random_workload(7, n_users=12, n_requests=3000, duration=500.0).requests
    assert a.requests != random_workload(8, n_users=12, n_requests=3000, duration=500.0).requests
    assert len(a.requests) == 3000 and 0 <= a.requests[0].arrival_s and a.duration_s <= 500.0
    assert all(1 <= r.prompt_tokens <= MAX_PROMPT and 1 <= r.output_tokens <= MAX_OUTPUT for r in a.requests)
    medians = {}
    for user in a.users:
        prompts = [r.prompt_tokens for r in a.requests if r.user == user]
        if len(prompts) >= 20:
            medians[user] = np.median(prompts)
    assert len(medians) >= 3 and max(medians.values()) > 4 * min(medians.values())
