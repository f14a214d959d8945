"""The spans of one request: the ingress's root span with admission, queue and dispatch children, the pool
replica's prefill and decode spans and the controller's accounting span, joined through a W3C trace-context carrier
sent with the generation request.

    <operation> <model>            (root, the ingress)     gen_ai.* request and usage, equinox.user, .policy
      equinox.admission                                    validation, the user and weight
      equinox.queue                                        waiting for the grant: score, counters, prediction
      equinox.dispatch                                     from the grant to the last token
      equinox.prefill              (the pool replica)      until the first token
      equinox.decode               (the pool replica)      the remaining tokens
      equinox.accounting           (the controller)        the charge and the counters after the finish

Attribute names are string literals: the GenAI semantic conventions where they apply, `equinox.*` for ours
(docs/observability.md lists them).
"""

from __future__ import annotations

from typing import AsyncIterator, Callable

from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import SpanKind, Status, StatusCode

from equinox_ray.engines.types import TokenChunk
from equinox_ray.serve.protocol import Grant

PROVIDER = "equinox-ray"
PREDICTED = ("output_tokens", "ttft_s", "e2e_s", "throughput_tps", "utilization")


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

    def queued(self) -> dict[str, str]:
        """Open the queue span; return the carrier from which the controller and the pool replica continue the
        trace (their spans are children of the root)."""
        self.queue = self.tracer.start_span("equinox.queue", context=self._context)
        carrier: dict[str, str] = {}
        inject(carrier, context=self._context)
        return carrier

    def granted(self, grant: Grant, gpu_type: str) -> None:
        """End the queue span with the decision's attributes and open the dispatch span (until the last token)."""
        decision = {"equinox.pool": grant.pool, "equinox.gpu_type": gpu_type, "equinox.replica": grant.replica,
                    "equinox.queue_wait_s": float(grant.queue_wait_s), "equinox.score": float(grant.score),
                    **_flat("equinox.counter.before", grant.counters_before),
                    **_flat("equinox.counter.after_admission", grant.counters_after)}
        if grant.prediction is not None:
            p = grant.prediction
            decision.update({f"equinox.predicted.{k}": float(getattr(p, k)) for k in PREDICTED})
            decision["equinox.predicted.source"] = str(p.source)
        if self.queue is not None:
            self.queue.set_attributes(decision)
            self.queue.end()
        self.root.set_attributes(decision)
        self.dispatch = self.tracer.start_span("equinox.dispatch", context=self._context,
                                               attributes={"equinox.pool": grant.pool, "equinox.gpu_type": gpu_type})

    def finished(self, last: TokenChunk) -> None:
        """The request's last chunk reached the client (or the client went away first)."""
        attributes = {"gen_ai.response.finish_reasons": [last.finish_reason or "abort"]}
        if last.usage is not None:
            u = last.usage
            attributes.update(_usage(u.output_tokens, last.finish_reason, u.ttft_s, u.e2e_s, u.busy_seconds))
            attributes["equinox.measured.output_tokens"] = u.output_tokens
        if last.error is not None:
            attributes["error.type"] = last.error
        if self.dispatch is not None:
            self.dispatch.end()
        self.root.set_attributes(attributes)
        if last.finish_reason in (None, "abort", "error"):
            self.root.set_status(Status(StatusCode.ERROR, last.error or "cancelled or failed before the end"))
        self.root.end()

    def failed(self, status: int, message: str) -> None:
        for span in (self.queue, self.dispatch):
            if span is not None and span.is_recording():
                span.end()
        self.root.set_attribute("http.response.status_code", status)
        self.root.set_status(Status(StatusCode.ERROR, message))
        self.root.end()


def accounting_span(tracer: trace.Tracer, carrier: dict | None, attributes: Callable[[], dict]) -> None:
    """The controller's side: one span per finished request with what it was charged and the counters after.
    The attributes are built only for a span that records (tracing on, trace sampled)."""
    span = tracer.start_span("equinox.accounting", context=extract(carrier or {}))
    if span.is_recording():
        span.set_attributes(attributes())
    span.end()


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

