"""The controller around its requests: overload signals to the ingresses, shutdown, users and keys, policy changes,
and what a restart restores."""

import pytest

from controller_helpers import config, controller, finish, grants, submit
from equinox_ray.engines.types import GenerationRequest
from equinox_ray.serve.config import PolicyConfig
from equinox_ray.serve.errors import Busy
from equinox_ray.serve.fairness_view import snapshot
from equinox_ray.serve.protocol import Closing, FullQueues, Grant, IngressBatch, Refusal, Submission


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

