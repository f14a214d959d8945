"""Completion records from the real serving path: the default application (vLLM on the CPU, tiny model) with
`records_path` set, driven by a trace replayed over HTTP.

    python -m predictors.collect --trace lmsys --requests 400 --time-scale 4 --out predictors/data/vllm_cpu_lmsys.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", choices=["lmsys", "sharegpt"], default="lmsys")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--time-scale", type=float, default=4.0, help="arrivals come this many times sooner")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from equinox_ray.serve.local import BASE_URL, default_app
    from equinox_ray.workloads import synthetic, traces
    from equinox_ray.workloads.http_replay import replay_over_http

    workload = traces.lmsys_arena() if args.trace == "lmsys" else synthetic.zipf_users(
        traces.sharegpt_lengths(), n_users=20, n_requests=args.requests, rate=2.0, seed=0, name="sharegpt")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.unlink(missing_ok=True)
    with default_app(workload.users, args.out, "sk-replay") as keys:
        results = asyncio.run(replay_over_http(BASE_URL, workload, keys, "tiny-llama", time_scale=args.time_scale,
                                               limit=args.requests))
    ok = sum(1 for r in results if r.status == 200)
    lines = sum(1 for _ in args.out.open()) if args.out.exists() else 0
    print(f"{ok}/{len(results)} requests served; {lines} records written to {args.out}")


if __name__ == "__main__":
    main()
