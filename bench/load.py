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
    status: int  # 0: no HTTP answer (the connection failed or broke, or the client timed out)
    ttft_s: float | None  # first event with a choice (streams); the whole response otherwise
    e2e_s: float
    output_tokens: int
    answer_s: float | None = None  # until the status line came
    complete: bool = False  # a 200 whose stream ended with [DONE] and no error event (or a whole JSON answer)
    error: str | None = None  # an error event's code or the exception's name


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
    first, tokens, done, error = None, 0, False, None
    async with session.post(load.url, json=body, headers=headers) as response:
        answered = time.perf_counter() - start
        if response.status != 200:
            payload = await response.read()
            try:
                error = json.loads(payload)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                error = payload[:80].decode(errors="replace")
            return Result(response.status, None, time.perf_counter() - start, 0, answered, error=error)
        if not load.stream:
            tokens = (await response.json())["usage"]["completion_tokens"]
            elapsed = time.perf_counter() - start
            return Result(200, elapsed, elapsed, tokens, answered, complete=True)
        async for line in response.content:
            if line.startswith(b"data: [DONE]"):
                done = True
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"].get("code") or "error"
            if first is None and event.get("choices"):
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return Result(200, first, time.perf_counter() - start, tokens, answered, complete=done and error is None,
                  error=error if error is not None or done else "cut")


async def attempt(session: aiohttp.ClientSession, load: Load, key: str) -> Result:
    """`one`, with a connection that fails or breaks, or a client timeout, as a result (status 0)."""
    start = time.perf_counter()
    try:
        return await one(session, load, key)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return Result(0, None, time.perf_counter() - start, 0, error=type(exc).__name__)


async def run(load: Load, clients: int, seconds: float | None = None, requests: int | None = None) -> Summary:
    """Until `seconds` have passed (requests in flight then finish and count), or `requests` were sent."""
    results: list[Result] = []
    sent = 0
    deadline = None if seconds is None else time.perf_counter() + seconds

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while (deadline is None or time.perf_counter() < deadline) and (requests is None or sent < requests):
            sent += 1
            results.append(await attempt(session, load, load.keys[i % len(load.keys)]))

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(clients)))
        return Summary(results, time.perf_counter() - start)
