"""The fairness controller as its own Serve deployment: one replica that every ingress replica and every pool
replica talks to, so one policy object decides for the whole cluster. Serve restarts it if it dies.

Its methods are the controller's protocol (`protocol.py`):
- `update(IngressBatch)`: an ingress replica's batched news (unary; the ingress sends one at a time);
- `grants(ingress)`: a long-lived stream of `Grant`s and `Refusal`s for one ingress replica;
- `work(ReplicaHello)`: a long-lived stream of `Dispatch`es and `Abort`s for one pool replica;
- `report(ReplicaReport)`: a pool replica's periodic state, answered with its pool's backlog.
Every method is async, so all of them run on the replica's one event loop: the controller is single-threaded state.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from ray import serve

from equinox_ray.engines.replica import ReplicaReport
from equinox_ray.serve.checkpoint import CheckpointStore
from equinox_ray.serve.config import AppConfig, PolicyConfig
from equinox_ray.serve.controller import FairnessController
from equinox_ray.serve.errors import Busy
from equinox_ray.serve.fairness_view import snapshot
from equinox_ray.serve.protocol import IngressBatch, ReplicaHello, ReportAnswer
from equinox_ray.serve.routing import watch_replicas
from equinox_ray.serve.users import ChangeRefused, refused_change
from equinox_ray.telemetry.metrics import FairnessMetrics

log = logging.getLogger("ray.serve")
CONTROLLER_DEPLOYMENT = "FairnessController"


@serve.deployment(name=CONTROLLER_DEPLOYMENT, num_replicas=1, max_ongoing_requests=100_000,
                  health_check_period_s=2, health_check_timeout_s=10, ray_actor_options={"num_cpus": 0},
                  logging_config={"enable_access_log": False})
class ControllerDeployment:
    async def __init__(self, config: AppConfig) -> None:
        self.controller = FairnessController(config)
        self.metrics = FairnessMetrics(self.controller, config.telemetry.max_user_labels)
        self.controller.ttft_observers.append(self.metrics.observe_ttft)
        self._wake: dict[str, asyncio.Event] = {}
        self.controller.to_ingress.notify = self._notify
        self.controller.to_replica.notify = self._notify
        loop, app = asyncio.get_running_loop(), serve.get_replica_context().app_name
        self._checkpoints = CheckpointStore(config.checkpoint, app)
        self._checkpoint_task = None
        if config.checkpoint.store != "none":
            restored = await asyncio.to_thread(self._checkpoints.load)
            if restored is not None:
                self.controller.restore(restored)
                log.info("fairness counters restored from the checkpoint written at %.3f", restored.written_at)
            self._checkpoint_task = asyncio.create_task(self._checkpoint_loop(config.checkpoint.interval_s))
        self._pool_handles = []
        for pool in config.pools:  # Serve's routable replicas of each pool (routing.py)
            watch_replicas(pool.deployment_name, lambda ids, name=pool.name: loop.call_soon_threadsafe(
                self.controller.set_routable, name, ids))
            # a handle's router hears of the replicas from its first use on (the pools hold handles to us: a
            # handle to them cannot be bound in, which would be a cycle)
            self._pool_handles.append(serve.get_deployment_handle(pool.deployment_name, app).options())

    async def _checkpoint_loop(self, interval_s: float) -> None:
        saved = self.controller.version
        while True:
            await asyncio.sleep(interval_s)
            if self.controller.version == saved:
                continue
            saved = self.controller.version
            try:
                await asyncio.to_thread(self._checkpoints.save, self.controller.checkpoint())
            except Exception:
                log.exception("checkpoint of the fairness counters failed; retrying in %.1f s", interval_s)

    def _notify(self, destination: str) -> None:
        event = self._wake.get(destination)
        if event is not None:
            event.set()

    async def _deliver(self, destination: str, mailbox) -> AsyncIterator[list]:
        """Yield everything waiting for `destination`, whenever there is something; one stream per destination."""
        event = self._wake[destination] = asyncio.Event()
        if mailbox.items.get(destination):  # put before the stream opened (a `Closing`)
            event.set()
        yield []  # the stream is open: the caller knows it reached us
        while True:
            await event.wait()
            event.clear()
            messages = mailbox.take(destination)
            if messages:
                yield messages

    # -- ingress replicas -------------------------------------------------------------------------------------
    async def update(self, batch: IngressBatch) -> None:
        self.controller.apply(batch)

    async def grants(self, ingress: str) -> AsyncIterator[list]:
        self.controller.ingress_connected(ingress)
        try:
            async for messages in self._deliver(ingress, self.controller.to_ingress):
                yield messages
        finally:
            self._wake.pop(ingress, None)
            self.controller.ingress_gone(ingress)

    # -- pool replicas ----------------------------------------------------------------------------------------
    async def work(self, hello: ReplicaHello) -> AsyncIterator[list]:
        self.controller.replica_connected(hello)
        try:
            async for messages in self._deliver(hello.replica, self.controller.to_replica):
                yield messages
        finally:
            self._wake.pop(hello.replica, None)
            self.controller.replica_gone(hello.replica)

    async def report(self, report: ReplicaReport) -> ReportAnswer:
        return self.controller.report(report)

    async def ready(self) -> bool:
        return self.controller.ready()

    # -- views and admin --------------------------------------------------------------------------------------
    async def snapshot(self, user: str | None = None) -> dict:
        return snapshot(self.controller, user)

    async def users(self) -> dict[str, float]:
        """Registered users and their weights (the ingress labels its spans with them)."""
        return {name: u.weight for name, u in self.controller.policy.users.items()}

    async def prometheus(self) -> tuple[bytes, str]:
        return self.metrics.render()

    async def set_policy(self, policy: PolicyConfig) -> str | ChangeRefused:
        """The new policy's name, or a 409 while requests wait or run."""
        try:
            return self.controller.set_policy(policy)
        except Busy as exc:
            return ChangeRefused(409, str(exc), "busy")

    # -- users and keys (serve/users.py) -----------------------------------------------------------------------
    async def list_users(self) -> dict[str, dict]:
        return self.controller.registry.listing()

    async def add_user(self, name: str, weight: float, key_digest: str) -> ChangeRefused | None:
        return refused_change(lambda: self.controller.add_user(name, weight, key_digest))

    async def set_weight(self, name: str, weight: float) -> ChangeRefused | None:
        return refused_change(lambda: self.controller.set_weight(name, weight))

    async def rotate_key(self, name: str, key_digest: str, keep_old: bool) -> ChangeRefused | None:
        return refused_change(lambda: self.controller.rotate_key(name, key_digest, keep_old))

    async def remove_user(self, name: str) -> ChangeRefused | None:
        return refused_change(lambda: self.controller.remove_user(name))

    # -- shutdown (equinox_ray/serve/run.py) ------------------------------------------------------------------
    async def close(self) -> float:
        return self.controller.close()

    async def unfinished(self) -> int:
        return self.controller.unfinished()
