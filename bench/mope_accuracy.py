"""MoPE judged on what the scheduler uses, on held-out data (the last 20% of each replay by time, never shuffled).

    python -m bench.mope_accuracy [--out bench/results]

The replays are the training data's (`predictors/replay.py`: the cluster simulator, one simulated GPU, FCFS): the
LMSYS Arena 27-client trace and ShareGPT lengths with 50 synthetic Zipf users, each on A100, L4 and H100 at half and
double load. Four predictors, fitted on the same training part:
- prompt-only: an XGBoost model of each target on the request alone (prompt and max_tokens);
- per-user moving average of the target (what VTC_predict uses; the training mean for a user with no history);
- a single XGBoost model on all features, without the gate;
- MoPE: the gated experts (their online corrections are not in play here).
For each: the MAE of every target, and the Spearman rank correlation of the predicted cost w_in * prompt + w_out *
predicted output (the policy's default weights) with the true cost; the policies order each user's queue by that
cost, so its ranking is what they use. Then the cost of a prediction. Printed and written to
bench/results/mope_accuracy.{md,json}.
"""

from __future__ import annotations

import argparse
import heapq
import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from equinox_ray.fairness import PoolView, Request
from equinox_ray.mope import experts as experts_io
from equinox_ray.mope.features import FEATURES, TARGETS
from equinox_ray.mope.predictor import MoPE
from equinox_ray.mope.records import TrainingRecord
from equinox_ray.serve.config import PolicyConfig
from equinox_ray.workloads import synthetic, traces
from predictors.replay import replay
from predictors.train import DEFAULT_MODELS, split_runs

RESULTS = Path(__file__).parent / "results"
PREDICTORS = ("prompt-only", "per-user moving avg", "single XGBoost", "MoPE")
REQUEST_ONLY = [FEATURES.index("prompt_tokens"), FEATURES.index("max_tokens")]


def runs_of(workload) -> list[list[TrainingRecord]]:
    return [replay(workload, gpu=gpu, rate_scale=scale) for gpu in ("A100", "L4", "H100") for scale in (0.5, 2.0)]


def moving_average(train: list[TrainingRecord], test: list[TrainingRecord], target: str,
                   window: int = 5) -> np.ndarray:
    """Per-user moving average of the target over the user's requests finished before this one arrived."""
    fallback = float(np.mean([getattr(r, target) for r in train]))
    average: dict[str, float] = {}
    out = []
    for records, emit in ((train, False), (test, True)):
        pending: list = []
        for i, r in enumerate(records):
            while pending and pending[0][0] <= r.arrival_s:
                _, j = heapq.heappop(pending)
                u, v = records[j].user, getattr(records[j], target)
                average[u] = v if u not in average else (average[u] * (window - 1) + v) / window
            if emit:
                out.append(average.get(r.user, fallback))
            heapq.heappush(pending, (r.finish_s, i))
    return np.array(out)


def predictions(runs: list[list[TrainingRecord]]) -> tuple[dict[str, dict[str, np.ndarray]], dict, list]:
    (X, y, train_records), (X_test, y_test, test_records) = split_runs(runs)
    mope = experts_io.predict(experts_io.train_experts(X, y), X_test)
    return {
        "prompt-only": {t: experts_io.fit(X[:, REQUEST_ONLY], y[t]).inplace_predict(X_test[:, REQUEST_ONLY])
                        for t in TARGETS},
        "per-user moving avg": {t: moving_average(train_records, test_records, t) for t in TARGETS},
        "single XGBoost": {t: experts_io.fit(X, y[t]).inplace_predict(X_test) for t in TARGETS},
        "MoPE": mope,
    }, y_test, test_records


def evaluate(runs: list[list[TrainingRecord]]) -> dict:
    predicted, truth, test = predictions(runs)
    policy = PolicyConfig()
    prompts = np.array([r.prompt_tokens for r in test], dtype=np.float64)
    caps = np.array([r.max_tokens for r in test], dtype=np.float64)
    true_cost = policy.input_weight * prompts + policy.output_weight * truth["output_tokens"]
    out = {}
    for name in PREDICTORS:
        output = np.clip(predicted[name]["output_tokens"], 1.0, caps)
        cost = policy.input_weight * prompts + policy.output_weight * output
        out[name] = {"cost_rank_correlation": float(spearmanr(cost, true_cost).statistic),
                     "mae": {t: float(np.mean(np.abs(truth[t] - predicted[name][t]))) for t in TARGETS}}
    out["output_rank_correlation_mope"] = float(spearmanr(predicted["MoPE"]["output_tokens"],
                                                          truth["output_tokens"]).statistic)
    out["test_rows"] = len(test)
    return out


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


def table(results: dict[str, dict]) -> list[str]:
    lines = ["| data | predictor | cost rank correlation | " + " | ".join(f"MAE {t}" for t in TARGETS) + " |",
             "|---|---|---:|" + "---:|" * len(TARGETS)]
    for data, scores in results.items():
        for name in PREDICTORS:
            s = scores[name]
            cells = " | ".join(f"{s['mae'][t]:.4g}" for t in TARGETS)
            lines.append(f"| {data} | {name} | {s['cost_rank_correlation']:.3f} | {cells} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    workloads = {
        "LMSYS 27 clients": traces.lmsys_arena(),
        "ShareGPT, 50 Zipf users": synthetic.zipf_users(traces.sharegpt_lengths(), n_users=50, n_requests=3000,
                                                         rate=3.0, seed=0, name="sharegpt"),
    }
    results = {name: evaluate(runs_of(w)) for name, w in workloads.items()}
    batch_us, single_us = prediction_cost()
    lines = ["# MoPE accuracy on what the scheduler uses", "",
             "Held out: the last 20% of each replay by time (`python -m bench.mope_accuracy`; the module docstring "
             "defines the predictors). The cost is w_in * prompt + w_out * output with the policy's default weights "
             "(1, 2).", "", *table(results), "",
             "Rank correlation of MoPE's predicted output length alone with the true length: "
             + ", ".join(f"{d} {r['output_rank_correlation_mope']:.3f}" for d, r in results.items()) + ".", "",
             f"Prediction cost (all 5 targets, shipped models, no refit running): {batch_us:.1f} µs per request in "
             f"batches of 64, {single_us:.0f} µs for a single request."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mope_accuracy.md").write_text(text)
    (args.out / "mope_accuracy.json").write_text(json.dumps(
        {"data": results, "predict_batch_us": batch_us, "predict_single_us": single_us}, indent=2) + "\n")


if __name__ == "__main__":
    main()
