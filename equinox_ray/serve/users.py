"""Users and their API keys at run time, owned by the fairness controller: seeded from the config, changed through
the admin API (`/v1/admin/users`), kept in the controller's checkpoint, and sent to every ingress replica, which
checks keys against it. Only SHA-256 digests are held; a key the server makes is shown once, to the admin who
asked for it.

The config seeds a user only if neither the checkpoint has it nor the admin API removed it: after the first start
the admin API owns the users, and a redeploy with the same YAML does not undo its changes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from equinox_ray.serve.config import UserConfig


@dataclass(frozen=True)
class ChangeRefused:
    """The answer to an admin change the registry would not make: no such user (404) or a conflict (409). An
    answer, not an exception: Serve logs every exception that crosses a handle with its traceback."""

    status: int
    message: str
    code: str


def refused_change(change: Callable[[], None]) -> ChangeRefused | None:
    try:
        change()
    except UserNotFound as exc:
        return ChangeRefused(404, str(exc), "user_not_found")
    except (UserExists, KeyInUse) as exc:
        return ChangeRefused(409, str(exc), "conflict")
    return None


class UserNotFound(Exception):
    """No such user (404)."""


class UserExists(Exception):
    """A user of that name exists (409)."""


class KeyInUse(Exception):
    """The key already belongs to another user (409)."""


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    weight: float = Field(1.0, gt=0, le=1e6)


class WeightChange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    weight: float = Field(gt=0, le=1e6)


class KeyRotation(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    keep_old: bool = Field(False, description="the old keys keep working too (rotate with an overlap)")


@dataclass
class UserRecord:
    weight: float
    keys: list[str] = field(default_factory=list)  # SHA-256 digests


@dataclass
class UserTable:
    """What an ingress replica needs to authenticate: key digest -> user, and each user's weight."""

    users: dict[str, str]
    weights: dict[str, float]


@dataclass
class RegistryState:
    """The registry in a checkpoint."""

    users: dict[str, UserRecord]
    removed: list[str]


class UserRegistry:
    def __init__(self, seed: list[UserConfig]) -> None:
        self.users: dict[str, UserRecord] = {}
        self.removed: set[str] = set()
        self._seed = seed
        self._apply_seed()

    def _apply_seed(self) -> None:
        for user in self._seed:
            if user.name not in self.users and user.name not in self.removed:
                key_digest = user.key.resolve()  # reads an env var or a file
                self._claim(user.name, key_digest)
                self.users[user.name] = UserRecord(user.weight, [key_digest])

    # -- changes (each returns what the admin sees) ----------------------------------------------------------
    def add(self, name: str, weight: float, key_digest: str) -> None:
        if name in self.users:
            raise UserExists(f"user {name!r} exists")
        self._claim(name, key_digest)
        self.users[name] = UserRecord(weight, [key_digest])
        self.removed.discard(name)

    def set_weight(self, name: str, weight: float) -> None:
        self._record(name).weight = weight

    def rotate(self, name: str, key_digest: str, keep_old: bool) -> None:
        """A new key for the user; its old keys stop working unless `keep_old` (a rotation with overlap)."""
        record = self._record(name)
        self._claim(name, key_digest)
        record.keys = (record.keys if keep_old else []) + [key_digest]

    def remove(self, name: str) -> None:
        self._record(name)
        del self.users[name]
        self.removed.add(name)

    # -- views ----------------------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.users

    def table(self) -> UserTable:
        return UserTable({key: name for name, r in self.users.items() for key in r.keys},
                         {name: r.weight for name, r in self.users.items()})

    def listing(self) -> dict[str, dict]:
        return {name: {"weight": r.weight, "keys": len(r.keys)} for name, r in sorted(self.users.items())}

    def state(self) -> RegistryState:
        return RegistryState({n: UserRecord(r.weight, list(r.keys)) for n, r in self.users.items()},
                             sorted(self.removed))

    def restore(self, state: RegistryState) -> None:
        self.users = {n: UserRecord(r.weight, list(r.keys)) for n, r in state.users.items()}
        self.removed = set(state.removed)
        self._apply_seed()

    def _record(self, name: str) -> UserRecord:
        if name not in self.users:
            raise UserNotFound(f"no user {name!r}")
        return self.users[name]

    def _claim(self, name: str, key_digest: str) -> None:
        owner = next((n for n, r in self.users.items() if key_digest in r.keys), None)
        if owner is not None and owner != name:
            raise KeyInUse("that key belongs to another user")
