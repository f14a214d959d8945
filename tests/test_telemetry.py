"""Traces, metrics and the live fairness figures, without Ray: the real controller, a real replica of the simulated
GPU, and the real OpenTelemetry SDK and exporters (in memory, JSON lines, and OTLP/HTTP to a loopback receiver)."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from equinox_ray.engines.admission import AdmissionWindow
from equinox_ray.engines.replica import Replica
from equinox_ray.engines.sim_engine import SimEngine, SimEngineConfig
from equinox_ray.engines.replica import ReplicaReport
from equinox_ray.engines.types import EngineStats, GenerationRequest, Usage
from equinox_ray.fairness.live import PredictionError, SlidingService
from equinox_ray.fairness.prediction import Outcome, Prediction
from equinox_ray.serve.config import AppConfig
from equinox_ray.serve.controller import FairnessController
from equinox_ray.serve.keys import digest
from equinox_ray.serve.protocol import Finished, IngressBatch, ReplicaHello, Submission
from equinox_ray.telemetry.config import TelemetryConfig
from equinox_ray.telemetry.metrics import FairnessMetrics
from equinox_ray.telemetry.spans import RequestTrace, traced_generation, tracer_of
from equinox_ray.telemetry.tracing import make_provider

GEN_AI = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "gen_ai.request.max_tokens",
          "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.response.finish_reasons")
EQUINOX = ("equinox.user", "equinox.user.weight", "equinox.policy", "equinox.counter.before.ufc",
           "equinox.counter.before.rfc", "equinox.counter.after_admission.ufc",
           "equinox.score", "equinox.predicted.output_tokens", "equinox.predicted.e2e_s",
           "equinox.measured.output_tokens", "equinox.measured.e2e_s", "equinox.pool", "equinox.gpu_type",
           "equinox.queue_wait_s")


def controller_config(users=("alice",), **telemetry) -> AppConfig:
    return AppConfig.model_validate({
        "model": {"name": "llama-sim", "tokenizer": None},
        "users": [{"name": u, "key": {"sha256": digest(f"sk-{u}-key-0000")}, "weight": 2.0 if u == "alice" else 1.0} for u in users],
        "policy": {"name": "equinox", "predictor": "moving-average"},
        "pools": [{"name": "h100", "gpu_type": "H100", "engine": "sim", "sim": {"gpu": "H100", "time_scale": 20.0},
                   "admission": {"max_window": 4, "initial_window": 4}}],
        "telemetry": telemetry or {"exporter": "none"},
    })


async def one_traced_request(tracer, controller: FairnessController, replica: Replica, rid: str = "cmpl-1") -> None:
    """A request along the path the ingress, the controller and the pool replica take, each with its spans."""
    span = RequestTrace(tracer, request_id=rid, operation="text_completion", model="llama-sim", user="alice",
                        weight=2.0, policy=controller.policy.name, prompt_tokens=40, max_tokens=12)
    with span.admission("alice", 2.0):
        pass
    request = GenerationRequest(rid, 12, prompt_token_ids=list(range(3, 43)), ignore_eos=True,
                                trace_context=span.queued())
    controller.apply(IngressBatch("ingress", submissions=[Submission("alice", request)]))
    grant = controller.to_ingress.take("ingress")[0]
    span.granted(grant, "H100")
    dispatch = controller.to_replica.take(grant.replica)[0]
    final = None
    async for chunk in traced_generation(tracer, replica.generate(dispatch.generation),
                                         dispatch.generation.trace_context, {"equinox.pool": "h100"}):
        final = chunk if chunk.last else final
    controller.apply(IngressBatch("ingress", finished=[Finished(rid, final.usage, 12, cancelled=False)]))
    span.finished(final)


def run_request(tracer) -> None:
    async def main():
        controller = FairnessController(controller_config(), tracer=tracer)
        controller.replica_connected(ReplicaHello("h100", "replica-0", 4))
        controller.set_routable("h100", {"replica-0"})
        replica = Replica(SimEngine(SimEngineConfig(gpu="H100", time_scale=20.0)), AdmissionWindow(maximum=4))
        await replica.start()
        try:
            await one_traced_request(tracer, controller, replica)
        finally:
            await replica.engine.shutdown()

    asyncio.run(main())


def test_in_memory_exporter_sees_the_whole_span_tree_with_its_attributes():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    run_request(provider.get_tracer("test"))
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"text_completion llama-sim", "equinox.admission", "equinox.queue", "equinox.dispatch",
                          "equinox.prefill", "equinox.decode", "equinox.accounting"}
    root = spans["text_completion llama-sim"]
    assert len({s.context.trace_id for s in spans.values()}) == 1
    parent = {name: s.parent.span_id if s.parent else None for name, s in spans.items()}
    assert parent["text_completion llama-sim"] is None
    for child in ("equinox.admission", "equinox.queue", "equinox.dispatch"):
        assert parent[child] == root.context.span_id
    for child in ("equinox.prefill", "equinox.decode", "equinox.accounting"):  # continued from the carrier
        assert parent[child] == root.context.span_id
    for name in GEN_AI + EQUINOX:
        assert name in root.attributes, name
    accounting = spans["equinox.accounting"].attributes
    assert accounting["equinox.measured.output_tokens"] == 12 and "equinox.counter.after_finish.rfc" in accounting
    assert root.attributes["gen_ai.usage.output_tokens"] == 12
    assert root.attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert root.attributes["equinox.user"] == "alice" and root.attributes["equinox.policy"] == "equinox"
    assert spans["equinox.queue"].attributes["equinox.gpu_type"] == "H100"
    assert spans["equinox.decode"].attributes["gen_ai.usage.output_tokens"] == 12
    assert spans["equinox.prefill"].end_time <= spans["equinox.decode"].start_time


def test_jsonl_exporter_writes_one_parseable_span_per_line(tmp_path):
    path = tmp_path / "spans.jsonl"
    provider = make_provider(TelemetryConfig(exporter="jsonl", jsonl_path=str(path)), "test")
    run_request(tracer_of(provider))
    provider.force_flush()
    spans = [json.loads(line) for line in path.read_text().splitlines()]
    assert {s["name"] for s in spans} >= {"equinox.queue", "equinox.prefill"}
    root = next(s for s in spans if s["parent_id"] is None)
    assert root["attributes"]["equinox.user"] == "alice"
    assert root["resource"]["attributes"]["service.name"] == "equinox-ray"


def test_otlp_exporters_are_chosen_by_the_config():
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    from equinox_ray.telemetry.tracing import make_exporter

    grpc = make_exporter(TelemetryConfig(exporter="otlp-grpc", endpoint="http://collector:4317"))
    assert isinstance(grpc, GrpcExporter)
    assert isinstance(make_exporter(TelemetryConfig(exporter="otlp-http")), HttpExporter)
    with pytest.raises(ValueError):
        TelemetryConfig(exporter="zipkin")


def test_no_exporter_means_no_provider_and_a_silent_tracer():
    assert make_provider(TelemetryConfig(exporter="none"), "test") is None
    run_request(tracer_of(None))  # the request path still works with tracing off


def test_sampling_ratio_zero_records_nothing(tmp_path):
    path = tmp_path / "spans.jsonl"
    provider = make_provider(TelemetryConfig(exporter="jsonl", jsonl_path=str(path), sampling_ratio=0.0), "test")
    run_request(tracer_of(provider))
    provider.force_flush()
    assert not path.exists() or path.read_text() == ""
    with pytest.raises(ValueError):
        TelemetryConfig(sampling_ratio=1.5)


class _Receiver(BaseHTTPRequestHandler):
    received: list[ExportTraceServiceRequest] = []

    def do_POST(self):  # noqa: N802 (the http.server API)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        type(self).received.append((self.path, self.headers["Content-Type"], message))
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_otlp_http_round_trip_to_a_loopback_receiver():
    _Receiver.received = []
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_port}/v1/traces"
        provider = make_provider(TelemetryConfig(exporter="otlp-http", endpoint=endpoint), "test")
        run_request(tracer_of(provider))
        assert provider.force_flush(10_000)
    finally:
        server.shutdown()
    assert _Receiver.received
    path, content_type, _ = _Receiver.received[0]
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    spans = [span for _, _, message in _Receiver.received for rs in message.resource_spans
             for ss in rs.scope_spans for span in ss.spans]
    names = {s.name for s in spans}
    assert {"text_completion llama-sim", "equinox.queue", "equinox.prefill", "equinox.decode"} <= names
    root = next(s for s in spans if s.name == "text_completion llama-sim")
    attributes = {a.key: a.value for a in root.attributes}
    assert attributes["gen_ai.request.model"].string_value == "llama-sim"
    assert attributes["equinox.user"].string_value == "alice"
    assert attributes["gen_ai.usage.output_tokens"].int_value == 12
    assert len({s.trace_id for s in spans}) == 1


def test_prometheus_metrics_bound_user_labels_and_report_what_was_served():
    users = [f"u{i:02d}" for i in range(8)]
    controller = FairnessController(controller_config(users=users))
    controller.replica_connected(ReplicaHello("h100", "replica-0", 4))
    controller.set_routable("h100", {"replica-0"})
    metrics = FairnessMetrics(controller, max_user_labels=3)
    controller.ttft_observers.append(metrics.observe_ttft)
    for i, user in enumerate(users[:4]):
        request = GenerationRequest(f"r{i}", 5, prompt_token_ids=[1] * 10)
        controller.apply(IngressBatch("ingress", submissions=[Submission(user, request)]))
    for i, user in enumerate(users[:4]):
        controller.apply(IngressBatch("ingress", finished=[Finished(f"r{i}", Usage(10, 5, 0.1, 0.4, 0.2), 5, False)]))
    stats = EngineStats(running=0, waiting=0, kv_cache_usage=0.1, tokens_per_s=1234.0, output_tokens_per_s=600.0,
                        busy_fraction=0.5, utilization=0.5, utilization_source="simulated")
    controller.report(ReplicaReport("replica-0", "h100", stats, 4, 0, 0, 4, None, 4))
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    served = {(s.labels["user"], s.labels["kind"]): s.value for s in families["equinox_user_served_tokens"].samples
              if s.name.endswith("_total")}
    assert {u for u, _ in served} == {"u00", "u01", "u02", "other"}  # three named, the rest in 'other'
    assert served[("u00", "output")] == 5 and served[("other", "output")] == 5 and served[("other", "input")] == 10
    ttft = {s.labels["user"] for s in families["equinox_user_ttft_seconds"].samples}
    assert ttft <= {"u00", "u01", "u02", "other"} and "other" in ttft
    pools = {s.name: s.value for f in families.values() for s in f.samples if s.name.startswith("equinox_pool")}
    assert pools["equinox_pool_throughput_tokens_per_second"] == 1234.0 and pools["equinox_pool_replicas"] == 1
    assert 0 < families["equinox_jain_index"].samples[0].value <= 1
    assert {s.labels["target"] for s in families["equinox_predictor_relative_error"].samples} == {
        "output_tokens", "ttft_s", "e2e_s"}


def test_sliding_service_jain_counts_waiting_users_with_no_service():
    window = SlidingService(window_s=10.0)
    window.add(0.0, "a", 100.0)
    window.add(1.0, "b", 100.0)
    assert window.jain(2.0, []) == pytest.approx(1.0)
    assert window.jain(2.0, ["c"]) == pytest.approx(2 / 3)  # c waits and got nothing
    assert window.jain(10.5, []) is None  # a's service left the window; b alone
    assert window.service(20.0) == {}


def test_prediction_error_is_relative_and_smoothed():
    error = PredictionError(smoothing=0.5)
    outcome = Outcome("r", "a", "p", 10, 100, 0.5, 2.0, 1.0)
    error.observe(Prediction(50, 0.5, 1.0, 1000, 0.5), outcome)
    assert error.error == {"output_tokens": 0.5, "ttft_s": 0.0, "e2e_s": 0.5}
    error.observe(Prediction(100, 0.5, 2.0, 1000, 0.5), outcome)
    assert error.error["output_tokens"] == pytest.approx(0.25)
    error.observe(Prediction(0, 0, 0, 1, 1), Outcome("r", "a", "p", 10, 0, 0, 0, 0, cancelled=True))
    assert error.count == 2


def test_the_span_file_rotates_past_its_size_and_keeps_its_backups(tmp_path):
    from equinox_ray.telemetry.tracing import JsonLinesSpanExporter

    path = tmp_path / "spans.jsonl"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path, max_bytes=4096, backups=2)))
    tracer = provider.get_tracer("t")
    for i in range(200):
        with tracer.start_as_current_span(f"span-{i}"):
            pass
    files = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert files == ["spans.jsonl", "spans.jsonl.1", "spans.jsonl.2"]
    assert all((tmp_path / f).stat().st_size < 4096 + 2048 for f in files)
    newest = [json.loads(line)["name"] for line in path.read_text().splitlines()]
    assert newest[-1] == "span-199"
