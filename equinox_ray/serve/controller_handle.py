"""Where the fairness controller actor lives and how replicas find it.

The controller is a deployment-scoped actor of the ingress deployment (Ray Serve 2.60's `deployment_actors`):
Serve creates it before the ingress replicas, health-checks and recreates it, and deletes it with the application,
which a detached named actor would outlive. The ingress gets it with `serve.get_deployment_actor`; pool replicas,
which belong to other deployments, look it up by the name Serve gives it.
"""

from __future__ import annotations

import ray
from ray.serve._private.constants import SERVE_DEPLOYMENT_ACTOR_PREFIX

CONTROLLER_ACTOR = "fairness_controller"
INGRESS_DEPLOYMENT = "EquinoxIngress"


def find_controller(app_name: str):
    prefix = f"{SERVE_DEPLOYMENT_ACTOR_PREFIX}{app_name}::{INGRESS_DEPLOYMENT}::"
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(prefix) and actor["name"].endswith(f"::{CONTROLLER_ACTOR}"):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    return None
