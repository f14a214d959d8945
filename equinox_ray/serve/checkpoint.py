"""The controller's durable state and where it is kept: Ray's GCS key-value store by default (it outlives the
controller's process and its node), or a file. Written every `interval_s` when something changed; read once when
the controller starts. JSON through pydantic, so a checkpoint survives an upgrade of the code that wrote it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter

from equinox_ray.serve.config import CheckpointConfig
from equinox_ray.serve.users import RegistryState

log = logging.getLogger("ray.serve")


@dataclass
class UsageTotals:
    """A user's requests by outcome and tokens served, since the service first started."""

    submitted: int = 0
    finished: int = 0
    rejected: int = 0
    cancelled: int = 0
    retried: int = 0  # attempts whose replica died before their first token, queued again
    prompt_tokens: int = 0
    output_tokens: int = 0


@dataclass
class Checkpoint:
    policy: str
    counters: dict[str, dict[str, float]]  # Policy.durable_state(): table -> user -> value
    usage: dict[str, UsageTotals]
    predictor: dict | None = None  # the predictor's online_state(), where it has one
    written_at: float = 0.0  # wall-clock seconds
    users: RegistryState | None = None  # users and key digests as the admin API left them (None: older checkpoint)


_ADAPTER = TypeAdapter(Checkpoint)


class CheckpointStore:
    def __init__(self, config: CheckpointConfig, app: str) -> None:
        self.config = config
        self.key = f"{config.key}/{app}".encode()

    def save(self, checkpoint: Checkpoint) -> None:
        data = _ADAPTER.dump_json(checkpoint)
        if self.config.store == "gcs":
            from ray.experimental.internal_kv import _internal_kv_put

            _internal_kv_put(self.key, data, overwrite=True)
        elif self.config.store == "file":
            path = Path(self.config.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            partial.write_bytes(data)
            os.replace(partial, path)  # a reader never sees half a checkpoint

    def load(self) -> Checkpoint | None:
        data = None
        if self.config.store == "gcs":
            from ray.experimental.internal_kv import _internal_kv_get

            data = _internal_kv_get(self.key)
        elif self.config.store == "file" and Path(self.config.path).exists():
            data = Path(self.config.path).read_bytes()
        if not data:
            return None
        try:
            return _ADAPTER.validate_json(data)
        except ValueError:
            log.exception("the controller's checkpoint is unreadable; starting from zero")
            return None
