"""The pool replica's per-ingress token channel (equinox_ray/serve/channel.py)."""

import asyncio

from equinox_ray.engines.types import TokenChunk
from equinox_ray.serve.channel import Channel


def test_chunks_pushed_while_a_batch_is_out_are_sent_before_a_close_ends_the_channel():
    """A draining pool replica closes an ingress's channel as soon as its last request there ends: the chunks
    pushed while the consumer still held the previous batch must reach it (they were dropped, and the requests
    ended with 'the replica serving this request stopped' one token short)."""

    async def main():
        channel = Channel(interval_s=0.0)
        batches = channel.batches()
        channel.push(TokenChunk("a", [1]))
        channel.push(TokenChunk("b", [1]))
        first = await batches.__anext__()  # the generator now waits at its yield, as a slow consumer leaves it
        channel.push(TokenChunk("a", [2], finish_reason="length"))
        channel.push(TokenChunk("b", [2], finish_reason="length"))
        channel.close()
        rest = [chunk async for batch in batches for chunk in batch]
        return first, rest

    first, rest = asyncio.run(main())
    assert {c.request_id for c in first} == {"a", "b"}
    assert sorted((c.request_id, c.token_ids, c.finish_reason) for c in rest) == [
        ("a", [2], "length"), ("b", [2], "length")]


def test_a_closed_channel_with_nothing_pending_ends_and_one_interval_merges_a_requests_chunks():
    async def main():
        channel = Channel(interval_s=0.05)
        batches = channel.batches()
        channel.push(TokenChunk("a", [1]), urgent=True)
        first = await batches.__anext__()
        channel.push(TokenChunk("a", [2]))
        channel.push(TokenChunk("a", [3], finish_reason="stop"))
        second = await batches.__anext__()
        channel.close()
        rest = [batch async for batch in batches]
        return first, second, rest

    first, second, rest = asyncio.run(main())
    assert [c.token_ids for c in first] == [[1]]
    assert [(c.token_ids, c.finish_reason) for c in second] == [([2, 3], "stop")]
    assert rest == []
