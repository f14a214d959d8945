"""Completion records: MoPE's training data, one per finished request, written as JSON lines (one flat object per
line: a `TrainingRecord`'s fields with its `AdmissionState`'s beside them). The Serve controller writes them when
`records_path` is set, the trace replay (`predictors/replay.py`) from the cluster simulator; both build them from
the `PoolView` the policy granted on.

| field | meaning |
|---|---|
| `arrival_s` | arrival time (records are kept in arrival order) |
| `user`, `prompt_tokens`, `max_tokens` | the request as admitted |
| `gpu`, `running`, `waiting`, `kv_usage`, `window` | its pool's state at the grant (`AdmissionState`) |
| `output_tokens`, `ttft_s`, `e2e_s` | measured: tokens produced, time to first token and to the last, from the grant |
| `throughput_tps`, `utilization`, `finish_s` | measured: its pool's tokens/s per replica and busy fraction at its end; the end |
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from equinox_ray.fairness.pools import PoolView
from equinox_ray.fairness.request import Request
from equinox_ray.mope.features import AdmissionState


@dataclass(frozen=True)
class TrainingRecord:
    arrival_s: float
    user: str
    prompt_tokens: int
    max_tokens: int
    admission: AdmissionState  # its pool at the grant
    output_tokens: int
    ttft_s: float
    e2e_s: float
    throughput_tps: float
    utilization: float
    finish_s: float

    @classmethod
    def of(cls, request: Request, admission: PoolView, at_finish: PoolView, output_tokens: int, ttft_s: float,
           e2e_s: float, finish_s: float) -> "TrainingRecord":
        return cls(request.arrival, request.user, request.prompt_tokens, request.max_tokens,
                   AdmissionState.of(admission), output_tokens, ttft_s, e2e_s, at_finish.throughput_tps,
                   at_finish.utilization, finish_s)

    def to_json(self) -> str:
        """One flat JSON object: the admission state's fields stand beside the record's."""
        row = asdict(self)
        row.update(row.pop("admission"))
        return json.dumps(row)


RECORD_FIELDS = tuple(f.name for f in fields(TrainingRecord) if f.name != "admission")
ADMISSION_FIELDS = tuple(f.name for f in fields(AdmissionState))
FIELDS = RECORD_FIELDS + ADMISSION_FIELDS  # a line of the file


def write(path: Path, records: list[TrainingRecord]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(r.to_json() + "\n")


def read(path: Path) -> list[TrainingRecord]:
    records = []
    with Path(path).open() as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_number}: not JSON: {exc}") from None
            missing = [k for k in FIELDS if k not in data]
            if missing:
                raise ValueError(f"{path}:{line_number}: missing field(s) {', '.join(missing)}")
            admission = AdmissionState(**{k: data[k] for k in ADMISSION_FIELDS})
            records.append(TrainingRecord(**{k: data[k] for k in RECORD_FIELDS}, admission=admission))
    return sorted(records, key=lambda r: r.arrival_s)
