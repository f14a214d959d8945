"""Past runs of `python -m bench real`, read again from the records they kept (`<stem>-records.jsonl.gz`).

    python -m bench real --jain-windows RECORDS        Jain's index at 2, 5 and 10 s windows, Equinox over VTC
    python -m bench real --pooled RECORDS RECORDS ...  every round of several runs: how often Equinox was the better
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import math
from pathlib import Path

from bench.real_engine import MIN_WAIT_S, WORKLOADS, jain_at_long_windows, jain_windows_table, pace
from bench.report import GOAL_KEYS, better, goal_ratios, mean_jain, publish, record_metrics, sign_test_p
from equinox_ray.fairness.metrics import CompletionRecord, windowed_service


def kept_rounds(path: Path) -> dict[str, dict[str, list[list[CompletionRecord]]]]:
    """Per scenario, per policy, each round's completion records, in round order."""
    with gzip.open(path, "rt") as f:
        kept = [json.loads(line) for line in f]
    fields = {f.name for f in dataclasses.fields(CompletionRecord)}
    rounds: dict[str, dict[str, list[list[CompletionRecord]]]] = {}
    for name, rows in itertools.groupby(kept, key=lambda r: r["scenario"]):
        for (_, policy), group in itertools.groupby(rows, key=lambda r: (r["round"], r["policy"])):
            records = [CompletionRecord(**{k: v for k, v in r.items() if k in fields}) for r in group]
            rounds.setdefault(name, {}).setdefault(policy, []).append(records)
    return rounds


def jain_windows_from_records(path: Path, out: Path) -> Path:
    """The Jain's-index table of a past run, recomputed from its kept records, so that runs made before the table
    existed can be read at the longer windows too."""
    sections = []
    for name, by_policy in kept_rounds(path).items():
        workload, _, window_s = WORKLOADS[name][0](), *WORKLOADS[name][1:]
        runs = {policy: [{"jain": mean_jain(windowed_service(records, workload.users, window_s, min_wait_s=MIN_WAIT_S)),
                          **jain_at_long_windows(records, workload)} for records in rounds]
                for policy, rounds in by_policy.items()}
        sections += [f"## {name}", "", jain_windows_table(runs, window_s), ""]
    stem = path.name.removesuffix("-records.jsonl.gz")
    text = "\n".join([f"# Jain's index at longer windows: {stem}", "",
                      f"Recomputed from `{path.name}` with `python -m bench real --jain-windows {path.name}`: each "
                      f"round's Jain's index (a user counts as backlogged in a window if a request waited over "
                      f"{MIN_WAIT_S:g} s), Equinox over VTC.", "", *sections])
    return publish(text, out, f"{stem}-jain-windows.md")


def pooled(paths: list[Path], out: Path) -> Path:
    """Equinox over VTC in every round of the given runs, per run and pooled: in how many rounds Equinox was the
    better on each goal metric, the sign test's p for that split, and how the engines' pace went: in how many
    rounds Equinox's engine was the faster, and in how many the faster engine's policy had the lower TTFT p50."""
    header = ("| run | scenario | rounds | " + " | ".join(k.replace("_", " ") for k in GOAL_KEYS)
              + " | Equinox's engine the faster | the faster engine's policy had the lower TTFT p50 |")
    lines = [header, "|---|---|---:|" + "---:|" * (len(GOAL_KEYS) + 2)]
    total = {key: [0, 0] for key in GOAL_KEYS}  # Equinox better, rounds with the metric defined
    for path in paths:
        for name, by_policy in kept_rounds(path).items():
            workload, _, window_s = WORKLOADS[name][0](), *WORKLOADS[name][1:]
            rounds = list(zip(by_policy["equinox"], by_policy["vtc"]))
            pairs = [goal_ratios(*(record_metrics(records, workload, window_s, min_wait_s=MIN_WAIT_S)
                                   for records in pair)) for pair in rounds]
            cells = []
            for key in GOAL_KEYS:
                defined = [r[key] for r in pairs if not math.isnan(r[key])]
                wins = sum(better(key, r) > 0 for r in defined)
                total[key][0] += wins
                total[key][1] += len(defined)
                cells.append(f"{wins} of {len(defined)}")
            paces = [(pace(eq), pace(vtc)) for eq, vtc in rounds]
            uneven = [(p, r["ttft_p50"]) for p, r in zip(paces, pairs) if p[0] != p[1] and r["ttft_p50"] != 1]
            faster_won = sum((p[0] < p[1]) == (ratio < 1) for p, ratio in uneven)
            cells += [f"{sum(eq < vtc for eq, vtc in paces)} of {len(paces)}", f"{faster_won} of {len(uneven)}"]
            lines.append(f"| `{path.name.removesuffix('-records.jsonl.gz')}` | {name} | {len(pairs)} | "
                         + " | ".join(cells) + " |")
    lines.append("| pooled | | | " + " | ".join(f"{b} of {n}" for b, n in total.values()) + " | | |")
    lines.append("| sign test, two-sided p | | | " + " | ".join(f"{sign_test_p(b, n):.3f}" for b, n in total.values())
                 + " | | |")
    text = "\n".join(["# Equinox against VTC on the real path, every round pooled", "",
                      "`python -m bench real --pooled " + " ".join(p.name for p in paths) + "`: in each round VTC "
                      "and Equinox ran back to back (`bench real`) or at once (`bench real --paired`); a cell counts "
                      "the rounds where Equinox was the better on that metric (recomputed from each run's kept "
                      "records). The sign test's row is the chance of a split at least as uneven if the two were "
                      "equal. An engine's pace is its mean time from first token to finish in the round.", "", *lines])
    name = "real-engine-pooled.md" if len(paths) > 1 else paths[0].name.replace("-records.jsonl.gz", "-rounds.md")
    return publish(text + "\n", out, name)
