"""How a request's chunks become its answer: the chunks in groups (all that have arrived when one is taken), then
either the SSE events of a stream, one write per group, or one completion body."""

from __future__ import annotations

from typing import AsyncIterator, Callable

from equinox_ray.engines.types import RESTARTED, TokenChunk
from equinox_ray.serve.http_io import engine_failure
from equinox_ray.serve.ingress_links import Inflight
from equinox_ray.serve.openai_protocol import StreamOptions, chunk_body, completion_body, logprobs_body, sse, usage
from equinox_ray.telemetry.spans import RequestTrace


async def chunk_groups(inflight: Inflight, first: TokenChunk, span: RequestTrace,
                       withdraw: Callable[[str], None]) -> AsyncIterator[list[TokenChunk]]:
    """The request's chunks to its last, in lists: each holds every chunk that had arrived when it was taken, so a
    stream that fell behind catches up in one write. If the client goes away first, the request is withdrawn."""
    chunk, group = first, [first]
    try:
        while True:
            while not chunk.last and not inflight.chunks.empty():
                chunk = inflight.chunks.get_nowait()
                group.append(chunk)
            yield group
            if chunk.last:
                return
            chunk = await inflight.chunks.get()
            group = [chunk]
    finally:
        if not chunk.last:
            withdraw(inflight.submission.request_id)
        span.finished(chunk)


async def collect(groups: AsyncIterator[list[TokenChunk]], rid: str, model: str, chat: bool) -> dict:
    text, n, last, logprobs = [], 0, None, None
    async for group in groups:
        for chunk in group:
            if chunk.error == RESTARTED and not chunk.last:  # the first attempt's tokens are not the answer
                text, n, logprobs = [], 0, None
                continue
            text.append(chunk.text)
            n += len(chunk.token_ids)
            last = chunk
            if chunk.logprobs is not None:
                logprobs = logprobs or []
                logprobs.extend(chunk.logprobs)
    if last.finish_reason == "error":
        raise engine_failure(last)
    prompt = last.usage.prompt_tokens if last.usage is not None else 0
    if logprobs is not None:
        logprobs = logprobs_body(logprobs, chat)
    return completion_body(rid, model, "".join(text), last.finish_reason, usage(prompt, n), chat, logprobs)


async def sse_events(groups: AsyncIterator[list[TokenChunk]], rid: str, model: str, chat: bool,
                     options: StreamOptions | None, prompt: int) -> AsyncIterator[str]:
    """One SSE event per chunk and one write per group; the last write also carries the usage event and `[DONE]`
    (each write crosses the whole ASGI stack)."""
    n, first, offset, ended = 0, True, 0, False
    continuous = options is not None and options.continuous_usage_stats
    async for group in groups:
        events = []
        for chunk in group:
            if chunk.finish_reason == "error":
                events.append(sse(engine_failure(chunk).body()))
                ended = True
                break
            n += len(chunk.token_ids)
            if chunk.usage is not None:
                prompt = chunk.usage.prompt_tokens
            logprobs = logprobs_body(chunk.logprobs, chat, offset) if chunk.logprobs is not None else None
            offset += len(chunk.text)
            body = chunk_body(rid, model, chunk.text, chunk.finish_reason, chat, first=first, logprobs=logprobs)
            if continuous:  # vLLM's extension: the usage so far in every chunk
                body["usage"] = usage(prompt, n)
            events.append(sse(body))
            first = False
            ended = chunk.last
        if ended:
            if options is not None and options.include_usage:
                events.append(sse(chunk_body(rid, model, None, None, chat, use=usage(prompt, n))))
            events.append(sse("[DONE]"))
        yield "".join(events)
        if ended:
            return
