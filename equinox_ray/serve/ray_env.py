"""The Ray settings the serving path is built for, read by Ray's processes when Ray starts (`make serve` sets them;
on a cluster, set them in the environment of `ray start` or the KubeRay pod spec):

- RAY_SERVE_ENABLE_HA_PROXY: Serve's HAProxy in front of the ingress replicas, which serve HTTP themselves, instead
  of Serve's Python proxy (about 3.8 ms of proxy CPU per request on these machines, against 0.08 ms);
- RAY_SERVE_USE_GRPC_BY_DEFAULT: gRPC between deployments (a unary call costs both sides about 1.4 ms of CPU here,
  against 4 ms over Ray's actor calls; a stream message 0.23 ms against 0.6 ms);
- RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0, RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0: our code and the handles'
  routers run on the replica's own event loop, so an SSE event or a channel message does not hop threads (the
  ingress's CPU per streamed token fell from 50 to 36 µs). All our replica code is async and never blocks.

docs/design.md ("The serving path") has the measurements.
"""

from __future__ import annotations

import os

FAST_PATH_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def missing() -> list[str]:
    """The settings this process's environment lacks, as NAME=value."""
    return [f"{name}={value}" for name, value in FAST_PATH_ENV.items() if os.environ.get(name) != value]


def use_fast_path() -> None:
    """Set them in this process before it starts Ray (tests, benchmarks, local runs); an explicit value stays."""
    for name, value in FAST_PATH_ENV.items():
        os.environ.setdefault(name, value)
