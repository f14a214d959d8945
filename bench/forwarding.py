"""The reference path the benchmarks compare the full one with: a bare forwarding ingress (HTTP in, one Serve
stream per request to the engine's replica, one SSE event per chunk) with no auth, queue, counters or coalescing:
what a first Serve app in front of an engine looks like. It shares every per-request and per-token cost of Serve
with nothing of ours."""

from __future__ import annotations

import json
import os
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

from equinox_ray.engines.admission import AdmissionWindow
from equinox_ray.engines.replica import Replica
from equinox_ray.engines.types import GenerationRequest, TokenChunk
from equinox_ray.serve.config import PoolConfig
from equinox_ray.serve.pool import make_engine

api = FastAPI()


@serve.deployment(max_ongoing_requests=100_000, logging_config={"enable_access_log": False})
class ForwardingPool:
    async def __init__(self, pool: PoolConfig) -> None:
        self.replica = Replica(make_engine(pool), AdmissionWindow(maximum=pool.admission.max_window))
        await self.replica.start()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        async for chunk in self.replica.generate(request):
            yield chunk


@serve.deployment(max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class ForwardingIngress:
    def __init__(self, pool) -> None:
        self.pool = pool

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        body = await request.json()
        generation = GenerationRequest(os.urandom(8).hex(), body["max_tokens"], prompt_token_ids=body["prompt"],
                                       ignore_eos=True)
        chunks = self.pool.options(stream=True).generate.remote(generation)
        if not body.get("stream"):
            n = 0
            async for chunk in chunks:
                n += len(chunk.token_ids)
            return {"usage": {"completion_tokens": n}}

        async def events():
            n = 0
            async for chunk in chunks:
                n += len(chunk.token_ids)
                yield f"data: {json.dumps({'choices': [{'text': chunk.text, 'index': 0}]})}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': n}})}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def forwarding_app(pool: PoolConfig):
    from equinox_ray.serve.app import pool_options

    options = pool_options(pool)
    del options["request_router_config"], options["autoscaling_config"], options["name"]
    return ForwardingIngress.bind(ForwardingPool.options(**options, name=f"Forward-{pool.name}").bind(pool))
