"""Faults under load on the default application (real vLLM on the CPU): what the clients got, and how long until
the service came back.

Closed-loop clients keep streaming requests. One at a time, with the service recovered in between, the bench
`kill -9`s a process: the pool replica (the Serve actor that runs the engine), the vLLM engine core (the engine's
own process inside that replica), and the fairness controller. For each it prints the requests that were in flight
or sent during the outage by outcome (completed whole, ended with an error event or a JSON error, refused, lost:
no answer or a stream cut without an error), the time from the kill to the first completion of a request sent
after it (recovery), and for the controller the users' counters before the kill and after the restart. Written to
bench/results/faults.{md,json}.

    python -m bench faults [--clients 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import psutil

from bench.load import Load, Result, attempt
from equinox_ray.fairness.request import User

RESULTS = Path(__file__).parent / "results"
BASE = "http://127.0.0.1:8000"
USERS = ("alice", "bob", "carol")
ADMIN = "sk-admin-demo-key"  # deploy/equinox.yaml's demo admin key (by its digest)
RECOVERY_BOUND_S = 240.0
# What to kill: a substring of the process's command line (Ray titles an actor's process with its class).
FAULTS = {"pool replica": "ServeReplica:equinox:Pool-cpu", "engine core": "VLLM::EngineCore",
          "fairness controller": "ServeReplica:equinox:FairnessController"}


@dataclass(frozen=True)
class Sent:
    at_s: float
    result: Result


def process(title: str) -> psutil.Process | None:
    for p in psutil.process_iter(["cmdline", "name"]):
        line = " ".join(p.info["cmdline"] or []) or (p.info["name"] or "")
        if title in line and p.pid != os.getpid():
            return p
    return None


def outcome(r: Result) -> str:
    if r.complete:
        return "completed"
    if r.status == 0 or r.error == "cut":
        return "lost"
    return f"{r.status} {r.error}"


def counters(admin_key: str) -> dict[str, dict]:
    users = httpx.get(f"{BASE}/v1/fairness", headers={"Authorization": f"Bearer {admin_key}"}, timeout=10).json()
    return {name: {"counters": row["counters"], "finished": row["finished"]} for name, row in users["users"].items()}


class Clients:
    """Closed-loop streaming clients that run until stopped, each result stamped with when it was sent."""

    def __init__(self, keys: list[str], clients: int) -> None:
        self.keys, self.clients = keys, clients
        self.sent: list[Sent] = []
        self.start = time.perf_counter()
        self.running = True

    def now(self) -> float:
        return time.perf_counter() - self.start

    async def run(self) -> None:
        load = Load(f"{BASE}/v1/completions", "tiny-llama", list(range(5, 69)), 128, stream=True)
        timeout = aiohttp.ClientTimeout(total=RECOVERY_BOUND_S)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            async def client(i: int) -> None:
                while self.running:
                    at = self.now()
                    result = await attempt(session, load, self.keys[i % len(self.keys)])
                    self.sent.append(Sent(at, result))
                    if not result.complete:
                        await asyncio.sleep(0.5)  # as a client would before retrying
            await asyncio.gather(*(client(i) for i in range(self.clients)))

    def recovered_after(self, t: float) -> float | None:
        done = [s.at_s + s.result.e2e_s for s in self.sent if s.at_s > t and s.result.complete]
        return min(done) - t if done else None


async def first_answer(clients: Clients, admin_key: str) -> tuple[float, dict]:
    """Seconds from now until the fairness view answers again, and the counters it then shows."""
    start = clients.now()
    while True:
        try:
            shown = await asyncio.to_thread(counters, admin_key)
            return round(clients.now() - start, 1), shown
        except (httpx.HTTPError, KeyError, ValueError):
            await asyncio.sleep(0.2)


async def inject(clients: Clients, name: str, title: str, admin_key: str) -> dict:
    await asyncio.sleep(10.0)  # load at steady state
    before = await asyncio.to_thread(counters, admin_key) if "controller" in name else None
    victim = process(title)
    if victim is None:
        return {"fault": name, "error": f"no process matching {title!r}"}
    killed_at = clients.now()
    os.kill(victim.pid, signal.SIGKILL)
    print(f"{name}: killed pid {victim.pid} at {killed_at:.1f} s", flush=True)
    restored = None
    if before is not None:  # the counters as the restarted controller first shows them
        restored = await first_answer(clients, admin_key)
    recovery = None
    while recovery is None and clients.now() - killed_at < RECOVERY_BOUND_S:
        await asyncio.sleep(0.5)
        recovery = clients.recovered_after(killed_at)
    await asyncio.sleep(5.0)  # what was in flight at recovery ends
    affected = [s for s in clients.sent if s.at_s + s.result.e2e_s >= killed_at and s.at_s <= killed_at + (recovery or
                                                                                                     RECOVERY_BOUND_S)]
    row = {"fault": name, "killed_at_s": round(killed_at, 1), "recovery_s": None if recovery is None else round(
        recovery, 1), "outcomes": dict(Counter(outcome(s.result) for s in affected).most_common())}
    if before is not None:
        row["counters_before"], (row["counters_shown_after_s"], row["counters_after"]) = before, restored
    print(json.dumps(row), flush=True)
    return row


async def scenario(keys: dict[str, str], clients_n: int, admin_key: str) -> list[dict]:
    clients = Clients([keys[u] for u in USERS], clients_n)
    load = asyncio.create_task(clients.run())
    rows = [await inject(clients, name, title, admin_key) for name, title in FAULTS.items()]
    clients.running = False
    await load
    return rows


def report(rows: list[dict], clients: int) -> str:
    lines = ["# Faults under load (`python -m bench faults`)", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"{clients} closed-loop clients, each streaming 64 prompt and 128 output tokens; a client waits 0.5 s "
             "after a request that did not complete.", "",
             "| killed | recovery | requests affected, by what the client got |", "|---|---:|---|"]
    for row in rows:
        recovery = "not within the bound" if row.get("recovery_s") is None else f"{row['recovery_s']} s"
        got = ", ".join(f"{k}: {v}" for k, v in row.get("outcomes", {}).items()) or row.get("error", "")
        lines.append(f"| {row['fault']} | {recovery} | {got} |")
    for row in rows:
        if "counters_before" in row:
            lines += ["", f"Counters of the fairness controller before the kill, and as the restarted controller "
                          f"first showed them, {row['counters_shown_after_s']} s after the kill:", "",
                      "| user | before | after | finished before | finished after |", "|---|---|---|---:|---:|"]
            for user, before in row["counters_before"].items():
                after = row["counters_after"].get(user, {})
                lines.append(f"| {user} | {_fmt(before['counters'])} | {_fmt(after.get('counters', {}))} | "
                             f"{before['finished']} | {after.get('finished')} |")
    return "\n".join(lines) + "\n"


def _fmt(values: dict) -> str:
    return ", ".join(f"{k} {v:,.0f}" for k, v in values.items())


def main(argv: list[str] | None = None) -> int:
    from equinox_ray.serve.local import default_app

    parser = argparse.ArgumentParser(prog="python -m bench faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with default_app({name: User(name) for name in USERS}, None, "sk-faults",
                     {"telemetry": {"exporter": "none"}}) as keys:
        rows = asyncio.run(scenario(keys, args.clients, ADMIN))
    text = report(rows, args.clients)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faults.md").write_text(text)
    (args.out / "faults.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0 if all(r.get("recovery_s") is not None for r in rows) else 1
