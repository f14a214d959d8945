"""What the predictors may see: only what is known when a request is admitted, never its true output length.

The schema is versioned; shipped models record it and a model trained on another schema is refused. The pool's
part of a row is `AdmissionState.of(view)`, of the very `PoolView` the policy decides on, in serving, in the
simulator and in the trace replay that makes the training data: one definition of each feature everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from equinox_ray.fairness.pools import PoolView

if TYPE_CHECKING:
    from equinox_ray.mope.records import TrainingRecord

SCHEMA_VERSION = 1
FEATURES = ("prompt_tokens", "max_tokens", "user_mean_output", "user_mean_prompt", "user_requests", "gpu",
            "running", "waiting", "kv_usage", "window")
TARGETS = ("output_tokens", "ttft_s", "e2e_s", "throughput_tps", "utilization")
# Ordered by speed, so one number carries the GPU type to a tree model.
GPU_CODES = {"CPU": 0.0, "A10G": 1.0, "L4": 2.0, "A100": 3.0, "H100": 4.0}
# The gate's regimes: prompt-length bands. Short chats, ordinary prompts, long documents behave differently.
BANDS = (("short", 0, 128), ("medium", 128, 1024), ("long", 1024, 1 << 62))


def band_of(prompt_tokens: int) -> str:
    """The deterministic gate: the same prompt length always picks the same expert."""
    for name, low, high in BANDS:
        if low <= prompt_tokens < high:
            return name
    raise ValueError(f"prompt_tokens must be >= 0, got {prompt_tokens}")


def gpu_code(gpu_type: str) -> float:
    return GPU_CODES.get(gpu_type, GPU_CODES["CPU"])


@dataclass(frozen=True)
class AdmissionState:
    """A pool's state when a request is granted to it, as MoPE sees it."""

    gpu: str
    running: int
    waiting: int  # in its replicas' engine queues
    kv_usage: float  # the replicas' mean share of KV cache held, 0..1
    window: int  # requests the pool takes at once now: its free slots plus those running

    @classmethod
    def of(cls, view: PoolView) -> "AdmissionState":
        return cls(view.gpu_type, view.running, view.waiting, view.kv_usage, view.free_slots + view.running)


@dataclass
class UserHistory:
    """A user's past, as known at admission: request count and moving averages of lengths (VTC_predict's w=5)."""

    requests: int = 0
    mean_output: float = 0.0
    mean_prompt: float = 0.0
    window: int = 5

    def add(self, prompt_tokens: int, output_tokens: int) -> None:
        if self.requests == 0:
            self.mean_output, self.mean_prompt = float(output_tokens), float(prompt_tokens)
        else:
            w = self.window
            self.mean_output = (self.mean_output * (w - 1) + output_tokens) / w
            self.mean_prompt = (self.mean_prompt * (w - 1) + prompt_tokens) / w
        self.requests += 1


def feature_row(prompt_tokens: int, max_tokens: int, history: UserHistory, pool: AdmissionState) -> np.ndarray:
    return np.array([prompt_tokens, max_tokens, history.mean_output, history.mean_prompt, history.requests,
                     gpu_code(pool.gpu), pool.running, pool.waiting, pool.kv_usage, pool.window], dtype=np.float32)


def record_features(records: list[TrainingRecord]) -> np.ndarray:
    """Feature rows for records in arrival order. A user's history holds only requests that had *finished* before
    this one arrived, as it would at admission: nothing from the future leaks in."""
    import heapq
    from collections import defaultdict

    histories: dict[str, UserHistory] = defaultdict(UserHistory)
    pending: list[tuple[float, int]] = []
    rows = []
    for i, r in enumerate(records):
        while pending and pending[0][0] <= r.arrival_s:
            _, j = heapq.heappop(pending)
            histories[records[j].user].add(records[j].prompt_tokens, records[j].output_tokens)
        rows.append(feature_row(r.prompt_tokens, r.max_tokens, histories[r.user], r.admission))
        heapq.heappush(pending, (r.finish_s, i))
    return np.stack(rows) if rows else np.zeros((0, len(FEATURES)), dtype=np.float32)


def target_values(records: list[TrainingRecord], target: str) -> np.ndarray:
    return np.array([getattr(r, target) for r in records], dtype=np.float32)
