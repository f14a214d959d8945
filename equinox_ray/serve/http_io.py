"""The ingress's HTTP plumbing: the bearer key, bodies read under a size limit and parsed into their models, and the
refusals of the rest of the system as OpenAI error answers."""

from __future__ import annotations

import json
import logging

from fastapi import Request
from pydantic import ValidationError

from equinox_ray.engines.types import TokenChunk
from equinox_ray.serve.ingress_links import CUT_AT_SHUTDOWN, Refused
from equinox_ray.serve.openai_protocol import APIError, one_line, unencodable
from equinox_ray.serve.users import ChangeRefused

log = logging.getLogger("ray.serve")


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over `limit` bytes: by its Content-Length before
    reading, or while reading a chunked one."""
    too_large = APIError(413, f"the request body is over this server's limit of {limit} bytes",
                         "invalid_request_error", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        parts.append(part)
    return b"".join(parts)


async def parse(request: Request, model, limit: int):
    raw = await read_body(request, limit)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {one_line(str(exc))}", "invalid_request_error") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", "invalid_request_error")
    bad = unencodable(data)
    if bad is not None:
        raise APIError(400, f"{bad}: not valid Unicode (a lone surrogate?)", "invalid_request_error",
                       bad.split(".")[0].split("[")[0])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        deepest = max(exc.errors(), key=lambda e: len(e["loc"]))  # of a union's alternatives, the nearest miss
        where = ".".join(str(p) for p in deepest["loc"]) or "body"
        param = str(deepest["loc"][0]) if deepest["loc"] else None
        message = one_line(deepest["msg"].removeprefix("Value error, "))
        raise APIError(400, f"{where}: {message}", "invalid_request_error", param) from None


def engine_failure(chunk: TokenChunk) -> APIError:
    """A request that failed on its replica (or was cut at shutdown): one line for the client, the whole error in
    the log."""
    if chunk.error == CUT_AT_SHUTDOWN:
        return APIError(503, CUT_AT_SHUTDOWN, "server_error", code="shutting_down")
    log.warning("request %s failed: %s", chunk.request_id, chunk.error)
    return APIError(503, f"the engine failed: {one_line(chunk.error or '')}", "server_error", code="engine_error")


def check_change(answer: ChangeRefused | None) -> None:
    """An admin change the controller refused, as its HTTP answer."""
    if answer is not None:
        raise APIError(answer.status, answer.message, "invalid_request_error", code=answer.code)


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, round(seconds)))}


def refusal(refused: Refused) -> APIError:
    r = refused.refusal
    kind = "rate_limit_error" if r.status == 429 else "server_error" if r.status >= 500 else "invalid_request_error"
    return APIError(r.status, r.message, kind, code=r.code, headers=retry_after(r.retry_after_s))
