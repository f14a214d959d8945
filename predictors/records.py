"""Completion records: the predictors' training data. One JSON object per line (JSONL), one per finished request:

| field | meaning |
|---|---|
| `arrival_s` | arrival time (records are kept in arrival order) |
| `user`, `prompt_tokens`, `max_tokens` | the request as admitted |
| `gpu`, `running`, `waiting`, `kv_usage`, `window` | the pool's state at admission |
| `output_tokens`, `ttft_s`, `e2e_s` | measured: tokens produced, time to first token and to the last, from dispatch |
| `throughput_tps`, `utilization`, `finish_s` | measured: the engine's tokens/s and busy fraction while it ran; its end |
"""

from __future__ import annotations

import json
from pathlib import Path

FIELDS = ("arrival_s", "user", "prompt_tokens", "max_tokens", "gpu", "running", "waiting", "kv_usage", "window",
          "output_tokens", "ttft_s", "e2e_s", "throughput_tps", "utilization", "finish_s")


def write(path: Path, records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps({k: r[k] for k in FIELDS}) + "\n")


def read(path: Path) -> list[dict]:
    records = []
    with Path(path).open() as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_number}: not JSON: {exc}") from None
            missing = [k for k in FIELDS if k not in record]
            if missing:
                raise ValueError(f"{path}:{line_number}: missing field(s) {', '.join(missing)}")
            records.append(record)
    return sorted(records, key=lambda r: r["arrival_s"])
