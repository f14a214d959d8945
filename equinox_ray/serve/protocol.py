"""The typed messages between the ingress replicas, the fairness controller and the pool replicas.

Every message travels as itself (pickled by Serve), never flattened into a dict or into positional arguments:

    ingress  --IngressBatch (unary, batched)-->  controller
    ingress  <--list[Grant | Refusal | FullQueues | Closing | UserTable] (stream)--  controller
    pool     <--list[Dispatch | Abort | Drain] (stream)--  controller
    pool     --ReplicaReport (unary, periodic)-->  controller
    ingress  <--list[TokenChunk] (stream, coalesced)--  pool replica

Streams are long-lived, one per (receiver, sender) pair, so a message carries the news of many requests: the cost
of a Serve call is paid per batch, not per request or per token (docs/design.md, "The serving path").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from equinox_ray.engines.types import GenerationRequest, Usage
from equinox_ray.fairness.prediction import Prediction


@dataclass(frozen=True)
class Submission:
    """A request the ingress validated and tokenized; the controller queues it under its user."""

    user: str
    generation: GenerationRequest
    retry_of: str | None = None  # the request id of an attempt whose replica died before its first token

    @property
    def request_id(self) -> str:
        return self.generation.id


@dataclass(frozen=True)
class Finished:
    """What a granted request was served, measured by its engine; `usage` is None when no engine report came back
    (the replica died), and `served_tokens` then counts what reached the ingress."""

    request_id: str
    usage: Usage | None
    served_tokens: int
    cancelled: bool


@dataclass
class IngressBatch:
    """Everything one ingress replica has to tell the controller since its last call."""

    ingress: str
    submissions: list[Submission] = field(default_factory=list)
    progress: dict[str, int] = field(default_factory=dict)  # request id -> new tokens streamed since the last batch
    finished: list[Finished] = field(default_factory=list)
    withdrawn: list[str] = field(default_factory=list)  # clients that went away before their request finished
    lost: list[str] = field(default_factory=list)  # pool replicas whose token channel to this ingress closed
    refused: dict[str, int] = field(default_factory=dict)  # user -> requests the ingress refused (FullQueues)
    seq: int = 0  # the ingress's count of its batches: a batch sent again is applied once

    def __bool__(self) -> bool:
        return bool(self.submissions or self.progress or self.finished or self.withdrawn or self.lost or self.refused)


@dataclass(frozen=True)
class Grant:
    """The controller's decision: the request runs now, on this replica of this pool."""

    request_id: str
    pool: str
    replica: str
    queue_wait_s: float
    score: float  # the user's key when it was chosen
    counters_before: dict[str, float]
    counters_after: dict[str, float]
    prediction: Prediction | None


@dataclass(frozen=True)
class Refusal:
    """The request will not be served: the controller would not queue it (the user's queue is full: 429), or the
    server shut down before it was granted (503)."""

    request_id: str
    message: str
    retry_after_s: float
    status: int = 429
    code: str = "queue_full"


@dataclass(frozen=True)
class FullQueues:
    """The users whose queues are at their bound, sent to every ingress replica whenever the set changes: the
    ingress answers such a user's next request 429 at the door, before reading its body (an overloaded server
    refuses thousands a minute)."""

    users: frozenset[str]
    message: str
    retry_after_s: float


@dataclass(frozen=True)
class Closing:
    """The application is shutting down (`equinox_ray.serve.run` heard SIGTERM or SIGINT): every ingress replica
    answers new requests 503 with Retry-After, lets what it has finish, and ends what is still unfinished
    `deadline_s` after it heard this with an error (an error event and `[DONE]` on a stream)."""

    deadline_s: float
    retry_after_s: float


@dataclass(frozen=True)
class Dispatch:
    """Start this generation on the receiving pool replica; its tokens go to this ingress replica's channel."""

    generation: GenerationRequest
    ingress: str


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Drain:
    """Serve is stopping the receiving replica: it takes no more work; it ends its channels once their requests
    are done, so that Serve can stop it without cutting a stream."""


@dataclass(frozen=True)
class ReplicaHello:
    """A pool replica opening its work stream: the controller may grant to it from now on."""

    pool: str
    replica: str
    window: int


@dataclass(frozen=True)
class ReportAnswer:
    """The controller's answer to a replica report: the pool's backlog, the autoscaler's signal."""

    backlog: int
    running: int
