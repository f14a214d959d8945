"""An ingress replica's links to the rest of the cluster: the controller (batched news up, a stream of grants down)
and the pool replicas (one token channel per replica it has requests on).

The replica keeps one `Inflight` record per request it serves. The HTTP handler submits it and awaits its grant
and then its chunks; everything else happens here, whether or not the handler is still there: progress and the
measured usage go to the controller, and a client that went away is withdrawn.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import Callable

from ray.serve.handle import DeploymentHandle

from equinox_ray.engines.types import RESTARTED, TokenChunk
from equinox_ray.serve.protocol import Closing, Finished, FullQueues, Grant, IngressBatch, Refusal, Submission
from equinox_ray.serve.users import UserTable

log = logging.getLogger("ray.serve")
RECONNECT_S = 0.5
UPDATE_TIMEOUT_S = 10.0
CHANNEL_OPEN_TIMEOUT_S = 30.0
ENDED = ("abort", "error")  # finish reasons of a request that did not complete
CUT_AT_SHUTDOWN = "the server shut down before this request finished"


class Refused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


@dataclass
class Inflight:
    """One request at its ingress replica, from submission to its last chunk."""

    submission: Submission
    granted: asyncio.Future
    chunks: asyncio.Queue = field(default_factory=asyncio.Queue)
    grant: Grant | None = None
    served: int = 0
    retried: bool = False
    # the client sees nothing before the last chunk (not streamed): an attempt cut after its first token may start
    # over, where a stream that has shown tokens cannot
    restartable: bool = False
    ended: bool = False  # its last chunk came before its grant: it stays here until the grant resolves the handler


class ControllerLink:
    """Sends the controller one `IngressBatch` at a time (see `_send_loop` for when), and receives this replica's
    grants on a long-lived stream."""

    def __init__(self, controller: DeploymentHandle, ingress: str, batch_interval_s: float,
                 progress_interval_s: float, on_grant: Callable[[Grant], None],
                 on_users: Callable[[UserTable], None] = lambda table: None) -> None:
        self.controller = controller
        self.ingress = ingress
        self.batch_interval_s = batch_interval_s
        self.progress_interval_s = progress_interval_s
        self.on_grant = on_grant
        self.on_users = on_users
        self.inflight: dict[str, Inflight] = {}
        self.closing: Closing | None = None
        self.full_queues = FullQueues(frozenset(), "", 1.0)
        self._batch = IngressBatch(ingress)
        self._seq = 0
        self._pending = asyncio.Event()
        self._tasks = [asyncio.create_task(self._send_loop()), asyncio.create_task(self._grant_loop())]

    # -- the handler's side -----------------------------------------------------------------------------------
    def submit(self, submission: Submission, restartable: bool = False) -> Inflight:
        inflight = Inflight(submission, asyncio.get_running_loop().create_future(), restartable=restartable)
        self.inflight[submission.request_id] = inflight
        self._send(lambda b: b.submissions.append(submission))
        return inflight

    def withdraw(self, request_id: str) -> None:
        """The client is gone: forget the request and tell the controller (which aborts it if it runs)."""
        inflight = self.inflight.pop(request_id, None)
        if inflight is not None and not inflight.ended:
            self._send(lambda b: b.withdrawn.append(request_id))

    # -- from the pool channels -------------------------------------------------------------------------------
    def deliver(self, chunk: TokenChunk) -> None:
        inflight = self.inflight.get(chunk.request_id)
        if chunk.finish_reason == "unavailable":  # its replica's engine is dead: like a replica lost, for one
            if inflight is not None and inflight.grant is not None and self._may_retry(inflight):
                replica = inflight.grant.replica
                self._send(lambda b: b.lost.append(replica))
                self._retry(inflight, chunk.error or "the engine is unavailable")
                return
            chunk = replace(chunk, finish_reason="error")
        if inflight is None:  # withdrawn: its last chunk still says what it was served
            if chunk.last:
                self._finish(chunk, 0)
            return
        tokens = len(chunk.token_ids)
        if tokens:
            inflight.served += tokens
            progress = self._batch.progress
            progress[chunk.request_id] = progress.get(chunk.request_id, 0) + tokens  # sent with the next batch
        inflight.chunks.put_nowait(chunk)
        if chunk.last:
            # A pool's channel can beat the controller's grant stream (a short request on a fast engine): then the
            # record waits for its grant, which is what the handler is waiting on.
            if inflight.grant is None:
                inflight.ended = True
            else:
                del self.inflight[chunk.request_id]
            self._finish(chunk, inflight.served)

    def replica_lost(self, replica: str, why: str) -> None:
        """The channel to a replica closed. Its requests here that had no token yet are queued once more (the
        controller dispatches nothing more to that replica); the others end with an error."""
        self._send(lambda b: b.lost.append(replica))
        for inflight in list(self.inflight.values()):
            if inflight.grant is None or inflight.grant.replica != replica:
                continue
            if self._may_retry(inflight):
                self._retry(inflight, why)
            else:
                self.deliver(TokenChunk(inflight.submission.request_id, [], finish_reason="error", error=why))

    @staticmethod
    def _may_retry(inflight: Inflight) -> bool:
        """Once, and only while the client has seen none of it."""
        return not inflight.retried and (inflight.served == 0 or inflight.restartable)

    def _retry(self, inflight: Inflight, why: str) -> None:
        """The attempt ends as cancelled with what it served; a new one (same client, same response) queues. A
        non-streamed request cut after its first token starts over: its collector drops what it gathered."""
        old, served = inflight.submission.request_id, inflight.served
        log.warning("request %s lost its replica after %d tokens (%s); queued once more", old, served, why)
        del self.inflight[old]
        self._send(lambda b: b.finished.append(Finished(old, None, served, cancelled=True)))
        if served:
            inflight.chunks.put_nowait(TokenChunk(old, [], error=RESTARTED))
            inflight.served = 0
        generation = replace(inflight.submission.generation, id=f"{old}-retry")
        inflight.submission = Submission(inflight.submission.user, generation, retry_of=old)
        inflight.grant, inflight.retried = None, True
        self.inflight[generation.id] = inflight
        self._send(lambda b: b.submissions.append(inflight.submission))

    def _finish(self, chunk: TokenChunk, served: int) -> None:
        finished = Finished(chunk.request_id, chunk.usage, served, cancelled=chunk.finish_reason in ENDED)
        self._send(lambda b: b.finished.append(finished))

    # -- the loops --------------------------------------------------------------------------------------------
    def _send(self, add: Callable[[IngressBatch], None]) -> None:
        add(self._batch)
        self._pending.set()

    async def _send_loop(self) -> None:
        """When a batch goes: new requests `batch_interval_s` after the last batch that carried new requests,
        finishes and withdrawals (a freed slot) `batch_interval_s` after the last that carried those, progress
        alone `progress_interval_s` after the last batch. So a request after a pause, or a client's next request
        right after its last one finished, waits for nothing; under load each kind comes in batches. One call is
        in flight at a time."""
        loop = asyncio.get_running_loop()
        last = {"submissions": -float("inf"), "finishes": -float("inf"), "any": -float("inf")}
        while True:
            await self._pending.wait()
            while True:
                batch = self._batch
                ready = min(last["submissions"] + self.batch_interval_s if batch.submissions else float("inf"),
                            last["finishes"] + self.batch_interval_s if batch.finished or batch.withdrawn
                            else float("inf"),
                            last["any"] + self.progress_interval_s)
                if loop.time() >= ready:
                    break
                await asyncio.sleep(min(ready - loop.time(), self.batch_interval_s or 0.001))
            self._pending.clear()
            batch, self._batch = self._batch, IngressBatch(self.ingress)
            last["any"] = loop.time()
            if batch.submissions:
                last["submissions"] = last["any"]
            if batch.finished or batch.withdrawn:
                last["finishes"] = last["any"]
            self._seq += 1
            batch.seq = self._seq
            await self._send_batch(batch)

    async def _send_batch(self, batch: IngressBatch) -> None:
        """Until the controller has it: a call that fails, or does not answer within UPDATE_TIMEOUT_S, is made
        again with the same batch (the controller applies a batch once, by its sequence number)."""
        while True:
            try:
                await asyncio.wait_for(self.controller.update.remote(batch), UPDATE_TIMEOUT_S)
                return
            except Exception as exc:  # includes the timeout
                log.warning("update %d to the fairness controller failed (%r); sending it again", batch.seq, exc)
                await asyncio.sleep(RECONNECT_S)

    async def _grant_loop(self) -> None:
        reconnecting = False
        while True:
            try:
                async for messages in self.controller.options(stream=True).grants.remote(self.ingress):
                    if reconnecting:  # the stream is open again (its first message is empty)
                        reconnecting = False
                        self._resubmit_waiting()
                    for message in messages:
                        self._on_decision(message)
            except Exception:
                log.warning("grant stream from the fairness controller broke; reconnecting", exc_info=True)
            reconnecting = True
            await asyncio.sleep(RECONNECT_S)

    def _resubmit_waiting(self) -> None:
        """After the controller restarted (or dropped this replica with its stream), the requests here that wait
        for a grant are queued again; the controller ignores one it still has."""
        waiting = [inflight.submission for inflight in self.inflight.values()
                   if inflight.grant is None and not inflight.ended]
        if waiting:
            log.warning("resubmitting %d waiting requests to the fairness controller", len(waiting))
            self._send(lambda b: b.submissions.extend(waiting))

    def refused_at_door(self, user: str) -> None:
        """A request of a user in `full_queues`, answered 429 without the controller: counted there."""
        self._send(lambda b: b.refused.__setitem__(user, b.refused.get(user, 0) + 1))

    def _on_decision(self, message: Grant | Refusal | FullQueues | Closing | UserTable) -> None:
        if isinstance(message, FullQueues):
            self.full_queues = message
            return
        if isinstance(message, Closing):
            self._close(message)
            return
        if isinstance(message, UserTable):
            self.on_users(message)
            return
        if isinstance(message, Grant):
            self.on_grant(message)  # open the replica's channel, even for a withdrawn request: its end comes there
        inflight = self.inflight.get(message.request_id)
        if inflight is None:
            return
        if isinstance(message, Grant):
            inflight.grant = message
            if not inflight.granted.done():  # a retry's grant: the handler already has the first one
                inflight.granted.set_result(message)
            if inflight.ended:
                del self.inflight[message.request_id]
        elif not inflight.granted.done():
            del self.inflight[message.request_id]
            inflight.granted.set_exception(Refused(message))
        else:  # a retry the controller would not queue
            self.deliver(TokenChunk(message.request_id, [], finish_reason="error", error=message.message))


    # -- shutdown ---------------------------------------------------------------------------------------------
    def _close(self, closing: Closing) -> None:
        if self.closing is None:
            self.closing = closing
            asyncio.get_running_loop().call_later(closing.deadline_s, self._cut)

    def _cut(self) -> None:
        """The drain deadline passed: every request still here ends with a 503 (an error event on a stream), and
        the controller dequeues or aborts it."""
        if self.inflight:
            log.warning("drain deadline: ending %d unfinished requests", len(self.inflight))
        for request_id, inflight in list(self.inflight.items()):
            if inflight.ended:
                continue
            self.withdraw(request_id)
            if not inflight.granted.done():
                inflight.granted.set_exception(Refused(Refusal(request_id, CUT_AT_SHUTDOWN,
                                                               self.closing.retry_after_s, 503, "shutting_down")))
            else:
                inflight.chunks.put_nowait(TokenChunk(request_id, [], finish_reason="error", error=CUT_AT_SHUTDOWN))


class PoolChannels:
    """One reader per pool replica this ingress has requests on; each chunk goes to `deliver`, and `lost` hears of
    a channel that closed."""

    def __init__(self, pools: dict[str, DeploymentHandle], ingress: str, deliver: Callable[[TokenChunk], None],
                 lost: Callable[[str, str], None]) -> None:
        self.pools = pools
        self.ingress = ingress
        self.deliver = deliver
        self.lost = lost
        self._readers: dict[str, asyncio.Task] = {}

    def ensure(self, grant: Grant) -> None:
        if grant.replica not in self._readers:
            self._readers[grant.replica] = asyncio.create_task(self._read(grant.pool, grant.replica))

    async def _read(self, pool: str, replica: str) -> None:
        why = "the replica serving this request stopped"
        try:
            stream = self.pools[pool].options(stream=True).channel.remote(replica=replica, ingress=self.ingress)
            await asyncio.wait_for(stream.__anext__(), CHANNEL_OPEN_TIMEOUT_S)  # the empty opening message
            async for batch in stream:
                for chunk in batch:
                    self.deliver(chunk)
        except asyncio.TimeoutError:
            why = f"replica {replica} of pool {pool} could not be reached"
            log.warning(why)
        except Exception as exc:
            log.warning("channel from replica %s of pool %s closed: %r", replica, pool, exc)
        finally:
            self._readers.pop(replica, None)
            self.lost(replica, why)
