"""API keys: the configuration names where a key is, or holds its SHA-256 digest, never the key itself, so neither
Serve's stored application args, nor its logs, nor the Ray dashboard ever show one. The ingress hashes each
request's bearer token and looks the digest up.

    python -m equinox_ray.serve.keys new          a fresh key and its digest, for `key: {sha256: ...}`
    python -m equinox_ray.serve.keys hash KEY     the digest of an existing key
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


def new_key() -> str:
    return f"sk-{secrets.token_urlsafe(32)}"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class KeyRef(BaseModel):
    """One key, by one of: its SHA-256 digest; an environment variable that holds it on the ingress replicas'
    nodes; a file that holds it (a mounted Kubernetes secret)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    env: str | None = Field(None, min_length=1)
    file: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> "KeyRef":
        if sum(v is not None for v in (self.sha256, self.env, self.file)) != 1:
            raise ValueError("a key is given by exactly one of sha256, env, file")
        return self

    def resolve(self) -> str:
        """The key's digest, read where it is (in the process that checks keys, not where the config is built)."""
        if self.sha256 is not None:
            return self.sha256
        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise KeyError(f"environment variable {self.env} (an API key) is not set on this node")
            return digest(value.strip())
        value = Path(self.file).read_text().strip()
        if not value:
            raise ValueError(f"key file {self.file} is empty")
        return digest(value)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m equinox_ray.serve.keys", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("new", help="print a fresh key and its digest")
    hashing = sub.add_parser("hash", help="print the digest of a key")
    hashing.add_argument("key")
    args = parser.parse_args()
    key = new_key() if args.command == "new" else args.key
    if args.command == "new":
        print(f"key:    {key}")
    print(f"sha256: {digest(key)}")


if __name__ == "__main__":
    main()
