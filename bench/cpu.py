"""CPU time of every process a request crosses, by kind: the proxy (HAProxy, or Serve's proxy actor), the ingress
replicas, the controller, the pool replicas (with their engine subprocesses), the client (this process), and the
rest of Ray (raylet, GCS, Serve's controller). Serve names its replica processes `ray::ServeReplica:<app>:<name>`,
which tells the kinds and the application apart."""

from __future__ import annotations

import os
from collections import defaultdict

import psutil

KINDS = ("proxy", "ingress", "controller", "pool", "client", "ray")
SERVER_KINDS = ("proxy", "ingress", "controller", "pool")


def server_at_client_priority() -> None:
    """Have Ray start its workers at this process's niceness, before this process starts Ray. Ray starts workers at
    niceness 15, so a load generator (and vLLM's own server, started from it) at 0 would take the CPU the two share
    from our server first; one machine for client and server needs one priority for both."""
    os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))


def _kind(process: psutil.Process, app: str | None) -> str | None:
    if process.pid == os.getpid():
        return "client"
    line = " ".join(process.cmdline())
    if "haproxy" in line or "ProxyActor" in line:
        return "proxy"
    if "ServeReplica:" in line:
        replica_app, _, deployment = line.split("ServeReplica:", 1)[1].split()[0].partition(":")
        if app is not None and replica_app != app:
            return None  # another application's replica: not this measurement's
        if "Ingress" in deployment:
            return "ingress"
        if "Controller" in deployment:
            return "controller"
        return "pool"
    ancestor = process.parent()
    for _ in range(3):  # an engine's processes (vLLM's engine core and its worker) count with their replica
        if ancestor is None:
            break
        if "ServeReplica:" in " ".join(ancestor.cmdline()):
            return _kind(ancestor, app)
        ancestor = ancestor.parent()
    if line.startswith("ray::") or "ray/core/src" in line or "/ray/" in line or "raylet" in line or "gcs" in line:
        return "ray"
    return None


def snapshot(app: str | None = None) -> dict[int, tuple[str, float]]:
    """pid -> (kind, CPU seconds so far) for the processes of `app` (every app with None), the proxies, the client
    and Ray itself."""
    taken = {}
    for process in psutil.process_iter():
        try:
            kind = _kind(process, app)
            if kind is not None:
                times = process.cpu_times()
                taken[process.pid] = (kind, times.user + times.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return taken


def spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per kind between two snapshots (a process that ended in between is lost; none should)."""
    by_kind: dict[str, float] = defaultdict(float)
    for pid, (kind, seconds) in after.items():
        by_kind[kind] += seconds - before.get(pid, (kind, 0.0))[1]
    return {kind: by_kind.get(kind, 0.0) for kind in KINDS}
