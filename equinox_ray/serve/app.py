"""The application builder: `serve run deploy/equinox.yaml` calls `build` with the YAML `args`, validated as an
`AppConfig`. One deployment per pool (its accelerator type and autoscaling), and the ingress, which hosts the
fairness controller in its own replica.

No `from __future__ import annotations` here: Serve validates the YAML `args` only when `build`'s annotation is
the pydantic class itself, not a string."""


from ray.serve import Application

from equinox_ray.serve.config import AppConfig, PoolConfig
from equinox_ray.serve.ingress import EquinoxIngress
from equinox_ray.serve.pool import PoolReplica


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
    a = pool.autoscaling
    autoscaling = {
        "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
        "initial_replicas": a.initial_replicas if a.initial_replicas is not None else max(a.min_replicas, 1),
        "target_ongoing_requests": a.target_requests_per_replica, "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s, "look_back_period_s": a.look_back_period_s,
        "policy": {"policy_function": "equinox_ray.serve.autoscaling:backlog_policy"},
    }
    return {"name": pool.deployment_name, "ray_actor_options": actor_options, "autoscaling_config": autoscaling}


def build(config: AppConfig) -> Application:
    raw = config.model_dump(mode="json")
    telemetry = config.telemetry.model_dump(mode="json")
    pools = {p.name: PoolReplica.options(**pool_options(p)).bind(p.model_dump(mode="json"), config.report_interval_s,
                                                                 telemetry)
             for p in config.pools}
    return EquinoxIngress.options(ray_actor_options={"num_cpus": 0}).bind(raw, pools)
