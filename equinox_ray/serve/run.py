"""`equinox-serve CONFIG` (or `python -m equinox_ray.serve.run CONFIG`): `serve run CONFIG` with a drain.

Serve's own `serve run` answers Ctrl-C with `serve.shutdown()`, which stops the HTTP proxies at once: every stream
in flight is cut. This runner deploys the same config file the same way, and on SIGTERM or SIGINT drains each
equinox application first: its ingress replicas answer new requests 503 with Retry-After, the requests already
accepted (waiting or running) finish for up to `ingress.drain_timeout_s`, and what is left then ends with an
error event (streams) or a JSON 503. Only then does Serve shut down. A second signal shuts down at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
import time

import ray
import yaml
from ray import serve
from ray.serve._private import api as serve_api
from ray.serve._private.constants import SERVE_NAMESPACE
from ray.serve.config import gRPCOptions
from ray.serve.schema import ServeDeploySchema

from equinox_ray.serve.controller_deployment import CONTROLLER_DEPLOYMENT

log = logging.getLogger("equinox_ray.serve.run")
APP_BUILDER = "equinox_ray.serve.app:build"
POLL_S = 1.0
CALL_TIMEOUT_S = 10.0
GRACE_S = 5.0  # after the drain deadline, for the ingress replicas' last reports to arrive


def deploy(config: ServeDeploySchema, address: str | None) -> None:
    """What `serve run CONFIG` does (ray/serve/scripts.py), without its blocking loop."""
    if not ray.is_initialized():
        ray.init(address=address, namespace=SERVE_NAMESPACE)
    client = serve_api.serve_start(http_options=config.http_options.model_dump(),
                                   proxy_location=config.proxy_location,
                                   grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
                                   controller_options=config.controller_options)
    client.deploy_apps(config, _blocking=False)


async def drain(apps: list[str], again: threading.Event) -> None:
    """Close every equinox application, then wait until none has an unfinished request, or until the longest
    deadline (plus GRACE_S) has passed, or until a second signal. (Async: with the Makefile's Ray settings a
    handle runs its router on the caller's event loop.)"""
    controllers, deadline = [], time.monotonic()
    for app in apps:
        try:
            controller = serve.get_deployment_handle(CONTROLLER_DEPLOYMENT, app)
            deadline_s = await asyncio.wait_for(controller.close.remote(), CALL_TIMEOUT_S)
            deadline = max(deadline, time.monotonic() + deadline_s + GRACE_S)
            controllers.append(controller)
        except Exception as exc:  # not deployed yet, or already gone: nothing to drain there
            log.warning("application %s could not be drained: %r", app, exc)
    while controllers and time.monotonic() < deadline and not again.is_set():
        try:
            left = sum(await asyncio.gather(*(asyncio.wait_for(c.unfinished.remote(), CALL_TIMEOUT_S)
                                              for c in controllers)))
        except Exception as exc:
            log.warning("drain: the fairness controller did not answer (%r); shutting down", exc)
            return
        if left == 0:
            return
        log.warning("drain: %d requests unfinished, %.0f s left", left, deadline - time.monotonic())
        await asyncio.sleep(POLL_S)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="equinox-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a Serve config file, such as deploy/equinox.yaml")
    parser.add_argument("--address", default=None, help="the Ray cluster (default: start one, as serve run does)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with open(args.config) as f:
        config = ServeDeploySchema.model_validate(yaml.safe_load(f))
    signals = threading.Event()
    again = threading.Event()

    def on_signal(signum, frame) -> None:
        (again if signals.is_set() else signals).set()
        log.warning("%s: %s", signal.Signals(signum).name,
                    "shutting down now" if again.is_set() else "draining (send it again to shut down at once)")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    deploy(config, args.address)
    log.info("deployed %s; SIGTERM or Ctrl-C drains, then shuts down", args.config)
    while not signals.wait(1.0):
        pass
    asyncio.run(drain([app.name for app in config.applications if app.import_path == APP_BUILDER], again))
    serve.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
