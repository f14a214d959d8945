"""The ingress's link to the controller, driven in order: the orderings Serve's timing makes rare but possible."""

import asyncio

import pytest

from equinox_ray.engines.types import GenerationRequest, TokenChunk, Usage
from equinox_ray.serve.ingress_links import CUT_AT_SHUTDOWN, ControllerLink, Refused
from equinox_ray.serve.protocol import Closing, Grant, Submission


class _Method:
    def __init__(self, call):
        self.remote = call


class RecordingController:
    """Stands in for the controller's handle: keeps the batches sent; its grant stream stays open and silent."""

    def __init__(self) -> None:
        self.batches = []
        self.update = _Method(self._update)
        self.grants = _Method(self._grants)

    def options(self, **_):
        return self

    async def _update(self, batch):
        self.batches.append(batch)

    async def _grants(self, ingress):
        yield []
        await asyncio.Event().wait()


def with_link(scenario) -> None:
    """Runs `scenario(link, controller)` on a fresh link to a recording controller."""
    async def main():
        controller = RecordingController()
        link = ControllerLink(controller, "ingress-a", batch_interval_s=0.0, progress_interval_s=0.01,
                              on_grant=lambda grant: None)
        try:
            await scenario(link, controller)
        finally:
            for task in link._tasks:
                task.cancel()

    asyncio.run(main())


def test_a_last_chunk_that_beats_its_grant_still_resolves_the_handler():
    """A short request on a fast engine: the pool's channel delivers the whole answer before the controller's grant
    stream delivers the grant. The handler, waiting on the grant, must still get it and then the chunks."""

    async def scenario(link: ControllerLink, controller: RecordingController):
        generation = GenerationRequest("r1", 4, prompt_token_ids=[1, 2, 3])
        inflight = link.submit(Submission("alice", generation))
        link.deliver(TokenChunk("r1", [5, 6, 7, 8], finish_reason="length", usage=Usage(3, 4, 0.01, 0.02, 0.02)))
        assert not inflight.granted.done()
        link._on_decision(Grant("r1", "pool", "replica-1", 0.0, 0.0, {}, {}, None))
        grant = await asyncio.wait_for(inflight.granted, 1)
        chunk = await asyncio.wait_for(inflight.chunks.get(), 1)
        assert grant.replica == "replica-1" and chunk.token_ids == [5, 6, 7, 8]
        assert "r1" not in link.inflight  # gone once its grant came
        link._resubmit_waiting()  # a finished request is never queued again
        await asyncio.sleep(0.1)
        sent = [s.request_id for b in controller.batches for s in b.submissions]
        finished = [f.request_id for b in controller.batches for f in b.finished]
        assert sent == ["r1"] and finished == ["r1"]

    with_link(scenario)


def test_at_the_drain_deadline_a_waiting_request_gets_503_and_a_running_one_an_error_and_both_are_withdrawn():
    async def scenario(link: ControllerLink, controller: RecordingController):
        waiting = link.submit(Submission("alice", GenerationRequest("w", 4, prompt_token_ids=[1])))
        running = link.submit(Submission("bob", GenerationRequest("r", 4, prompt_token_ids=[1])))
        link._on_decision(Grant("r", "pool", "replica-1", 0.0, 0.0, {}, {}, None))
        link.deliver(TokenChunk("r", [5]))
        link._on_decision(Closing(deadline_s=0.2, retry_after_s=3))
        assert link.closing is not None and not waiting.granted.done()  # nothing is cut before the deadline
        with pytest.raises(Refused) as refused:
            await asyncio.wait_for(waiting.granted, 2)
        assert refused.value.refusal.status == 503 and refused.value.refusal.retry_after_s == 3
        assert (await running.chunks.get()).token_ids == [5]
        cut = await asyncio.wait_for(running.chunks.get(), 1)
        assert cut.finish_reason == "error" and cut.error == CUT_AT_SHUTDOWN
        await asyncio.sleep(0.1)
        assert sorted(w for b in controller.batches for w in b.withdrawn) == ["r", "w"]
        assert not link.inflight

    with_link(scenario)


def test_a_request_its_replicas_dead_engine_could_not_start_is_queued_once_more_and_the_replica_reported():
    async def scenario(link: ControllerLink, controller: RecordingController):
        inflight = link.submit(Submission("alice", GenerationRequest("r1", 4, prompt_token_ids=[1])))
        link._on_decision(Grant("r1", "pool", "replica-1", 0.0, 0.0, {}, {}, None))
        link.deliver(TokenChunk("r1", [], finish_reason="unavailable", error="EngineError: vLLM engine is dead"))
        assert inflight.chunks.empty() and "r1-retry" in link.inflight  # the client hears nothing of it
        link._on_decision(Grant("r1-retry", "pool", "replica-2", 0.0, 0.0, {}, {}, None))
        link.deliver(TokenChunk("r1-retry", [], finish_reason="unavailable", error="dead too"))
        assert (await asyncio.wait_for(inflight.chunks.get(), 1)).finish_reason == "error"  # once only
        await asyncio.sleep(0.1)
        assert [r for b in controller.batches for r in b.lost] == ["replica-1"]
        assert [s.request_id for b in controller.batches for s in b.submissions] == ["r1", "r1-retry"]

    with_link(scenario)


def _inflight_with(chunks: list[TokenChunk]):
    from equinox_ray.serve.ingress_links import Inflight

    inflight = Inflight(Submission("u", GenerationRequest("r", 8, prompt_token_ids=[1, 2])), asyncio.Future())
    for chunk in chunks:
        inflight.chunks.put_nowait(chunk)
    return inflight


def _trace():
    from opentelemetry import trace

    from equinox_ray.telemetry.spans import RequestTrace

    return RequestTrace(trace.NoOpTracer(), request_id="r", operation="text_completion", model="m", user="u",
                        weight=None, policy="vtc", prompt_tokens=2, max_tokens=8)


def test_a_stream_that_fell_behind_catches_up_in_one_write_with_every_event():
    """Chunks that arrived while the last write was on its way go out in one write, one SSE event each, and the
    last write carries the usage event and [DONE]: same events as one write per chunk, fewer trips through ASGI."""
    import json

    from equinox_ray.serve.answers import chunk_groups, sse_events
    from equinox_ray.serve.openai_protocol import StreamOptions

    first = TokenChunk("r", [5], "a")
    rest = [TokenChunk("r", [6, 7], "bc"),
            TokenChunk("r", [8], "d", finish_reason="length", usage=Usage(2, 4, 0.1, 0.2, 0.1))]

    async def writes(chunks_later: list[TokenChunk]):
        inflight = _inflight_with([])
        groups = chunk_groups(inflight, first, _trace(), withdraw=lambda rid: None)
        out = []
        async for write in sse_events(groups, "r", "m", False, StreamOptions(include_usage=True), 2):
            out.append(write)
            for chunk in chunks_later:
                inflight.chunks.put_nowait(chunk)
            chunks_later = []
        return out

    out = asyncio.run(writes(rest))
    assert len(out) == 2  # the first chunk alone, then everything that came meanwhile
    events = [e for write in out for e in write.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    bodies = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert "".join(b["choices"][0]["text"] for b in bodies[:-1]) == "abcd"
    assert bodies[-1]["usage"]["completion_tokens"] == 4 and bodies[-1]["choices"] == []


def test_a_client_gone_mid_stream_withdraws_its_request_once():
    from equinox_ray.serve.answers import chunk_groups

    withdrawn = []

    async def main():
        inflight = _inflight_with([TokenChunk("r", [6], "b")])
        groups = chunk_groups(inflight, TokenChunk("r", [5], "a"), _trace(), withdraw=withdrawn.append)
        assert [c.text for c in await groups.__anext__()] == ["a", "b"]
        await groups.aclose()  # the client went away before the last chunk

    asyncio.run(main())
    assert withdrawn == ["r"]


def test_a_request_not_streamed_that_lost_its_replica_after_tokens_starts_over_and_answers_only_the_new_attempt():
    """Its client has seen nothing before the whole answer, so a cut after the first token is queued once more
    (charged what the cut attempt served), and the collected answer holds only the second attempt's tokens. A
    streamed request cut after a token cannot start over: it ends with an error."""
    from equinox_ray.serve.answers import chunk_groups, collect

    async def scenario(link: ControllerLink, controller: RecordingController):
        whole = link.submit(Submission("alice", GenerationRequest("u1", 3, prompt_token_ids=[1])), restartable=True)
        streamed = link.submit(Submission("bob", GenerationRequest("s1", 3, prompt_token_ids=[1])))
        for rid in ("u1", "s1"):
            link._on_decision(Grant(rid, "pool", "replica-1", 0.0, 0.0, {}, {}, None))
            link.deliver(TokenChunk(rid, [5, 6], "ab"))
        link.replica_lost("replica-1", "the replica serving this request stopped")
        assert "u1-retry" in link.inflight and "s1-retry" not in link.inflight
        link._on_decision(Grant("u1-retry", "pool", "replica-2", 0.0, 0.0, {}, {}, None))
        link.deliver(TokenChunk("u1-retry", [7, 8, 9], "xyz", finish_reason="length", usage=Usage(1, 3, 0.1, 0.2, 0.1)))
        first = await asyncio.wait_for(whole.chunks.get(), 1)
        body = await collect(chunk_groups(whole, first, _trace(), link.withdraw), "u1", "m", chat=False)
        assert body["choices"][0]["text"] == "xyz" and body["usage"]["completion_tokens"] == 3
        assert (await streamed.chunks.get()).token_ids == [5, 6]
        assert (await asyncio.wait_for(streamed.chunks.get(), 1)).finish_reason == "error"
        await asyncio.sleep(0.1)
        cut = [f for b in controller.batches for f in b.finished if f.request_id == "u1"]
        assert [(f.served_tokens, f.cancelled) for f in cut] == [(2, True)]

    with_link(scenario)
