"""vLLM's `AsyncLLM` behind the engine interface.

Stall-free scheduling is vLLM's chunked prefill with a token budget per step (`max_num_batched_tokens`): decodes
are scheduled first and a long prompt is split across steps, so it never stops the decodes already running.
Statistics come from a vLLM stat logger with per-iteration details: each step's measured duration is split among
the requests in it (decoding requests one token each, prefill tokens among the requests still before their first
token, by prompt length), which gives each request's busy-seconds. GPU utilization comes from NVML where a GPU is
present, and is the measured busy fraction otherwise.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator, Literal

from pydantic import BaseModel, Field

from equinox_ray.engines.busy_tracker import BusyTracker
from equinox_ray.engines.types import (
    EngineError, EngineStats, GenerationRequest, RequestRejected, TokenChunk, TokenLogprob, Usage, validate,
)


class VLLMEngineConfig(BaseModel):
    model: str = Field("models/tiny-llama", description="local model directory or model name")
    tokenizer: str | None = None
    dtype: str = "bfloat16"
    max_model_len: int = Field(2048, ge=16)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(512, ge=16, description="token budget per step: chunked, stall-free prefill")
    kv_cache_memory_bytes: int | None = Field(512 * 1024**2, ge=1, description="KV-cache size; None lets vLLM size it")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    scheduling_policy: Literal["fcfs", "priority"] = "priority"
    enforce_eager: bool = True
    seed: int = 0
    tensor_parallel_size: int = Field(1, ge=1)
    stats_window_s: float = Field(5.0, gt=0)


@dataclass
class _Active:
    prompt_tokens: int
    submitted: float
    first_token: float | None = None
    generated: int = 0


class _NVML:
    """GPU utilization from NVML, or None where there is no GPU or no nvidia-ml-py."""

    def __init__(self) -> None:
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._pynvml = pynvml
        except Exception:
            self.handle = None

    def utilization(self) -> float | None:
        if self.handle is None:
            return None
        try:
            return self._pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu / 100.0
        except Exception:
            return None


class VLLMEngine:
    def __init__(self, config: VLLMEngineConfig | None = None) -> None:
        self.config = config or VLLMEngineConfig()
        self.max_model_len = self.config.max_model_len
        self.tracker = BusyTracker(self.config.stats_window_s)
        self._active: dict[str, _Active] = {}
        self._sched = {"running": 0, "waiting": 0, "kv": 0.0}
        self._engine = None
        self._tokenizer = None
        self._nvml = None
        self._dead: BaseException | None = None

    async def start(self) -> None:
        if self._engine is not None:
            return
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        c = self.config
        args = AsyncEngineArgs(
            model=c.model, tokenizer=c.tokenizer or c.model, dtype=c.dtype, max_model_len=c.max_model_len,
            max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
            enable_chunked_prefill=True, scheduling_policy=c.scheduling_policy, enforce_eager=c.enforce_eager,
            seed=c.seed, tensor_parallel_size=c.tensor_parallel_size, kv_cache_memory_bytes=c.kv_cache_memory_bytes,
            # our stat logger only: vLLM's default one would log every step (iteration details are on for busy time)
            gpu_memory_utilization=c.gpu_memory_utilization, disable_log_stats=True,
            enable_logging_iteration_details=True,
        )
        self._tokenizer = AutoTokenizer.from_pretrained(c.tokenizer or c.model)
        self._engine = AsyncLLM.from_engine_args(args, stat_loggers=[self._make_stat_logger])
        self._nvml = _NVML()

    async def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def count_prompt_tokens(self, request: GenerationRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        if self._tokenizer is None:
            raise EngineError("engine not started")
        return self._tokenizer.encode(request.prompt or "", add_special_tokens=False)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        ids = self.count_prompt_tokens(request)
        validate(request, self.max_model_len, len(ids))
        if max(ids) >= self._tokenizer.vocab_size + len(self._tokenizer.get_added_vocab()) or min(ids) < 0:
            raise RequestRejected(f"request {request.id!r}: token ids outside the vocabulary")
        self._check_alive()
        sampling = request.sampling
        params = SamplingParams(max_tokens=request.max_tokens, ignore_eos=request.ignore_eos,
                                output_kind=RequestOutputKind.DELTA, stream_interval=request.stream_every,
                                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                min_p=sampling.min_p, presence_penalty=sampling.presence_penalty,
                                frequency_penalty=sampling.frequency_penalty,
                                repetition_penalty=sampling.repetition_penalty, seed=sampling.seed,
                                stop=list(sampling.stop), stop_token_ids=list(sampling.stop_token_ids),
                                logprobs=sampling.logprobs)
        active = _Active(len(ids), time.monotonic())
        self._active[request.id] = active
        finished = False
        try:
            async for out in self._engine.generate({"prompt_token_ids": ids}, params, request.id,
                                                   priority=request.priority):
                completion = out.outputs[0]
                now = time.monotonic()
                if completion.token_ids and active.first_token is None:
                    active.first_token = now
                active.generated += len(completion.token_ids)
                usage = None
                if out.finished:
                    finished = True
                    usage = self._usage(request.id, active, now)
                logprobs = None
                if sampling.logprobs is not None:
                    logprobs = tuple(_token_logprob(token, position, sampling.logprobs)
                                     for token, position in zip(completion.token_ids, completion.logprobs or ()))
                yield TokenChunk(request.id, list(completion.token_ids), completion.text,
                                 completion.finish_reason if out.finished else None, usage, logprobs=logprobs)
                if out.finished:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except RequestRejected:
            raise
        except Exception as exc:
            if self._engine is not None and self._engine.errored:
                self._dead = exc
            raise EngineError(f"vLLM failed on request {request.id!r}: {exc!r}") from exc
        finally:
            self._active.pop(request.id, None)
            if not finished:
                self.tracker.pop_request(request.id)
                if self._engine is not None:
                    await self._engine.abort(request.id)

    async def abort(self, request_id: str) -> None:
        if self._engine is not None:
            await self._engine.abort(request_id)

    async def check_health(self) -> None:
        self._check_alive()
        await self._engine.check_health()

    def stats(self) -> EngineStats:
        tps, out_tps, busy = self.tracker.rates(time.monotonic())
        gpu = self._nvml.utilization() if self._nvml is not None else None
        return EngineStats(
            running=self._sched["running"], waiting=self._sched["waiting"], kv_cache_usage=self._sched["kv"],
            tokens_per_s=tps, output_tokens_per_s=out_tps, busy_fraction=busy,
            utilization=busy if gpu is None else gpu, utilization_source="busy-fraction" if gpu is None else "nvml",
            healthy=self._engine is not None and self._dead is None and not self._engine.errored,
            extra={"model": self.config.model}, kv_capacity_tokens=self._kv_capacity(),
        )

    def _kv_capacity(self) -> int | None:
        """The KV cache's tokens, known once the engine core has sized it (it tells the client at start-up)."""
        cache = self._engine.vllm_config.cache_config if self._engine is not None else None
        return cache.num_gpu_blocks * cache.block_size if cache is not None and cache.num_gpu_blocks else None

    def _check_alive(self) -> None:
        if self._engine is None:
            raise EngineError("engine not started")
        if self._dead is not None or self._engine.errored:
            raise EngineError(f"vLLM engine is dead: {self._dead or self._engine.dead_error!r}")

    def _usage(self, request_id: str, active: _Active, now: float) -> Usage:
        first = active.first_token if active.first_token is not None else now
        return Usage(active.prompt_tokens, active.generated, first - active.submitted, now - active.submitted,
                     self.tracker.pop_request(request_id))

    # -- statistics -----------------------------------------------------------------------------------------
    def _make_stat_logger(self, vllm_config, engine_index: int = 0):
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class StepLogger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
                engine._record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return StepLogger(vllm_config, engine_index)

    def _record(self, scheduler_stats, iteration_stats) -> None:
        if scheduler_stats is None:
            return
        self._sched = {"running": scheduler_stats.num_running_reqs, "waiting": scheduler_stats.num_waiting_reqs,
                       "kv": scheduler_stats.kv_cache_usage}
        details = scheduler_stats.iteration_details
        if details is None or details.is_dummy:
            return
        tokens: dict[str, float] = {}
        prefilling = {rid: a.prompt_tokens for rid, a in self._active.items() if a.first_token is None}
        decoding = [rid for rid, a in self._active.items() if a.first_token is not None]
        for rid in decoding[: details.num_generation_requests or len(decoding)]:
            tokens[rid] = 1.0
        total_prompt = sum(prefilling.values())
        for rid, n in prefilling.items():
            tokens[rid] = details.num_ctx_tokens * n / total_prompt if total_prompt else 0.0
        output = details.num_generation_tokens
        self.tracker.record_step(time.monotonic(), details.elapsed_ms / 1000.0, tokens, output)


def _token_logprob(token_id: int, position, top: int) -> TokenLogprob:
    """vLLM's logprobs at one position (token id -> Logprob: the sampled token and the top ranks) as ours."""
    chosen = position[token_id]
    ranked = sorted((lp for lp in position.values() if lp.rank is not None and lp.rank <= top),
                    key=lambda lp: lp.rank)
    return TokenLogprob(chosen.decoded_token or "", chosen.logprob,
                        tuple((lp.decoded_token or "", lp.logprob) for lp in ranked))
