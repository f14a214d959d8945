"""VTC and Equinox on the real path at the same time: two copies of the default app on one Ray (each with one vLLM
CPU replica of one core, at /a and /b), both sent the same trace at the same moments by one load generator, one app
under VTC and the other under Equinox, swapped every round.

`python -m bench real` runs the policies one after the other, and on this shared 2-core machine the engine's pace
moves between two runs of 25 s by more than the policies differ (in its fourth run the faster engine of a round had
the better TTFT p50 in 10 of 12 rounds, `bench real --pooled`). Here both policies meet nearly the same pace, so
each round is a paired comparison; the swap cancels a difference between the two apps' places (which engine the OS
favours), and the table shows both, so that such a difference is seen.

    python -m bench real --paired [--scenario lmsys] [--rounds 12]
"""

from __future__ import annotations

import asyncio
import gzip
import json
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np

from bench.real_engine import (
    CAPACITY_S, MAX_OUTPUT, MAX_PROMPT, MIN_WAIT_S, WORKLOADS, admission_window, completion_records, compression,
    jain_at_long_windows, jain_windows_table, medians, per_round_table, round_ratios, set_policy, trace_mix,
)
from bench.report import publish, record_metrics, rows_table
from equinox_ray.workloads.workload import Workload

APPS = ("a", "b")


@contextmanager
def twin_apps(users, records: dict[str, Path], key_prefix: str) -> Iterator[dict[str, str]]:
    """Both apps on one local Ray, each pool replica on one of the two cores; yields the users' keys (the same in
    both)."""
    from ray import serve

    from equinox_ray.serve.app import build
    from equinox_ray.serve.local import app_config, local_ray, user_keys

    keys = user_keys(users, key_prefix)
    pools = [{**p.model_dump(), "num_cpus": 1} for p in app_config(users, keys, None).pools]
    with local_ray():
        for name in APPS:
            serve.run(build(app_config(users, keys, records[name], {"pools": pools})), name=name,
                      route_prefix=f"/{name}")
        yield keys


def assignments(rounds: int) -> list[dict[str, str]]:
    """Each round's policy per app: VTC on /a in odd rounds, on /b in even ones."""
    return [dict(zip(APPS, ("vtc", "equinox") if i % 2 == 0 else ("equinox", "vtc"))) for i in range(rounds)]


def paired_capacity(bases: list[str], workload: Workload, keys: dict[str, str], window: int) -> list[float]:
    """Each app's output tokens/s in a closed loop of the workload's requests, both loops at once."""
    from bench.soak import capacity

    async def both():
        return await asyncio.gather(*(capacity(keys, CAPACITY_S, trace_mix(base, workload), clients=2 * window)
                                      for base in bases))

    return [tokens_per_s for _, tokens_per_s in asyncio.run(both())]


def run_round(bases: dict[str, str], workload: Workload, keys: dict[str, str], scale: float,
              records: dict[str, Path], policies: dict[str, str]) -> dict[str, list[str]]:
    """Set each app's policy, replay the workload to both at once; each app's new record lines."""
    from equinox_ray.workloads.http_replay import replay_over_http

    for app, policy in policies.items():
        set_policy(bases[app], policy)
    before = {app: path.read_text().splitlines() if path.exists() else [] for app, path in records.items()}

    async def both():
        return await asyncio.gather(*(replay_over_http(bases[app], workload, keys, "tiny-llama", time_scale=scale,
                                                       max_prompt=MAX_PROMPT, max_output=MAX_OUTPUT)
                                      for app in APPS))

    asyncio.run(both())
    time.sleep(1.0)  # the last finish reports reach the controllers
    return {app: records[app].read_text().splitlines()[len(before[app]):] for app in APPS}


def main(name: str, out: Path, rounds: int) -> Path:
    from equinox_ray.serve.local import BASE_URL

    workload, load, window_s = WORKLOADS[name][0](), *WORKLOADS[name][1:]
    folder = Path(tempfile.mkdtemp())
    records = {app: folder / f"{app}.jsonl" for app in APPS}
    bases = {app: f"{BASE_URL}/{app}" for app in APPS}
    runs: dict[str, list[dict[str, float]]] = {"vtc": [], "equinox": []}
    kept: list[dict] = []
    with twin_apps(workload.users, records, "sk-paired") as keys:
        capacities = paired_capacity([bases[app] for app in APPS], workload, keys, admission_window())
        scale = compression(workload, load, float(np.mean(capacities)))
        print(f"{name}: capacities {', '.join(f'{c:,.0f}' for c in capacities)} output tokens/s, arrivals compressed "
              f"{scale:.1f}x", flush=True)
        for i, policies in enumerate(assignments(rounds), 1):
            lines = run_round(bases, workload, keys, scale, records, policies)
            for app in sorted(APPS, key=lambda a: policies[a] != "vtc"):  # VTC first in kept: `bench real --pooled`
                found, busy = completion_records(lines[app])
                runs[policies[app]].append({**record_metrics(found, workload, window_s, min_wait_s=MIN_WAIT_S),
                                            **jain_at_long_windows(found, workload), "utilization": busy})
                kept += [{"scenario": name, "round": i, "policy": policies[app], "app": app, **asdict(r)}
                         for r in found]
            print(f"{name} round {i}: " + ", ".join(f"/{a} {p} {len(lines[a])} records" for a, p in policies.items()),
                  flush=True)
    text = "\n".join([
        "# VTC and Equinox on the real engine at the same time (Ray Serve + vLLM CPU, tiny model)", "",
        __doc__.split("\n\n")[0].replace("\n", " "), "", __doc__.split("\n\n")[1].replace("\n", " "), "",
        f"Run with `python -m bench real --paired --scenario {name} --rounds {rounds}`. {len(workload.requests)} "
        f"requests, arrivals compressed {scale:.1f}x for {load:g}x the mean of the two apps' capacities measured at "
        f"once ({', '.join(f'{c:,.0f}' for c in capacities)} output tokens/s), {window_s:g} s windows; the table "
        f"shows medians over the rounds. Each engine computes on one core here (two in `bench real`).", "",
        rows_table({policy: medians(r) for policy, r in runs.items()}), "",
        "Equinox over VTC in each round (the two ran at the same time):", "", round_ratios(runs), "",
        "Jain's index at longer windows, Equinox over VTC in each round:", "", jain_windows_table(runs, window_s), "",
        "Each app in each round:", "", per_round_table(kept), ""])
    stem = f"real-paired-{name}"
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(out / f"{stem}-records.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    return publish(text, out, f"{stem}.md")
