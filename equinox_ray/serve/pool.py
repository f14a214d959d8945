"""A pool replica: one engine (vLLM or the simulated GPU) with its admission window, as a Serve deployment.

The app builder binds this class once per pool, each with its own name, accelerator type and autoscaling. The
replica takes its work from the controller over one long-lived stream (`Dispatch`es and `Abort`s) and sends each
request's tokens to the ingress replica that owns it over that ingress's `Channel`, a long-lived stream the ingress
opened. Every `report_interval_s` it reports its state to the controller, which answers with the pool's backlog,
the custom autoscaling policy's signal (autoscaling.py).

Channels are addressed to this very replica (`replica=` keyword, `routing.ReplicaRouter`); a call meant for a
replica that is gone ends at once with `WrongReplica`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from equinox_ray.engines.admission import AdmissionWindow
from equinox_ray.engines.replica import Replica
from equinox_ray.engines.sim_engine import SimEngine
from equinox_ray.engines.types import TokenChunk
from equinox_ray.engines.vllm_engine import VLLMEngine
from equinox_ray.serve.channel import Channel
from equinox_ray.serve.config import PoolConfig
from equinox_ray.serve.paths import resolve
from equinox_ray.serve.protocol import Abort, Dispatch, Drain, ReplicaHello
from equinox_ray.telemetry.config import TelemetryConfig
from equinox_ray.telemetry.spans import traced_generation, tracer_of
from equinox_ray.telemetry.tracing import make_provider

log = logging.getLogger("ray.serve")
RECONNECT_S = 0.5


class WrongReplica(RuntimeError):
    """A call addressed to another replica reached this one: the addressed replica is gone."""


def make_engine(pool: PoolConfig):
    if pool.engine == "sim":
        return SimEngine(pool.sim)
    config = pool.vllm.model_copy(update={"model": resolve(pool.vllm.model),
                                          "tokenizer": resolve(pool.vllm.tokenizer)})
    return VLLMEngine(config)


@serve.deployment(max_ongoing_requests=100_000, health_check_period_s=5, health_check_timeout_s=30,
                  logging_config={"enable_access_log": False})
class PoolReplica:
    async def __init__(self, pool: PoolConfig, controller: DeploymentHandle, report_interval_s: float = 0.5,
                       telemetry: TelemetryConfig | None = None) -> None:
        self.pool = pool
        self.controller = controller
        self.name = serve.get_replica_context().replica_id.unique_id
        a = pool.admission
        window = AdmissionWindow(maximum=a.max_window, initial=a.initial_window,
                                 target_tpot_s=None if a.target_tpot_ms is None else a.target_tpot_ms / 1000.0)
        self.replica = Replica(make_engine(pool), window, name=self.name, pool=pool.name)
        self.tracer = tracer_of(make_provider(telemetry or TelemetryConfig(), f"pool-{pool.name}"))
        self.span_attributes = {"equinox.pool": pool.name, "equinox.gpu_type": pool.gpu_type,
                                "equinox.replica": self.name}
        self.channels: dict[str, Channel] = {}
        self.running: dict[str, tuple[asyncio.Task, str]] = {}  # request id -> (its task, its ingress)
        self.draining = False
        self.backlog = 0
        self.report_interval_s = report_interval_s
        await self.replica.start()
        self._tasks = [asyncio.create_task(self._work_loop()), asyncio.create_task(self._report_loop())]

    # -- the ingress replicas' side ---------------------------------------------------------------------------
    async def channel(self, replica: str, ingress: str) -> AsyncIterator[list[TokenChunk]]:
        """The tokens of `ingress`'s requests, coalesced (channel.py). The first message is empty: it tells the
        ingress the channel is open."""
        if replica != self.name:
            raise WrongReplica(f"replica {replica} is gone (this is {self.name})")
        yield []
        channel = self._channel(ingress)
        self._close_idle_channels()
        try:
            async for batch in channel.batches():
                yield batch
        finally:  # the ingress went away: forget its channel unless its requests still run (it may reconnect)
            if self.channels.get(ingress) is channel and not any(i == ingress for _, i in self.running.values()):
                del self.channels[ingress]

    def _channel(self, ingress: str) -> Channel:
        channel = self.channels.get(ingress)
        if channel is None:
            channel = self.channels[ingress] = Channel(self.pool.stream_interval_ms / 1000.0)
        return channel

    # -- the controller's side --------------------------------------------------------------------------------
    async def _work_loop(self) -> None:
        while True:
            hello = ReplicaHello(self.pool.name, self.name, self.replica.window.size)
            try:
                async for messages in self.controller.options(stream=True).work.remote(hello):
                    for message in messages:
                        if isinstance(message, Dispatch):
                            self._start(message)
                        elif isinstance(message, Abort):
                            await self._abort(message.request_id)
                        elif isinstance(message, Drain):
                            self.draining = True
                            self._close_idle_channels()
            except Exception:  # the controller is restarting: reconnect
                log.warning("work stream from the fairness controller broke; reconnecting", exc_info=True)
            await asyncio.sleep(RECONNECT_S)

    def _start(self, dispatch: Dispatch) -> None:
        request_id = dispatch.generation.id
        if request_id not in self.running:
            every = self._tokens_per_interval()
            if every > 1:
                dispatch = replace(dispatch, generation=replace(dispatch.generation, stream_every=every))
            self.running[request_id] = (asyncio.create_task(self._generate(dispatch)), dispatch.ingress)

    def _tokens_per_interval(self) -> int:
        """How many tokens a stream makes in one channel interval, at the engine's measured pace: the engine may
        hold that many back (its first token and its last go at once), so that a token costs no Python of its own
        between the engine and the channel."""
        tpot = self.replica.window.tpot_s
        if not tpot or self.pool.stream_interval_ms <= 0:
            return 1
        if self.pool.engine == "sim":
            tpot /= self.pool.sim.time_scale  # the simulated engine measures simulated seconds
        return max(1, int(self.pool.stream_interval_ms / 1000.0 / tpot))

    async def _generate(self, dispatch: Dispatch) -> None:
        generation, channel = dispatch.generation, self._channel(dispatch.ingress)
        attributes = {**self.span_attributes, "equinox.request_id": generation.id}
        first = True
        try:
            async for chunk in traced_generation(self.tracer, self.replica.generate(generation),
                                                 generation.trace_context, attributes):
                channel.push(chunk, urgent=chunk.last or (first and bool(chunk.token_ids)))
                first = first and not chunk.token_ids
        except asyncio.CancelledError:
            channel.push(TokenChunk(generation.id, [], finish_reason="abort"), urgent=True)
        except Exception as exc:
            log.warning("request %s failed in the engine", generation.id, exc_info=True)
            # a dead engine fails every request at once: one that had no token yet may run on another replica
            reason = "unavailable" if first and not self.replica.healthy() else "error"
            channel.push(TokenChunk(generation.id, [], finish_reason=reason, error=_one_line(exc)), urgent=True)
        finally:
            self.running.pop(generation.id, None)
            self._close_idle_channels()

    async def _abort(self, request_id: str) -> None:
        """In the engine, its stream ends with the engine's own "abort" chunk and usage; still waiting for a slot
        here, its task is cancelled."""
        running = self.running.get(request_id)
        if running is not None and not await self.replica.abort(request_id):
            running[0].cancel()

    def _close_idle_channels(self) -> None:
        """While draining, a channel ends once its ingress has no request left here: then nothing keeps Serve
        from stopping this replica."""
        if not self.draining:
            return
        busy = {ingress for _, ingress in self.running.values()}
        for ingress in [i for i in self.channels if i not in busy]:
            self.channels.pop(ingress).close()

    # -- reports, health, autoscaling -------------------------------------------------------------------------
    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.report_interval_s)
            try:
                answer = await self.controller.report.remote(self.replica.report())
                self.backlog = answer.backlog
            except Exception:  # the controller may be starting or restarting: try again next time
                log.warning("report to the fairness controller failed", exc_info=True)

    def check_health(self) -> None:
        if not self.replica.healthy():
            raise RuntimeError(f"pool {self.pool.name} replica {self.name}: engine unhealthy")

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"backlog": float(self.backlog), "in_flight": float(self.replica.in_flight + self.replica.local_queue)}

    async def __del__(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.replica.engine.shutdown()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
