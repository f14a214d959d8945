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
