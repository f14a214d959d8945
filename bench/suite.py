"""Run a scenario: every policy on every workload of the scenario, through the cluster simulator."""

from __future__ import annotations

from dataclasses import dataclass

from tqdm import tqdm

from bench.scenarios import Scenario
from equinox_ray.serve.config import PolicyConfig
from equinox_ray.serve.policies import make_policy as serve_policy
from equinox_ray.sim import ClusterSim, SimResult
from equinox_ray.workloads.workload import Workload

POLICY_NOTES = {
    "fcfs": "first come, first served",
    "vtc": "VTC (the artifact's counter, input at admission, output per token)",
    "vtc-predict": "VTC charging MoPE's predicted output at admission",
    "equinox": "Equinox, default config (docs/design.md), MoPE, fastest-pool dispatch",
    "equinox-fifo": "ablation: Equinox with each user's queue FIFO (max_overtakes = 0)",
    "equinox-no-slack": "ablation: Equinox with the smallest key always next (slack_tokens = 0)",
    "equinox-no-fresh": "ablation: Equinox without the first turn for users back from idle (fresh_first = false)",
    "equinox-no-pairing": "ablation: Equinox without pairing pools and requests on mixed GPU types",
    "equinox-holistic": "ablation: Equinox with the latency deficit and resource counter on (alpha = beta = 0.5)",
}


# each label is a policy config the Serve application accepts, built by the same factory the controller uses
POLICIES = {
    "fcfs": {"name": "fcfs"},
    "vtc": {"name": "vtc"},
    "vtc-predict": {"name": "vtc-predict"},
    "equinox": {"name": "equinox"},
    "equinox-fifo": {"name": "equinox", "efficiency": {"max_overtakes": 0}},
    "equinox-no-slack": {"name": "equinox", "efficiency": {"slack_tokens": 0.0}},
    "equinox-no-fresh": {"name": "equinox", "efficiency": {"fresh_first": False}},
    "equinox-no-pairing": {"name": "equinox", "efficiency": {"pairing": False}},
    "equinox-holistic": {"name": "equinox", "weights": {"latency": 0.5, "resource": 0.5}},
}


def policy_config(label: str, predictor: str = "mope") -> PolicyConfig:
    if label not in POLICIES:
        raise ValueError(f"unknown policy {label!r}; known: {', '.join(POLICIES)}")
    return PolicyConfig.model_validate({**POLICIES[label], "predictor": predictor})


@dataclass
class Run:
    scenario: Scenario
    workload: Workload
    label: str
    result: SimResult
    config: PolicyConfig


def run_scenario(scenario: Scenario, smoke: bool = False, policies: tuple[str, ...] | None = None,
                 predictor: str = "mope", progress: bool = True,
                 configs: dict[str, PolicyConfig] | None = None, kv_visible: bool = True) -> list[Run]:
    """Every policy label (POLICIES) on every workload; `configs` adds labelled configs of its own (a sweep's);
    `kv_visible` False hides the replicas' free KV cache from the policy (bench/kv_view.py)."""
    runs = []
    labelled = {label: policy_config(label, predictor) for label in policies or scenario.policies}
    labelled.update(configs or {})
    for workload in scenario.workloads(smoke):
        for label, config in labelled.items():
            policy = serve_policy(config, list(workload.users.values()))
            sim = ClusterSim(scenario.pools, policy, max_tokens_cap=scenario.max_tokens_cap, kv_visible=kv_visible)
            with tqdm(total=len(workload.requests), desc=f"{workload.name} {label}", unit="req", leave=False,
                      mininterval=2.0, disable=not progress) as bar:
                result = sim.run(workload, progress=bar.update)
            runs.append(Run(scenario, workload, label, result, config))
    return runs
