"""Training records from replaying a workload through one simulated GPU (SimBatcher under a virtual clock).

    python -m predictors.replay --trace lmsys --gpu A100 --scale 1.0 --out records.jsonl

As in serving, requests wait in a queue in front of the engine and are dispatched while it has a free slot; TTFT and
end-to-end time count from dispatch. The engine sees the true output length (it is the trace); the records keep
the scheduler's view (the cap) apart.
"""

from __future__ import annotations

import argparse
from collections import deque
from pathlib import Path

from equinox_ray.engines.gpu_profiles import StepModel
from equinox_ray.engines.sim_batcher import SimBatcher, SimSequence
from equinox_ray.workloads.workload import Workload
from predictors import records as rec


def replay(workload: Workload, gpu: str = "A100", model: str = "Llama-2-7B", rate_scale: float = 1.0,
           max_tokens_cap: int = 1024, max_num_seqs: int = 32, window_s: float = 5.0) -> list[dict]:
    step_model = StepModel.of(gpu, model)
    batcher = SimBatcher(step_model, max_num_seqs=max_num_seqs, max_num_batched_tokens=2048)
    arrivals = [(r.arrival_s / rate_scale, i, r) for i, r in enumerate(workload.requests)]
    clock, nxt, out = 0.0, 0, []
    queue: deque = deque()  # the controller's queue: requests wait here, not in the engine
    live: dict[str, dict] = {}
    steps: deque[tuple[float, float, int]] = deque()  # (end, duration, tokens) over the last window_s
    while nxt < len(arrivals) or queue or batcher.has_work():
        if not batcher.has_work() and not queue and nxt < len(arrivals):
            clock = max(clock, arrivals[nxt][0])
        while nxt < len(arrivals) and arrivals[nxt][0] <= clock:
            queue.append(arrivals[nxt])
            nxt += 1
        while queue and len(batcher.running) + len(batcher.waiting) < max_num_seqs:
            t, i, r = queue.popleft()
            cap = max(min(max_tokens_cap, 4096 - r.prompt_tokens), 1)
            live[str(i)] = {"arrival_s": t, "user": r.user, "prompt_tokens": r.prompt_tokens, "max_tokens": cap,
                            "gpu": gpu, "running": len(batcher.running), "waiting": len(batcher.waiting),
                            "kv_usage": batcher.kv_usage, "window": max_num_seqs, "dispatch": clock, "first": None}
            batcher.add(SimSequence(str(i), r.prompt_tokens, r.output_tokens))
        step = batcher.step()
        clock += step.duration
        steps.append((clock, step.duration, sum(step.tokens.values())))
        while steps[0][0] < clock - window_s:
            steps.popleft()
        for seq_id in step.emitted:
            if live[seq_id]["first"] is None:
                live[seq_id]["first"] = clock
        for seq_id in step.finished:
            s = live.pop(seq_id)
            first, dispatch = s.pop("first"), s.pop("dispatch")
            out.append({**s, "output_tokens": workload.requests[int(seq_id)].output_tokens,
                        "ttft_s": first - dispatch, "e2e_s": clock - dispatch,
                        "throughput_tps": sum(n for _, _, n in steps) / window_s,
                        "utilization": min(1.0, sum(d for _, d, _ in steps) / window_s), "finish_s": clock})
    return sorted(out, key=lambda r: r["arrival_s"])


def main() -> None:
    from equinox_ray.workloads import synthetic, traces

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", choices=["lmsys", "sharegpt"], default="lmsys")
    parser.add_argument("--gpu", default="A100")
    parser.add_argument("--scale", type=float, default=1.0, help="arrival rate multiplier")
    parser.add_argument("--requests", type=int, default=3000, help="sharegpt: how many requests")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.trace == "lmsys":
        workload = traces.lmsys_arena()
    else:
        workload = synthetic.zipf_users(traces.sharegpt_lengths(), n_users=50, n_requests=args.requests, rate=3.0,
                                        seed=0, name="sharegpt")
    records = replay(workload, gpu=args.gpu, rate_scale=args.scale)
    rec.write(args.out, records)
    print(f"{len(records)} records written to {args.out}")


if __name__ == "__main__":
    main()
