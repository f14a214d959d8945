"""Overload soak on the default application (real vLLM on the CPU, two ingress replicas behind HAProxy).

First the capacity: a closed loop of clients keeps the engine full for `--capacity-s`; the tokens it streams in
that time, per second, are the capacity. Then three users send Poisson arrivals at `--load` times that rate for
`--minutes`: alice 60% of the arrivals, bob 30%, carol 10% with weight 2, so that carol asks for well under her
weighted share (a half) while the others are over theirs. Every request streams. Printed and written to
bench/results/soak.{md,json}: sent, completed, 429s and how fast they came, 503s, lost (no answer, or a stream cut
without an error event, or none within `--bound-s`), per-user TTFT and served tokens, and the delivered token rate
against the capacity, overall and minute by minute. The capacity is measured again after the soak, and the
delivered rate is compared with the mean of the two: on a shared two-core machine the same closed loop has measured
from 47 to 73 requests/s in one hour, so one measurement taken minutes away from the soak says more about the
machine than about the server. Exits 1 if a request was lost.

With `--engine sim` the pool is a simulated GPU (an H100 running Llama-2-7B, `SimEngine`) instead of vLLM on the CPU,
and the results go to bench/results/soak-sim.{md,json}. The CPU engine computes on the same two cores as the
ingress, the controller and the load generator, so refusing the excess takes CPU from the engine itself; a GPU's
steps do not. The simulated GPU steps at its roofline speed whatever the front end costs, which isolates what the
serving path does at overload (does it keep the engine full?) from what the shared cores do.

    python -m bench soak [--minutes 10] [--load 2.0] [--engine vllm|sim]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench import cpu
from bench.cpu import KINDS
from bench.load import Load, Result, attempt
from equinox_ray.fairness.request import User

RESULTS = Path(__file__).parent / "results"
URL = "http://127.0.0.1:8000/v1/completions"
METRICS_URL = "http://127.0.0.1:8000/metrics"
ADMIN_KEY = "sk-admin-demo-key"  # deploy/equinox.yaml's demo admin key, by its digest
USERS = {"alice": (0.6, 1.0), "bob": (0.3, 1.0), "carol": (0.1, 2.0)}  # share of arrivals, weight
PROMPT_TOKENS = (16, 256)
OUTPUT_TOKENS = (16, 128)
CAPACITY_CLIENTS = 48
WARMUP_S = 20.0  # left out of the delivered rate: the queues fill first
# The simulated GPU: one pool with the CPU pool's admission window (a batch of 32 and a queue of 8)
SIM_POOL = {"name": "gpu", "gpu_type": "CPU", "engine": "sim", "num_cpus": 0.25,
            "sim": {"gpu": "H100", "model": "Llama-2-7B", "max_model_len": 1024, "max_num_seqs": 32},
            "admission": {"max_window": 40, "initial_window": 40},
            "autoscaling": {"min_replicas": 1, "max_replicas": 1}}


@dataclass(frozen=True)
class Sent:
    user: str
    at_s: float  # since the soak began
    result: Result

    @property
    def lost(self) -> bool:
        """No HTTP answer, or a 200 whose stream was cut without an error event and [DONE]."""
        return self.result.status == 0 or (self.result.status == 200 and self.result.error == "cut")


class Requests:
    """The seeded request mix: random prompt token ids and lengths, ignore_eos outputs of random length."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def next(self) -> Load:
        prompt = self.rng.integers(5, 500, int(self.rng.integers(*PROMPT_TOKENS))).tolist()
        return Load(URL, "tiny-llama", prompt, int(self.rng.integers(*OUTPUT_TOKENS)), stream=True)


async def capacity(keys: dict[str, str], seconds: float, next_request: Callable[[], Load],
                   clients: int = CAPACITY_CLIENTS) -> tuple[float, float]:
    """Requests/s and output tokens/s of a closed loop of `clients` that keeps the engine full (more clients than
    its admission window), counted as the soak counts what it delivered: the tokens streamed within the `seconds`,
    not the drain after them, when no new request comes."""
    done: list[Sent] = []
    deadline = time.perf_counter() + seconds

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        key = list(keys.values())[i % len(keys)]
        while time.perf_counter() < deadline:
            at_s = seconds - (deadline - time.perf_counter())
            done.append(Sent("capacity", at_s, await attempt(session, next_request(), key)))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    ok = [s for s in done if s.result.complete]
    if not ok:
        raise SystemExit(f"no request completed: {Counter((s.result.status, s.result.error) for s in done)}")
    tokens_per_s = delivered_tokens(ok, 0.0, seconds) / seconds
    return tokens_per_s / float(np.mean([s.result.output_tokens for s in ok])), tokens_per_s


async def soak(keys: dict[str, str], rate: float, seconds: float, bound_s: float, requests: Requests,
               seed: int, fullness: list[float]) -> tuple[list[Sent], float]:
    rng = np.random.default_rng(seed + 1)
    names = list(USERS)
    shares = np.array([USERS[u][0] for u in names])
    sent: list[Sent] = []
    tasks = []
    timeout = aiohttp.ClientTimeout(total=bound_s)

    async def send(session, user: str, at_s: float, load: Load) -> None:
        sent.append(Sent(user, at_s, await attempt(session, load, keys[user])))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        start = time.perf_counter()
        watching = asyncio.create_task(watch_pool(session, fullness))
        at = 0.0
        while at < seconds:
            at += rng.exponential(1.0 / rate)
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            user = names[int(rng.choice(len(names), p=shares))]
            tasks.append(asyncio.create_task(send(session, user, at, requests.next())))
        watching.cancel()
        await asyncio.gather(*tasks)
        return sent, time.perf_counter() - start


async def watch_pool(session: aiohttp.ClientSession, fullness: list[float]) -> None:
    """Once a second, the requests the pool holds (running in the engine or queued in front of it) over its admission
    window, from the controller's /metrics: 1.0 means the engine has a full batch and its own queue is full too."""
    while True:
        await asyncio.sleep(1.0)
        try:
            async with session.get(METRICS_URL, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as response:
                text = await response.text()
        except aiohttp.ClientError:
            continue
        values = {family.name: sum(sample.value for sample in family.samples)
                  for family in text_string_to_metric_families(text)
                  if family.name in ("equinox_pool_running", "equinox_pool_window")}
        if values.get("equinox_pool_window"):
            fullness.append(values["equinox_pool_running"] / values["equinox_pool_window"])


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(1000 * float(np.percentile(values, q)), 1) if values else None


def delivered_tokens(complete: list[Sent], start_s: float, end_s: float) -> float:
    """Output tokens streamed within [start_s, end_s], each request's spread evenly from its first token to its
    last."""
    total = 0.0
    for s in complete:
        first = s.at_s + (s.result.ttft_s or s.result.e2e_s)
        last = s.at_s + s.result.e2e_s
        overlap = min(last, end_s) - max(first, start_s)
        if overlap > 0:
            total += s.result.output_tokens * overlap / max(last - first, 1e-9)
    return total


def summarize(sent: list[Sent], seconds: float, capacity_rps: float, capacities_tps: tuple[float, float],
              rate: float, fullness: list[float]) -> dict:
    capacity_tps = float(np.mean(capacities_tps))
    by_status = Counter(s.result.status for s in sent)
    refused = [s.result.answer_s for s in sent if s.result.status == 429]
    complete = [s for s in sent if s.result.complete]
    users = {}
    for user, (share, weight) in USERS.items():
        mine = [s for s in sent if s.user == user]
        served = [s for s in mine if s.result.complete]
        ttft = [s.result.ttft_s for s in served if s.result.ttft_s is not None]
        users[user] = {"weight": weight, "arrival_share": share, "sent": len(mine), "completed": len(served),
                       "refused_429": sum(s.result.status == 429 for s in mine),
                       "ttft_p50_ms": percentile_ms(ttft, 50), "ttft_p99_ms": percentile_ms(ttft, 99),
                       "output_tokens": sum(s.result.output_tokens for s in served)}
    total_tokens = sum(u["output_tokens"] for u in users.values()) or 1
    for u in users.values():
        u["token_share"] = round(u["output_tokens"] / total_tokens, 3)
    delivered = delivered_tokens(complete, WARMUP_S, seconds) / max(seconds - WARMUP_S, 1e-9)
    by_minute = [delivered_tokens(complete, m, min(m + 60.0, seconds)) / max(min(60.0, seconds - m), 1e-9)
                 for m in np.arange(0.0, seconds, 60.0)]
    settled = np.array(fullness[int(WARMUP_S):])  # one sample a second
    return {"seconds": seconds, "rate_rps": rate, "capacity_rps": capacity_rps, "capacity_tps": capacity_tps,
            "capacity_before_tps": capacities_tps[0], "capacity_after_tps": capacities_tps[1],
            "sent": len(sent), "completed": len(complete), "status": dict(sorted(by_status.items())),
            "refused_429": len(refused), "refusal_p50_ms": percentile_ms(refused, 50),
            "refusal_p99_ms": percentile_ms(refused, 99),
            "unavailable_503": by_status.get(503, 0), "lost": sum(s.lost for s in sent),
            "errors": dict(sorted(Counter(s.result.error for s in sent if s.result.error).items())),
            "delivered_tps": delivered, "delivered_over_capacity": delivered / capacity_tps,
            "delivered_by_minute": [round(t / capacity_tps, 3) for t in by_minute],
            "pool_full_share": float(np.mean(settled >= 1.0)) if settled.size else None,
            "pool_fullness_mean": float(np.mean(settled)) if settled.size else None, "users": users}


def report(summary: dict, minutes: float, load: float) -> str:
    s = summary
    engine = summary.get("engine", "vllm")
    command = f"python -m bench soak --minutes {minutes:g} --load {load:g}"
    if engine == "sim":
        command += " --engine sim"
    pool = "a simulated H100 GPU (Llama-2-7B)" if engine == "sim" else "vLLM on the CPU (tiny model)"
    lines = [f"# Overload soak: {load:g}x capacity for {minutes:g} min, {pool} (`{command}`)", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             *([__doc__.split("\n\n")[2].replace("\n", " "), ""] if engine == "sim" else []),
             f"Capacity (closed loop, {CAPACITY_CLIENTS} clients): {s['capacity_rps']:.1f} requests/s and "
             f"{s['capacity_before_tps']:,.0f} output tokens/s before the soak, {s['capacity_after_tps']:,.0f} after "
             f"it; their mean, {s['capacity_tps']:,.0f}, is the capacity below. Soak arrivals: {s['rate_rps']:.1f} "
             "requests/s.", "",
             "| sent | completed | 429 | 429 answer p50 / p99 | 503 | lost | delivered tokens/s | of capacity |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {s['sent']:,} | {s['completed']:,} | {s['refused_429']:,} | {s['refusal_p50_ms']} / "
             f"{s['refusal_p99_ms']} ms | {s['unavailable_503']} | {s['lost']} | {s['delivered_tps']:,.0f} | "
             f"{s['delivered_over_capacity']:.2f}x |", "",
             "| user | weight | share of arrivals | sent | completed | 429 | TTFT p50 | TTFT p99 | output tokens | "
             "share of tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, u in s["users"].items():
        lines.append(f"| {name} | {u['weight']:g} | {u['arrival_share']:.0%} | {u['sent']:,} | {u['completed']:,} | "
                     f"{u['refused_429']:,} | {u['ttft_p50_ms']} ms | {u['ttft_p99_ms']} ms | "
                     f"{u['output_tokens']:,} | {u['token_share']:.0%} |")
    lines += ["", f"Statuses: {s['status']}. Errors by code: {s['errors'] or 'none'}. Delivered: output tokens "
                  f"streamed from {WARMUP_S:g} s after the first arrival to the last arrival, each request's spread "
                  "from its first token to its last.", "",
              "Delivered by minute, of capacity: " + ", ".join(f"{x:.2f}x" for x in s["delivered_by_minute"]) + "."]
    if s.get("pool_full_share") is not None:
        lines += ["", f"The pool held its full admission window (a full engine batch and its queue) in "
                      f"{s['pool_full_share']:.0%} of the once-a-second samples after the first {WARMUP_S:g} s; "
                      f"it held {s['pool_fullness_mean']:.0%} of the window on average."]
    if "cpu" in s and engine == "vllm":  # a simulated GPU's steps cost no CPU: per core would mean nothing
        pool = {phase: used["pool"] for phase, used in s["cpu"].items()}
        soak_per_core = s["delivered_tps"] / pool["soak"]
        capacity_per_core = np.mean([s["capacity_before_tps"] / pool["capacity"],
                                     s["capacity_after_tps"] / pool["capacity after"]])
        lines += ["", f"Output tokens per core the pool used (its replica and engine processes): "
                      f"{soak_per_core:,.0f} during the soak against {capacity_per_core:,.0f} while measuring the "
                      f"capacity ({soak_per_core / capacity_per_core:.2f}x); the pool used {pool['soak']:.2f} cores "
                      f"during the soak against {np.mean([pool['capacity'], pool['capacity after']]):.2f}."]
    if "cpu" in s:
        lines += ["", "CPU cores used, by process kind (bench/cpu.py), while measuring the capacity, during the soak "
                      "and while measuring the capacity again:", "", "| phase | " + " | ".join(KINDS) + " |",
                  "|---|" + "---:|" * len(KINDS)]
    for phase in s.get("cpu", {}):
        lines.append(f"| {phase} | " + " | ".join(f"{s['cpu'][phase][k]:.2f}" for k in KINDS) + " |")
    return "\n".join(lines) + "\n"


@contextmanager
def cpu_use(into: dict, phase: str):
    """Cores used per process kind while the block runs."""
    before, start = cpu.snapshot("equinox"), time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    into[phase] = {kind: used / seconds for kind, used in cpu.spent(before, cpu.snapshot("equinox")).items()}


def main(argv: list[str] | None = None) -> int:
    from equinox_ray.serve.local import default_app

    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=2.0, help="arrivals as a multiple of the measured capacity")
    parser.add_argument("--capacity-s", type=float, default=60.0)
    parser.add_argument("--bound-s", type=float, default=120.0, help="a request unanswered this long is lost")
    parser.add_argument("--ingress-replicas", type=int, default=2)
    parser.add_argument("--engine", choices=("vllm", "sim"), default="vllm",
                        help="the pool's engine: vLLM on the CPU (deploy/equinox.yaml) or a simulated GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    users = {name: User(name, weight) for name, (_, weight) in USERS.items()}
    overrides = {"ingress": {"num_replicas": args.ingress_replicas}, "limits": {"max_queue_per_user": 64},
                 "telemetry": {"exporter": "none"}}
    if args.engine == "sim":
        overrides["pools"] = [SIM_POOL]
    requests = Requests(args.seed)
    cores = {}
    cpu.server_at_client_priority()
    with default_app(users, None, "sk-soak", overrides) as keys:
        asyncio.run(capacity(keys, 10.0, requests.next))  # warm-up: compile paths, fill caches
        with cpu_use(cores, "capacity"):
            capacity_rps, capacity_tps = asyncio.run(capacity(keys, args.capacity_s, requests.next))
        print(f"capacity: {capacity_rps:.1f} requests/s, {capacity_tps:,.0f} tokens/s", flush=True)
        rate = args.load * capacity_rps
        fullness: list[float] = []
        with cpu_use(cores, "soak"):
            sent, _ = asyncio.run(soak(keys, rate, args.minutes * 60, args.bound_s, requests, args.seed, fullness))
        with cpu_use(cores, "capacity after"):  # every soak request has been answered: the queues are empty
            _, capacity_after_tps = asyncio.run(capacity(keys, args.capacity_s, requests.next))
        print(f"capacity after the soak: {capacity_after_tps:,.0f} tokens/s", flush=True)
    summary = {**summarize(sent, args.minutes * 60, capacity_rps, (capacity_tps, capacity_after_tps), rate,
                           fullness), "cpu": cores, "engine": args.engine}
    text = report(summary, args.minutes, args.load)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "soak" if args.engine == "vllm" else "soak-sim"
    (args.out / f"{name}.md").write_text(text)
    (args.out / f"{name}.json").write_text(json.dumps({**summary, "args": {k: str(v) for k, v in vars(args).items()}},
                                                   indent=1))
    print(text)
    return 1 if summary["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
