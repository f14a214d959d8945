"""The fairness path's cost: the same vLLM CPU replica configuration behind (a) the full application, ingress +
controller, and (b) a bare forwarding ingress with no auth, queueing or counters. Both are deployed side by side
and measured in alternation (A, B, A, B, ...), so drift on the machine hits both alike. Prints the added median and
p99 latency per request (one client, short requests) and throughput at saturation as a ratio (each path alone).

    python -m bench.fairness_overhead [--requests 200] [--clients 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import httpx
import numpy as np
import ray
import yaml
from fastapi import FastAPI, Request
from ray import serve

from equinox_ray.engines.types import GenerationRequest
from equinox_ray.serve.app import build, pool_options
from equinox_ray.serve.config import AppConfig
from equinox_ray.serve.pool import PoolReplica
from equinox_ray.serve.paths import PROJECT_ROOT

direct_api = FastAPI()
KEY = "sk-alice-demo-key"


@serve.deployment(max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
@serve.ingress(direct_api)
class DirectIngress:
    """Straight to the pool: tokens in, tokens out, nothing else."""

    def __init__(self, pool) -> None:
        self.pool = pool

    @direct_api.post("/v1/completions")
    async def completions(self, request: Request) -> dict:
        body = await request.json()
        generation = GenerationRequest(os.urandom(8).hex(), body["max_tokens"], prompt_token_ids=body["prompt"],
                                       ignore_eos=True)
        n = 0
        async for chunk in self.pool.options(stream=True).generate.remote(generation):
            n += len(chunk.token_ids)
        return {"usage": {"completion_tokens": n}}


def config(predictor: str = "mope") -> AppConfig:
    args = yaml.safe_load((PROJECT_ROOT / "deploy" / "equinox.yaml").read_text())["applications"][0]["args"]
    args["policy"]["predictor"] = predictor
    args["pools"][0]["admission"] = {"max_window": 32, "initial_window": 32}
    args["limits"]["max_queue_per_user"] = 4096
    return AppConfig.model_validate(args)


async def one(http: httpx.AsyncClient, prefix: str, max_tokens: int) -> int:
    r = await http.post(f"http://127.0.0.1:8000{prefix}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                        json={"model": "tiny-llama", "prompt": list(range(3, 35)), "max_tokens": max_tokens,
                              "ignore_eos": True})
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


async def alternating(n: int, max_tokens: int) -> dict[str, np.ndarray]:
    times = {"/direct": [], "": []}
    async with httpx.AsyncClient(timeout=60) as http:
        for i in range(2 * n):
            prefix = "/direct" if i % 2 == 0 else ""
            start = time.perf_counter()
            await one(http, prefix, max_tokens)
            times[prefix].append(time.perf_counter() - start)
    return {k: np.array(v) for k, v in times.items()}


async def saturated(prefix: str, clients: int, per_client: int, max_tokens: int) -> float:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        async def client() -> int:
            return sum([await one(http, prefix, max_tokens) for _ in range(per_client)])

        start = time.perf_counter()
        total = sum(await asyncio.gather(*(client() for _ in range(clients))))
        return total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=8)
    parser.add_argument("--saturation-tokens", type=int, default=64)
    parser.add_argument("--predictor", choices=["mope", "moving-average"], default="mope")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = config(args.predictor)
    pool = cfg.pools[0]
    direct_app = DirectIngress.bind(PoolReplica.options(**pool_options(pool)).bind(pool.model_dump(mode="json")))
    t = time.perf_counter()
    serve.run(direct_app, name="direct", route_prefix="/direct", blocking=False)
    serve.run(build(cfg), name="equinox", route_prefix="/")
    print(f"both deployed in {time.perf_counter() - t:.0f} s", flush=True)
    asyncio.run(alternating(20, args.max_tokens))  # warm-up
    latency = asyncio.run(alternating(args.requests, args.max_tokens))
    tps = {prefix: asyncio.run(saturated(prefix, args.clients, args.per_client, args.saturation_tokens))
           for prefix in ("/direct", "", "/direct", "")}  # each twice, alternating; the last of each counts
    serve.shutdown()
    ray.shutdown()
    results = {name: {"p50": float(np.median(latency[prefix])), "p99": float(np.percentile(latency[prefix], 99)),
                      "tps": tps[prefix]} for name, prefix in (("direct", "/direct"), ("equinox", ""))}
    d, e = results["direct"], results["equinox"]
    print(f"\n## Fairness path overhead ({args.predictor} predictor; vLLM CPU replica, tiny model; {args.requests} requests of "
          f"{args.max_tokens} tokens to each path, alternating; saturation: {args.clients} clients x {args.per_client} requests of "
          f"{args.saturation_tokens} tokens)\n")
    print("| path | p50 latency ms | p99 latency ms | saturated output tokens/s |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {1000 * r['p50']:.2f} | {1000 * r['p99']:.2f} | {r['tps']:,.0f} |")
    print(f"\nadded latency: median {1000 * (e['p50'] - d['p50']):.2f} ms (target < 2 ms), "
          f"p99 {1000 * (e['p99'] - d['p99']):.2f} ms")
    print(f"throughput ratio at saturation: {e['tps'] / d['tps']:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
