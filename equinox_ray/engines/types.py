"""The one interface both engines (vLLM and the simulated GPU) implement, and the values that cross it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Literal, Protocol


class EngineError(RuntimeError):
    """The engine failed or died; streams in flight end with this error instead of hanging."""


class RequestRejected(ValueError):
    """A request refused before it reaches the engine (empty prompt, too long, bad max_tokens)."""


@dataclass(frozen=True)
class Sampling:
    """The client's sampling parameters, as vLLM's `SamplingParams` takes them (its defaults where not sent). The
    simulated engine draws no tokens, so it has none to apply."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # the client's seed, never one it did not send
    stop: tuple[str, ...] = ()  # generation ends before any of these strings (finish reason "stop")
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; k: each token's log probability and the k most likely alternatives


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability, and the most likely alternatives at its position (by rank)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class GenerationRequest:
    id: str
    max_tokens: int
    prompt_token_ids: list[int] | None = None
    prompt: str | None = None  # text, tokenized by the engine when no ids are given
    ignore_eos: bool = False  # trace replay: produce exactly max_tokens
    sampling: Sampling = Sampling()
    priority: int = 0  # lower first, as vLLM's priority scheduling
    stream_every: int = 1  # the engine may hold tokens back until it has this many (first and last: at once)
    prompt_len_hint: int | None = None  # prompt length in tokens when only text is given and ids are unknown
    trace_context: dict[str, str] | None = None  # W3C trace context of the caller's span (telemetry)


@dataclass(frozen=True)
class Usage:
    """Measured at the end of a request; this is what corrects the fairness counters."""

    prompt_tokens: int
    output_tokens: int
    ttft_s: float  # engine submit to first token
    e2e_s: float  # engine submit to last token
    busy_seconds: float  # the request's share of engine busy time


@dataclass(frozen=True)
class TokenChunk:
    request_id: str
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None  # "length", "stop", "abort", "error" on the last chunk; "unavailable": the
    # replica could not start it (its engine is dead), so it may be tried on another
    usage: Usage | None = None  # on the last chunk
    error: str | None = None  # what failed, with finish_reason "error"; RESTARTED, with none, see below
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token in token_ids, when the request asked

    @property
    def last(self) -> bool:
        return self.finish_reason is not None


# The in-band chunk an ingress puts before the chunks of a request's second attempt when the client has seen none of
# the first (it is not streamed): whoever collects the answer drops what it gathered.
RESTARTED = "restarted: the replica serving this request was lost; it starts over"


def merge_chunks(chunks: list[TokenChunk]) -> TokenChunk:
    """Consecutive chunks of one request as one: tokens and text in order, the finish of the last."""
    if len(chunks) == 1:
        return chunks[0]
    last = chunks[-1]
    logprobs = None
    if any(c.logprobs is not None for c in chunks):
        logprobs = tuple(lp for c in chunks for lp in (c.logprobs or ()))
    return TokenChunk(last.request_id, [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks),
                      last.finish_reason, last.usage, last.error, logprobs)


UtilizationSource = Literal["nvml", "busy-fraction", "simulated"]


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_cache_usage: float  # 0..1
    tokens_per_s: float  # prompt + output tokens over the recent window
    output_tokens_per_s: float
    busy_fraction: float  # share of the recent window the engine was stepping
    utilization: float  # GPU utilization where NVML has it, else the busy fraction
    utilization_source: UtilizationSource
    healthy: bool = True
    extra: dict = field(default_factory=dict)
    kv_capacity_tokens: int | None = None  # tokens its KV cache holds in all; None: unknown


class Engine(Protocol):
    max_model_len: int

    async def start(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    async def shutdown(self) -> None: ...


def validate(request: GenerationRequest, max_model_len: int, prompt_tokens: int) -> None:
    """Refuse what can never run, before it reaches the engine."""
    if isinstance(request.max_tokens, bool) or not isinstance(request.max_tokens, int) or request.max_tokens <= 0:
        raise RequestRejected(f"request {request.id!r}: max_tokens must be a positive integer, "
                              f"got {request.max_tokens!r}")
    if prompt_tokens <= 0:
        raise RequestRejected(f"request {request.id!r}: the prompt is empty")
    if prompt_tokens + request.max_tokens > max_model_len:
        raise RequestRejected(
            f"request {request.id!r}: prompt ({prompt_tokens} tokens) + max_tokens ({request.max_tokens}) "
            f"exceeds the model's context of {max_model_len} tokens")
