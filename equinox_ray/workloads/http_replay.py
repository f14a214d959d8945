"""Replay a workload against an OpenAI-compatible endpoint over HTTP: each user's requests at their (time-scaled)
arrival times, streamed so that time to first token is measured where the client sees it.

Prompts are token ids of the trace's length (the tiny model has no meaningful text); `ignore_eos` makes the server
produce exactly the trace's output length, as vLLM's own benchmarks do. Lengths are capped to fit the model.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

from equinox_ray.workloads.workload import Workload


@dataclass(frozen=True)
class ClientResult:
    user: str
    arrival_s: float  # scheduled, on the scaled clock
    status: int
    ttft_s: float | None
    e2e_s: float
    output_tokens: int


async def replay_over_http(base_url: str, workload: Workload, keys: dict[str, str], model: str,
                           time_scale: float = 1.0, max_prompt: int = 512, max_output: int = 256,
                           limit: int | None = None) -> list[ClientResult]:
    """time_scale > 1 compresses time (arrivals come sooner)."""
    requests = workload.requests[:limit] if limit else workload.requests
    start = time.monotonic()

    async def one(http: httpx.AsyncClient, i: int) -> ClientResult:
        r = requests[i]
        at = r.arrival_s / time_scale
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        sent = time.monotonic()
        body = {"model": model, "prompt": [3 + (i + k) % 400 for k in range(min(r.prompt_tokens, max_prompt))],
                "max_tokens": min(r.output_tokens, max_output), "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        first, tokens = None, 0
        async with http.stream("POST", f"{base_url}/v1/completions", json=body,
                               headers={"Authorization": f"Bearer {keys[r.user]}"}) as response:
            if response.status_code != 200:
                await response.aread()
                return ClientResult(r.user, at, response.status_code, None, time.monotonic() - sent, 0)
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk.get("choices"):
                    first = time.monotonic() - sent
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return ClientResult(r.user, at, 200, first, time.monotonic() - sent, tokens)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=1024)) as http:
        return list(await asyncio.gather(*(one(http, i) for i in range(len(requests)))))
