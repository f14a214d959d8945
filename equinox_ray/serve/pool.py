"""A pool replica: one engine (vLLM or the simulated GPU) with its admission window, as a Serve deployment.

The app builder binds this class once per pool, each with its own name, accelerator type and autoscaling. Every
`report_interval_s` the replica reports its state to the controller (hosted by the ingress), which answers with the
pool's backlog; that backlog is the custom autoscaling policy's signal (autoscaling.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from ray import serve

from equinox_ray.engines.admission import AdmissionWindow
from equinox_ray.engines.replica import Replica
from equinox_ray.engines.sim_engine import SimEngine
from equinox_ray.engines.types import GenerationRequest, TokenChunk
from equinox_ray.engines.vllm_engine import VLLMEngine
from equinox_ray.serve.config import PoolConfig
from equinox_ray.serve.paths import resolve
from equinox_ray.telemetry.config import TelemetryConfig
from equinox_ray.telemetry.spans import traced_generation, tracer_of
from equinox_ray.telemetry.tracing import make_provider

log = logging.getLogger("ray.serve")
INGRESS_DEPLOYMENT = "EquinoxIngress"


def make_engine(pool: PoolConfig):
    if pool.engine == "sim":
        return SimEngine(pool.sim)
    config = pool.vllm.model_copy(update={"model": resolve(pool.vllm.model),
                                          "tokenizer": resolve(pool.vllm.tokenizer)})
    return VLLMEngine(config)


@serve.deployment(max_ongoing_requests=1024, health_check_period_s=5, health_check_timeout_s=30)
class PoolReplica:
    async def __init__(self, pool: dict, report_interval_s: float = 0.5, telemetry: dict | None = None) -> None:
        self.pool = PoolConfig.model_validate(pool)
        context = serve.get_replica_context()
        self.name = context.replica_id.unique_id
        self.app_name = context.app_name
        a = self.pool.admission
        window = AdmissionWindow(maximum=a.max_window, initial=a.initial_window,
                                 target_tpot_s=None if a.target_tpot_ms is None else a.target_tpot_ms / 1000.0)
        self.replica = Replica(make_engine(self.pool), window, name=self.name, pool=self.pool.name)
        self.tracer = tracer_of(make_provider(TelemetryConfig.model_validate(telemetry or {}), f"pool-{self.pool.name}"))
        self.span_attributes = {"equinox.pool": self.pool.name, "equinox.gpu_type": self.pool.gpu_type,
                                "equinox.replica": self.name}
        await self.replica.start()
        self.backlog = 0
        self.report_interval_s = report_interval_s
        self._reporter = asyncio.create_task(self._report_loop())

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        chunks = self.replica.generate(request)
        async for chunk in traced_generation(self.tracer, chunks, request.trace_context,
                                             {**self.span_attributes, "equinox.request_id": request.id}):
            yield chunk

    def check_health(self) -> None:
        if not self.replica.healthy():
            raise RuntimeError(f"pool {self.pool.name} replica {self.name}: engine unhealthy")

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"backlog": float(self.backlog), "in_flight": float(self.replica.in_flight + self.replica.local_queue)}

    async def _report_loop(self) -> None:
        """Report to the controller, which the ingress hosts, through a Serve handle to the ingress."""
        ingress = None
        while True:
            await asyncio.sleep(self.report_interval_s)
            try:
                ingress = ingress or serve.get_deployment_handle(INGRESS_DEPLOYMENT, self.app_name)
                r = self.replica.report()
                answer = await ingress.report.remote(
                    self.pool.name, self.name, r.window, r.free_slots, r.stats.tokens_per_s, r.stats.utilization,
                    r.stats.kv_cache_usage, r.tpot_s,
                    {"in_flight": r.in_flight, "local_queue": r.local_queue, "engine_running": r.stats.running,
                     "engine_waiting": r.stats.waiting, "finished": r.finished})
                self.backlog = answer.get("backlog", 0)
            except Exception:  # the ingress may be starting or restarting: try again next time
                log.warning("report to the fairness controller failed", exc_info=True)

    async def __del__(self) -> None:
        self._reporter.cancel()
        await self.replica.engine.shutdown()
