"""Scenarios 1 and 2 on the real path: the whole Ray Serve application with a vLLM CPU replica of the tiny model,
driven over HTTP by a load generator that replays the arrival times and users (`http_replay.py`). The table's
columns are measured by the controller (its completion records), not simulated.

Scaling, since one 2-core CPU replica is some 100 times slower than an A100: lengths are capped at 512 prompt and
256 output tokens (the tiny model's context is 1,024), and arrival times are compressed so that the replica is
overloaded, as the scenarios intend. The compression comes from the replica's capacity, measured first with a closed
loop of the workload's own requests: the arrivals ask for a set multiple of it (the load), so that the run means the
same on a fast machine and a slow one. Each policy runs on the same deployment, switched through the admin API.

The policies run in alternating rounds, each round in a rotated order, and the table shows each metric's median over
the rounds: on a shared two-core machine the same closed loop has measured from 47 to 73 requests/s within an hour,
so one run per policy compares the machine's moods as much as the policies. Equinox's ratios to VTC in each round
are listed below the table, so that the spread is seen.

    python -m bench real [--scenario vtc-overload lmsys] [--rounds 3] [--policies vtc equinox]
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np

from bench import cpu
from bench.report import GOAL_KEYS, better, goal_ratios, mean_jain, record_metrics, rows_table, sign_test_p
from bench.suite import POLICIES as SUITE_POLICIES  # each row's config, as the admin API takes it
from equinox_ray.fairness.metrics import CompletionRecord, windowed_service
from equinox_ray.workloads import synthetic, traces
from equinox_ray.workloads.workload import TraceRequest, Workload

POLICIES = ("fcfs", "vtc", "equinox", "equinox-fifo")  # equinox-fifo: the ablation of the within-user order
MAX_PROMPT, MAX_OUTPUT = 512, 256
ADMIN = "sk-admin-demo-key"
MIN_WAIT_S = 0.05  # on the real path every grant takes a few ms: a user is backlogged if a request waited longer


def capped(workload: Workload, limit: int | None = None) -> Workload:
    requests = [TraceRequest(r.arrival_s, r.user, min(r.prompt_tokens, MAX_PROMPT), min(r.output_tokens, MAX_OUTPUT))
                for r in workload.requests[:limit]]
    return Workload(workload.name, workload.users, requests)


# name: (workload, load, metrics window in seconds). The load is the arrivals' mean demand for output tokens over
# the replica's measured capacity. It must overload the replica, so that the queue forms in the controller, where
# the policy acts; too much, and every TTFT is the backlog's drain. These are the loads of the fixed compressions
# first used (16x and 20x on a machine whose replica served about 10,000 tokens/s): VTC's two backlogged clients at
# twice the capacity, LMSYS at 0.75 of it on average, which its bursts were to overload. They did not: measured
# against a capacity probe of the trace's own requests, every policy's TTFT p50 was 0.06 s (no queue) and the p99
# swung from 0.16 s to 0.74 s between runs of one policy, so LMSYS asked for the whole capacity on average. That
# is a knife edge: in one run (`python -m bench real --rounds 3` at commit d933308, kept in
# bench/results/real-engine-load-1.0x.md) FCFS's TTFT p50 was 6.19 s in one round and 0.06 s in the next, as the
# machine's pace moved the mean decode time from 4.4 s to 2.3 s: whether a queue formed at all decided the tables.
# At 1.5x a queue forms in every round, as in the simulated LMSYS scenario, where the A100 is busy throughout.
WORKLOADS = {
    "vtc-overload": (lambda: capped(synthetic.overload(duration=120.0)), 2.0, 2.0),
    "lmsys": (lambda: capped(traces.lmsys_arena(), limit=400), 1.5, 2.0),
}
CAPACITY_S = 30.0
# Jain's index is also read at longer windows: a policy whose users drift apart by several requests can look fair
# at 2 s and not at 10 s (Equinox with a 4,096-token slack on the tiny model did: 0.95x VTC's at 2 s, 0.77x at 10 s)
LONG_WINDOWS_S = (5.0, 10.0)


def trace_mix(base: str, workload: Workload):
    """The workload's own requests, cycled without end: the mix the replay will send, for a closed loop."""
    from bench.load import Load

    rng = np.random.default_rng(0)
    return itertools.cycle([Load(f"{base}/v1/completions", "tiny-llama",
                                 rng.integers(5, 500, max(1, r.prompt_tokens)).tolist(), max(1, r.output_tokens),
                                 True) for r in workload.requests]).__next__


def admission_window() -> int:
    """The default app's pool admission window (deploy/equinox.yaml)."""
    from equinox_ray.serve.local import default_args

    return int(default_args()["pools"][0]["admission"]["max_window"])


def measured_capacity(base: str, workload: Workload, keys: dict[str, str], window: int) -> float:
    """Output tokens/s the replica delivers in a closed loop of the workload's own requests, with twice its admission
    window of clients (so that it is full), counting the tokens streamed within the loop's time, not its drain."""
    from bench.soak import capacity

    _, tokens_per_s = asyncio.run(capacity(keys, CAPACITY_S, trace_mix(base, workload), clients=2 * window))
    return tokens_per_s


def compression(workload: Workload, load: float, capacity_tps: float) -> float:
    """The factor that divides arrival times so that the arrivals ask for `load` times the capacity."""
    requests = workload.requests
    span = requests[-1].arrival_s - requests[0].arrival_s
    return load * capacity_tps * span / sum(r.output_tokens for r in requests)


def completion_records(lines: list[str]) -> tuple[list[CompletionRecord], float]:
    """The controller's records as the metrics' records (times on the controller's clock), and the mean engine busy
    fraction it measured."""
    records, busy = [], []
    for i, line in enumerate(lines):
        r = json.loads(line)
        granted = r["finish_s"] - r["e2e_s"]
        records.append(CompletionRecord(str(i), r["user"], r["arrival_s"], max(granted, r["arrival_s"]),
                                        max(granted + r["ttft_s"], r["arrival_s"]), r["finish_s"], r["prompt_tokens"],
                                        r["output_tokens"]))
        busy.append(r["utilization"])
    return records, sum(busy) / len(busy) if busy else float("nan")


def set_policy(base: str, policy: str) -> None:
    """Switch the app at `base` to one of the suite's policy rows, through the admin API."""
    httpx.put(f"{base}/v1/admin/policy", json=SUITE_POLICIES[policy], headers={"Authorization": f"Bearer {ADMIN}"},
              timeout=30).raise_for_status()


def run_one(base: str, workload: Workload, keys: dict[str, str], scale: float, records_path: Path,
            policy: str) -> tuple[list[str], int, dict[str, float]]:
    """The controller's record lines of one replay, how many requests were answered 200, and the CPU seconds each
    kind of process spent during it (bench/cpu.py)."""
    from equinox_ray.workloads.http_replay import replay_over_http

    set_policy(base, policy)
    before = records_path.read_text().splitlines() if records_path.exists() else []
    cpu_before = cpu.snapshot()
    results = asyncio.run(replay_over_http(base, workload, keys, "tiny-llama", time_scale=scale,
                                           max_prompt=MAX_PROMPT, max_output=MAX_OUTPUT))
    time.sleep(1.0)  # the last finish reports reach the controller
    used = cpu.spent(cpu_before, cpu.snapshot())
    after = records_path.read_text().splitlines()
    return after[len(before):], sum(r.status == 200 for r in results), used


def pace(records: list[CompletionRecord]) -> float:
    """The engine's pace in a run: the mean time from first token to finish (CPU taken by other processes on a
    shared machine slows it)."""
    return float(np.mean([r.finish - r.first_token for r in records])) if records else float("nan")


def engine_and_cpu(records: list[CompletionRecord], used: dict[str, float]) -> dict[str, float]:
    """Where a run's time and CPU went: the mean time from first token to finish (the engine's pace, which CPU
    taken by other processes on a shared machine slows), and CPU milliseconds per request of the controller, the
    pool (with its engine) and everything else a request crosses."""
    n = max(len(records), 1)
    return {"decode_mean_s": pace(records),
            "controller_ms": 1e3 * used["controller"] / n, "pool_ms": 1e3 * used["pool"] / n,
            "other_ms": 1e3 * sum(v for k, v in used.items() if k not in ("controller", "pool")) / n}


def per_round_table(kept: list[dict]) -> str:
    """Each policy in each round, from the kept records: how the machine's pace (the mean time from first token to
    finish) moves every policy's queue. Records of `bench real --paired` say which app served them: a column."""
    apps = bool(kept) and "app" in kept[0]
    lines = ["| round | " + ("app | " if apps else "") + "policy | TTFT p50 s | TTFT p99 s | first token to finish, "
             "mean s |", "|---:|" + ("---|" if apps else "") + "---|---:|---:|---:|"]
    for (scenario, i, policy), group in itertools.groupby(kept, key=lambda r: (r["scenario"], r["round"], r["policy"])):
        group = list(group)
        ttft = [r["first_token"] - r["arrival"] for r in group]
        decode = np.mean([r["finish"] - r["first_token"] for r in group])
        app = f"/{group[0]['app']} | " if apps else ""
        lines.append(f"| {i} | {app}{policy} | {np.percentile(ttft, 50):.2f} | {np.percentile(ttft, 99):.2f} | "
                     f"{decode:.2f} |")
    return "\n".join(lines)


def cpu_table(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| policy | first token to finish, mean s | controller CPU ms/request | pool CPU ms/request | "
             "other CPU ms/request |", "|---|---:|---:|---:|---:|"]
    for policy, m in rows.items():
        lines.append(f"| {policy} | {m['decode_mean_s']:.2f} | {m['controller_ms']:.1f} | {m['pool_ms']:.1f} | "
                     f"{m['other_ms']:.1f} |")
    return "\n".join(lines)


def rounds_in_rotation(rounds: int, policies: tuple[str, ...] = POLICIES) -> list[list[str]]:
    """The policies' order in each round: rotated, so that none always runs first (after the idle engine) or
    last."""
    n = len(policies)
    return [list(policies[i % n:] + policies[:i % n]) for i in range(rounds)]


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's median over the rounds where it is defined (Jain's index is not when no user waited past the
    minimum wait)."""
    def median(values: list[float]) -> float:
        defined = [v for v in values if not np.isnan(v)]
        return float(np.median(defined)) if defined else float("nan")

    return {key: median([run[key] for run in runs]) for key in runs[0]}


def round_ratios(runs: dict[str, list[dict[str, float]]]) -> str:
    """Equinox over VTC in each round, on the goals' metrics, their medians, in how many rounds Equinox was the
    better of the two and the sign test's p for that split: the two ran back to back (`bench real`) or at once
    (`--paired`), so a round's ratio is the pairing least moved by the machine's pace."""
    lines = ["| round | steady throughput | TTFT p50 | TTFT p99 | light TTFT p99 | Jain |",
             "|---:|---:|---:|---:|---:|---:|"]
    wins = {key: 0 for key in GOAL_KEYS}
    ratios = [goal_ratios(eq, vtc) for eq, vtc in zip(runs["equinox"], runs["vtc"])]
    for i, r in enumerate(ratios, 1):
        for key in GOAL_KEYS:
            wins[key] += better(key, r[key]) > 0
        lines.append(f"| {i} | {r['steady_throughput']:.2f}x | {r['ttft_p50']:.2f}x | {r['ttft_p99']:.2f}x | "
                     f"{r['light_ttft_p99']:.2f}x | {r['jain']:.3f}x |")
    middle = {key: float(np.nanmedian([r[key] for r in ratios])) for key in GOAL_KEYS}
    lines.append(f"| median | {middle['steady_throughput']:.2f}x | {middle['ttft_p50']:.2f}x | "
                 f"{middle['ttft_p99']:.2f}x | {middle['light_ttft_p99']:.2f}x | {middle['jain']:.3f}x |")
    n = len(runs["equinox"])
    lines.append("| Equinox better in | " + " | ".join(f"{wins[key]} of {n}" for key in GOAL_KEYS) + " |")
    defined = {key: sum(not np.isnan(r[key]) for r in ratios) for key in GOAL_KEYS}
    lines.append("| sign test, two-sided p | " + " | ".join(f"{sign_test_p(wins[key], defined[key]):.3f}"
                                                         for key in GOAL_KEYS) + " |")
    return "\n".join(lines)


def jain_at_long_windows(records: list[CompletionRecord], workload: Workload) -> dict[str, float]:
    return {f"jain_{w:g}s": mean_jain(windowed_service(records, workload.users, w, min_wait_s=MIN_WAIT_S))
            for w in LONG_WINDOWS_S}


def jain_windows_table(runs: dict[str, list[dict[str, float]]], window_s: float) -> str:
    """Equinox's Jain's index over VTC's in each round at the table's window and the longer ones, with the median
    ratio and the rounds where Equinox was the fairer."""
    keys = {"jain": window_s, **{f"jain_{w:g}s": w for w in LONG_WINDOWS_S}}
    lines = ["| round | " + " | ".join(f"Jain, {w:g} s windows" for w in keys.values()) + " |",
             "|---:|" + "---:|" * len(keys)]
    ratios = {key: [eq[key] / vtc[key] for eq, vtc in zip(runs["equinox"], runs["vtc"])] for key in keys}
    for i in range(len(runs["equinox"])):
        lines.append(f"| {i + 1} | " + " | ".join(f"{ratios[key][i]:.3f}x" for key in keys) + " |")
    lines.append("| median | " + " | ".join(f"{np.nanmedian(ratios[key]):.3f}x" for key in keys) + " |")
    n = len(runs["equinox"])
    lines.append("| Equinox fairer in | " + " | ".join(f"{sum(r > 1 for r in ratios[key])} of {n}" for key in keys)
                 + " |")
    return "\n".join(lines)


def main(names: list[str], out: Path, rounds: int = 3, policies: tuple[str, ...] = POLICIES) -> None:
    from equinox_ray.serve.local import BASE_URL, default_app

    if not {"vtc", "equinox"} <= set(policies):
        raise SystemExit("bench real compares Equinox with VTC: --policies must include both")
    if unknown := set(policies) - set(SUITE_POLICIES):
        raise SystemExit(f"unknown policies {sorted(unknown)}; known: {', '.join(SUITE_POLICIES)}")

    workloads = {name: (WORKLOADS[name][0](), *WORKLOADS[name][1:]) for name in names}
    users = {u: w.users[u] for w, _, _ in workloads.values() for u in w.users}
    records_path = Path(tempfile.mkdtemp()) / "records.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    sections, kept = [], []
    with default_app(users, records_path, "sk-bench") as keys:
        for name, (workload, load, window_s) in workloads.items():
            capacity_tps = measured_capacity(BASE_URL, workload, keys, admission_window())
            scale = compression(workload, load, capacity_tps)
            print(f"{name}: capacity {capacity_tps:,.0f} output tokens/s, arrivals compressed {scale:.1f}x", flush=True)
            runs: dict[str, list[dict[str, float]]] = {policy: [] for policy in policies}
            served: dict[str, list[str]] = {policy: [] for policy in policies}
            for i, order in enumerate(rounds_in_rotation(rounds, policies), 1):
                for policy in order:
                    lines, ok, used = run_one(BASE_URL, workload, keys, scale, records_path, policy)
                    records, busy = completion_records(lines)
                    runs[policy].append({**record_metrics(records, workload, window_s, min_wait_s=MIN_WAIT_S),
                                         **jain_at_long_windows(records, workload),
                                         "utilization": busy, **engine_and_cpu(records, used)})
                    kept += [{"scenario": name, "round": i, "policy": policy, **asdict(r)} for r in records]
                    served[policy].append(f"{ok}/{len(workload.requests)} answered 200, {len(records)} records")
                    print(f"{name} round {i} {policy}: {served[policy][-1]}", flush=True)
            rows = {policy: medians(runs[policy]) for policy in policies}
            sections += [f"## {name}: {len(workload.requests)} requests, arrivals compressed {scale:.1f}x for {load:g}x "
                         f"the measured capacity ({capacity_tps:,.0f} output tokens/s), {window_s:g} s windows, "
                         f"medians of {rounds} rounds", "", rows_table(rows), "",
                         "Equinox over VTC in each round:", "", round_ratios(runs), "",
                         "Jain's index at longer windows, Equinox over VTC in each round:", "",
                         jain_windows_table(runs, window_s), "",
                         "Each policy in each round:", "",
                         per_round_table([r for r in kept if r["scenario"] == name]), "",
                         "Where the time and CPU went (medians over the rounds; CPU of every process a request "
                         "crosses, bench/cpu.py):", "", cpu_table(rows), "",
                         "Served: " + "; ".join(f"{p} {', '.join(s)}" for p, s in served.items()) + ".", ""]
    text = "\n".join(["# Scenarios 1 and 2 on the real engine (Ray Serve + vLLM CPU, tiny model), measured", "",
                      __doc__.split("\n\n")[1].replace("\n", " "), "",
                      __doc__.split("\n\n")[2].replace("\n", " "), "",
                      f"Run with `python -m bench real --scenario {' '.join(names)} --rounds {rounds}"
                      f"{'' if policies == POLICIES else ' --policies ' + ' '.join(policies)}`. "
                      "GPU busy is the engine's own measured busy fraction (mean over requests). Counter gaps are not "
                      "measured on the real path (n/a). "
                      "`equinox-fifo`: Equinox with each user's queue FIFO (`max_overtakes: 0`), the ablation of "
                      "the within-user order.", "",
                      *sections])
    stem = "real-engine" if policies == POLICIES else "real-engine-" + "-".join(policies)
    path = out / f"{stem}.md"
    path.write_text(text)
    # every request of every run, for questions the table does not answer (which requests a policy delayed)
    with gzip.open(out / f"{stem}-records.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    print(text)
