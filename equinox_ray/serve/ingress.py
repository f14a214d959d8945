"""The OpenAI-compatible ingress: identify the user, validate, ask the controller for a grant, stream from the pool.

Every accepted request ends in a completion or an explicit error. A client that goes away before its grant is
taken out of its queue; one that goes away mid-stream has its engine request aborted, and the controller is told
what was actually served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve

from equinox_ray.engines.types import EngineError, GenerationRequest, RequestRejected
from equinox_ray.serve.config import AppConfig, PolicyConfig
from equinox_ray.serve.errors import Busy, Cancelled, QueueFull
from equinox_ray.serve.controller import FairnessController
from equinox_ray.serve.openai_protocol import (
    APIError, ChatRequest, CompletionRequest, chunk_body, completion_body, sse, usage,
)
from equinox_ray.serve.paths import resolve
from equinox_ray.telemetry.dashboard import DASHBOARD_HTML
from equinox_ray.telemetry.metrics import FairnessMetrics
from equinox_ray.telemetry.spans import RequestTrace, tracer_of
from equinox_ray.telemetry.tracing import make_provider

log = logging.getLogger("ray.serve")
api = FastAPI(title="equinox-ray", description="Fair multi-user LLM serving (OpenAI-compatible)")
PROGRESS_EVERY = 16  # tokens between progress reports to the controller


# serve.ingress pickles the app when the class is decorated: helpers must be defined above the class.


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", "server_error").body(), status_code=500)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


async def _parse(request: Request, model):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", "invalid_request_error") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", "invalid_request_error")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}", "invalid_request_error", param) from None


ENGINE_FAILURES = (EngineError, RequestRejected, RuntimeError)


def _engine_failure(exc: Exception) -> APIError:
    return APIError(503, f"the engine failed: {exc}", "server_error", code="engine_error")


async def _prepend(first, rest):
    yield first
    async for item in rest:
        yield item


class Tokenizer:
    """Counts prompt tokens at the door, so a prompt that cannot fit is refused before it queues."""

    def __init__(self, path: str | None) -> None:
        self.hf = None
        if path is not None:
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(resolve(path))

    def encode(self, text: str) -> list[int]:
        if self.hf is None:
            return [1] * len(text.split())
        return self.hf.encode(text, add_special_tokens=False)

    def chat(self, messages) -> list[int]:
        if self.hf is not None and getattr(self.hf, "chat_template", None):
            return self.hf.apply_chat_template([m.model_dump() for m in messages], add_generation_prompt=True)
        return self.encode("".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:")


@serve.deployment(max_ongoing_requests=4096, num_replicas=1)
@serve.ingress(api)
class EquinoxIngress:
    """Hosts the global fairness controller in its own process (one replica): a grant costs no remote call."""

    def __init__(self, config: dict, pools: dict) -> None:
        self.config = AppConfig.model_validate(config)
        self.pools = pools
        self.controller = FairnessController(config)
        self.tokenizer = Tokenizer(self.config.model.tokenizer)
        self.users = {u.api_key: u.name for u in self.config.users}
        self.admins = set(self.config.admin_keys)
        self.max_model_len = max(p.max_model_len for p in self.config.pools)  # the controller picks a pool it fits
        self.model = self.config.model.name
        self.gpu_types = {p.name: p.gpu_type for p in self.config.pools}
        self.tracer = tracer_of(make_provider(self.config.telemetry, "ingress"))
        self.metrics = FairnessMetrics(self.controller, self.config.telemetry.max_user_labels)

    # -- routes ----------------------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "equinox-ray"}]}

    @api.get("/metrics")
    async def prometheus(self) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    @api.get("/dashboard")
    async def dashboard(self) -> HTMLResponse:
        return HTMLResponse(DASHBOARD_HTML)

    @api.get("/v1/fairness")
    async def fairness(self, request: Request) -> dict:
        key = _bearer(request)
        if key in self.admins:
            return self.controller.snapshot()
        user = self._user_for_key(key, None)
        return self.controller.snapshot(user)

    @api.put("/v1/admin/policy")
    async def set_policy(self, request: Request) -> dict:
        """Admin only: switch policy or tune its weights while the server is idle (409 otherwise)."""
        if _bearer(request) not in self.admins:
            raise APIError(403 if _bearer(request) else 401, "an admin key is required", "invalid_request_error",
                           code="forbidden")
        try:
            body = PolicyConfig.model_validate(json.loads(await request.body()))
            return {"policy": self.controller.set_policy(body.model_dump())}
        except json.JSONDecodeError as exc:
            raise APIError(400, f"the body is not valid JSON: {exc}", "invalid_request_error") from None
        except Busy as exc:
            raise APIError(409, str(exc), "invalid_request_error", code="busy") from None
        except ValidationError as exc:
            raise APIError(400, str(exc.errors()[0]["msg"]), "invalid_request_error", "policy") from None

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        body = await _parse(request, CompletionRequest)
        user = self._user_for_key(_bearer(request), body.user)
        ids = body.prompt if isinstance(body.prompt, list) else self.tokenizer.encode(body.prompt)
        return await self._serve(body, user, ids, body.max_tokens, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        body = await _parse(request, ChatRequest)
        user = self._user_for_key(_bearer(request), body.user)
        return await self._serve(body, user, self.tokenizer.chat(body.messages), body.requested_max_tokens, chat=True)

    # -- from the pool replicas (Serve handle calls) --------------------------------------------------------------
    async def report(self, pool: str, replica: str, window: int, free_slots: int, tokens_per_s: float,
                     utilization: float, kv_cache_usage: float, tpot_s: float | None = None,
                     detail: dict | None = None) -> dict:
        # async on purpose: Serve runs plain methods in a thread pool, and the controller is single-threaded state
        return self.controller.report(pool, replica, window, free_slots, tokens_per_s, utilization, kv_cache_usage,
                                      tpot_s, detail)

    # -- the request path --------------------------------------------------------------------------------------
    def _user_for_key(self, key: str | None, claimed: str | None) -> str:
        if not self.config.auth:
            return claimed or "anonymous"
        if key is None:
            raise APIError(401, "missing API key: send Authorization: Bearer <key>", "invalid_request_error",
                           code="invalid_api_key")
        user = self.users.get(key)
        if user is None:
            raise APIError(401, "invalid API key", "invalid_request_error", code="invalid_api_key")
        return user  # the OpenAI `user` field never overrides the key's identity

    async def _serve(self, body, user: str, ids: list[int], max_tokens: int | None, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        max_tokens = max_tokens or self.config.limits.default_max_tokens
        known = self.controller.policy.users.get(user)  # None for a demo user's first request with auth off
        weight = known.weight if known else None
        span = RequestTrace(self.tracer, request_id=rid, operation="chat" if chat else "text_completion",
                            model=body.model, user=user, weight=weight, policy=self.controller.policy.name,
                            prompt_tokens=len(ids), max_tokens=max_tokens)
        try:
            with span.admission(user, weight):
                self._admit(body, ids, max_tokens)
            span.queued()
            grant = await self._wait_for_grant(rid, user, len(ids), max_tokens)
        except APIError as exc:
            span.failed(exc.status, exc.message)
            raise
        except BaseException as exc:
            span.failed(499 if isinstance(exc, asyncio.CancelledError) else 500, type(exc).__name__)
            raise
        carrier = span.granted(grant, self.gpu_types.get(grant["pool"], ""))
        generation = GenerationRequest(rid, max_tokens, prompt_token_ids=list(ids), ignore_eos=body.ignore_eos,
                                       temperature=body.temperature, trace_context=carrier)
        chunks = self._stream(grant["pool"], generation, user, span, grant.get("queue_wait_s", 0.0))
        try:  # start the stream here, so that from the grant on a running generator owns the request
            first = await chunks.__anext__()
        except BaseException as exc:
            await chunks.aclose()
            if isinstance(exc, ENGINE_FAILURES):
                raise _engine_failure(exc) from None
            raise
        chunks = _prepend(first, chunks)
        if body.stream:
            return StreamingResponse(self._sse(chunks, rid, chat, body.include_usage),
                                     media_type="text/event-stream")
        return await self._collect(chunks, rid, chat)

    def _admit(self, body, ids: list[int], max_tokens: int) -> None:
        """Refuse, before it queues, what this server cannot run."""
        if body.model != self.model:
            raise APIError(404, f"model {body.model!r} does not exist; this server has {self.model!r}",
                           "invalid_request_error", "model", "model_not_found")
        cap = self.config.limits.max_tokens_cap
        if cap is not None and max_tokens > cap:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's cap of {cap}",
                           "invalid_request_error", "max_tokens")
        if not ids:
            raise APIError(400, "the prompt is empty", "invalid_request_error", "prompt")
        if len(ids) + max_tokens > self.max_model_len:
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                                f"{len(ids)} and max_tokens is {max_tokens}", "invalid_request_error",
                           "max_tokens", "context_length_exceeded")

    async def _wait_for_grant(self, rid: str, user: str, prompt_tokens: int, max_tokens: int) -> dict:
        try:
            return await self.controller.submit(rid, user, prompt_tokens, max_tokens)
        except QueueFull as exc:
            retry = self.config.limits.retry_after_s
            raise APIError(429, str(exc), "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(retry)}) from None
        except Cancelled:
            raise APIError(499, "request cancelled", "invalid_request_error") from None

    async def _stream(self, pool: str, generation: GenerationRequest, user: str, span: RequestTrace,
                      queue_wait_s: float):
        """Chunks from the pool; whatever happens, the controller learns what was served."""
        with span.dispatching():
            response = self.pools[pool].options(stream=True).generate.remote(generation)
        served, reported, final = 0, 0, None
        try:
            async for chunk in response:
                served += len(chunk.token_ids)
                if served - reported >= PROGRESS_EVERY:
                    self.controller.progress(generation.id, served - reported)
                    reported = served
                if chunk.usage is not None:
                    final = chunk
                yield chunk
        finally:
            if final is None:
                response.cancel()  # aborts the engine request on the replica
            u = final.usage if final is not None else None
            if u is None:
                output, ttft, e2e, busy = served, 0.0, 0.0, 0.0
            else:
                output, ttft, e2e, busy = u.output_tokens, u.ttft_s, u.e2e_s, u.busy_seconds
            cancelled = final is None or final.finish_reason == "abort"
            counters = self.controller.finish(generation.id, user, pool, len(generation.prompt_token_ids), output,
                                              ttft, e2e, busy, cancelled=cancelled)
            if not cancelled:
                self.metrics.observe_ttft(user, queue_wait_s + ttft)
            span.finished(output_tokens=output, finish_reason=final.finish_reason if final else None, ttft_s=ttft,
                          e2e_s=e2e, busy_seconds=busy, counters=counters)

    async def _collect(self, chunks, rid: str, chat: bool) -> dict:
        text, n, finish, prompt = [], 0, None, 0
        try:
            async for chunk in chunks:
                text.append(chunk.text)
                n += len(chunk.token_ids)
                if chunk.usage is not None:
                    finish, prompt = chunk.finish_reason, chunk.usage.prompt_tokens
        except ENGINE_FAILURES as exc:
            raise _engine_failure(exc) from None
        return completion_body(rid, self.model, "".join(text), finish, usage(prompt, n), chat)

    async def _sse(self, chunks, rid: str, chat: bool, include_usage: bool):
        n, prompt, first = 0, 0, True
        try:
            async for chunk in chunks:
                n += len(chunk.token_ids)
                if chunk.usage is not None:
                    prompt = chunk.usage.prompt_tokens
                yield sse(chunk_body(rid, self.model, chunk.text, chunk.finish_reason, chat, first=first))
                first = False
        except ENGINE_FAILURES as exc:
            yield sse(_engine_failure(exc).body())
        if include_usage:
            yield sse(chunk_body(rid, self.model, None, None, chat, use=usage(prompt, n)))
        yield sse("[DONE]")
