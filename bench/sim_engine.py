"""SimEngine benchmark: (1) the step times it produces in real time against the roofline formula, (2) saturated
throughput per GPU profile on a fixed workload (virtual clock).

    python -m bench.sim_engine
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from equinox_ray.engines.gpu_profiles import GPUS, MODELS, StepModel
from equinox_ray.engines.sim_batcher import SimBatcher, SimSequence
from equinox_ray.engines.sim_engine import SimEngine, SimEngineConfig
from equinox_ray.engines.types import GenerationRequest
from equinox_ray.workloads.traces import sharegpt_lengths


def roofline_seconds(gpu: str, model: str, tp: int, prefill: int, prefill_ctx: int, seqs: int, ctx: int,
                     overhead: float) -> float:
    """The formula written out again from the published peaks, independent of StepModel."""
    g, m = GPUS[gpu], MODELS[model]
    kv_bytes = 2 * m.layers * m.kv_heads * (m.hidden // m.heads) * 2
    flops = 2 * m.params * (prefill + seqs) + 4 * m.layers * m.hidden * (prefill_ctx + ctx)
    moved = 2 * m.params + kv_bytes * (ctx + prefill)
    return max(flops / (tp * g.bf16_tflops * 1e12), moved / (tp * g.memory_bandwidth_gbs * 1e9)) + overhead


async def drain(stream) -> int:
    return sum([len(c.token_ids) async for c in stream])


async def measured_decode_steps(gpu: str, model: str, batch: int, prompt: int, tokens: int) -> tuple[float, float]:
    """Wall-clock time of `tokens` decode steps of `batch` sequences, and the formula's sum for the same steps."""
    config = SimEngineConfig(gpu=gpu, model=model, tp=2 if model == "Llama-2-70B" else 1, time_scale=1.0)
    engine = SimEngine(config)
    await engine.start()
    requests = [GenerationRequest(f"s{i}", tokens + 1, prompt_token_ids=[1] * prompt) for i in range(batch)]
    streams = [engine.generate(r) for r in requests]
    await asyncio.gather(*(s.__anext__() for s in streams))  # all join the same prefill step
    start = time.monotonic()
    await asyncio.gather(*(drain(s) for s in streams))
    wall = time.monotonic() - start
    await engine.shutdown()
    formula = sum(roofline_seconds(gpu, model, config.tp, 0, 0, batch, batch * (prompt + k), config.overhead_s)
                  for k in range(1, tokens + 1))
    return wall, formula


def saturated_throughput(gpu: str, model: str, tp: int, lengths: list[tuple[int, int]]) -> tuple[float, float]:
    batcher = SimBatcher(StepModel.of(gpu, model, tp), max_num_seqs=256, max_num_batched_tokens=2048)
    for i, (p, o) in enumerate(lengths):
        batcher.add(SimSequence(str(i), p, o))
    clock = tokens = output = 0.0
    while batcher.has_work():
        step = batcher.step()
        clock += step.duration
        tokens += sum(step.tokens.values())
        output += len(step.emitted)
    return tokens / clock, output / clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()

    print("## Step time: SimEngine in real time vs the roofline formula (decode steps, Llama-2-7B)\n")
    print("| GPU | batch | steps | measured s | formula s | error |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for gpu in GPUS:
        for batch in (1, 16):
            wall, formula = asyncio.run(measured_decode_steps(gpu, "Llama-2-7B", batch, prompt=100, tokens=60))
            error = abs(wall - formula) / formula
            worst = max(worst, error)
            print(f"| {gpu} | {batch} | 60 | {wall:.3f} | {formula:.3f} | {100 * error:.2f}% |")
    print(f"\nworst step-time error: {100 * worst:.2f}% (target: within 1%)\n")

    rng = np.random.default_rng(0)
    pool = [(p, o) for p, o in sharegpt_lengths() if p + o <= 4096]
    lengths = [pool[i] for i in rng.integers(0, len(pool), size=args.requests)]
    print(f"## Saturated throughput: {args.requests} ShareGPT requests at once, max 256 sequences, "
          "2,048-token step budget\n")
    print("| GPU | model | TP | KV tokens | tokens/s | output tokens/s |")
    print("|---|---|---|---|---|---|")
    for model, tp_by_gpu in [("Llama-2-7B", {}), ("Llama-3-8B", {}), ("Llama-2-70B", {"L4": 8, "A10G": 8})]:
        for gpu in GPUS:
            tp = tp_by_gpu.get(gpu, 4 if model == "Llama-2-70B" else 1)
            step_model = StepModel.of(gpu, model, tp)
            fitting = [(p, o) for p, o in lengths if p + o <= step_model.kv_capacity_tokens]
            tps, out = saturated_throughput(gpu, model, tp, fitting)
            print(f"| {gpu} | {model} | {tp} | {step_model.kv_capacity_tokens:,} | {tps:,.0f} | {out:,.0f} |")


if __name__ == "__main__":
    main()
