"""Train, save and load the experts: one XGBoost model per (target, prompt-length band), with a manifest that
records the feature schema. A model trained on another schema is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xgboost as xgb

from equinox_ray.mope.features import BANDS, FEATURES, SCHEMA_VERSION, TARGETS, band_of

MIN_ROWS_PER_EXPERT = 30


class SchemaMismatch(ValueError):
    """The models on disk were trained on another feature schema."""


# MAE objective: the accuracy bench reports MAE, and it is robust to the long tails of output lengths.
# One booster per regime holds one tree ensemble per target (`one_output_per_tree`): the experts stay separate per
# target and regime, and a prediction for all five targets costs one call per regime (~0.2 ms), not five.
PARAMS = {"objective": "reg:absoluteerror", "max_depth": 5, "eta": 0.15, "subsample": 0.9, "tree_method": "hist",
          "multi_strategy": "one_output_per_tree", "nthread": 2, "seed": 0}
ROUNDS = 60


def fit(X: np.ndarray, y: np.ndarray) -> xgb.Booster:
    """y: one target (n,) or all targets (n, len(TARGETS))."""
    return xgb.train(PARAMS, xgb.DMatrix(X, label=y), num_boost_round=ROUNDS)


def bands_of(X: np.ndarray) -> np.ndarray:
    prompt = X[:, FEATURES.index("prompt_tokens")]
    return np.array([band_of(int(p)) for p in prompt])


def stack(targets: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([targets[t] for t in TARGETS], axis=1)


def train_experts(X: np.ndarray, targets: dict[str, np.ndarray], progress=None) -> dict[str, xgb.Booster]:
    """One expert per regime (prompt-length band); a band with too few rows gets the all-bands model."""
    bands, Y = bands_of(X), stack(targets)
    overall = None
    experts: dict[str, xgb.Booster] = {}
    for name, _, _ in BANDS:
        rows = bands == name
        if rows.sum() >= MIN_ROWS_PER_EXPERT:
            experts[name] = fit(X[rows], Y[rows])
        else:
            overall = overall or fit(X, Y)
            experts[name] = overall
        if progress is not None:
            progress.update(1)
    return experts


def single_threaded(experts: dict[str, xgb.Booster]) -> dict[str, xgb.Booster]:
    """Predict on one thread: rows come a few at a time, and OpenMP workers that spin between calls take CPU from
    the engine sharing the machine (measured: 12% of saturated throughput on 2 cores)."""
    for booster in experts.values():
        booster.set_param({"nthread": 1})
    return experts


def predict(experts: dict[str, xgb.Booster], X: np.ndarray) -> dict[str, np.ndarray]:
    """The gate routes each row to its band's expert; one call per band present."""
    out = np.zeros((len(X), len(TARGETS)))
    bands = bands_of(X)
    for band in np.unique(bands):
        rows = np.nonzero(bands == band)[0]
        out[rows] = np.asarray(experts[band].inplace_predict(X[rows])).reshape(len(rows), len(TARGETS))
    return {t: out[:, i] for i, t in enumerate(TARGETS)}


def save(experts: dict[str, xgb.Booster], out: Path, extra: dict | None = None) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for band, model in experts.items():
        files[band] = f"expert__{band}.json"
        model.save_model(out / files[band])
    manifest = {"schema_version": SCHEMA_VERSION, "features": list(FEATURES), "targets": list(TARGETS),
                "bands": [b[0] for b in BANDS], "experts": files, **(extra or {})}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def load(directory: Path) -> dict[str, xgb.Booster]:
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"no MoPE models in {directory} (manifest.json missing)")
    manifest = json.loads(manifest_path.read_text())
    if (manifest.get("schema_version") != SCHEMA_VERSION or manifest.get("features") != list(FEATURES)
            or manifest.get("targets") != list(TARGETS)):
        raise SchemaMismatch(
            f"{manifest_path}: models use feature schema v{manifest.get('schema_version')} "
            f"{manifest.get('features')} -> {manifest.get('targets')}, this code uses v{SCHEMA_VERSION} "
            f"{list(FEATURES)} -> {list(TARGETS)}: retrain them")
    experts = {}
    for band, name in manifest["experts"].items():
        booster = xgb.Booster()
        booster.load_model(directory / name)
        experts[band] = booster
    return single_threaded(experts)
