"""The benchmark suite.

    python -m bench suite [--scenario NAME ...] [--smoke]   simulated scenarios: tables and plots in bench/results/
    python -m bench overhead                               scheduling decisions/s of the fairness core
    python -m bench real [--scenario vtc-overload lmsys] [--rounds 3] [--policies vtc equinox]   the real path
    python -m bench real --jain-windows RECORDS            Jain's index at 2, 5, 10 s windows from a run's records
    python -m bench real --pooled RECORDS ...              every round of past runs: how often Equinox beat VTC
    python -m bench real --paired [--scenario lmsys] [--rounds 12]  VTC and Equinox at the same time, swapped
    python -m bench path [--smoke]                         the serving path's cost against the engine alone
    python -m bench soak [--minutes 10] [--load 2.0]       three users at twice the capacity (bench/soak.py)
    python -m bench faults                                 kill -9 under load: pool replica, engine, controller
    python -m bench churn [--cycles 3]                     a pool scaling up and down under load loses nothing
    python -m bench peers                                  vllm bench serve and guidellm, ours against vLLM's server
    python -m bench sweep SETTING VALUE ...                one policy setting at several values against VTC
    python -m bench kv-view [--scenario NAME ...]          VTC and Equinox with and without the replicas' free KV
    python -m bench ceiling [--scenario NAME ...]          steady throughput placement can buy on mixed GPU types
    python -m bench generalize [--draws 24]                Equinox against VTC on random workloads and clusters
    python -m bench loads [--factors 0.7 0.85 1 1.15 1.3]  Equinox against VTC at other loads of the scenarios
    python -m bench jitter [--draws 8]                     the same, across draws of jittered arrivals
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PLOTTED_SUITES = {"overload", "on-off-overload", "poisson-short-long-2"}
OWN_OPTIONS = {  # the commands that parse their own options (python -m bench NAME --help): module, what it does
    "soak": ("bench.soak", "three users at twice the capacity"),
    "faults": ("bench.faults", "kill -9 under load"),
    "churn": ("bench.churn", "autoscaling under load"),
    "sweep": ("bench.sweep", "one policy setting at several values against VTC"),
    "peers": ("bench.peers", "peer load generators against us and vLLM"),
    "kv-view": ("bench.kv_view", "the policy with and without the replicas' free KV"),
    "ceiling": ("bench.ceiling", "steady throughput placement can buy"),
    "generalize": ("bench.generalize", "Equinox against VTC on random workloads"),
    "loads": ("bench.loads", "Equinox against VTC at other loads"),
    "jitter": ("bench.jitter", "Equinox against VTC across jittered arrivals"),
}


def write_scenario(name: str, smoke: bool, out: Path, predictor: str) -> Path:
    from bench.plots import plot_all
    from bench.report import metrics, placement_table, rows_table
    from bench.scenarios import SCENARIOS
    from bench.suite import POLICY_NOTES, run_scenario
    from equinox_ray.engines.gpu_profiles import StepModel

    scenario = SCENARIOS[name]
    started = time.perf_counter()
    runs = run_scenario(scenario, smoke=smoke, predictor=predictor)
    by_workload = defaultdict(list)
    for run in runs:
        by_workload[run.workload.name].append(run)
    pools = ", ".join(f"{p.replicas} x {p.gpu} ({p.model}, window {p.max_num_seqs}, cost {p.cost_weight:g}, nominal "
                      f"prefill {f.prefill_tps:,.0f} tokens/s and decode {f.decode_tps:.1f} tokens/s per sequence, "
                      f"KV cache {StepModel.of(p.gpu, p.model).kv_capacity_tokens:,} tokens)"
                      for p, f in ((p, p.facts()) for p in scenario.pools))
    lines = [f"# {scenario.title}{' (smoke)' if smoke else ''}", "",
             f"Simulated with `python -m bench suite --scenario {name}{' --smoke' if smoke else ''}`: "
             f"{pools}. Arrival times divided by {scenario.time_scale:.2f}; client max_tokens "
             f"{scenario.max_tokens_cap or 'the true length (VTC artifact)'}; windows of "
             f"{scenario.metrics_window_s:.1f} s. Predictor: {predictor}.", "",
             "Policies: " + "; ".join(f"`{p}` {POLICY_NOTES[p]}" for p in scenario.policies) + ".", "",
             "TTFT and end-to-end latency count from arrival. Light users: the quarter of users with the least "
             "weighted demand. Counter gap: the largest difference of the policy's key between backlogged users, "
             "sampled every simulated second; bound: the one docs/design.md claims.", ""]
    numbers = {}
    for workload, wruns in by_workload.items():
        n = len(wruns[0].workload.requests)
        numbers[workload] = {r.label: metrics(r) for r in wruns}
        lines += [f"## {workload} ({n:,} requests)", "", rows_table(numbers[workload]), ""]
        lines.append("Wall time per run: " + ", ".join(
            f"{r.label} {r.result.wall_s:.1f} s ({n / r.result.wall_s:,.0f} simulated requests/s)" for r in wruns))
        lines.append(f"Requests cut to fit the model context or the client's max_tokens: {wruns[0].result.truncated:,}.")
        lines.append("")
        if len({p.gpu for p in scenario.pools}) > 1:
            shown = [r for r in wruns if r.label in ("vtc", "equinox", "equinox-no-pairing")]
            lines += ["Where the requests ran (VTC, Equinox and Equinox without pairing):", "",
                      placement_table(shown), ""]
        if name != "vtc-suites" or workload in PLOTTED_SUITES:
            for path in plot_all(wruns, out, f"{name}-{workload}" if name == "vtc-suites" else name):
                lines.append(f"![{path.stem}]({path.name})")
            lines.append("")
    lines.append(f"Total wall time: {time.perf_counter() - started:.0f} s.")
    path = out / f"{name}{'-smoke' if smoke else ''}.md"
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps({"title": scenario.title, "workloads": numbers}, indent=1))
    return path


def write_summary(out: Path, smoke: bool = False) -> Path:
    """One row per scenario (and VTC suite): Equinox's ratios to VTC in the same run, the goals it misses, and
    summary.json with the same ratios, from the scenarios' JSON."""
    from bench.report import goal_ratios, missed_goals, yes_no
    from bench.scenarios import SCENARIOS

    lines = ["| scenario | workload | steady throughput | TTFT p50 | TTFT p99 | light TTFT p99 | Jain | "
             "pair gap within bound | wall time | goals missed |", "|---|---|---:|---:|---:|---:|---:|---|---:|---|"]
    summary = {}
    for name in SCENARIOS:
        path = out / f"{name}{'-smoke' if smoke else ''}.json"
        if not path.exists():
            continue
        for workload, rows in json.loads(path.read_text())["workloads"].items():
            if not ("equinox" in rows and "vtc" in rows):
                continue
            r = goal_ratios(rows["equinox"], rows["vtc"])
            missed = missed_goals(name, r, rows["equinox"])
            summary[name if name != "vtc-suites" else f"{name}/{workload}"] = {**r, "missed": missed}
            lines.append(f"| {name} | {workload} | {r['steady_throughput']:.2f}x | {r['ttft_p50']:.2f}x | "
                         f"{r['ttft_p99']:.2f}x | {r['light_ttft_p99']:.2f}x | {r['jain']:.3f}x | "
                         f"{yes_no(r['gap_within_bound'])} | {r['wall_time']:.2f}x | "
                         f"{'; '.join(missed) or 'none'} |")
    path = out / f"summary{'-smoke' if smoke else ''}.md"
    intro = ("Equinox's ratios to VTC in the same run (`python -m bench suite`); the last column names every goal of "
             "the beat-VTC issue this row misses. Wall time is the simulator's, Equinox over VTC (the goal is for the "
             "scale run). Jain n/a: no user waited past the minimum wait, so no window counts.")
    path.write_text(intro + "\n\n" + "\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    return path


def main(argv: list[str] | None = None) -> None:
    from bench.scenarios import SCENARIOS

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in OWN_OPTIONS:
        sys.exit(importlib.import_module(OWN_OPTIONS[argv[0]][0]).main(argv[1:]))
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    suite = sub.add_parser("suite", help="simulated scenarios")
    suite.add_argument("--scenario", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    suite.add_argument("--smoke", action="store_true", help="small workloads, seconds per scenario")
    suite.add_argument("--predictor", choices=["mope", "moving-average"], default="mope")
    suite.add_argument("--out", type=Path, default=RESULTS)
    sub.add_parser("overhead", help="decisions/s of the fairness core")
    real = sub.add_parser("real", help="the real Serve + vLLM CPU path")
    real.add_argument("--scenario", nargs="+", choices=["vtc-overload", "lmsys"], default=["vtc-overload", "lmsys"])
    real.add_argument("--rounds", type=int, default=3, help="alternating rounds of the policies (medians shown)")
    real.add_argument("--policies", nargs="+", default=None, help="the rows (default: fcfs vtc equinox "
                      "equinox-fifo); with fewer, each round is shorter, so VTC and Equinox run closer together")
    real.add_argument("--out", type=Path, default=RESULTS)
    real.add_argument("--jain-windows", type=Path, metavar="RECORDS", help="run nothing: recompute Jain's index at "
                      "longer windows from a past run's kept records (a file name in --out, or a path)")
    real.add_argument("--pooled", type=Path, nargs="+", metavar="RECORDS", help="run nothing: Equinox against VTC "
                      "in every round of past runs' kept records, per run and pooled, with a sign test (one run: "
                      "<stem>-rounds.md)")
    real.add_argument("--paired", action="store_true", help="VTC and Equinox at the same time on two copies of "
                      "the app, swapped every round (bench/real_paired.py)")
    path = sub.add_parser("path", help="the serving path's CPU, throughput and latency")
    path.add_argument("--smoke", action="store_true", help="short loads, under 2 minutes")
    path.add_argument("--out", type=Path, default=RESULTS)
    for name, (_, does) in OWN_OPTIONS.items():
        sub.add_parser(name, help=f"{does}: python -m bench {name} --help")
    args = parser.parse_args(argv)
    if args.command == "suite":
        args.out.mkdir(parents=True, exist_ok=True)
        for name in args.scenario:
            path = write_scenario(name, args.smoke, args.out, args.predictor)
            print(path.read_text())
            print(f"written: {path}", file=sys.stderr)
        print(write_summary(args.out, args.smoke).read_text())
    elif args.command == "path":
        from bench.path import main as path_main

        path_main(args.smoke, args.out)
    elif args.command == "overhead":
        from bench.decisions import main as overhead

        overhead()
    elif args.jain_windows:
        from bench.real_rounds import jain_windows_from_records

        jain_windows_from_records(_kept(args.jain_windows, args.out), args.out)
    elif args.pooled:
        from bench.real_rounds import pooled

        pooled([_kept(p, args.out) for p in args.pooled], args.out)
    elif args.paired:
        from bench.real_paired import main as paired_main

        for name in args.scenario:
            paired_main(name, args.out, args.rounds)
    else:
        from bench.real_engine import POLICIES as REAL_POLICIES, main as real_main

        real_main(args.scenario, args.out, args.rounds, tuple(args.policies or REAL_POLICIES))


def _kept(records: Path, out: Path) -> Path:
    """A run's kept records: a path, or a file name in --out."""
    return records if records.exists() else out / records


if __name__ == "__main__":
    main()
