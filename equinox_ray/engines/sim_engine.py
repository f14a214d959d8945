"""The simulated GPU as an `Engine`: `SimBatcher` steps paced in real time, for Serve replicas on machines without
the GPUs they stand for. Its clock runs `time_scale` times faster than the wall clock, and every time it reports
(TTFT, latency, busy-seconds, rates) is in simulated seconds."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from pydantic import BaseModel, Field

from equinox_ray.engines.busy_tracker import BusyTracker
from equinox_ray.engines.gpu_profiles import GPUName, ModelName, StepModel
from equinox_ray.engines.sim_batcher import SimBatcher, SimSequence
from equinox_ray.engines.types import EngineError, EngineStats, GenerationRequest, TokenChunk, Usage, validate


class SimEngineConfig(BaseModel):
    gpu: GPUName = "A100"
    model: ModelName = "Llama-2-7B"
    tp: int = Field(1, ge=1)
    max_model_len: int = Field(4096, ge=16)
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=16, description="token budget per step (stall-free prefill)")
    kv_capacity_tokens: int | None = Field(None, ge=16, description="default: what the GPU memory holds")
    overhead_s: float = Field(0.004, ge=0)
    time_scale: float = Field(1.0, gt=0, description="simulated seconds per wall-clock second")
    stats_window_s: float = Field(5.0, gt=0)
    vocab_size: int = Field(32000, ge=2)

    def step_model(self) -> StepModel:
        return StepModel.of(self.gpu, self.model, self.tp, self.overhead_s)


class _Stream:
    def __init__(self, seq: SimSequence, submitted: float, every: int) -> None:
        self.seq = seq
        self.submitted = submitted
        self.every = max(1, every)
        self.held: list[int] = []  # tokens not yet yielded (stream_every)
        self.first_token: float | None = None
        self.queue: asyncio.Queue = asyncio.Queue()


class SimEngine:
    def __init__(self, config: SimEngineConfig | None = None) -> None:
        self.config = config or SimEngineConfig()
        self.max_model_len = self.config.max_model_len
        self.batcher = SimBatcher(self.config.step_model(), self.config.max_num_seqs,
                                  self.config.max_num_batched_tokens, self.config.kv_capacity_tokens)
        self.tracker = BusyTracker(self.config.stats_window_s)
        self._streams: dict[str, _Stream] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._failure: BaseException | None = None
        self._wall0 = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self._wall0) * self.config.time_scale

    async def start(self) -> None:
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._loop_task = asyncio.create_task(self._run(), name="sim-engine")

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        self._fail_all(EngineError("engine shut down"))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        prompt_tokens = len(request.prompt_token_ids) if request.prompt_token_ids is not None else (
            request.prompt_len_hint or len((request.prompt or "").split()))
        validate(request, self.max_model_len, prompt_tokens)
        if self._failure is not None or self._loop_task is None:
            raise EngineError(f"simulated engine is not running: {self._failure!r}")
        if request.id in self._streams:
            raise ValueError(f"request {request.id!r} is already running")
        stream = _Stream(SimSequence(request.id, prompt_tokens, request.max_tokens), self.now(), request.stream_every)
        self.batcher.add(stream.seq)
        self._streams[request.id] = stream
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                await self.abort(request.id)

    async def abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        self.batcher.abort(request_id)
        if stream is None:
            self.tracker.pop_request(request_id)
        else:
            stream.queue.put_nowait(TokenChunk(request_id, stream.held, finish_reason="abort",
                                               usage=self._usage(stream, self.now())))

    def stats(self) -> EngineStats:
        tps, out_tps, busy = self.tracker.rates(self.now())
        return EngineStats(
            running=len(self.batcher.running), waiting=len(self.batcher.waiting),
            kv_cache_usage=self.batcher.kv_usage, tokens_per_s=tps, output_tokens_per_s=out_tps,
            busy_fraction=busy, utilization=busy, utilization_source="simulated",
            healthy=self._failure is None and self._loop_task is not None and not self._loop_task.done(),
            extra={"gpu": self.config.gpu, "model": self.config.model, "tp": self.config.tp},
            kv_capacity_tokens=self.batcher.kv_capacity,
        )

    async def _run(self) -> None:
        deadline = time.monotonic()
        try:
            while True:
                if not self.batcher.has_work():
                    self._wake.clear()
                    await self._wake.wait()
                    deadline = time.monotonic()
                    continue
                result = self.batcher.step()
                deadline += result.duration / self.config.time_scale  # absolute deadlines: no drift
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                end = self.now()
                self.tracker.record_step(end, result.duration, result.tokens, len(result.emitted))
                self._deliver(result, end)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a broken step model must not leave streams hanging
            self._failure = exc
            self._fail_all(EngineError(f"simulated engine failed: {exc!r}"))

    def _deliver(self, result, end: float) -> None:
        finished = set(result.finished)
        for seq_id in result.emitted:
            stream = self._streams.get(seq_id)
            if stream is None:
                continue
            first = stream.first_token is None
            if first:
                stream.first_token = end
            stream.held.append(hash((seq_id, stream.seq.generated)) % self.config.vocab_size)
            if seq_id in finished:
                del self._streams[seq_id]
                stream.queue.put_nowait(TokenChunk(seq_id, stream.held, finish_reason="length",
                                                   usage=self._usage(stream, end)))
            elif first or len(stream.held) >= stream.every:
                stream.queue.put_nowait(TokenChunk(seq_id, stream.held))
                stream.held = []

    def _usage(self, stream: _Stream, end: float) -> Usage:
        first = stream.first_token if stream.first_token is not None else end
        return Usage(stream.seq.prompt_tokens, stream.seq.generated, first - stream.submitted,
                     end - stream.submitted, self.tracker.pop_request(stream.seq.id))

    def _fail_all(self, error: EngineError) -> None:
        for seq_id, stream in list(self._streams.items()):
            stream.queue.put_nowait(error)
            self.batcher.abort(seq_id)
        self._streams.clear()
