"""Train the MoPE experts from completion records and write them, a report and a plot next to each other.

    python -m predictors.train --out predictors/models/             # records replayed from the vendored traces
    python -m predictors.train --data records.jsonl --out DIR        # records the serving path wrote

The split is by time within each record file or replay (its first 80% of arrivals train, the rest is held out),
never shuffled.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from equinox_ray.mope import experts as experts_io
from equinox_ray.mope.features import BANDS, TARGETS, record_features, target_values
from equinox_ray.mope import records as rec

DEFAULT_MODELS = Path(__file__).parent / "models"


def default_runs(quick: bool = False) -> list[list[dict]]:
    """Record sets, one per replay: LMSYS (27 real users) and ShareGPT lengths with 50 Zipf users, on simulated
    A100, L4 and H100 pools at half and double their trace's load."""
    from equinox_ray.workloads import synthetic, traces
    from predictors.replay import replay

    lmsys = traces.lmsys_arena()
    sharegpt = synthetic.zipf_users(traces.sharegpt_lengths(), n_users=50, n_requests=600 if quick else 3000,
                                    rate=3.0, seed=0, name="sharegpt")
    runs = [(lmsys, "A100", 1.0)] if quick else [
        (w, gpu, scale) for w in (lmsys, sharegpt) for gpu in ("A100", "L4", "H100") for scale in (0.5, 2.0)]
    return [replay(workload, gpu=gpu, rate_scale=scale) for workload, gpu, scale in runs]


def split_runs(runs: list[list[dict]], train_fraction: float = 0.8):
    """Features and targets of each run, cut by time inside the run: its first 80% of arrivals train, the rest is
    held out. Never shuffled. A user's history is computed within its own run."""
    parts = {"train": [], "test": []}
    for records in runs:
        X = record_features(records)
        y = {t: target_values(records, t) for t in TARGETS}
        cut = int(len(records) * train_fraction)
        parts["train"].append((X[:cut], {t: v[:cut] for t, v in y.items()}, records[:cut]))
        parts["test"].append((X[cut:], {t: v[cut:] for t, v in y.items()}, records[cut:]))
    joined = {}
    for name, chunks in parts.items():
        joined[name] = (np.concatenate([c[0] for c in chunks]),
                        {t: np.concatenate([c[1][t] for c in chunks]) for t in TARGETS},
                        [r for c in chunks for r in c[2]])
    return joined["train"], joined["test"]


def mae_mape(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    return float(np.mean(np.abs(y - p))), float(np.mean(np.abs(y - p) / np.maximum(np.abs(y), 1e-6)))


def train(runs: list[list[dict]], out: Path) -> dict:
    (X, y, _), (X_test, y_test, _) = split_runs(runs)
    with tqdm(total=len(BANDS), desc="training experts") as bar:
        experts = experts_io.train_experts(X, y, bar)
    experts_io.save(experts, out, {"train_rows": int(len(X)), "test_rows": int(len(X_test))})
    predicted = experts_io.predict(experts, X_test)
    scores = {t: mae_mape(y_test[t], predicted[t]) for t in TARGETS}
    write_report(out, scores, y_test, predicted, len(X))
    return scores


def write_report(out: Path, scores: dict, measured: dict, predicted: dict, train_rows: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# MoPE training report", "",
             f"{train_rows} training records; held out: the last 20% of each run by time.", "",
             "| target | MAE | MAPE |", "|---|---|---|"]
    lines += [f"| {t} | {mae:.4g} | {100 * mape:.1f}% |" for t, (mae, mape) in scores.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(4 * len(TARGETS), 4))
    for ax, t in zip(axes, TARGETS):
        ax.scatter(measured[t], predicted[t], s=3, alpha=0.4)
        top = max(float(np.max(measured[t])), float(np.max(predicted[t])), 1e-6)
        ax.plot([0, top], [0, top], color="black", linewidth=0.8)
        ax.set_title(t)
        ax.set_xlabel("measured")
        ax.set_ylabel("predicted")
    fig.tight_layout()
    fig.savefig(out / "predicted_vs_measured.png", dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, nargs="*", help="JSONL record files (default: replay the traces)")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODELS)
    args = parser.parse_args()
    runs = [rec.read(path) for path in args.data] if args.data else default_runs()
    scores = train(runs, args.out)
    for t, (mae, mape) in scores.items():
        print(f"{t}: MAE {mae:.4g}, MAPE {100 * mape:.1f}%")
    print(f"models, report.md and predicted_vs_measured.png written to {args.out}")


if __name__ == "__main__":
    main()
