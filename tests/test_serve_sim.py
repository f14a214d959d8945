"""deploy/equinox-sim.yaml's mixed H100 + L4 cluster of simulated GPUs, placed on fake accelerator resources:
requests reach both pools, and a sustained backlog scales a pool up and then back down."""

import asyncio
import os

import httpx
import pytest
import ray
from ray import serve

from equinox_ray.serve.app import build
from equinox_ray.serve.config import AppConfig
from serve_helpers import BASE, app_args, auth, fairness, wait_until

ADMIN = "sk-admin-demo-key"
KEYS = ["sk-alice-demo-key", "sk-bob-demo-key", "sk-carol-demo-key"]


@pytest.fixture(scope="module")
def app():
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"  # react in seconds, not tens
    os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    args = app_args("equinox-sim.yaml")
    for pool in args["pools"]:
        pool["autoscaling"].update(upscale_delay_s=1, downscale_delay_s=4, look_back_period_s=3)
    ray.init(num_cpus=2, include_dashboard=False, resources={"accelerator_type:H100": 4, "accelerator_type:L4": 8})
    serve.run(build(AppConfig.model_validate(args)), name="equinox", route_prefix="/")
    yield
    serve.shutdown()
    ray.shutdown()


def running_replicas(pool: str) -> int:
    status = serve.status().applications["equinox"].deployments[f"Pool-{pool}"]
    return status.replica_states.get("RUNNING", 0)


async def load(seconds: float, concurrency: int) -> list[int]:
    """Closed-loop clients of all three users for `seconds`."""
    codes = []
    stop = asyncio.get_running_loop().time() + seconds

    async def worker(i: int, http: httpx.AsyncClient) -> None:
        while asyncio.get_running_loop().time() < stop:
            r = await http.post(f"{BASE}/v1/completions", headers=auth(KEYS[i % 3]), json={
                "model": "llama-2-7b-sim", "prompt": "word " * 200, "max_tokens": 48})
            codes.append(r.status_code)

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=256)) as http:
        await asyncio.gather(*(worker(i, http) for i in range(concurrency)))
    return codes


def test_requests_reach_both_pools_and_a_backlog_scales_a_pool_up_then_down(app):
    assert running_replicas("h100") == 1 and running_replicas("l4") == 1

    async def main():
        task = asyncio.create_task(load(25, 160))
        scaled = await asyncio.to_thread(
            wait_until, lambda: max(running_replicas("h100"), running_replicas("l4")) >= 2, 40)
        codes = await task
        return scaled, codes

    scaled, codes = asyncio.run(main())
    assert scaled and codes and set(codes) == {200}
    pools = fairness(ADMIN)["pools"]
    assert pools["h100"]["granted"] > 0 and pools["l4"]["granted"] > 0
    wait_until(lambda: running_replicas("h100") == 1 and running_replicas("l4") == 1, 60)


def test_the_hetero_config_validates():
    config = AppConfig.model_validate(app_args("equinox-hetero.yaml"))
    assert {p.gpu_type for p in config.pools} == {"H100", "L4"}
    assert all(p.engine == "vllm" and p.num_gpus == 1 for p in config.pools)
    from equinox_ray.serve.app import pool_options

    options = pool_options(config.pools[0])
    assert options["ray_actor_options"]["accelerator_type"] == "H100"
    assert options["autoscaling_config"]["max_replicas"] == 8
    from equinox_ray.serve.app import ingress_options

    ingress = ingress_options(config.ingress)  # HTTP scales out in front of the one controller
    assert ingress["autoscaling_config"]["min_replicas"] == 2 and "num_replicas" not in ingress


def test_a_wrong_config_names_the_field():
    from pydantic import ValidationError

    args = app_args("equinox-sim.yaml")
    args["pools"][0]["autoscaling"]["max_replicas"] = 0
    with pytest.raises(ValidationError, match="max_replicas"):
        AppConfig.model_validate(args)
    args = app_args("equinox.yaml")
    args["users"][0]["weight"] = -1
    with pytest.raises(ValidationError, match=r"users\.0\.weight"):
        AppConfig.model_validate(args)


def test_serve_validates_the_yaml_args_against_the_config_model():
    """The path `serve run deploy/*.yaml` takes: Serve's own builder call, which must see the pydantic type."""
    from pydantic import ValidationError
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from equinox_ray.serve.app import build

    for name in ("equinox.yaml", "equinox-sim.yaml", "equinox-hetero.yaml"):
        assert isinstance(call_user_app_builder_with_args_if_necessary(build, app_args(name)), Application)
    bad = app_args("equinox.yaml")
    bad["pools"][0]["engine"] = "tensorrt"
    with pytest.raises(ValidationError, match=r"pools\.0\.engine"):
        call_user_app_builder_with_args_if_necessary(build, bad)


def test_every_controller_method_runs_on_its_event_loop():
    """Serve runs plain methods in a thread pool; a threaded `report` raced the event loop's dispatch and corrupted
    the queues under load (found replaying 400 LMSYS requests). The controller is single-threaded state."""
    import inspect

    from equinox_ray.serve.controller_deployment import ControllerDeployment

    cls = ControllerDeployment.func_or_class
    methods = [name for name, f in vars(cls).items() if inspect.isfunction(f) and not name.startswith("_")]
    assert {"update", "grants", "work", "report", "snapshot", "set_policy"} <= set(methods)
    for name in methods:
        f = getattr(cls, name)
        assert inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f), name
