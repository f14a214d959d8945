"""Completion records for training MoPE: one JSON line per finished request (predictors/records.py's schema), with
its pool's state at the grant and at the finish. Written by the controller when `records_path` is set."""

from __future__ import annotations

import json

from equinox_ray.serve.controller_state import PoolState, Tracked


class CompletionRecords:
    def __init__(self, path: str) -> None:
        self.file = open(path, "a")

    @staticmethod
    def at_grant(pool: PoolState) -> dict:
        view = pool.view()
        return {"running": view.running, "waiting": view.waiting, "kv_usage": view.kv_usage,
                "window": pool.capacity()}

    def write(self, tracked: Tracked, pool: PoolState, output_tokens: int, ttft_s: float, e2e_s: float,
              now: float) -> None:
        request, view = tracked.request, pool.view()
        self.file.write(json.dumps({
            "arrival_s": request.arrival, "user": request.user, "prompt_tokens": request.prompt_tokens,
            "max_tokens": request.max_tokens, "gpu": pool.config.gpu_type, **tracked.pool_at_grant,
            "output_tokens": output_tokens, "ttft_s": ttft_s, "e2e_s": e2e_s,
            "throughput_tps": view.throughput_tps, "utilization": view.utilization, "finish_s": now}) + "\n")
        self.file.flush()
