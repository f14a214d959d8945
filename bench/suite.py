"""Run a scenario: every policy on every workload of the scenario, through the cluster simulator."""

from __future__ import annotations

from dataclasses import dataclass

from tqdm import tqdm

from bench.scenarios import Scenario
from equinox_ray.fairness import FCFS, VTC, Equinox, EquinoxWeights, MovingAveragePredictor, Policy, User
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


def make_predictor(kind: str):
    if kind == "moving-average":
        return MovingAveragePredictor()
    from equinox_ray.mope.predictor import MoPE
    from predictors.train import DEFAULT_MODELS

    return MoPE(DEFAULT_MODELS)


def make_policy(label: str, users: list[User], predictor: str = "mope") -> Policy:
    if label == "fcfs":
        return FCFS(users)
    if label == "vtc":
        return VTC(users)
    if label == "vtc-predict":
        return VTC(users, predictor=make_predictor(predictor))
    weights = {"equinox": EquinoxWeights(), "equinox-no-latency": EquinoxWeights(latency=0.0),
               "equinox-no-resource": EquinoxWeights(resource=0.0)}
    if label not in weights:
        raise ValueError(f"unknown policy {label!r}; known: {', '.join(POLICY_NOTES)}")
    return Equinox(users, weights=weights[label], predictor=make_predictor(predictor))


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
