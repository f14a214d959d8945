"""MoPE accuracy on held-out data (the last 20% of each replay by time, never shuffled): MAE and MAPE per target,
against three baselines on the same split: the global mean, the per-user moving average (what VTC_predict uses),
and a single XGBoost model without the gate. On the LMSYS Arena 27-client trace and on ShareGPT lengths with 50
synthetic Zipf users, each replayed on simulated A100, L4 and H100 pools at two load levels. Then the cost of a
prediction, single and in batches of 64.

    python -m bench.mope_accuracy
"""

from __future__ import annotations

import time

import numpy as np

from equinox_ray.fairness import PoolView, Request
from equinox_ray.mope import experts as experts_io
from equinox_ray.mope.features import TARGETS
from equinox_ray.mope.predictor import MoPE
from equinox_ray.workloads import synthetic, traces
from predictors.replay import replay
from predictors.train import DEFAULT_MODELS, mae_mape, split_runs


def runs_of(workload) -> list[list[dict]]:
    return [replay(workload, gpu=gpu, rate_scale=scale) for gpu in ("A100", "L4", "H100") for scale in (0.5, 2.0)]


def moving_average(train: list[dict], test: list[dict], target: str, window: int = 5) -> np.ndarray:
    """Per-user moving average of the target over the user's finished requests, as VTC_predict does; a user with
    no history gets the training mean."""
    fallback = float(np.mean([r[target] for r in train]))
    average: dict[str, float] = {}
    out = []
    import heapq

    for records, emit in ((train, False), (test, True)):
        pending: list = []
        average_local = average if not emit else dict(average)
        for i, r in enumerate(records):
            while pending and pending[0][0] <= r["arrival_s"]:
                _, j = heapq.heappop(pending)
                u, v = records[j]["user"], records[j][target]
                average_local[u] = v if u not in average_local else (average_local[u] * (window - 1) + v) / window
            if emit:
                out.append(average_local.get(r["user"], fallback))
            heapq.heappush(pending, (r["finish_s"], i))
        average = average_local
    return np.array(out)


def evaluate(name: str, runs: list[list[dict]]) -> list[str]:
    (X, y, train_records), (X_test, y_test, test_records) = split_runs(runs)
    mope = experts_io.predict(experts_io.train_experts(X, y), X_test)
    single = {t: experts_io.fit(X, y[t]).inplace_predict(X_test) for t in TARGETS}
    rows = []
    for t in TARGETS:
        truth = y_test[t]
        candidates = {
            "global mean": np.full(len(truth), float(np.mean(y[t]))),
            "per-user moving avg": moving_average(train_records, test_records, t),
            "single XGBoost": single[t],
            "MoPE": mope[t],
        }
        scores = {k: mae_mape(truth, p) for k, p in candidates.items()}
        best_baseline = min((v[0] for k, v in scores.items() if k != "MoPE"))
        verdict = "beats all" if scores["MoPE"][0] < best_baseline else "**does not beat all**"
        cells = " | ".join(f"{scores[k][0]:.4g} / {100 * scores[k][1]:.0f}%" for k in candidates)
        rows.append(f"| {name} | {t} | {cells} | {verdict} |")
    return rows


def prediction_cost() -> tuple[float, float]:
    mope = MoPE(DEFAULT_MODELS)
    pool = PoolView("a100", gpu_type="A100", free_slots=8, running=20)
    requests = [Request(f"r{i}", f"u{i % 7}", 0.0, 20 + 37 * i % 1500, 512) for i in range(64)]
    items = [(r, pool) for r in requests]
    mope.predict_batch(items)  # warm-up
    t = time.perf_counter()
    for _ in range(50):
        mope.predict_batch(items)
    batch_us = (time.perf_counter() - t) / (50 * 64) * 1e6
    t = time.perf_counter()
    for i in range(500):
        mope.predict(requests[i % 64], pool)
    single_us = (time.perf_counter() - t) / 500 * 1e6
    return batch_us, single_us


def main() -> None:
    lmsys = traces.lmsys_arena()
    sharegpt = synthetic.zipf_users(traces.sharegpt_lengths(), n_users=50, n_requests=3000, rate=3.0, seed=0,
                                    name="sharegpt")
    print("## MoPE accuracy, held-out last 20% of each replay (MAE / MAPE)\n")
    print("| data | target | global mean | per-user moving avg | single XGBoost | MoPE | MoPE vs baselines |")
    print("|---|---|---|---|---|---|---|")
    for name, workload in (("LMSYS 27 clients", lmsys), ("ShareGPT, 50 Zipf users", sharegpt)):
        for row in evaluate(name, runs_of(workload)):
            print(row, flush=True)
    batch_us, single_us = prediction_cost()
    print(f"\nprediction cost (all 5 targets, shipped models, no online refit running): {batch_us:.1f} us per request in batches of 64 "
          f"(target < 50 us), {single_us:.0f} us for a single request (target < 1,000 us)")


if __name__ == "__main__":
    main()
