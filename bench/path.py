"""The serving path's cost and capacity, measured against the engine itself and against a bare forwarding path.

    python -m bench path [--smoke]

One Ray cluster (HAProxy and gRPC on, as `make serve` runs it) holds, side by side, the bare forwarding ingress
(bench/forwarding.py) and the full application with 1 and with 2 ingress replicas, each over its own simulated
A100 replica at real-time pace; loads alternate between them. Then the same engine runs in this process with no
Serve at all, under the same loads: the ceiling. Then H100 replicas, and a controller fed by 4 ingress replicas
for the grant rate. CPU is counted in every process a request crosses (bench/cpu.py). vLLM's own server is the
reference of `python -m bench.fairness_overhead`, whose last result this table quotes.

Writes bench/results/path.md and path.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import cpu
from bench.load import Load, run
from equinox_ray.serve.keys import digest

RESULTS = Path(__file__).parent / "results"
BASE = "http://127.0.0.1:8000"
KEYS = tuple(f"sk-bench-user-{i}" for i in range(4))
PROMPT = [3 + i % 400 for i in range(128)]


@dataclass(frozen=True)
class Plan:
    seconds: float
    rounds: int
    light_requests: int
    streams: tuple[int, ...]
    long_tokens: int
    short_tokens: int
    two_ingress: bool = True  # also the full path with 2 ingress replicas, and unary requests
    wait_deletes: bool = True  # a stage starts once the last one's apps are gone (their replicas burn CPU)
    grant_ingress: int = 4  # ingress replicas sending to the controller in the grant stage


FULL = Plan(seconds=10.0, rounds=2, light_requests=200, streams=(64, 256), long_tokens=256, short_tokens=32)
SMOKE = Plan(seconds=2.0, rounds=1, light_requests=20, streams=(64,), long_tokens=64, short_tokens=16,
             two_ingress=False, grant_ingress=2, wait_deletes=False)


def sim_pool(gpu: str, window: int = 256, time_scale: float = 1.0) -> dict:
    return {"name": gpu.lower(), "gpu_type": "CPU", "engine": "sim", "num_cpus": 0,
            "sim": {"gpu": gpu, "time_scale": time_scale, "max_num_seqs": window},
            "admission": {"max_window": window, "initial_window": window},
            "autoscaling": {"min_replicas": 1, "max_replicas": 1}}


def app_config(pool: dict, ingress_replicas: int):
    from equinox_ray.serve.config import AppConfig

    return AppConfig.model_validate({
        "model": {"name": "sim", "tokenizer": None},
        "ingress": {"num_replicas": ingress_replicas},
        "users": [{"name": f"user{i}", "key": {"sha256": digest(k)}} for i, k in enumerate(KEYS)],
        "limits": {"max_queue_per_user": 4096},
        "telemetry": {"exporter": "none"},
        "pools": [pool],
    })


def deploy(apps: dict[str, object]) -> None:
    from ray import serve

    started = time.monotonic()
    for name, app in apps.items():
        serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
    deadline = started + 300
    while time.monotonic() < deadline:
        status = serve.status().applications
        if all(status[name].status == "RUNNING" for name in apps):
            print(f"deployed {', '.join(apps)} in {time.monotonic() - started:.0f} s", flush=True)
            return
        time.sleep(1)
    raise RuntimeError(f"applications not running: { {n: serve.status().applications[n].status for n in apps} }")


def measure(app: str, load: Load, clients: int, seconds: float) -> dict:
    """One load on one application: its delivery and the CPU of every process it crossed."""
    asyncio.run(run(load, clients, seconds=min(2.0, seconds)))  # warm: channels open, windows full
    before, started = cpu.snapshot(app), time.perf_counter()
    summary = asyncio.run(run(load, clients, seconds=seconds))
    used = cpu.spent(before, cpu.snapshot(app))
    return {**summary.row(), "cpu_s": used, "wall": time.perf_counter() - started}


def load_for(app: str, tokens: int, stream: bool) -> Load:
    return Load(f"{BASE}/{app}/v1/completions", "sim", PROMPT, tokens, stream, KEYS)


async def in_process(gpu: str, clients: int, tokens: int, seconds: float, window: int = 256) -> dict:
    """The same engine and load with no Serve: requests straight into the replica, in this process."""
    import resource

    from equinox_ray.engines.admission import AdmissionWindow
    from equinox_ray.engines.replica import Replica
    from equinox_ray.engines.sim_engine import SimEngine, SimEngineConfig
    from equinox_ray.engines.types import GenerationRequest

    replica = Replica(SimEngine(SimEngineConfig(gpu=gpu, max_num_seqs=window)), AdmissionWindow(maximum=window))
    await replica.start()
    served, counter = 0, 0
    ttfts: list[float] = []

    async def client(deadline: float) -> None:
        nonlocal served, counter
        while time.perf_counter() < deadline:
            counter += 1
            start, first = time.perf_counter(), None
            async for chunk in replica.generate(GenerationRequest(f"r{counter}", tokens, prompt_token_ids=PROMPT,
                                                                  ignore_eos=True)):
                if first is None and chunk.token_ids:
                    first = time.perf_counter() - start
                served += len(chunk.token_ids)
            ttfts.append(first)

    await asyncio.gather(*(client(time.perf_counter() + 1.0) for _ in range(clients)))  # warm
    served, ttfts = 0, []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    await asyncio.gather(*(client(started + seconds) for _ in range(clients)))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    await replica.engine.shutdown()
    cpu_s = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    return {"tokens_per_s": served / wall, "ttft_p50_ms": 1000 * float(np.median(ttfts)),
            "ttft_p99_ms": 1000 * float(np.percentile(ttfts, 99)), "cpu_us_per_token": 1e6 * cpu_s / served,
            "requests_per_s": len(ttfts) / wall}


def light_latency(apps: tuple[str, str], requests: int) -> dict[str, list[float]]:
    """One client, one short request at a time, alternating between the two applications."""
    times: dict[str, list[float]] = {app: [] for app in apps}

    async def main():
        import aiohttp

        from bench.load import one

        async with aiohttp.ClientSession() as session:
            for i in range(2 * requests + 20):
                app = apps[i % 2]
                result = await one(session, load_for(app, 4, stream=False), KEYS[0])
                if i >= 20:
                    times[app].append(result.e2e_s)

    asyncio.run(main())
    return times


def per_token(row: dict, kinds=cpu.SERVER_KINDS) -> float:
    return 1e6 * sum(row["cpu_s"][k] for k in kinds) / max(row["tokens"], 1)


def fit(long: dict, short: dict) -> tuple[float, float]:
    """Server CPU = a * requests + b * tokens through the two runs: (ms per request, µs per token)."""
    a = np.array([[long["requests"], long["tokens"]], [short["requests"], short["tokens"]]], dtype=float)
    y = np.array([sum(r["cpu_s"][k] for k in cpu.SERVER_KINDS) for r in (long, short)])
    per_request, per_token_s = np.linalg.solve(a, y)
    return 1000 * per_request, 1e6 * per_token_s


def main(smoke: bool = False, out: Path = RESULTS) -> dict:
    from equinox_ray.serve.ray_env import use_fast_path

    use_fast_path()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from bench.forwarding import forwarding_app
    from equinox_ray.serve.app import build
    from equinox_ray.serve.config import PoolConfig

    plan = SMOKE if smoke else FULL
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    report: dict = {"plan": plan.__dict__, "machine": f"{os.cpu_count()} cores"}
    try:
        a100 = sim_pool("A100")
        apps = {"fwd": lambda: forwarding_app(PoolConfig.model_validate(a100)),
                "eq1": lambda: build(app_config(a100, 1)), "eq2": lambda: build(app_config(a100, 2))}
        if not plan.two_ingress:
            del apps["eq2"]
        deploy({name: make() for name, make in apps.items()})
        loads = [(f"stream {plan.long_tokens} x {n}", plan.long_tokens, True, n) for n in plan.streams]
        if plan.two_ingress:
            loads.append((f"unary {plan.long_tokens} x {plan.streams[0]}", plan.long_tokens, False, plan.streams[0]))
        loads.append((f"stream {plan.short_tokens} x {plan.streams[0]}", plan.short_tokens, True, plan.streams[0]))
        rows: dict[str, dict[str, list[dict]]] = {label: {app: [] for app in apps} for label, *_ in loads}
        for _ in range(plan.rounds):
            for label, tokens, stream, clients in loads:
                for app in apps:
                    rows[label][app].append(measure(app, load_for(app, tokens, stream), clients, plan.seconds))
                    print(f"{label:>20} {app}: {rows[label][app][-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
        engine = {n: asyncio.run(in_process("A100", n, plan.long_tokens, plan.seconds)) for n in plan.streams}
        light = light_latency(("fwd", "eq1"), plan.light_requests)
        for name in apps:
            if name != "eq1":
                serve.delete(name, _blocking=plan.wait_deletes)
        report["a100"] = {"loads": rows, "engine": engine, "light_ms": {
            app: {"p50": 1000 * float(np.median(t)), "p99": 1000 * float(np.percentile(t, 99))}
            for app, t in light.items()}}
        report["h100"] = h100_stage(plan) if not smoke else None
        report["grants"] = grant_stage(plan)
    finally:
        serve.shutdown()
        ray.shutdown()
    summary = summarize(report, plan)
    out.mkdir(parents=True, exist_ok=True)
    name = "path-smoke" if smoke else "path"
    (out / f"{name}.json").write_text(json.dumps({**summary, "raw": report}, indent=1, default=float))
    text = render(summary, report, plan, smoke)
    (out / f"{name}.md").write_text(text)
    print(text)
    return summary


def h100_stage(plan: Plan) -> dict:
    from ray import serve

    from equinox_ray.serve.app import build

    deploy({"eqh": build(app_config(sim_pool("H100"), 1))})
    rows = {n: [] for n in plan.streams}
    for _ in range(plan.rounds):
        for n in plan.streams:
            rows[n].append(measure("eqh", load_for("eqh", plan.long_tokens, True), n, plan.seconds))
    engine = {n: asyncio.run(in_process("H100", n, plan.long_tokens, plan.seconds)) for n in plan.streams}
    serve.delete("eqh", _blocking=plan.wait_deletes)
    return {"loads": rows, "engine": engine}


def grant_stage(plan: Plan) -> dict:
    """`plan.grant_ingress` ingress replicas (4 in the full run) and a fast pool (the simulated H100 at 20x), short requests: as many grants per second
    as this machine can send; the controller's CPU per grant is what counts."""
    from ray import serve

    from equinox_ray.serve.app import build

    pool = sim_pool("H100", window=256, time_scale=20.0)
    deploy({"eq4": build(app_config(pool, plan.grant_ingress))})
    row = measure("eq4", load_for("eq4", 4, stream=False), 128, plan.seconds * (2 if plan.two_ingress else 1))
    serve.delete("eq4", _blocking=plan.wait_deletes)
    controller_s = row["cpu_s"]["controller"]
    return {**row, "grants_per_controller_cpu_s": row["requests"] / max(controller_s, 1e-9)}


def mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def summarize(report: dict, plan: Plan) -> dict:
    a = report["a100"]
    long_stream = f"stream {plan.long_tokens} x {plan.streams[0]}"
    short_stream = f"stream {plan.short_tokens} x {plan.streams[0]}"
    full = a["loads"][long_stream]["eq1"][-1]
    per_request_ms, marginal_us = fit(full, a["loads"][short_stream]["eq1"][-1])
    widest = f"stream {plan.long_tokens} x {plan.streams[-1]}"
    engine_ratio = {"A100": mean(a["loads"][widest]["eq1"], "tokens_per_s") /
                    a["engine"][plan.streams[-1]]["tokens_per_s"]}
    if report.get("h100"):
        h = report["h100"]
        engine_ratio["H100"] = mean(h["loads"][plan.streams[-1]], "tokens_per_s") / \
            h["engine"][plan.streams[-1]]["tokens_per_s"]
    overhead = RESULTS / "fairness_overhead.json"
    vllm_ratio = json.loads(overhead.read_text())["vllm_ratio"] if overhead.exists() else None
    return {"cpu_us_per_token": per_token(full), "cpu_us_per_token_marginal": marginal_us,
            "cpu_ms_per_request": per_request_ms, "engine_ratio": engine_ratio,
            "controller_grants_per_s": report["grants"]["grants_per_controller_cpu_s"],
            "added_p50_ms": a["light_ms"]["eq1"]["p50"] - a["light_ms"]["fwd"]["p50"],
            "vllm_ratio": vllm_ratio}


def render(summary: dict, report: dict, plan: Plan, smoke: bool) -> str:
    a = report["a100"]
    lines = [f"# The serving path{' (smoke)' if smoke else ''}", "",
             f"`python -m bench path{' --smoke' if smoke else ''}` on {report['machine']}: HAProxy and gRPC on; "
             f"simulated A100 replicas at real-time pace (window 256), {plan.seconds:g} s per load, "
             f"{plan.rounds} alternating round(s); prompts of {len(PROMPT)} tokens, `ignore_eos`. `fwd` is the bare "
             "forwarding ingress, `eq1` and `eq2` the full application with 1 and 2 ingress replicas. CPU is per "
             "process kind, summed over the processes of the application under load.", "",
             "| load | path | output tokens/s | requests/s | TTFT p50 ms | TTFT p99 ms | server CPU µs/token | "
             "proxy | ingress | controller | pool | client µs/token |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, by_app in a["loads"].items():
        for app, rows in by_app.items():
            r = rows[-1]
            cells = [f"{1e6 * r['cpu_s'][k] / max(r['tokens'], 1):.0f}" for k in cpu.SERVER_KINDS]
            lines.append(f"| {label} | {app} | {mean(rows, 'tokens_per_s'):,.0f} | {mean(rows, 'requests_per_s'):,.1f}"
                         f" | {r['ttft_p50_ms'] or 0:.0f} | {r['ttft_p99_ms'] or 0:.0f} | {per_token(r):.0f} | "
                         + " | ".join(cells) + f" | {1e6 * r['cpu_s']['client'] / max(r['tokens'], 1):.0f} |")
    for n, e in a["engine"].items():
        lines.append(f"| stream {plan.long_tokens} x {n} | engine in process | {e['tokens_per_s']:,.0f} | "
                     f"{e['requests_per_s']:,.1f} | {e['ttft_p50_ms']:.0f} | {e['ttft_p99_ms']:.0f} | "
                     f"{e['cpu_us_per_token']:.0f} (engine alone) | | | | | |")
    if report.get("h100"):
        h = report["h100"]
        for n, rows in h["loads"].items():
            r = rows[-1]
            lines.append(f"| H100 stream {plan.long_tokens} x {n} | eq1 | {mean(rows, 'tokens_per_s'):,.0f} | "
                         f"{mean(rows, 'requests_per_s'):,.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
                         f"{per_token(r):.0f} | | | | | |")
            e = h["engine"][n]
            lines.append(f"| H100 stream {plan.long_tokens} x {n} | engine in process | {e['tokens_per_s']:,.0f} | "
                         f"{e['requests_per_s']:,.1f} | {e['ttft_p50_ms']:.0f} | {e['ttft_p99_ms']:.0f} | "
                         f"{e['cpu_us_per_token']:.0f} (engine alone) | | | | | |")
    g = report["grants"]
    s = summary
    ratios = ", ".join(f"{gpu} {r:.2f}x" for gpu, r in s["engine_ratio"].items())
    vllm = "not measured yet" if s["vllm_ratio"] is None else f"{s['vllm_ratio']:.2f}x"
    lines += ["", f"Light load (one client, 4-token requests, alternating): p50 {a['light_ms']['fwd']['p50']:.1f} ms "
              f"forwarding, {a['light_ms']['eq1']['p50']:.1f} ms full path.",
              f"Controller: {g['requests']:,} grants in {g['wall_s']:.0f} s from {plan.grant_ingress} ingress replicas, "
              f"{1e3 * g['cpu_s']['controller'] / max(g['requests'], 1):.3f} ms of controller CPU each.", "",
              "| target | measured | goal |", "|---|---:|---:|",
              f"| server CPU per streamed token (long requests, {plan.streams[0]} streams) | "
              f"{s['cpu_us_per_token']:.0f} µs | <= 50 µs |",
              f"| marginal CPU per token / fixed CPU per request (fit of long and short requests) | "
              f"{s['cpu_us_per_token_marginal']:.0f} µs / {s['cpu_ms_per_request']:.2f} ms | <= 50 µs / <= 5 ms |",
              f"| full path / engine in process at {plan.streams[-1]} streams | {ratios} | >= 0.9x |",
              f"| controller grants per CPU-second | {s['controller_grants_per_s']:,.0f} | >= 5,000 |",
              f"| added p50 at light load | {s['added_p50_ms']:.2f} ms | < 2 ms |",
              f"| full path / vLLM's own server (bench.fairness_overhead) | {vllm} | >= 0.95x |"]
    return "\n".join(lines) + "\n"
