"""The application builder: `serve run deploy/equinox.yaml` calls `build` with the YAML `args`, validated as an
`AppConfig`. Three kinds of deployment: the ingress (HTTP; any number of replicas), the fairness controller (one
replica), and one pool deployment per GPU type (its accelerator, autoscaling and replica-addressing router).

No `from __future__ import annotations` here: Serve validates the YAML `args` only when `build`'s annotation is
the pydantic class itself, not a string."""


import logging

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from equinox_ray.serve import ray_env
from equinox_ray.serve.config import AppConfig, IngressConfig, PoolConfig
from equinox_ray.serve.controller_deployment import ControllerDeployment
from equinox_ray.serve.ingress import EquinoxIngress
from equinox_ray.serve.pool import PoolReplica

log = logging.getLogger("ray.serve")


def autoscaling_options(a, policy_function: str | None = None) -> dict:
    options = {
        "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
        "initial_replicas": a.initial_replicas if a.initial_replicas is not None else max(a.min_replicas, 1),
        "target_ongoing_requests": a.target_requests_per_replica, "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s, "look_back_period_s": a.look_back_period_s,
    }
    if policy_function is not None:
        options["policy"] = {"policy_function": policy_function}
    return options


def pool_options(pool: PoolConfig) -> dict:
    actor_options: dict = {"num_cpus": pool.num_cpus}
    if pool.num_gpus:
        actor_options["num_gpus"] = pool.num_gpus
    if pool.gpu_type != "CPU":
        actor_options["accelerator_type"] = pool.gpu_type
    if pool.engine == "vllm" and pool.vllm.kv_cache_memory_bytes is not None and not pool.num_gpus:
        # vLLM on CPU sizes its KV cache from this variable unless told otherwise
        gib = max(1, pool.vllm.kv_cache_memory_bytes // 1024**3)
        actor_options["runtime_env"] = {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(gib)}}
    return {"name": pool.deployment_name, "ray_actor_options": actor_options,
            "autoscaling_config": autoscaling_options(pool.autoscaling, "equinox_ray.serve.autoscaling:backlog_policy"),
            "request_router_config": RequestRouterConfig(
                request_router_class="equinox_ray.serve.routing:ReplicaRouter")}


def ingress_options(ingress: IngressConfig) -> dict:
    options: dict = {"max_ongoing_requests": ingress.max_ongoing_requests,
                     "ray_actor_options": {"num_cpus": ingress.num_cpus}}
    if ingress.autoscaling is not None:
        options["autoscaling_config"] = autoscaling_options(ingress.autoscaling)
    else:
        options["num_replicas"] = ingress.num_replicas
    return options


def build(config: AppConfig) -> Application:
    if ray_env.missing():
        log.warning("%s not set when Ray started: Serve's Python proxy and Ray's object transport carry every "
                    "request, several times slower than HAProxy and gRPC (equinox_ray/serve/ray_env.py)",
                    " ".join(ray_env.missing()))
    controller = ControllerDeployment.bind(config)
    pools = {p.name: PoolReplica.options(**pool_options(p)).bind(p, controller, config.report_interval_s,
                                                                 config.telemetry)
             for p in config.pools}
    return EquinoxIngress.options(**ingress_options(config.ingress)).bind(config, controller, pools)
