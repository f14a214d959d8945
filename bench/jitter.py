"""Equinox against VTC on the suite's scenarios in several seeded draws, each arrival delayed by a random part of
one mean gap between arrivals: the traces keep their shape at every longer scale, and only their coincidences (which
request meets which free slot) are drawn anew. One run of a scenario is one draw of these; this shows which ratios,
and which goals met or missed, hold across draws and which are the coincidences of one. A p99 over a few dozen light
requests (LMSYS has 26) is its slowest request or two, so one draw of it says little. Each row also gives VTC's
own Jain's index, far below 1 where users who asked for little count as backlogged, and the ratio of VTC's windowed
service difference, which counts no user as short of what it did not ask for.

    python -m bench jitter [--scenario lmsys sharegpt-zipf azure-mixed] [--draws 8] [--first-seed 0] [--load 1]
                           [--set efficiency.max_overtakes 0]

`--load`: the arrivals that many times as dense first, as `bench loads` has them. Written to
jitter[-LOADx][-SCENARIOS][-SETTING-VALUE].md and .json (the scenarios named where they are not the default three).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.loads import DEFAULT_SCENARIOS, at_load
from bench.report import GOAL_KEYS, RATIO_ALIGN, RATIO_HEADER, missed_goals, missed_keys, publish, ratio_cells, tally
from bench.scenarios import SCENARIOS
from bench.sweep import add_set_option, set_config, set_flag, set_suffix
from equinox_ray.serve.config import PolicyConfig

RESULTS = Path(__file__).parent / "results"


def jitter(name: str, seeds: range, load: float = 1.0, equinox: PolicyConfig | None = None) -> tuple[list[str], dict]:
    """The scenario's section: a row per draw, then the tally over the draws and how often each goal was missed."""
    rows = [f"| draw | VTC TTFT p50 s | {RATIO_HEADER} | goals missed |", f"|---:|---:|{RATIO_ALIGN}|---|"]
    ratios: dict[str, list[float]] = {key: [] for key in GOAL_KEYS}
    within, misses, draws = [], {key: 0 for key in GOAL_KEYS}, {}
    for seed in seeds:
        vtc, ours, r = at_load(name, load, equinox, jitter_seed=seed)
        missed = missed_goals(name, r, ours)
        for key in GOAL_KEYS:
            ratios[key].append(float(r[key]))
        for key in set(missed_keys(name, r)) & set(GOAL_KEYS):
            misses[key] += 1
        within.append(r["gap_within_bound"])
        draws[seed] = {"vtc": vtc, "equinox": ours, "missed": missed, **r}
        rows.append(f"| {seed} | {vtc['ttft_p50']:.2f} | {ratio_cells(r, vtc, ours)} | {'; '.join(missed) or 'none'} |")
        print(f"{name} {rows[-1]}", flush=True)
    missed_line = "Draws that miss each goal: " + ", ".join(
        f"{key.replace('_', ' ')} {misses[key]} of {len(seeds)}" for key in GOAL_KEYS) + "."
    section = [f"## {name}", "", *tally(ratios, within), "", missed_line, "", *rows, ""]
    return section, {"draws": draws, "missed": misses}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench jitter", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", nargs="+", choices=[s for s in SCENARIOS if s not in ("vtc-suites", "scale")],
                        default=list(DEFAULT_SCENARIOS))
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--load", type=float, default=1.0, help="arrivals this many times as dense first")
    add_set_option(parser)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    seeds = range(args.first_seed, args.first_seed + args.draws)
    equinox = set_config(args.set)
    options = (f" --load {args.load:g}" if args.load != 1.0 else "") + set_flag(args.set)
    lines = [f"# Equinox against VTC across jittered arrivals (`python -m bench jitter --scenario "
             f"{' '.join(args.scenario)} --draws {args.draws} --first-seed {args.first_seed}{options}`)", "",
             __doc__.split("\n\n")[0].replace("\n", " "), "", "Ratios are Equinox over VTC in the same draw.", ""]
    numbers = {}
    for name in args.scenario:
        section, numbers[name] = jitter(name, seeds, args.load, equinox)
        lines += section
    stem = "-".join(["jitter", *([f"{args.load:g}x"] if args.load != 1.0 else []),
                     *(sorted(args.scenario) if sorted(args.scenario) != sorted(DEFAULT_SCENARIOS) else [])])
    stem += set_suffix(args.set)
    publish("\n".join(lines), args.out, f"{stem}.md")
    (args.out / f"{stem}.json").write_text(json.dumps(numbers, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
