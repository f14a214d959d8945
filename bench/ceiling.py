"""How much steady throughput the policy's placement can buy on mixed GPU types, against VTC in the same run.

Four policies on each mixed-cluster scenario: VTC; Equinox as configured by default; Equinox told every request's
true output length for its queue order and pairing (`true lengths`: what a perfect predictor would give); and
Equinox pairing free pools with requests with no fairness limit on whom it picks (`unbounded`: slack without end,
64 candidate users, bands of 0), which is what pairing can do at most when fairness does not constrain it. Per
policy: steady tokens/s and its ratio to VTC, TTFT p50 and p99, and each pool's mean requests in flight per replica
while requests arrive, against its window (max_num_seqs).

    python -m bench ceiling [--scenario azure-mixed scale]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.report import metrics, publish
from bench.scenarios import SCENARIOS, Scenario
from bench.suite import Run, policy_config
from equinox_ray.fairness import Equinox, Outcome, Request
from equinox_ray.serve.config import PolicyConfig
from equinox_ray.serve.policies import make_policy
from equinox_ray.sim import ClusterSim, scheduler_view
from equinox_ray.workloads.workload import Workload

RESULTS = Path(__file__).parent / "results"
DEFAULT_SCENARIOS = ("azure-mixed", "scale")
UNBOUNDED = PolicyConfig.model_validate({"name": "equinox", "predictor": "mope", "efficiency": {
    "slack_tokens": 1e12, "candidates": 64, "pairing_band": 0.0}})


class TrueLengths:
    """The output each request will really have, as its simulated replica runs it."""

    def __init__(self, truth: dict[str, int]) -> None:
        self.truth = truth

    def output_tokens(self, request: Request) -> float:
        return float(self.truth[request.id])

    def observe(self, outcome: Outcome) -> None:
        pass


def run_policy(scenario: Scenario, workload: Workload, label: str, config: PolicyConfig,
               true_lengths: bool = False) -> Run:
    policy = make_policy(config, list(workload.users.values()))
    if true_lengths:
        assert isinstance(policy, Equinox)
        requests, truth, _ = scheduler_view(workload, scenario.pools, scenario.max_tokens_cap)
        policy.lengths = TrueLengths(dict(zip((r.id for r in requests), truth)))
    result = ClusterSim(scenario.pools, policy, max_tokens_cap=scenario.max_tokens_cap).run(workload)
    return Run(scenario, workload, label, result, config)


def occupancy(run: Run) -> str:
    """Each pool's mean requests in flight per replica between the first and last arrival, of its window."""
    records = run.result.records
    start, end = min(r.arrival for r in records), max(r.arrival for r in records)
    cells = []
    for pool in run.scenario.pools:
        held = sum(max(0.0, min(r.finish, end) - max(r.granted, start)) for r in records if r.pool == pool.name)
        cells.append(f"{pool.name} {held / (end - start) / pool.replicas:.1f} of {pool.max_num_seqs}")
    return ", ".join(cells)


def ceiling(scenarios: list[str]) -> str:
    lines = [f"# What placement can buy (`python -m bench ceiling --scenario {' '.join(scenarios)}`)", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             "| scenario | policy | steady tokens/s | over VTC | TTFT p50 s | TTFT p99 s | "
             "in flight per replica while requests arrive |",
             "|---|---|---:|---:|---:|---:|---|"]
    for name in scenarios:
        scenario = SCENARIOS[name]
        for workload in scenario.workloads(False):
            runs = [run_policy(scenario, workload, "vtc", policy_config("vtc")),
                    run_policy(scenario, workload, "equinox", policy_config("equinox")),
                    run_policy(scenario, workload, "equinox, true lengths", policy_config("equinox"), True),
                    run_policy(scenario, workload, "equinox, unbounded pairing", UNBOUNDED)]
            vtc = metrics(runs[0])["steady_throughput"]
            for run in runs:
                m = metrics(run)
                lines.append(f"| {workload.name} | {run.label} | {m['steady_throughput']:,.0f} | "
                             f"{m['steady_throughput'] / vtc:.3f}x | {m['ttft_p50']:.2f} | {m['ttft_p99']:.2f} | "
                             f"{occupancy(run)} |")
                print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", nargs="+", choices=list(SCENARIOS), default=list(DEFAULT_SCENARIOS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    publish(ceiling(args.scenario), args.out, "ceiling.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
