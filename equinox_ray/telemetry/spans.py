"""The spans of one request: the ingress's root span with admission, queue and dispatch children, and the pool
replica's prefill and decode spans, joined through a W3C trace-context carrier sent with the generation request.

    <operation> <model>            (root, the ingress)     gen_ai.* request and usage, equinox.user, .policy
      equinox.admission                                    validation, the user and weight
      equinox.queue                                        waiting for the grant: score, counters, prediction
      equinox.dispatch                                     the call to the pool, until the last token
        equinox.prefill            (the pool replica)      until the first token
        equinox.decode             (the pool replica)      the remaining tokens

Attribute names are string literals: the GenAI semantic conventions where they apply, `equinox.*` for ours
(docs/observability.md lists them).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import AsyncIterator

from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import SpanKind, Status, StatusCode

PROVIDER = "equinox-ray"


def tracer_of(provider) -> trace.Tracer:
    return provider.get_tracer("equinox_ray") if provider is not None else trace.NoOpTracer()


def _user(user: str, weight: float | None) -> dict:
    return {"equinox.user": user, **({"equinox.user.weight": float(weight)} if weight is not None else {})}


def _usage(output_tokens: int, finish_reason: str | None, ttft_s: float, e2e_s: float, busy_seconds: float) -> dict:
    """What the engine measured, on the root span (ingress) and the decode span (pool replica) alike."""
    return {"gen_ai.usage.output_tokens": output_tokens, "gen_ai.response.finish_reasons": [finish_reason or "abort"],
            "equinox.measured.ttft_s": ttft_s, "equinox.measured.e2e_s": e2e_s,
            "equinox.measured.busy_seconds": busy_seconds}


def _flat(prefix: str, values: dict | None) -> dict:
    return {f"{prefix}.{k}": float(v) for k, v in (values or {}).items() if isinstance(v, (int, float))}


class RequestTrace:
    """Spans of one request at the ingress. Every method is safe to call on a no-op tracer."""

    def __init__(self, tracer: trace.Tracer, *, request_id: str, operation: str, model: str, user: str,
                 weight: float | None, policy: str, prompt_tokens: int, max_tokens: int) -> None:
        self.tracer = tracer
        self.root = tracer.start_span(f"{operation} {model}", kind=SpanKind.SERVER, attributes={
            "gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER, "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": max_tokens, "gen_ai.usage.input_tokens": prompt_tokens,
            "equinox.request_id": request_id, "equinox.policy": policy, **_user(user, weight)})
        self._context = trace.set_span_in_context(self.root)
        self.queue: trace.Span | None = None
        self.dispatch: trace.Span | None = None

    def admission(self, user: str, weight: float | None):
        return self.tracer.start_as_current_span("equinox.admission", context=self._context,
                                                 attributes=_user(user, weight))

    def queued(self) -> None:
        self.queue = self.tracer.start_span("equinox.queue", context=self._context)

    def granted(self, grant: dict, gpu_type: str) -> dict[str, str]:
        """End the queue span with the decision's attributes, open the dispatch span, and return the carrier the
        pool replica continues the trace from."""
        prediction = grant.get("prediction") or {}
        decision = {
            "equinox.pool": grant["pool"], "equinox.gpu_type": gpu_type,
            "equinox.queue_wait_s": float(grant.get("queue_wait_s", 0.0)), "equinox.score": float(grant["score"]),
            **_flat("equinox.counter.before", grant.get("counters_before")),
            **_flat("equinox.counter.after_admission", grant.get("counters_after")),
            **{f"equinox.predicted.{k}": float(prediction[k]) for k in ("output_tokens", "ttft_s", "e2e_s",
                                                                       "throughput_tps", "utilization")
               if k in prediction},
        }
        if "source" in prediction:
            decision["equinox.predicted.source"] = str(prediction["source"])
        if self.queue is not None:
            self.queue.set_attributes(decision)
            self.queue.end()
        self.root.set_attributes(decision)
        self.dispatch = self.tracer.start_span("equinox.dispatch", context=self._context,
                                               attributes={"equinox.pool": grant["pool"],
                                                           "equinox.gpu_type": gpu_type})
        carrier: dict[str, str] = {}
        inject(carrier, context=trace.set_span_in_context(self.dispatch))
        return carrier

    def dispatching(self):
        """Make the dispatch span current around the call to the pool, so Serve's own routing spans nest in it."""
        return trace.use_span(self.dispatch, end_on_exit=False) if self.dispatch is not None else nullcontext()

    def finished(self, *, output_tokens: int, finish_reason: str | None, ttft_s: float, e2e_s: float,
                 busy_seconds: float, counters: dict | None) -> None:
        attributes = {**_usage(output_tokens, finish_reason, ttft_s, e2e_s, busy_seconds),
                      "equinox.measured.output_tokens": output_tokens,
                      **_flat("equinox.counter.after_finish", counters)}
        if self.dispatch is not None:
            self.dispatch.end()
        self.root.set_attributes(attributes)
        if finish_reason in (None, "abort"):
            self.root.set_status(Status(StatusCode.ERROR, "cancelled or failed before the end"))
        self.root.end()

    def failed(self, status: int, message: str) -> None:
        for span in (self.queue, self.dispatch):
            if span is not None and span.is_recording():
                span.end()
        self.root.set_attribute("http.response.status_code", status)
        self.root.set_status(Status(StatusCode.ERROR, message))
        self.root.end()


async def traced_generation(tracer: trace.Tracer, chunks: AsyncIterator, carrier: dict | None,
                            attributes: dict) -> AsyncIterator:
    """The pool replica's side: prefill until the first token, decode until the last, under the ingress's
    dispatch span (from the carrier)."""
    parent = extract(carrier or {})
    span = tracer.start_span("equinox.prefill", context=parent, attributes=attributes)
    phase, tokens = "prefill", 0
    try:
        async for chunk in chunks:
            tokens += len(chunk.token_ids)
            if phase == "prefill" and chunk.token_ids:
                span.end()
                span = tracer.start_span("equinox.decode", context=parent, attributes=attributes)
                phase = "decode"
            if chunk.usage is not None:
                u = chunk.usage
                span.set_attributes({**_usage(u.output_tokens, chunk.finish_reason, u.ttft_s, u.e2e_s,
                                              u.busy_seconds), "gen_ai.usage.input_tokens": u.prompt_tokens})
            yield chunk
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        span.set_attribute("equinox.tokens_streamed", tokens)
        span.end()

