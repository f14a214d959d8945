"""Shared set-up for the controller tests: a config with two users and two GPU pools, a controller driven with the
serving path's messages."""

import os

from equinox_ray.engines.replica import ReplicaReport
from equinox_ray.engines.types import EngineStats, GenerationRequest, Usage
from equinox_ray.serve.config import AppConfig
from equinox_ray.serve.controller import FairnessController
from equinox_ray.serve.protocol import Finished, Grant, IngressBatch, Refusal, ReplicaHello, Submission

os.environ.setdefault("KEY_A", "sk-key-of-a")  # the config names its users' keys by env var
os.environ.setdefault("KEY_B", "sk-key-of-b")


def config(**policy) -> AppConfig:
    return AppConfig.model_validate({
        "model": {"name": "m", "tokenizer": None},
        "users": [{"name": "a", "key": {"env": "KEY_A"}}, {"name": "b", "key": {"env": "KEY_B"}}],
        "limits": {"max_queue_per_user": 3},
        "telemetry": {"exporter": "none"},
        "policy": policy or {"name": "vtc"},
        "pools": [
            {"name": "h100", "gpu_type": "H100", "engine": "sim", "cost_weight": 8.0,
             "sim": {"gpu": "H100", "max_model_len": 8192}, "admission": {"max_window": 2, "initial_window": 2}},
            {"name": "l4", "gpu_type": "L4", "engine": "sim", "cost_weight": 1.0,
             "sim": {"gpu": "L4", "max_model_len": 2048}, "admission": {"max_window": 2, "initial_window": 2}},
        ],
    })


def controller(cfg: AppConfig | None = None, replicas=(("h100", "h0"), ("l4", "l0"))) -> FairnessController:
    ctl = FairnessController(cfg or config())
    for pool, name in replicas:
        ctl.replica_connected(ReplicaHello(pool, name, 2))
    for pool in ctl.pools:
        ctl.set_routable(pool, {name for p, name in replicas if p == pool})
    return ctl


def submit(ctl, rid: str, user: str, prompt: int = 10, max_tokens: int = 10, ingress: str = "i0") -> None:
    generation = GenerationRequest(rid, max_tokens, prompt_token_ids=[1] * prompt)
    ctl.apply(IngressBatch(ingress, submissions=[Submission(user, generation)]))


def finish(ctl, rid: str, output: int = 10, cancelled: bool = False, ingress: str = "i0") -> None:
    usage = Usage(10, output, 0.1, 0.5, 0.2)
    ctl.apply(IngressBatch(ingress, finished=[Finished(rid, usage, output, cancelled)]))


def grants(ctl, ingress: str = "i0") -> dict[str, Grant | Refusal]:
    return {m.request_id: m for m in ctl.to_ingress.take(ingress) if isinstance(m, (Grant, Refusal))}


def report(ctl, pool: str, replica: str, tokens_per_s: float = 1000.0, tpot_s: float = 0.02,
           healthy: bool = True, kv_capacity_tokens: int | None = None) -> None:
    stats = EngineStats(running=0, waiting=0, kv_cache_usage=0.5, tokens_per_s=tokens_per_s,
                        output_tokens_per_s=tokens_per_s / 2, busy_fraction=1.0, utilization=1.0,
                        utilization_source="simulated", healthy=healthy, kv_capacity_tokens=kv_capacity_tokens)
    ctl.report(ReplicaReport(replica, pool, stats, 2, 0, 0, 2, tpot_s, 0))
