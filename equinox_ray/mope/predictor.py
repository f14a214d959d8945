"""The MoPE predictor: the `Predictor` the fairness core uses, backed by the XGBoost experts.

The deterministic gate picks the expert by prompt-length band; the same request in the same pool state always gets
the same prediction. Online, each completion corrects at once: a per-user ratio for output tokens and a per-pool
ratio for latency, each a smoothed estimate of measured over the experts' own (uncorrected) prediction, applied on
top of the experts. `refit()` retrains the experts from the records seen
so far and swaps them in whole; `start_refits()` runs it on a schedule in a background thread, so scheduling never
waits for training. Without models (missing, or failing), it falls back to the moving-average predictor, says so
in the log once, and counts it in `fallbacks`.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict, deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from equinox_ray.fairness.pools import PoolView
from equinox_ray.fairness.prediction import MovingAveragePredictor, Outcome, Prediction
from equinox_ray.fairness.request import Request
from equinox_ray.mope import experts as experts_io
from equinox_ray.mope.features import TARGETS, AdmissionState, UserHistory, band_of, feature_row

log = logging.getLogger("equinox.mope")
CORRECTION_SMOOTHING = 0.2
MAX_RECORDS = 50_000


class MoPE:
    def __init__(self, model_dir: str | Path | None = None, experts: dict | None = None) -> None:
        self.history: dict[str, UserHistory] = defaultdict(UserHistory)
        self.fallback = MovingAveragePredictor()
        self.fallbacks = 0
        self.output_ratio: dict[str, float] = {}
        self.latency_ratio: dict[str, float] = {}
        self.records: deque[tuple[np.ndarray, dict]] = deque(maxlen=MAX_RECORDS)  # what a refit learns from
        self._pending: dict[str, dict[str, _Made]] = {}  # request -> pool -> what was predicted there
        self._lock = threading.Lock()
        self._refit_thread: threading.Thread | None = None
        self.experts = experts
        if experts is None and model_dir is not None:
            try:
                self.experts = experts_io.load(Path(model_dir))
            except experts_io.SchemaMismatch:
                raise
            except Exception as exc:  # missing or unreadable: run on the fallback, loudly
                log.warning("MoPE models unavailable (%s): using the per-user moving average", exc)

    # -- the Predictor protocol -----------------------------------------------------------------------------
    def predict(self, request: Request, pool: PoolView) -> Prediction:
        return self.predict_batch([(request, pool)])[0]

    def observe(self, outcome: Outcome) -> None:
        self.fallback.observe(outcome)
        if outcome.cancelled:
            self._pending.pop(outcome.request_id, None)
            return
        self.history[outcome.user].add(outcome.prompt_tokens, outcome.output_tokens)
        made = self._pending.pop(outcome.request_id, {}).get(outcome.pool)
        if made is None:
            return
        features, predicted = made.features, made.prediction
        self._correct(self.output_ratio, outcome.user, outcome.output_tokens, made.experts_output)
        self._correct(self.latency_ratio, outcome.pool, outcome.e2e_s, made.experts_e2e)
        self.records.append((features, {"output_tokens": outcome.output_tokens, "ttft_s": outcome.ttft_s,
                                        "e2e_s": outcome.e2e_s, "throughput_tps": predicted.throughput_tps,
                                        "utilization": outcome.utilization if outcome.utilization is not None
                                        else predicted.utilization}))

    def online_state(self) -> dict:
        """What serving taught it, to outlive a restart: the smoothed corrections and the users' histories."""
        with self._lock:
            return {"output_ratio": dict(self.output_ratio), "latency_ratio": dict(self.latency_ratio),
                    "history": {user: asdict(h) for user, h in self.history.items()}}

    def restore_online(self, state: dict) -> None:
        with self._lock:
            self.output_ratio.update(state.get("output_ratio", {}))
            self.latency_ratio.update(state.get("latency_ratio", {}))
            for user, history in state.get("history", {}).items():
                self.history[user] = UserHistory(**history)

    def forget(self, request_id: str) -> None:
        """A request that will never run (cancelled while waiting): drop the predictions kept for it."""
        self._pending.pop(request_id, None)

    # -- batch prediction -----------------------------------------------------------------------------------
    def predict_batch(self, items: list[tuple[Request, PoolView]]) -> list[Prediction]:
        experts = self.experts
        if not experts:
            self.fallbacks += len(items)
            return [self.fallback.predict(request, pool) for request, pool in items]
        X = np.stack([feature_row(r.prompt_tokens, r.max_tokens, self.history[r.user], AdmissionState.of(p))
                      for r, p in items])
        try:
            raw = experts_io.predict(experts, X)
        except Exception:
            log.exception("MoPE expert failed: using the per-user moving average")
            self.fallbacks += len(items)
            return [self.fallback.predict(request, pool) for request, pool in items]
        out = []
        columns = {target: values.tolist() for target, values in raw.items()}  # Python floats: no numpy per item
        for i, (request, pool) in enumerate(items):
            user_fix = self.output_ratio.get(request.user, 1.0)
            pool_fix = self.latency_ratio.get(pool.name, 1.0)
            output = _clip(columns["output_tokens"][i] * user_fix, 1.0, request.max_tokens)
            ttft = max(columns["ttft_s"][i] * pool_fix, 0.0)
            prediction = Prediction(
                output_tokens=output, ttft_s=ttft, e2e_s=max(columns["e2e_s"][i] * pool_fix, ttft),
                throughput_tps=max(columns["throughput_tps"][i], 1.0),
                utilization=_clip(columns["utilization"][i], 0.0, 1.0),
                source=f"mope:{band_of(request.prompt_tokens)}")
            made = _Made(X[i], prediction, columns["output_tokens"][i], columns["e2e_s"][i])
            self._pending.setdefault(request.id, {})[pool.name] = made
            out.append(prediction)
        return out

    # -- online learning ------------------------------------------------------------------------------------
    @staticmethod
    def _correct(ratios: dict[str, float], key: str, measured: float, predicted: float) -> None:
        if predicted <= 0:
            return
        ratio = _clip(measured / predicted, 0.2, 5.0)
        old = ratios.get(key, 1.0)
        ratios[key] = old + CORRECTION_SMOOTHING * (ratio - old)

    def refit(self, min_records: int = 200) -> bool:
        """Retrain the experts on the records seen so far and swap them in; False if too few records."""
        with self._lock:
            records = list(self.records)
        if len(records) < min_records:
            return False
        X = np.stack([f for f, _ in records])
        targets = {t: np.array([v[t] for _, v in records], dtype=np.float32) for t in TARGETS}
        trained = experts_io.train_experts(X, targets)
        self.experts = experts_io.single_threaded(trained)  # one assignment: a prediction sees the old experts or the new, never a mix
        self.output_ratio.clear()  # the new experts already learned what the corrections were fixing
        self.latency_ratio.clear()
        return True

    def start_refits(self, interval_s: float, min_records: int = 200) -> threading.Thread:
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval_s):
                try:
                    self.refit(min_records)
                except Exception:
                    log.exception("MoPE background refit failed; keeping the current experts")

        thread = threading.Thread(target=loop, name="mope-refit", daemon=True)
        thread.stop = stop  # type: ignore[attr-defined]
        thread.start()
        self._refit_thread = thread
        return thread


@dataclass(frozen=True)
class _Made:
    features: np.ndarray
    prediction: Prediction
    experts_output: float  # the experts' output tokens and e2e before the online corrections
    experts_e2e: float


def _clip(value: float, low: float, high: float) -> float:
    return float(min(max(value, low), high))
