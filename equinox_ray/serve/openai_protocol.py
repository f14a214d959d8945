"""The subset of OpenAI's API the ingress speaks: request bodies, response bodies, error bodies, SSE chunks."""

from __future__ import annotations

import json
import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from equinox_ray.engines.types import Sampling

TokenId = Annotated[int, Field(ge=0)]
StopString = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="vLLM's: the usage so far in every chunk")


# Parameters of OpenAI's API this server does not implement, with the values that ask for nothing: a client may send
# those (many send their defaults); any other value is refused with a 400 that names the parameter.
UNSUPPORTED = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logit_bias": (None, {}),
               "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "parallel_tool_calls": (None, True, False),
               "response_format": (None, {"type": "text"}), "store": (None, False)}


# Parameters OpenAI's schema (and vLLM's server) let be null, meaning the default: the openai SDK sends null for an
# explicit None, and clients that build the body from their own options send every one
NULL_MEANS_DEFAULT = ("stream", "temperature", "top_p", "presence_penalty", "frequency_penalty", "logprobs", "top_k",
                      "min_p", "repetition_penalty", "ignore_eos")


class _Body(BaseModel):
    # strict: a string is not a number nor a boolean; forbid: a parameter we do not know is refused, not ignored
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="vLLM's: sample among the k most likely tokens; 0 or -1: all")
    min_p: float = Field(0.0, ge=0, le=1, description="vLLM's")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=2, description="vLLM's")
    seed: int | None = None
    stop: StopString | list[StopString] | None = None  # [] asks for nothing; "" is refused, as vLLM does both
    stop_token_ids: list[TokenId] | None = Field(None, description="vLLM's: token ids that end the generation")
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: produce exactly max_tokens (benchmarks, trace replay)
    # sent with a value that asks for nothing (UNSUPPORTED): accepted; any other value is refused in `_neutral`
    n: int | None = None
    best_of: int | None = None
    echo: bool | None = None
    logit_bias: dict | None = None
    suffix: str | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None
    store: bool | None = None

    @field_validator(*NULL_MEANS_DEFAULT, mode="before", check_fields=False)
    @classmethod
    def _null_is_default(cls, value, info):
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _neutral(cls, value, info):
        allowed = UNSUPPORTED[info.field_name]
        if not any(value == a and type(value) is type(a) for a in allowed):
            takes = " or ".join(json.dumps(a) for a in allowed)
            raise ValueError(f"{json.dumps(value)} is not supported by this server (it takes {takes})")
        return value

    def sampling(self) -> Sampling:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(self.temperature, self.top_p, max(self.top_k, 0), self.min_p, self.presence_penalty,
                        self.frequency_penalty, self.repetition_penalty, self.seed, stop,
                        tuple(self.stop_token_ids or ()), self.requested_logprobs)

    @property
    def requested_logprobs(self) -> int | None:
        """How many alternatives per token to report log probabilities for (0: the sampled token's only)."""
        return None


class CompletionRequest(_Body):
    prompt: str | list[TokenId] = Field(min_length=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value):
        """OpenAI's batch form, a list of prompts (strings or token lists): one is that prompt (lm-eval's
        local-completions sends a batch of one); several are refused, as this server answers one choice."""
        if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
            if len(value) > 1:
                raise ValueError(f"a batch of {len(value)} prompts is not supported by this server; send one "
                                 "prompt per request")
            return value[0]
        return value
    logprobs: int | None = Field(None, ge=0, le=20, description="the sampled token's log probability and this "
                                                                "many alternatives'")

    @property
    def requested_logprobs(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    """One part of a chat message's content; this text-only model takes no images, audio or files."""

    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant", "tool", "developer"]
    # OpenAI's two forms: a string, or a list of parts (openai-chat clients send this); an assistant's turn may
    # have none (OpenAI sends null with tool calls, and agents replay their history as it came)
    content: str | list[TextPart] | None = None

    @model_validator(mode="after")
    def _content_unless_assistant(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    @property
    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)

    def template_message(self) -> dict:
        return {"role": self.role, "content": self.text}


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value, info):
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unencodable(value, path: str = "") -> str | None:
    """The path of the first string (or key) in a parsed JSON value that is not valid Unicode (a lone surrogate
    such as "\\ud800" parses, but no tokenizer or encoder can take it), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = unencodable(key, path) or unencodable(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = unencodable(item, f"{path}[{i}]")
            if found:
                return found
    return None


def one_line(text: str, limit: int = 200) -> str:
    """What a client sees of an internal failure: its first line, cut short (the log has the rest)."""
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def usage(prompt_tokens: int, output_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": output_tokens,
            "total_tokens": prompt_tokens + output_tokens}


def completion_logprobs(tokens, offset: int = 0) -> dict:
    """Completions' logprobs object for these tokens (`TokenLogprob`s); `offset`: where they start in the text."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}


def chat_logprobs(tokens) -> dict:
    """Chat's logprobs object for these tokens (`TokenLogprob`s)."""
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(a, b) for a, b in t.top]}
                        for t in tokens]}


def logprobs_body(tokens, chat: bool, offset: int = 0) -> dict:
    return chat_logprobs(tokens) if chat else completion_logprobs(tokens, offset)


def completion_body(rid: str, model: str, text: str, finish: str | None, use: dict | None, chat: bool,
                    logprobs: dict | None = None) -> dict:
    created = int(time.time())
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                  "finish_reason": finish}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
                "usage": use}
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice],
            "usage": use}


def chunk_body(rid: str, model: str, text: str | None, finish: str | None, chat: bool, first: bool = False,
               use: dict | None = None, logprobs: dict | None = None) -> dict:
    created = int(time.time())
    if use is not None:  # the usage chunk that include_usage asks for: no choices
        return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": model, "choices": [], "usage": use}
    if chat:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}]}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
