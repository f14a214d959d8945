"""A closed-loop load generator for OpenAI completions endpoints: `clients` concurrent clients, each sending its
next request when the last one ends, for a time or a number of requests. aiohttp, so the client costs little CPU
next to the server it measures. Streams are read as server-sent events; usage comes from the last event."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp
import numpy as np


@dataclass(frozen=True)
class Result:
    status: int
    ttft_s: float | None  # first event with a choice (streams); the whole response otherwise
    e2e_s: float
    output_tokens: int


@dataclass(frozen=True)
class Load:
    url: str  # .../v1/completions
    model: str
    prompt: list[int]
    max_tokens: int
    stream: bool
    keys: tuple[str, ...] = ("",)  # round-robin over clients


@dataclass
class Summary:
    results: list[Result]
    wall_s: float

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if r.status == 200]

    @property
    def tokens(self) -> int:
        return sum(r.output_tokens for r in self.ok)

    def row(self) -> dict:
        ttft = [r.ttft_s for r in self.ok if r.ttft_s is not None]
        return {"requests": len(self.ok), "failed": len(self.results) - len(self.ok), "tokens": self.tokens,
                "wall_s": self.wall_s, "tokens_per_s": self.tokens / self.wall_s,
                "requests_per_s": len(self.ok) / self.wall_s,
                "ttft_p50_ms": 1000 * float(np.percentile(ttft, 50)) if ttft else None,
                "ttft_p99_ms": 1000 * float(np.percentile(ttft, 99)) if ttft else None,
                "e2e_p50_ms": 1000 * float(np.median([r.e2e_s for r in self.ok])) if self.ok else None}


async def one(session: aiohttp.ClientSession, load: Load, key: str) -> Result:
    body = {"model": load.model, "prompt": load.prompt, "max_tokens": load.max_tokens, "ignore_eos": True,
            "stream": load.stream}
    if load.stream:
        body["stream_options"] = {"include_usage": True}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    start = time.perf_counter()
    first, tokens = None, 0
    async with session.post(load.url, json=body, headers=headers) as response:
        if response.status != 200:
            await response.read()
            return Result(response.status, None, time.perf_counter() - start, 0)
        if not load.stream:
            tokens = (await response.json())["usage"]["completion_tokens"]
            elapsed = time.perf_counter() - start
            return Result(200, elapsed, elapsed, tokens)
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and event.get("choices"):
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return Result(200, first, time.perf_counter() - start, tokens)


async def run(load: Load, clients: int, seconds: float | None = None, requests: int | None = None) -> Summary:
    """Until `seconds` have passed (requests in flight then finish and count), or `requests` were sent."""
    results: list[Result] = []
    sent = 0
    deadline = None if seconds is None else time.perf_counter() + seconds

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while (deadline is None or time.perf_counter() < deadline) and (requests is None or sent < requests):
            sent += 1
            try:
                results.append(await one(session, load, load.keys[i % len(load.keys)]))
            except aiohttp.ClientError:
                results.append(Result(0, None, 0.0, 0))

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(clients)))
        return Summary(results, time.perf_counter() - start)
