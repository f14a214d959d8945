"""What the scheduler knows about users and requests: nothing that is only known after a request runs."""

from __future__ import annotations

from dataclasses import dataclass, field


class InvalidRequest(ValueError):
    """A request the scheduler refuses before it queues (bad token counts, unknown user)."""


class UnknownUser(InvalidRequest):
    """A request names a user that was never registered."""


@dataclass(frozen=True)
class User:
    name: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a user needs a non-empty name")
        if not self.weight > 0:
            raise ValueError(f"user {self.name!r}: weight must be > 0, got {self.weight!r}")


@dataclass
class Request:
    """One generation request as the controller sees it.

    `max_tokens` is the client's cap. The true output length is not here on purpose: in trace replay it travels to
    the engine only, so no policy or predictor can peek at it.
    """

    id: str
    user: str
    arrival: float
    prompt_tokens: int
    max_tokens: int
    # Filled by the scheduler: the queue wait ends at `granted_at`.
    granted_at: float | None = None
    pool: str | None = None
    served_output_tokens: int = 0
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.id:
            raise InvalidRequest("a request needs a non-empty id")
        for name in ("prompt_tokens", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidRequest(f"request {self.id!r}: {name} must be a positive integer, got {value!r}")

    @property
    def kv_demand(self) -> int:
        """Tokens of KV cache and context the request may need: its prompt plus max_tokens, reserved up front."""
        return self.prompt_tokens + self.max_tokens
