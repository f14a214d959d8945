"""Completion records for training MoPE (`equinox_ray/mope/records.py`): one JSON line per finished request,
written by the controller when `records_path` is set."""

from __future__ import annotations

from equinox_ray.mope.records import TrainingRecord
from equinox_ray.serve.controller_state import PoolState, Tracked


class CompletionRecords:
    def __init__(self, path: str) -> None:
        self.file = open(path, "a")

    def write(self, tracked: Tracked, pool: PoolState, output_tokens: int, ttft_s: float, e2e_s: float,
              now: float) -> None:
        record = TrainingRecord.of(tracked.request, tracked.admission, pool.view(), output_tokens, ttft_s, e2e_s, now)
        self.file.write(record.to_json() + "\n")
        self.file.flush()
