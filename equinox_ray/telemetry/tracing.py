"""Tracer providers from the telemetry config, and the JSON-lines span exporter (the embedded default).

Each process (the ingress, each pool replica) builds its own provider from the same config rather than setting
OpenTelemetry's global one: Serve sets the global provider itself when its `tracing_config` is on, and a global
provider can be set only once. Parent contexts still flow through the context API, so Serve's spans and ours form
one trace.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import Sequence

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from equinox_ray.telemetry.config import TelemetryConfig

SERVE_SPANS_ENV = "EQUINOX_SERVE_SPANS_PATH"


class JsonLinesSpanExporter(SpanExporter):
    """One JSON object per span and line (OpenTelemetry's own `ReadableSpan.to_json`), appended to a file that
    several processes may share: each batch is one write. Past `max_bytes` the file rotates (`.1` is the newest
    of `backups` old files); a lock file makes one process do it."""

    def __init__(self, path: str | Path, max_bytes: int = 64 * 1024**2, backups: int = 3) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(span.to_json(indent=None) + "\n" for span in spans)
        try:
            with self._lock:
                self._rotate_if_full()
                with self.path.open("a") as f:
                    f.write(lines)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def _rotate_if_full(self) -> None:
        if self._size() < self.max_bytes:
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._size() < self.max_bytes:  # another process rotated it while we waited
                return
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))

    def shutdown(self) -> None:
        pass


def make_exporter(config: TelemetryConfig) -> SpanExporter | None:
    if config.exporter == "none":
        return None
    if config.exporter == "jsonl":
        return JsonLinesSpanExporter(_under_project(config.jsonl_path), config.jsonl_max_bytes, config.jsonl_backups)
    if config.exporter == "otlp-grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=config.endpoint) if config.endpoint else OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=config.endpoint) if config.endpoint else OTLPSpanExporter()


def make_provider(config: TelemetryConfig, component: str) -> TracerProvider | None:
    """A provider for one process, or None when tracing is off (callers then use a no-op tracer)."""
    exporter = make_exporter(config)
    if exporter is None:
        return None
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: config.service_name,
                                                        "equinox.component": component}),
                              sampler=ParentBased(TraceIdRatioBased(config.sampling_ratio)))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    return provider


def serve_span_processors() -> list:
    """For Serve's own spans: `tracing_config.exporter_import_path: equinox_ray.telemetry.tracing:serve_span_processors`
    writes them as JSON lines next to ours (path from $EQUINOX_SERVE_SPANS_PATH, default logs/spans.jsonl)."""
    path = _under_project(os.environ.get(SERVE_SPANS_ENV, TelemetryConfig().jsonl_path))
    return [BatchSpanProcessor(JsonLinesSpanExporter(path), schedule_delay_millis=500)]


def _under_project(path: str) -> Path:
    """A relative path is relative to the project root, wherever Ray started the process."""
    from equinox_ray.serve.paths import PROJECT_ROOT

    return Path(path) if Path(path).is_absolute() else PROJECT_ROOT / path
