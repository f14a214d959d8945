"""One Serve application for every test in this folder, on deploy/equinox.yaml's settings with two ingress replicas
behind Serve's HAProxy: real Ray Serve, real vLLM (CPU). Package scope: the app starts once for both files."""

import tempfile
from pathlib import Path

import pytest
import ray
from ray import serve

from equinox_ray.serve.app import build
from equinox_ray.serve.config import AppConfig
from serve_helpers import BASE, app_args

SPANS = Path(tempfile.mkdtemp(prefix="equinox-spans-")) / "spans.jsonl"


@pytest.fixture(scope="package")
def app():
    args = app_args("equinox.yaml")
    args["pools"][0]["admission"] = {"max_window": 4, "initial_window": 4}  # small, so queues form in the controller
    args["limits"]["max_queue_per_user"] = 24
    args["limits"]["max_prompt_tokens"] = 600
    args["ingress"] = {"num_replicas": 2}
    args["telemetry"] = {"exporter": "jsonl", "jsonl_path": str(SPANS)}
    ray.init(num_cpus=2, include_dashboard=False)
    serve.run(build(AppConfig.model_validate(args)), name="equinox", route_prefix="/")
    yield BASE
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def spans() -> Path:
    """Where the app's telemetry writes its spans, one JSON object per line."""
    return SPANS
