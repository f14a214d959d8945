"""Equinox against VTC on random workloads and clusters that no vendored trace shaped.

Each draw (seeded) picks a cluster (one A100 pool, or a random mix of H100, A100 and L4 pools), a number of users
with weights 1, 2 or 4, and a workload from `equinox_ray.workloads.random_mix`: every user has its own log-normal
prompt and output lengths, its own share of the requests and its own arrival process (Poisson, bursty or on/off).
Arrivals are spread so that the nominal load (the pools' nominal speeds against the workload's mean lengths) is
drawn from 0.7 to 1.6. Both policies run in the simulator with their defaults; the table gives Equinox's ratios to
VTC on the goals' metrics for every draw, then how many draws each metric went Equinox's way.

    python -m bench generalize [--draws 24] [--requests 4000] [--set efficiency.max_passes 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.report import GOAL_KEYS, RATIO_ALIGN, RATIO_HEADER, against_vtc, goal_ratios, publish, ratio_cells, tally
from bench.scenarios import Scenario, pool
from bench.sweep import add_set_option, set_config, set_flag, set_suffix
from equinox_ray.sim import PoolSpec
from equinox_ray.workloads.random_mix import random_workload
from equinox_ray.workloads.workload import Workload

RESULTS = Path(__file__).parent / "results"
WINDOW_S = 5.0
MAX_TOKENS = 1024


def random_cluster(rng: np.random.Generator) -> tuple[PoolSpec, ...]:
    if rng.random() < 0.4:
        return (pool("a100", "A100", int(rng.integers(1, 3))),)
    while True:
        counts = {"h100": int(rng.integers(0, 3)), "a100": int(rng.integers(0, 5)), "l4": int(rng.integers(0, 9))}
        if sum(n > 0 for n in counts.values()) >= 2 and counts["h100"] + counts["a100"] > 0:
            break
    gpus = {"h100": ("H100", 32), "a100": ("A100", 32), "l4": ("L4", 16)}
    return tuple(pool(name, gpus[name][0], n, max_num_seqs=gpus[name][1]) for name, n in counts.items() if n)


def nominal_capacity(pools: tuple[PoolSpec, ...], workload: Workload) -> float:
    """Requests/s the pools serve at their nominal speeds, each slot busy with a request of mean lengths."""
    prompt = float(np.mean([r.prompt_tokens for r in workload.requests]))
    output = float(np.mean([min(r.output_tokens, MAX_TOKENS) for r in workload.requests]))
    total = 0.0
    for spec in pools:
        facts = spec.facts()
        total += spec.replicas * spec.max_num_seqs / (prompt / facts.prefill_tps + output / facts.decode_tps)
    return total


def draw(seed: int, n_requests: int) -> tuple[Scenario, float]:
    rng = np.random.default_rng(seed)
    pools = random_cluster(rng)
    n_users, load = int(rng.integers(4, 61)), float(rng.uniform(0.7, 1.6))
    workload = random_workload(seed, n_users, n_requests, duration=1000.0, name=f"random-{seed}")
    span = n_requests / (load * nominal_capacity(pools, workload))
    workload = workload.compressed(workload.duration_s / span)
    cluster = " + ".join(f"{p.replicas} {p.gpu}" for p in pools)
    return Scenario(f"random-{seed}", cluster, pools, lambda smoke, w=workload: [w], 1.0, MAX_TOKENS, WINDOW_S,
                    ("vtc", "equinox")), load


def generalize(draws: int, n_requests: int, first_seed: int, setting: list[str] | None = None) -> str:
    """`setting`: one Equinox setting and its value, as `--set` takes them (Equinox's defaults where None)."""
    equinox = set_config(setting)
    lines = [f"| seed | cluster | users | nominal load | {RATIO_HEADER} |", f"|---:|---|---:|---:|{RATIO_ALIGN}|"]
    ratios: dict[str, list[float]] = {key: [] for key in GOAL_KEYS}
    within = []
    for seed in range(first_seed, first_seed + draws):
        scenario, load = draw(seed, n_requests)
        runs = against_vtc(scenario, equinox)
        r = goal_ratios(runs["equinox"], runs["vtc"])
        for key in GOAL_KEYS:
            ratios[key].append(float(r[key]))
        within.append(r["gap_within_bound"])
        workload = scenario.workloads(False)[0]
        lines.append(f"| {seed} | {scenario.title} | {len(workload.users)} | {load:.2f} | "
                     f"{ratio_cells(r, runs['vtc'], runs['equinox'])} |")
        print(lines[-1], flush=True)
    summary = tally(ratios, within)
    return "\n".join([f"# Equinox against VTC on random workloads (`python -m bench generalize{set_flag(setting)} --draws {draws} "
                      f"--requests {n_requests}`)", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
                      f"Client max_tokens {MAX_TOKENS}; windows of {WINDOW_S:g} s; ratios are Equinox over VTC.", "",
                      *summary, "", *lines]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench generalize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=24)
    parser.add_argument("--requests", type=int, default=4000, help="requests per draw")
    parser.add_argument("--first-seed", type=int, default=1000)
    add_set_option(parser)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    text = generalize(args.draws, args.requests, args.first_seed, args.set)
    publish(text, args.out, f"generalize{set_suffix(args.set)}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
