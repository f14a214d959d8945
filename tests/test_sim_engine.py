import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from equinox_ray.engines.admission import AdmissionWindow
from equinox_ray.engines.gpu_profiles import StepModel
from equinox_ray.engines.replica import Replica
from equinox_ray.engines.sim_batcher import SimBatcher, SimSequence
from equinox_ray.engines.sim_engine import SimEngine, SimEngineConfig
from equinox_ray.engines.types import EngineError, GenerationRequest, RequestRejected

A100 = StepModel.of("A100", "Llama-2-7B")


def test_prefill_then_decode_timing_follows_the_roofline():
    batcher = SimBatcher(A100, max_num_batched_tokens=2048)
    batcher.add(SimSequence("a", prompt_tokens=500, max_tokens=3))
    first = batcher.step()
    assert first.tokens == {"a": 500} and first.emitted == ["a"]
    assert first.duration == pytest.approx(A100.step_time(500, 500 * 501 // 2, 0, 0))
    second = batcher.step()
    assert second.tokens == {"a": 1}
    assert second.duration == pytest.approx(A100.step_time(0, 0, 1, 501))
    third = batcher.step()
    assert third.finished == ["a"] and not batcher.has_work()
    assert second.duration < first.duration  # a 500-token prefill costs more than one decode


def test_requests_wait_when_the_kv_cache_is_full():
    batcher = SimBatcher(A100, kv_capacity_tokens=300)
    batcher.add(SimSequence("a", 100, 100))
    batcher.add(SimSequence("b", 100, 100))
    batcher.step()
    assert [s.id for s in batcher.running] == ["a"] and [s.id for s in batcher.waiting] == ["b"]
    while "a" not in batcher.step().finished:
        pass
    batcher.step()
    assert [s.id for s in batcher.running] == ["b"]
    with pytest.raises(ValueError, match="KV tokens"):
        batcher.add(SimSequence("huge", 200, 200))


def test_chunked_prefill_never_stalls_running_decodes():
    batcher = SimBatcher(A100, max_num_batched_tokens=256)
    batcher.add(SimSequence("short", 10, 50))
    batcher.step()  # short's prefill
    batcher.add(SimSequence("long", 1000, 5))
    chunks = []
    for _ in range(4):
        step = batcher.step()
        assert "short" in step.emitted  # a decode token every step while the long prompt is prefilled
        chunks.append(step.tokens.get("long", 0))
    assert chunks == [255, 255, 255, 235]  # the budget minus one decode token, then the rest
    assert "long" in step.emitted  # its first token comes with the last chunk


def run(coro):
    return asyncio.run(coro)


async def collect(engine, request):
    return [chunk async for chunk in engine.generate(request)]


def fast_config(**kw):
    return SimEngineConfig(gpu="A100", model="Llama-2-7B", time_scale=50.0, **kw)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3000), st.integers(1, 300)), min_size=1, max_size=40),
       st.lists(st.integers(0, 39), max_size=5))
def test_the_kv_cache_the_batcher_reports_is_what_its_running_sequences_hold(sequences, aborted):
    """KV use is counted as steps run (the simulator reads it on every decision); it must equal the sum over
    running sequences of their prefilled and generated tokens, through finishes and aborts."""
    batcher = SimBatcher(StepModel.of("A100", "Llama-2-7B"), max_num_seqs=8, max_num_batched_tokens=512)
    for i, (prompt, output) in enumerate(sequences):
        batcher.add(SimSequence(f"s{i}", prompt, output))
    steps = 0
    while batcher.has_work():
        batcher.step()
        steps += 1
        if steps in aborted:
            batcher.abort(f"s{steps}")
        held = sum(s.prefilled + s.generated for s in batcher.running)
        assert batcher.kv_used == held and batcher.kv_usage == held / batcher.kv_capacity
    assert batcher.kv_used == 0


def test_sim_engine_streams_concurrent_requests_to_completion():
    async def main():
        engine = SimEngine(fast_config())
        await engine.start()
        requests = [GenerationRequest(f"r{i}", max_tokens=10 + i, prompt_token_ids=[1] * (20 + i)) for i in range(8)]
        results = await asyncio.gather(*(collect(engine, r) for r in requests))
        stats = engine.stats()
        await engine.shutdown()
        return requests, results, stats

    requests, results, stats = run(main())
    for request, chunks in zip(requests, results):
        assert sum(len(c.token_ids) for c in chunks) == request.max_tokens
        assert chunks[-1].finish_reason == "length"
        usage = chunks[-1].usage
        assert usage.output_tokens == request.max_tokens and usage.prompt_tokens == len(request.prompt_token_ids)
        assert 0 < usage.ttft_s < usage.e2e_s and usage.busy_seconds > 0
    assert stats.tokens_per_s > 0 and stats.busy_fraction > 0 and stats.utilization_source == "simulated"


def test_sim_engine_abort_ends_the_stream_and_frees_the_slot():
    async def main():
        engine = SimEngine(fast_config())
        await engine.start()
        stream = engine.generate(GenerationRequest("long", max_tokens=4000, prompt_token_ids=[1] * 10))
        first = await stream.__anext__()
        await engine.abort("long")
        rest = [c async for c in stream]
        running = engine.stats().running
        await engine.shutdown()
        return first, rest, running

    first, rest, running = run(main())
    assert first.token_ids and rest[-1].finish_reason == "abort"
    assert running == 0


def test_sim_engine_refuses_bad_requests_before_they_run():
    async def main():
        engine = SimEngine(fast_config(max_model_len=100))
        await engine.start()
        errors = []
        for request in [GenerationRequest("a", max_tokens=0, prompt_token_ids=[1]),
                        GenerationRequest("b", max_tokens=10, prompt_token_ids=[]),
                        GenerationRequest("c", max_tokens=50, prompt_token_ids=[1] * 60)]:
            with pytest.raises(RequestRejected) as err:
                await collect(engine, request)
            errors.append(str(err.value))
        await engine.shutdown()
        return errors

    errors = run(main())
    assert "max_tokens" in errors[0] and "empty" in errors[1] and "context of 100" in errors[2]


def test_a_dead_engine_ends_streams_with_an_error_and_reports_unhealthy():
    async def main():
        engine = SimEngine(fast_config())
        await engine.start()
        stream = engine.generate(GenerationRequest("r", max_tokens=1000, prompt_token_ids=[1] * 10))
        await stream.__anext__()

        def broken():
            raise RuntimeError("GPU fell off the bus")

        engine.batcher.step = broken
        with pytest.raises(EngineError, match="fell off"):
            await asyncio.wait_for(collect_rest(stream), timeout=5)
        return engine.stats().healthy

    async def collect_rest(stream):
        return [c async for c in stream]

    assert run(main()) is False


def test_admission_window_slow_starts_then_backs_off_and_grows_additively():
    window = AdmissionWindow(maximum=64, initial=2, target_tpot_s=0.05, min_samples=4)
    fast = dict(output_tokens=11, ttft_s=0.1, e2e_s=0.1 + 10 * 0.02)
    slow = dict(output_tokens=11, ttft_s=0.1, e2e_s=0.1 + 10 * 0.5)
    sizes = []
    for _ in range(3):
        for _ in range(max(window.size, 4)):
            window.observe(**fast)
        sizes.append(window.size)
    assert sizes == [4, 8, 16]  # doubling while under the target
    for _ in range(16):
        window.observe(**slow)
    assert window.size == 12 and not window.slow_start  # one cut by 0.75
    for _ in range(12):
        window.observe(**fast)
    assert window.size == 13  # then additive growth
    window.observe(output_tokens=1, ttft_s=0.1, e2e_s=0.1)  # no TPOT from a single token
    assert AdmissionWindow(maximum=16).size == 16  # no target: the engine's own limit


def test_replica_holds_requests_beyond_its_window_and_reports():
    async def main():
        engine = SimEngine(SimEngineConfig(gpu="A100", model="Llama-2-7B", time_scale=1.0))
        replica = Replica(engine, AdmissionWindow(maximum=2, initial=2, target_tpot_s=10.0),
                          name="r0", pool="A100")
        await replica.start()
        peak = 0

        async def one(i):
            nonlocal peak
            n = 0
            async for chunk in replica.generate(GenerationRequest(f"q{i}", 8, prompt_token_ids=[1] * 16)):
                peak = max(peak, replica.in_flight)
                n += len(chunk.token_ids)
            return n

        tasks = [asyncio.create_task(one(i)) for i in range(5)]
        await asyncio.sleep(0.01)
        during = replica.report()
        counts = await asyncio.gather(*tasks)
        after = replica.report()
        await replica.engine.shutdown()
        return peak, during, counts, after

    peak, during, counts, after = run(main())
    assert counts == [8] * 5
    assert peak <= 2
    assert during.local_queue >= 1 and during.free_slots == 0
    assert after.in_flight == 0 and after.finished == 5 and after.free_slots == after.window
