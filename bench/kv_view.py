"""What the policy loses when it cannot see the replicas' free KV cache, as on the Serve path before its engines
reported their KV cache's size.

The policy is told how many KV-cache tokens each replica has not promised, and a request is granted only where its
prompt plus max_tokens fits. Without that, the policy sees free slots alone and a request that does not fit waits
inside the replica's engine, out of the fair queue. This runs VTC and Equinox both ways on the simulated scenarios
and prints each one's metrics, and Equinox's ratios to VTC in each view.

    python -m bench kv-view [--scenario lmsys sharegpt-zipf azure-mixed]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.report import goal_ratios, metrics, publish
from bench.scenarios import SCENARIOS
from bench.suite import run_scenario

RESULTS = Path(__file__).parent / "results"
DEFAULT_SCENARIOS = ("lmsys", "sharegpt-zipf", "azure-mixed")
VIEWS = {True: "free slots and KV", False: "free slots only"}


def kv_view(scenarios: list[str]) -> str:
    lines = [f"# The policy's view of the KV cache (`python -m bench kv-view --scenario {' '.join(scenarios)}`)", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             "| scenario | policy | the policy sees | steady tokens/s | TTFT p50 s | TTFT p99 s | light TTFT p99 s | "
             "Jain | Equinox over VTC: steady throughput, TTFT p50, p99, light p99, Jain |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for name in scenarios:
        for visible, seen in VIEWS.items():
            rows = {run.label: metrics(run) for run in run_scenario(SCENARIOS[name], policies=("vtc", "equinox"),
                                                                    kv_visible=visible)}
            r = goal_ratios(rows["equinox"], rows["vtc"])
            for label, m in rows.items():
                ratios = (f"{r['steady_throughput']:.3f}x, {r['ttft_p50']:.2f}x, {r['ttft_p99']:.2f}x, "
                          f"{r['light_ttft_p99']:.2f}x, {r['jain']:.3f}x" if label == "equinox" else "")
                lines.append(f"| {name} | {label} | {seen} | {m['steady_throughput']:,.0f} | {m['ttft_p50']:.2f} | "
                             f"{m['ttft_p99']:.2f} | {m['light_ttft_p99']:.2f} | {m['jain']:.3f} | {ratios} |")
            print("\n".join(lines[-2:]), flush=True)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench kv-view", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", nargs="+", choices=list(SCENARIOS), default=list(DEFAULT_SCENARIOS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    publish(kv_view(args.scenario), args.out, "kv-view.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
