"""The cluster manifests an operator applies, checked without a cluster: the KubeRay RayService against KubeRay's
own schema for it (tests/data/kuberay), strictly (a misspelt field fails, where the API server would drop it), and
its Serve config against Serve's schema and the application's config model."""

import gzip
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from equinox_ray.serve.config import AppConfig

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
SCHEMA = ROOT / "tests" / "data" / "kuberay" / "rayservice-v1.schema.json.gz"


def strict(schema):
    """An object schema with properties takes no others, unless it says it keeps unknown fields (as
    kubeconform -strict reads a CRD)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def rayservice() -> dict:
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    return next(d for d in docs if d["kind"] == "RayService")


def test_the_rayservice_matches_kuberays_schema_strictly():
    validator = jsonschema.Draft4Validator(strict(json.loads(gzip.decompress(SCHEMA.read_bytes()))))
    errors = sorted(validator.iter_errors(rayservice()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_the_strict_check_is_not_vacuous_a_misspelt_field_fails():
    validator = jsonschema.Draft4Validator(strict(json.loads(gzip.decompress(SCHEMA.read_bytes()))))
    service = rayservice()
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParms"] = {}
    assert list(validator.iter_errors(service))


def test_its_serve_config_is_serves_and_the_apps_args_are_a_valid_config_with_keys_from_the_secret():
    service = rayservice()
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    [app] = serve_config.applications
    assert app.import_path == "equinox_ray.serve.app:build"
    config = AppConfig.model_validate(app.args)
    assert {p.gpu_type for p in config.pools} == {"H100", "L4"} and all(p.num_gpus == 1 for p in config.pools)
    secret = next(d for d in yaml.safe_load_all(MANIFEST.read_text()) if d["kind"] == "Secret")
    refs = [u.key for u in config.users] + config.admin_keys + config.metrics_keys
    assert all(ref.env in secret["stringData"] for ref in refs)  # every key is read from the secret
    containers = [service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    assert all({"secretRef": {"name": secret["metadata"]["name"]}} in c["envFrom"] for c in containers)


@pytest.mark.parametrize("group,accelerator", [("h100", "nvidia-h100-80gb"), ("l4", "nvidia-l4")])
def test_each_gpu_pool_has_a_worker_group_on_its_gpu(group, accelerator):
    groups = {g["groupName"]: g for g in rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    spec = groups[group]["template"]["spec"]
    assert spec["nodeSelector"]["cloud.google.com/gke-accelerator"] == accelerator
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


DASHBOARD = ROOT / "deploy" / "grafana" / "equinox.json"


def exported_samples() -> dict[str, set[str]]:
    """Every sample name the ingress's /metrics serves after some traffic, with its label names."""
    from prometheus_client.parser import text_string_to_metric_families
    from controller_helpers import config, controller, finish, grants, submit

    from equinox_ray.telemetry.metrics import FairnessMetrics

    ctl = controller(config(name="vtc-predict"))  # a policy that predicts: the prediction error is exported
    metrics = FairnessMetrics(ctl)
    ctl.ttft_observers.append(metrics.observe_ttft)
    submit(ctl, "r0", "a")
    submit(ctl, "r1", "b")
    grants(ctl)
    finish(ctl, "r0")
    body, _ = metrics.render()
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in board["panels"] for t in p["targets"]]
    return queries + [v["query"]["query"] for v in board["templating"]["list"]]


def test_the_grafana_dashboard_queries_only_metrics_and_labels_the_ingress_exports():
    import re

    samples = exported_samples()
    labels = set().union(*samples.values())
    for query in dashboard_queries():
        for name in re.findall(r"\b(equinox_[a-z_]+)\b", query):
            assert name in samples, f"{name} in {query!r} is not exported"
        used = [label for group in re.findall(r"by \(([^)]*)\)", query) for label in group.split(",")]
        used += re.findall(r"[{,]\s*([a-z_]+)\s*=~?", query) + re.findall(r"label_values\([a-z_]+, ([a-z_]+)\)", query)
        assert {label.strip() for label in used} <= labels, (query, labels)


def test_the_dashboard_shows_what_an_operator_asks_for():
    queries = " ".join(dashboard_queries())
    for metric in ("equinox_user_served_tokens_total", "equinox_user_queue_length", "equinox_user_ttft_seconds_bucket",
                   "equinox_jain_index", "equinox_pool_throughput_tokens_per_second", "equinox_pool_utilization"):
        assert metric in queries


def _autoscaling_context(metrics: dict, target: int = 3):
    """Serve's own context, as its controller builds it for a custom policy."""
    from ray.serve.config import AutoscalingConfig, AutoscalingContext
    from ray.serve._private.common import DeploymentID

    return AutoscalingContext(
        DeploymentID("Pool-h100", "equinox"), "Pool-h100", "equinox", current_num_replicas=target,
        target_num_replicas=target, running_replicas=[], total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics=metrics, raw_metrics={}, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=4, policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=None, config=AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=32))


def test_the_backlog_policy_scales_to_demand_and_keeps_the_target_without_reports():
    from equinox_ray.serve.autoscaling import backlog_policy

    busy = {"in_flight": {"a": 32.0, "b": 32.0}, "backlog": {"a": 40.0, "b": 40.0}}
    assert backlog_policy(_autoscaling_context(busy))[0] == 4  # ceil((64 + 40) / 32)
    idle = {"in_flight": {"a": 0.0, "b": 0.0}, "backlog": {"a": 0.0, "b": 0.0}}
    assert backlog_policy(_autoscaling_context(idle))[0] == 1  # the minimum
    assert backlog_policy(_autoscaling_context({}))[0] == 3  # no reports: the target stays
    assert backlog_policy(_autoscaling_context({"in_flight": {}, "backlog": {}}))[0] == 3
