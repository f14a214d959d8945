import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from equinox_ray.fairness import Outcome, PoolView, Request
from equinox_ray.mope import experts as experts_io
from equinox_ray.mope.features import FEATURES, band_of, record_features
from equinox_ray.mope.predictor import MoPE
from equinox_ray.workloads import traces
from predictors.replay import replay
from predictors.train import DEFAULT_MODELS, mae_mape, split_runs, train

MODELS = str(DEFAULT_MODELS)
POOL = PoolView("a100", gpu_type="A100", free_slots=8, running=12, waiting=1, kv_usage=0.3)


def test_the_gate_is_a_fixed_rule_on_prompt_length():
    assert [band_of(n) for n in (1, 127, 128, 1023, 1024, 50_000)] == [
        "short", "short", "medium", "medium", "long", "long"]


def test_predictions_are_deterministic_across_processes():
    request = Request("r", "u", 0.0, 300, 512)
    here = MoPE(MODELS).predict(request, POOL)
    code = ("from equinox_ray.mope.predictor import MoPE; from equinox_ray.fairness import PoolView, Request; "
            f"p = MoPE({MODELS!r}).predict(Request('r', 'u', 0.0, 300, 512), PoolView('a100', "
            "gpu_type='A100', free_slots=8, running=12, waiting=1, kv_usage=0.3)); "
            "print(repr((p.output_tokens, p.ttft_s, p.e2e_s, p.throughput_tps, p.utilization)))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert there == repr((here.output_tokens, here.ttft_s, here.e2e_s, here.throughput_tps, here.utilization))
    assert here.source == "mope:medium"
    assert MoPE(MODELS).predict_batch([(request, POOL)] * 3)[2] == here


def test_a_model_with_another_schema_is_refused(tmp_path):
    for f in __import__("pathlib").Path(MODELS).glob("*.json"):
        (tmp_path / f.name).write_text(f.read_text())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["features"] = list(FEATURES)[:-1] + ["true_output_tokens"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(experts_io.SchemaMismatch, match="retrain"):
        MoPE(tmp_path)


def test_missing_models_fall_back_to_the_moving_average_and_count_it(tmp_path, caplog):
    mope = MoPE(tmp_path / "nowhere")
    assert "unavailable" in caplog.text
    prediction = mope.predict(Request("r", "u", 0.0, 10, 100), POOL)
    assert prediction.source == "moving-average" and mope.fallbacks == 1
    mope.observe(Outcome("r", "u", "a100", 10, 40, 0.1, 1.0, 0.5))
    assert mope.predict(Request("s", "u", 1.0, 10, 100), POOL).output_tokens == 40


def test_features_never_see_the_true_output_length():
    """Changing a request's true length changes nothing in its own features, nor in anyone's before it ends."""
    records = replay(traces.lmsys_arena(), gpu="A100")[:300]
    base = record_features(records)
    changed = list(records)
    changed[100] = replace(records[100], output_tokens=99_999)
    after = record_features(changed)
    assert np.array_equal(base[: 101], after[: 101])  # nothing at or before it moves
    later = [i for i, r in enumerate(records) if r.arrival_s >= records[100].finish_s
             and r.user == records[100].user]
    if later:  # once it has finished, its user's history may reflect it
        assert not np.array_equal(base[later[0]], after[later[0]])
    assert "output_tokens" not in FEATURES and "max_tokens" in FEATURES


def test_online_correction_moves_a_users_predictions_toward_what_was_measured():
    mope = MoPE(MODELS)
    request = Request("r0", "verbose", 0.0, 50, 1000)
    before = mope.predict(request, POOL).output_tokens
    for i in range(10):
        r = Request(f"r{i}", "verbose", float(i), 50, 1000)
        predicted = mope.predict(r, POOL)
        mope.observe(Outcome(r.id, "verbose", "a100", 50, int(min(1000, predicted.output_tokens * 3)), 0.1, 2.0, 1.0))
    assert mope.predict(Request("next", "verbose", 20.0, 50, 1000), POOL).output_tokens > 1.5 * before


def test_the_online_correction_converges_to_measured_over_the_experts_own_prediction():
    """Experts that always say 100 tokens and 1 s, a user who always writes 200 tokens in 3 s: the corrected
    predictions settle at 200 and 3 s, not at a ratio of the already corrected ones (which settles at sqrt 2)."""
    X = np.tile(np.arange(len(FEATURES), dtype=np.float32), (300, 1))
    X[:, FEATURES.index("prompt_tokens")] = np.arange(300) * 5  # every band has rows
    constant = {t: np.full(300, v, dtype=np.float32) for t, v in
                {"output_tokens": 100, "ttft_s": 0.1, "e2e_s": 1.0, "throughput_tps": 500, "utilization": 0.5}.items()}
    mope = MoPE(experts=experts_io.train_experts(X, constant))
    for i in range(60):
        r = Request(f"r{i}", "u", float(i), 50, 1000)
        mope.predict(r, POOL)
        mope.observe(Outcome(r.id, "u", "a100", 50, 200, 0.1, 3.0, 1.0))
    settled = mope.predict(Request("next", "u", 99.0, 50, 1000), POOL)
    assert settled.output_tokens == pytest.approx(200, rel=0.01)
    assert settled.e2e_s == pytest.approx(3.0, rel=0.01)


def test_refit_swaps_in_new_experts_without_stopping_predictions():
    mope = MoPE(experts={})  # start on the fallback
    for i in range(250):
        r = Request(f"r{i}", f"u{i % 5}", float(i), 20 + (i % 200), 600)
        mope.predict(r, POOL)
    assert mope.fallbacks == 250 and not mope.records  # the fallback makes no records to learn from
    seeded = MoPE(MODELS)
    for i in range(250):
        r = Request(f"q{i}", f"u{i % 5}", float(i), 20 + (i % 200), 600)
        seeded.predict(r, POOL)
        seeded.observe(Outcome(r.id, r.user, "a100", r.prompt_tokens, 10 + i % 90, 0.05, 1.0, 0.3, 0.9))
    old = seeded.experts
    thread = seeded.start_refits(interval_s=0.05)
    for _ in range(200):  # predictions keep working while it trains
        seeded.predict(Request("x", "u1", 0.0, 60, 600), POOL)
    import time

    deadline = time.monotonic() + 30
    while seeded.experts is old and time.monotonic() < deadline:
        time.sleep(0.05)
    thread.stop.set()
    assert seeded.experts is not old


def test_a_small_training_run_beats_the_global_mean(tmp_path):
    runs = [replay(traces.lmsys_arena(), gpu=gpu) for gpu in ("A100", "L4")]
    scores = train(runs, tmp_path)
    (_, y, _), (_, y_test, _) = split_runs(runs)
    for target in ("output_tokens", "ttft_s", "e2e_s", "throughput_tps"):
        mean_mae, _ = mae_mape(y_test[target], np.full(len(y_test[target]), float(np.mean(y[target]))))
        assert scores[target][0] < mean_mae, target
    assert (tmp_path / "report.md").exists() and (tmp_path / "predicted_vs_measured.png").stat().st_size > 1000
    assert MoPE(tmp_path).predict(Request("r", "u", 0.0, 100, 200), POOL).source.startswith("mope:")


def test_the_simulator_and_its_training_records_give_mope_the_same_rows():
    """The replay's record writer (an observer of the cluster simulator) rebuilds, for every request granted on
    arrival, the very feature row MoPE predicted with in the run: one definition of each feature in simulation and
    training. (A request that waits is predicted when it is first needed, on the pool as it was then.)"""
    from equinox_ray.fairness import VTC
    from equinox_ray.sim import ClusterSim, PoolSpec
    from predictors.replay import RecordWriter

    workload = traces.lmsys_arena()
    mope, writer, done = MoPE(MODELS), RecordWriter(), []

    def observe(completion):
        done.append(completion)
        writer(completion)

    ClusterSim([PoolSpec("a100", "A100", 1, max_num_seqs=32)], VTC(predictor=mope), max_tokens_cap=1024,
               on_completion=observe).run(workload)
    by_arrival = sorted(range(len(writer.records)), key=lambda i: writer.records[i].arrival_s)
    rows = dict(zip(by_arrival, record_features([writer.records[i] for i in by_arrival])))
    predicted_with = [features for features, _ in mope.records]  # in finish order, as the writer's
    assert len(predicted_with) == len(done) == len(workload.requests)
    on_arrival = [i for i, c in enumerate(done) if c.record.granted == c.record.arrival]
    assert len(on_arrival) > 500 and any(writer.records[i].admission.running > 0 for i in on_arrival)
    for i in on_arrival:
        assert np.array_equal(rows[i], predicted_with[i]), writer.records[i]
