"""Run a scenario: every policy on every workload of the scenario, through the cluster simulator."""

from __future__ import annotations

from dataclasses import dataclass

from tqdm import tqdm

from bench.scenarios import Scenario
from equinox_ray.fairness import Policy, User
from equinox_ray.serve.config import PolicyConfig
from equinox_ray.serve.policies import make_policy as serve_policy
from equinox_ray.sim import ClusterSim, SimResult
from equinox_ray.workloads.workload import Workload

POLICY_NOTES = {
    "fcfs": "first come, first served",
    "vtc": "VTC (the artifact's counter, input at admission, output per token)",
    "vtc-predict": "VTC charging MoPE's predicted output at admission",
    "equinox": "Equinox, default weights (alpha = beta = 0.5), MoPE, fastest-pool dispatch",
    "equinox-no-latency": "ablation: Equinox with alpha = 0 (no latency deficit)",
    "equinox-no-resource": "ablation: Equinox with beta = 0 (no resource counter)",
}


# each label is a policy config the Serve application accepts, built by the same factory the controller uses
POLICIES = {
    "fcfs": {"name": "fcfs"},
    "vtc": {"name": "vtc"},
    "vtc-predict": {"name": "vtc-predict"},
    "equinox": {"name": "equinox"},
    "equinox-no-latency": {"name": "equinox", "weights": {"latency": 0.0}},
    "equinox-no-resource": {"name": "equinox", "weights": {"resource": 0.0}},
}


def make_policy(label: str, users: list[User], predictor: str = "mope") -> Policy:
    if label not in POLICIES:
        raise ValueError(f"unknown policy {label!r}; known: {', '.join(POLICIES)}")
    return serve_policy(PolicyConfig.model_validate({**POLICIES[label], "predictor": predictor}), users)


@dataclass
class Run:
    scenario: Scenario
    workload: Workload
    label: str
    result: SimResult


def run_scenario(scenario: Scenario, smoke: bool = False, policies: tuple[str, ...] | None = None,
                 predictor: str = "mope", progress: bool = True) -> list[Run]:
    runs = []
    for workload in scenario.workloads(smoke):
        for label in policies or scenario.policies:
            policy = make_policy(label, list(workload.users.values()), predictor)
            sim = ClusterSim(scenario.pools, policy, max_tokens_cap=scenario.max_tokens_cap)
            with tqdm(total=len(workload.requests), desc=f"{workload.name} {label}", unit="req", leave=False,
                      mininterval=2.0, disable=not progress) as bar:
                result = sim.run(workload, progress=bar.update)
            runs.append(Run(scenario, workload, label, result))
    return runs
