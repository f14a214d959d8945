"""Equinox against VTC at other loads than the suite's: each scenario's workload with its arrivals sped up or
slowed down by a factor (1.3: the same requests in 1/1.3 of the time; 0.7: spread over 1/0.7 of it), both policies
in the same simulated run. The suite measures one load per scenario, and what the mechanisms buy depends on how
deep the queues get, so this shows where its ratios hold and where they do not. Each row names the goals of the
beat-VTC issue it misses; VTC's own TTFT p50 and p99 say how loaded the row is, and VTC's own Jain's index how
far from 1 that index is where users who asked for little count as backlogged (the service difference, VTC's
metric, counts no user as short of what it did not ask for).

    python -m bench loads [--scenario lmsys sharegpt-zipf azure-mixed] [--factors 0.7 0.85 1 1.15 1.3]
                          [--set efficiency.max_overtakes 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from bench.report import RATIO_ALIGN, RATIO_HEADER, against_vtc, goal_ratios, missed_goals, publish, ratio_cells
from bench.scenarios import SCENARIOS
from bench.sweep import add_set_option, set_config, set_flag, set_suffix
from equinox_ray.serve.config import PolicyConfig

RESULTS = Path(__file__).parent / "results"
DEFAULT_SCENARIOS = ("lmsys", "sharegpt-zipf", "azure-mixed")
DEFAULT_FACTORS = (0.7, 0.85, 1.0, 1.15, 1.3)


def at_load(name: str, factor: float, equinox: PolicyConfig | None = None,
            jitter_seed: int | None = None) -> tuple[dict, dict, dict]:
    """VTC's and Equinox's metrics on the scenario's workload with arrivals `factor` times as dense, and the ratios;
    `equinox`: the config Equinox runs with (its defaults where None); `jitter_seed`: each arrival delayed by a random
    part of one mean gap (`Workload.jittered`)."""
    scenario = SCENARIOS[name]
    workload = scenario.workloads(False)[0]
    if factor != 1.0:
        workload = workload.compressed(factor)
    if jitter_seed is not None:
        workload = workload.jittered(jitter_seed)
    scaled = dataclasses.replace(scenario, workloads=lambda smoke: [workload])
    runs = against_vtc(scaled, equinox)
    return runs["vtc"], runs["equinox"], goal_ratios(runs["equinox"], runs["vtc"])


def loads(scenarios: list[str], factors: list[float], setting: list[str] | None = None) -> tuple[str, dict]:
    equinox = set_config(setting)
    lines = [f"| scenario | load | VTC TTFT p50 s | VTC TTFT p99 s | {RATIO_HEADER} | goals missed |",
             f"|---|---:|---:|---:|{RATIO_ALIGN}|---|"]
    numbers: dict[str, dict] = {}
    for name in scenarios:
        for factor in factors:
            vtc, ours, r = at_load(name, factor, equinox)
            missed = missed_goals(name, r, ours)
            numbers.setdefault(name, {})[f"{factor:g}"] = {"vtc": vtc, "equinox": ours, "missed": missed,
                                                           **{k: v for k, v in r.items() if k != "wall_time"}}
            lines.append(f"| {name} | {factor:g}x | {vtc['ttft_p50']:.2f} | {vtc['ttft_p99']:.2f} | "
                         f"{ratio_cells(r, vtc, ours)} | {'; '.join(missed) or 'none'} |")
            print(lines[-1], flush=True)
    command = (f"python -m bench loads --scenario {' '.join(scenarios)} --factors "
               f"{' '.join(f'{f:g}' for f in factors)}{set_flag(setting)}")
    text = "\n".join([f"# Equinox against VTC at other loads (`{command}`)", "",
                      __doc__.split("\n\n")[0].replace("\n", " "), "", *lines]) + "\n"
    return text, numbers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench loads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", nargs="+", choices=[s for s in SCENARIOS if s != "vtc-suites"],
                        default=list(DEFAULT_SCENARIOS))
    parser.add_argument("--factors", nargs="+", type=float, default=list(DEFAULT_FACTORS))
    add_set_option(parser)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    text, numbers = loads(args.scenario, args.factors, args.set)
    stem = f"loads{set_suffix(args.set)}"
    publish(text, args.out, f"{stem}.md")
    (args.out / f"{stem}.json").write_text(json.dumps(numbers, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
