"""Autoscaling churn under load: does a pool scaling up and down lose or cut requests?

The default application's serving path (HAProxy, two ingress replicas, the controller) in front of one pool of
simulated H100s that autoscales between 1 and 3 replicas. The load alternates: a heavy phase (many clients, short
answers) builds a backlog that scales the pool up; a light phase (few clients, long answers, streamed and not) leaves
demand under one replica's target while requests run on every replica, so Serve stops replicas that have requests
running. Each stopped replica must be drained (the controller stops granting to it, its running requests finish);
every request must complete. Prints, and writes to bench/results/churn.{md,json}, the replica counts seen, the scale
events, and the requests by outcome.

    python -m bench churn [--cycles 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import aiohttp

from bench.faults import outcome
from bench.load import Load, attempt
from equinox_ray.fairness.request import User

RESULTS = Path(__file__).parent / "results"
BASE = "http://127.0.0.1:8000"
USERS = {"alice": 1.0, "bob": 1.0, "carol": 2.0}
POOL = {"name": "gpu", "gpu_type": "CPU", "engine": "sim", "num_cpus": 0.25,
        "sim": {"gpu": "H100", "model": "Llama-2-7B", "max_model_len": 2048, "max_num_seqs": 32},
        "admission": {"max_window": 32, "initial_window": 32},
        "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_requests_per_replica": 16,
                        "upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 4}}
# (clients, max_tokens, seconds): heavy builds a backlog, light keeps long requests running under the target
HEAVY, LIGHT = (96, 32, 20.0), (8, 768, 25.0)


class ReplicaWatch(threading.Thread):
    """Samples the pool's replica states from Serve once a second."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, dict]] = []
        self.running = True
        self.start_s = time.perf_counter()

    def run(self) -> None:
        from ray import serve

        while self.running:
            try:
                states = serve.status().applications["equinox"].deployments["Pool-gpu"].replica_states
                self.samples.append((time.perf_counter() - self.start_s, dict(states)))
            except Exception:  # Serve's controller busy: next second
                pass
            time.sleep(1.0)

    def events(self) -> tuple[int, int, int]:
        """Scale-ups, scale-downs (changes of the RUNNING count) and the largest count seen."""
        counts = [s.get("RUNNING", 0) for _, s in self.samples]
        ups = sum(1 for a, b in zip(counts, counts[1:]) if b > a)
        downs = sum(1 for a, b in zip(counts, counts[1:]) if b < a)
        return ups, downs, max(counts, default=0)


async def phase(session: aiohttp.ClientSession, keys: list[str], clients: int, max_tokens: int,
                seconds: float) -> list[tuple[bool, str]]:
    deadline = time.perf_counter() + seconds
    results: list[tuple[bool, str]] = []

    async def client(i: int) -> None:
        stream = i % 2 == 0
        load = Load(f"{BASE}/v1/completions", "tiny-llama", list(range(5, 261)), max_tokens, stream)
        while time.perf_counter() < deadline:
            results.append((stream, outcome(await attempt(session, load, keys[i % len(keys)]))))

    await asyncio.gather(*(client(i) for i in range(clients)))
    return results


async def churn(keys: list[str], cycles: int) -> list[dict]:
    rows = []
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        for cycle in range(cycles):
            for name, (clients, max_tokens, seconds) in (("heavy", HEAVY), ("light", LIGHT)):
                results = await phase(session, keys, clients, max_tokens, seconds)
                row = {"cycle": cycle + 1, "phase": name, "sent": len(results),
                       "outcomes": dict(Counter(o for _, o in results).most_common()),
                       "streams_not_completed": sum(1 for s, o in results if s and o != "completed")}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def report(rows: list[dict], events: tuple[int, int, int], samples: list[tuple[float, dict]]) -> str:
    ups, downs, most = events
    total = Counter()
    for row in rows:
        total.update(row["outcomes"])
    lines = ["# Autoscaling churn under load", "",
             "`python -m bench churn`: the default app's serving path (HAProxy, 2 ingress replicas, the controller) "
             "in front of one pool of simulated H100s autoscaling between 1 and 3 replicas; heavy phases "
             f"({HEAVY[0]} clients, {HEAVY[1]} tokens, {HEAVY[2]:.0f} s) scale it up, light phases ({LIGHT[0]} "
             f"clients, {LIGHT[1]} tokens, {LIGHT[2]:.0f} s) leave demand under one replica's target; half the "
             "clients stream. Serve stops replicas in both phases, with requests running on them: each must be "
             "drained, and every request complete.", "",
             f"Scale-ups seen: {ups}; scale-downs: {downs}; most replicas running: {most}; samples with a replica "
             f"stopping: {sum(1 for _, s in samples if s.get('STOPPING'))}.", "",
             f"Requests: {sum(total.values()):,} sent; " + ", ".join(f"{k}: {v:,}" for k, v in total.most_common()),
             "", "| cycle | phase | sent | outcomes | streams not completed |", "|---|---|---|---|---|"]
    for row in rows:
        outcomes = ", ".join(f"{k} {v}" for k, v in row["outcomes"].items())
        lines.append(f"| {row['cycle']} | {row['phase']} | {row['sent']} | {outcomes} | "
                     f"{row['streams_not_completed']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from equinox_ray.serve.local import default_app

    parser = argparse.ArgumentParser(prog="python -m bench churn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    # Serve's replicas push autoscaling metrics every 10 s by default: the pool would react in tens of seconds
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    users = {name: User(name, weight) for name, weight in USERS.items()}
    overrides = {"ingress": {"num_replicas": 2}, "pools": [POOL], "telemetry": {"exporter": "none"}}
    with default_app(users, None, "sk-churn", overrides) as keys:
        watch = ReplicaWatch()
        watch.start()
        rows = asyncio.run(churn([keys[u] for u in USERS], args.cycles))
        watch.running = False
        watch.join()
    text = report(rows, watch.events(), watch.samples)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "churn.md").write_text(text)
    (args.out / "churn.json").write_text(json.dumps({"rows": rows, "events": watch.events(),
                                                     "samples": watch.samples}, indent=1))
    print(text)
    lost = sum(v for row in rows for k, v in row["outcomes"].items() if k != "completed")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
