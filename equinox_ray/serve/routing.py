"""Addressing one replica of a pool deployment through Serve, and watching which replicas Serve routes to.

The controller grants a request to a replica, and the ingress replica that owns the request reads its tokens from
a channel on that very replica. Serve's handles pick replicas by load; this router (Serve's request-router
extension, set on every pool deployment) picks the replica named by the call's `replica` keyword instead. A replica
not in the handle's view yet (just started) is waited for; one that is gone is never chosen, and the caller's
timeout ends the call.

Serve tells every router which replicas it may route to, and leaves a replica out as soon as it starts to stop it
(downscaling, an update). `watch_replicas` passes that set on, so the controller grants only to replicas Serve
routes to, and drains a replica Serve is stopping instead of cutting its requests.
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from typing import Callable, List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

_watchers: dict[str, list[Callable[[set[str]], None]]] = defaultdict(list)


def watch_replicas(deployment: str, callback: Callable[[set[str]], None]) -> None:
    """Call `callback(replica ids)` whenever this process's handle to `deployment` learns its routable replicas.
    The callback may run on the router's own thread."""
    _watchers[deployment].append(callback)


class ReplicaRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        target = pending_request.kwargs.get("replica") if pending_request is not None else None
        if target is None:
            return [candidate_replicas]
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        ids = {r.replica_id.unique_id for r in replicas}
        # Serve runs a by-value copy of this class, with globals of its own: the watchers are the imported module's
        for callback in importlib.import_module(__name__)._watchers.get(self._deployment_id.name, ()):
            callback(ids)
