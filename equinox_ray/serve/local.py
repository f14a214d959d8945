"""The default application (deploy/equinox.yaml: vLLM on the CPU, tiny model) on a local Ray, for trace replay: one
API key per trace user, completion records written to a file, queues long enough for a whole trace."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import yaml

from equinox_ray.fairness.request import User
from equinox_ray.serve.keys import digest
from equinox_ray.serve.ray_env import use_fast_path
from equinox_ray.serve.paths import PROJECT_ROOT

BASE_URL = "http://127.0.0.1:8000"


def default_args() -> dict:
    """The default application's args, as deploy/equinox.yaml gives them to the builder."""
    return yaml.safe_load((PROJECT_ROOT / "deploy" / "equinox.yaml").read_text())["applications"][0]["args"]


def app_config(users: Mapping[str, User], keys: Mapping[str, str], records_path: Path | None,
               overrides: Mapping[str, dict] | None = None):
    """The default app's config for these users and keys, completion records to `records_path`, and `overrides`:
    fields of the config's sections (for example {"ingress": {"num_replicas": 2}}); a list replaces its whole
    section (for example {"pools": [...]})."""
    from equinox_ray.serve.config import AppConfig

    config = default_args()
    config["users"] = [{"name": u, "key": {"sha256": digest(keys[u])}, "weight": users[u].weight} for u in sorted(users)]
    config["records_path"] = str(Path(records_path).resolve()) if records_path is not None else None
    config["limits"]["max_queue_per_user"] = 4096
    for section, fields in (overrides or {}).items():
        config[section] = fields if isinstance(fields, list) else {**config.get(section, {}), **fields}
    return AppConfig.model_validate(config)


@contextmanager
def local_ray() -> Iterator[None]:
    """A local Ray of two CPUs with the fast path's settings, and Serve shut down with it."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    use_fast_path()
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def user_keys(users: Mapping[str, User], key_prefix: str) -> dict[str, str]:
    return {user: f"{key_prefix}-{i:04d}-key" for i, user in enumerate(sorted(users))}


@contextmanager
def default_app(users: Mapping[str, User], records_path: Path | None, key_prefix: str,
                overrides: Mapping[str, dict] | None = None) -> Iterator[dict[str, str]]:
    """Serve the default app for these users while the block runs (at BASE_URL); yields each user's API key.
    `overrides`: as `app_config` takes them."""
    from ray import serve

    from equinox_ray.serve.app import build

    keys = user_keys(users, key_prefix)
    with local_ray():
        serve.run(build(app_config(users, keys, records_path, overrides)), name="equinox", route_prefix="/")
        yield keys
