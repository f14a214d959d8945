"""Telemetry settings, part of the application config (`telemetry:` in deploy/*.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TelemetryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exporter: Literal["jsonl", "otlp-grpc", "otlp-http", "none"] = Field(
        "jsonl", description="where spans go: a JSON-lines file (the embedded default), an OTLP collector, or nowhere")
    endpoint: str | None = Field(None, description="OTLP endpoint; default http://localhost:4317 (gRPC) or "
                                                   "http://localhost:4318/v1/traces (HTTP)")
    jsonl_path: str = Field("logs/spans.jsonl", description="the JSON-lines file, relative to the project root")
    jsonl_max_bytes: int = Field(64 * 1024**2, ge=1024, description="past this size the file rotates (spans.jsonl.1, "
                                                                   "...)")
    jsonl_backups: int = Field(3, ge=1, description="rotated files kept")
    sampling_ratio: float = Field(1.0, ge=0.0, le=1.0, description="share of traces kept (Serve's default is 0.01)")
    service_name: str = "equinox-ray"
    max_user_labels: int = Field(20, ge=1, description="users with their own Prometheus label; the rest are 'other'")
    prediction_sample_s: float = Field(
        0.1, ge=0, description="the controller predicts the requests of at most one update per this many seconds "
                               "for the prediction-error metrics and MoPE's online corrections; a decision that needs "
                               "a prediction makes it anyway. 0: every request")
