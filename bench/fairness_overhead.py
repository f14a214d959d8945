"""The serving path against the real peer: vLLM's own OpenAI server on the same tiny model and engine settings,
next to the full application as deploy/equinox.yaml configures it and the bare forwarding ingress (bench/forwarding.py). Each runs alone on the machine in turn (three vLLM
engines side by side on 2 cores slow each other: an engine's OpenMP threads spin after each step), and the rounds
alternate (A, B, C, A, B, C), so drift on the machine hits each alike. Ray is not running while vLLM is measured.

    python -m bench.fairness_overhead [--seconds 20] [--rounds 3] [--clients 64]

Saturation: `clients` closed-loop streaming clients, prompts of 64 random token ids, 32 output tokens
(`ignore_eos`), as `vllm bench serve --dataset-name random --random-input-len 64 --random-output-len 32` sends.
Light load: one client, 4-token requests, alternating. CPU is counted in every process of each path (for vLLM,
its API server and its engine core; for ours, HAProxy, the ingress, the controller and the pool replica with its
engine core), and the engine's processes (vLLM's engine core and worker, the same on every path) apart from the
rest, which is what the serving path itself costs. Writes bench/results/fairness_overhead.md and .json;
`python -m bench path` quotes the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from bench import cpu
from bench.load import Load, one, run
from equinox_ray.serve.local import default_args
from equinox_ray.serve.paths import PROJECT_ROOT

RESULTS = Path(__file__).parent / "results"
KEY = "sk-alice-demo-key"
VLLM_PORT = 8100


def equinox_args() -> dict:
    args = default_args()
    args["limits"]["max_queue_per_user"] = 4096
    args["telemetry"] = {"exporter": "none"}
    return args


def start_vllm(engine: dict, log: Path) -> subprocess.Popen:
    """vLLM's own OpenAI server with the pool's engine settings."""
    model = str(PROJECT_ROOT / engine["model"])
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", "tiny-llama", "--host", "127.0.0.1", "--port", str(VLLM_PORT),
               "--max-model-len", str(engine["max_model_len"]), "--max-num-seqs", str(engine["max_num_seqs"]),
               "--max-num-batched-tokens", str(engine["max_num_batched_tokens"]), "--enforce-eager",
               "--dtype", "bfloat16", "--scheduling-policy", "priority",
               "--kv-cache-memory-bytes", str(engine["kv_cache_memory_bytes"]),
               "--chat-template", str(Path(__file__).parent / "chat_template.jinja")]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(max(1, engine["kv_cache_memory_bytes"] // 1024**3))}
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def wait_for(url: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"{url} did not come up")


def vllm_processes(server: subprocess.Popen) -> list[psutil.Process]:
    parent = psutil.Process(server.pid)
    return [parent, *parent.children(recursive=True)]


def cpu_of(processes: list[psutil.Process]) -> float:
    total = 0.0
    for p in processes:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def engine_processes() -> list[psutil.Process]:
    """vLLM's engine core and its worker, whichever server started them (they name themselves `VLLM::...`); one
    path runs at a time, so these are the measured path's."""
    found = []
    for process in psutil.process_iter():
        try:
            if " ".join(process.cmdline()).startswith("VLLM::"):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def measure(path: str, load: Load, clients: int, seconds: float, vllm: list[psutil.Process]) -> dict:
    """One saturating load on one path, with the CPU of every process the path has, and how much of it the engine
    took (the same engine on every path: the rest is the serving path's own)."""
    asyncio.run(run(load, clients, seconds=3.0))  # warm
    app = {"equinox": "equinox", "forwarding": "fwd"}.get(path)
    engine = engine_processes()
    before, vllm_before, engine_before = cpu.snapshot(app), cpu_of(vllm), cpu_of(engine)
    summary = asyncio.run(run(load, clients, seconds=seconds))
    spent = cpu.spent(before, cpu.snapshot(app))
    engine_s = cpu_of(engine) - engine_before
    server_s = cpu_of(vllm) - vllm_before if path == "vllm" else sum(spent[k] for k in cpu.SERVER_KINDS)
    row = summary.row()
    tokens = max(row["tokens"], 1)
    per_token = {kind: 1e6 * spent[kind] / tokens for kind in cpu.KINDS}
    return {**row, "server_cpu_s": server_s, "client_cpu_s": spent["client"], "ray_cpu_s": spent["ray"],
            "server_us_per_token": 1e6 * server_s / tokens, "us_per_token_by_kind": per_token,
            "engine_us_per_token": 1e6 * engine_s / tokens, "outside_engine_us_per_token": 1e6 * (server_s - engine_s)
            / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--light-requests", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still stops its vLLM server
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    prompt = [rng.randrange(3, 500) for _ in range(64)]
    loads = {"vllm": Load(f"http://127.0.0.1:{VLLM_PORT}/v1/completions", "tiny-llama", prompt, 32, True),
             "equinox": Load("http://127.0.0.1:8000/equinox/v1/completions", "tiny-llama", prompt, 32, True, (KEY,)),
             "forwarding": Load("http://127.0.0.1:8000/fwd/v1/completions", "tiny-llama", prompt, 32, True)}
    rows: dict[str, list[dict]] = {path: [] for path in loads}
    light: dict[str, list[float]] = {path: [] for path in loads}
    for r in range(args.rounds):
        for path, (saturated, latencies) in [("vllm", run_vllm(loads["vllm"], args)),
                                             *run_ray_paths({p: loads[p] for p in ("equinox", "forwarding")}, args)]:
            rows[path].append(saturated)
            light[path] += latencies
            print(f"round {r + 1} {path}: {saturated['tokens_per_s']:,.0f} output tokens/s, "
                  f"{saturated['server_us_per_token']:.0f} µs server CPU per token, light-load p50 "
                  f"{1000 * np.median(latencies):.1f} ms", flush=True)
    write(rows, {p: {"p50_ms": 1000 * float(np.median(t)), "p99_ms": 1000 * float(np.percentile(t, 99))}
                 for p, t in light.items()}, args)


def run_vllm(load: Load, args) -> tuple[dict, list[float]]:
    """vLLM's own server alone on the machine (no Ray running): saturation, then light load."""
    server = start_vllm(equinox_args()["pools"][0]["vllm"], args.out / "fairness_overhead-vllm.log")
    try:
        wait_for(f"http://127.0.0.1:{VLLM_PORT}/health")
        return measure("vllm", load, args.clients, args.seconds, vllm_processes(server)), \
            light_latency(load, args.light_requests)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def run_ray_paths(loads: dict[str, Load], args) -> list[tuple[str, tuple[dict, list[float]]]]:
    """Our two paths, each deployed alone on a fresh Ray cluster in turn."""
    from equinox_ray.serve.ray_env import use_fast_path

    use_fast_path()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from bench.forwarding import forwarding_app
    from bench.path import deploy
    from equinox_ray.serve.app import build
    from equinox_ray.serve.config import AppConfig

    config = AppConfig.model_validate(equinox_args())
    cpu.server_at_client_priority()  # vLLM's server runs at this process's priority too
    apps = {"equinox": lambda: build(config), "forwarding": lambda: forwarding_app(config.pools[0])}
    out = []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for path, load in loads.items():
            name = "equinox" if path == "equinox" else "fwd"
            deploy({name: apps[path]()})
            out.append((path, (measure(path, load, args.clients, args.seconds, []),
                               light_latency(load, args.light_requests))))
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def light_latency(load: Load, requests: int) -> list[float]:
    """One client, one 4-token request at a time."""
    import aiohttp

    short = Load(load.url, load.model, load.prompt, 4, False, load.keys)

    async def main() -> list[float]:
        async with aiohttp.ClientSession() as session:
            times = [(await one(session, short, load.keys[0])).e2e_s for _ in range(requests + 10)]
        return times[10:]

    return asyncio.run(main())


def write(rows: dict[str, list[dict]], light: dict[str, dict], args) -> None:
    tps = {path: float(np.mean([r["tokens_per_s"] for r in rs])) for path, rs in rows.items()}
    pairs = [e["tokens_per_s"] / v["tokens_per_s"] for e, v in zip(rows["equinox"], rows["vllm"])]
    result = {"vllm_ratio": tps["equinox"] / tps["vllm"], "vllm_ratio_per_round": pairs,
              "forwarding_ratio": tps["forwarding"] / tps["vllm"],
              "added_p50_ms_vs_vllm": light["equinox"]["p50_ms"] - light["vllm"]["p50_ms"],
              "added_p50_ms_vs_forwarding": light["equinox"]["p50_ms"] - light["forwarding"]["p50_ms"],
              "rows": rows, "light": light,
              "load": f"{args.clients} streaming clients, 64 prompt tokens, 32 output tokens, {args.seconds:g} s x "
                      f"{args.rounds} rounds"}
    (args.out / "fairness_overhead.json").write_text(json.dumps(result, indent=1))
    lines = ["# The serving path against vLLM's own OpenAI server (same tiny model, same engine settings)", "",
             f"`python -m bench.fairness_overhead`: {result['load']}, alternating between the paths. Server CPU "
             "counts every process of a path.", "",
             "| path | output tokens/s (mean) | per round | TTFT p50 ms | TTFT p99 ms | server CPU µs/token | "
             "light-load p50 ms | light-load p99 ms |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for path, rs in rows.items():
        last = rs[-1]
        per_round = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in rs)
        lines.append(f"| {path} | {tps[path]:,.0f} | {per_round} | "
                     f"{last['ttft_p50_ms']:.0f} | {last['ttft_p99_ms']:.0f} | "
                     f"{np.mean([r['server_us_per_token'] for r in rs]):.0f} | {light[path]['p50_ms']:.1f} | "
                     f"{light[path]['p99_ms']:.1f} |")
    lines += ["", "Where the server's CPU per output token goes (µs, mean over rounds): the engine is vLLM's engine "
              "core and worker processes (the same engine on every path); the rest is the serving path's own. On a GPU "
              "the engine's step runs on the GPU, but on these shared cores every µs outside the engine is taken from "
              "it.",
              "", "| path | engine | outside the engine | proxy | ingress | controller | pool replica | Ray's own "
              "(GCS, raylet, Serve controller; not in the server CPU) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for path, rs in rows.items():
        engine = float(np.mean([r["engine_us_per_token"] for r in rs]))
        outside = float(np.mean([r["outside_engine_us_per_token"] for r in rs]))
        kinds = {k: float(np.mean([r["us_per_token_by_kind"][k] for r in rs])) for k in cpu.KINDS}
        kinds["pool"] -= engine  # the pool replica's own process
        cells = ["-"] * 5 if path == "vllm" else [f"{kinds[k]:.0f}" for k in ("proxy", "ingress", "controller",
                                                                              "pool", "ray")]
        lines.append(f"| {path} | {engine:.0f} | {outside:.0f} | " + " | ".join(cells) + " |")
    lines += ["", f"Full path / vLLM's own server: **{result['vllm_ratio']:.2f}x** output tokens/s (rounds: "
              f"{', '.join(f'{p:.2f}' for p in pairs)}; target >= 0.95x). Bare forwarding ingress / vLLM: "
              f"{result['forwarding_ratio']:.2f}x. Added median latency at light load: "
              f"{result['added_p50_ms_vs_vllm']:.1f} ms against vLLM, {result['added_p50_ms_vs_forwarding']:.1f} ms "
              "against the forwarding ingress."]
    text = "\n".join(lines) + "\n"
    (args.out / "fairness_overhead.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
