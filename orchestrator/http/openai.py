"""OpenAI request bodies to Tidal's GenerateRequest, and Tidal's token chunks to OpenAI response objects.

Parsing only checks what OpenAI's JSON can get wrong (types, shapes, fields Tidal does not support); the
limits (max_tokens, temperature, top_p, the model's length...) are checked by the frontend's own validation,
the same for gRPC and HTTP. Every refusal is an `ApiError` that names the field.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from tidal.v1 import generation_pb2

INT32_MAX = 2**31 - 1
MAX_BODY_BYTES = 4 * 1024 * 1024

# OpenAI's error `type` for each status, as its clients map them to exceptions
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
               500: "internal_server_error", 503: "service_unavailable", 504: "timeout"}
# gRPC status of the frontend's RpcError -> HTTP status (google/rpc/code.proto's mapping)
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
               "FAILED_PRECONDITION": 400, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503,
               "DEADLINE_EXCEEDED": 504, "INTERNAL": 500}


class ApiError(Exception):
    """Ends an HTTP request with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "api_error"),
                          "param": self.param, "code": self.status}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param)


@dataclass
class Parsed:
    """One OpenAI request, ready for the frontend."""

    request: generation_pb2.GenerateRequest
    stream: bool
    include_usage: bool
    timeout_s: float | None
    return_token_ids: bool = False


def decode_body(raw: bytes, content_type: str | None) -> dict:
    if content_type is None or content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type: send application/json (got {content_type or 'none'})", "Content-Type")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"body: not valid JSON ({e})", "body") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"body: must be a JSON object, got {type(body).__name__}", "body")
    return body


def _number(body: dict, key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(key, f"must be a number, got {json.dumps(v)[:40]}")
    return float(v)


def _integer(body: dict, key: str, low: int = -INT32_MAX, high: int = INT32_MAX) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(key, f"must be an integer, got {json.dumps(v)[:40]}")
    if not low <= v <= high:
        raise bad(key, f"must be in [{low}, {high}], got {v}")
    return v


def _text(content, key: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(key, "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(key, "must be a string or a list of text parts")


def check_model(body: dict, served: str) -> str:
    model = body.get("model")
    if model is None:
        raise bad("model", f"missing; this server serves {served!r}")
    if not isinstance(model, str):
        raise bad("model", "must be a string")
    if model != served:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves {served!r}", "model")
    return model


def parse(body: dict, chat: bool) -> Parsed:
    """An OpenAI completions (chat=False) or chat completions body as a GenerateRequest."""
    req = generation_pb2.GenerateRequest()
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("messages", "must be a non-empty list of {role, content} messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise bad(f"messages[{i}]", "must be an object with a string role")
            req.chat.messages.add(role=m["role"], content=_text(m.get("content", ""), f"messages[{i}].content"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]          # a batch of one
        if isinstance(prompt, str):
            req.prompt = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            if not all(0 <= t <= INT32_MAX for t in prompt):
                raise bad("prompt", "token ids must be non-negative")
            req.token_ids.ids.extend(prompt)
        elif prompt is None:
            raise bad("prompt", "missing; give a string or a list of token ids")
        elif isinstance(prompt, list) and len(prompt) > 1:
            raise bad("prompt", "batches of prompts are not supported; send one prompt per request")
        else:
            raise bad("prompt", "must be a string or a non-empty list of token ids")
        if body.get("echo"):
            raise bad("echo", "is not supported")
        if body.get("suffix") is not None:
            raise bad("suffix", "is not supported")
        best_of = _integer(body, "best_of")
        if best_of not in (None, 1):
            raise bad("best_of", "only 1 is supported")

    # chat's logprobs is a bool (and top_logprobs a count), completions' logprobs a count; null/false/0: off
    for key in ("logprobs", "top_logprobs"):
        if body.get(key) not in (None, False, 0):
            raise bad(key, "log probabilities are not supported by Tidal yet; leave it unset")
    n = _integer(body, "n")
    if n not in (None, 1):
        raise bad("n", f"only n=1 is supported, got {n}")
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key) not in (None, 0.0):
            raise bad(key, "penalties are not supported; leave it unset or 0")
    if body.get("tools") or body.get("functions"):
        raise bad("tools", "tool calling is not supported")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("response_format", "only {\"type\": \"text\"} is supported")

    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key)
    if max_tokens is not None:
        req.max_tokens = max_tokens             # its limits: the frontend's validation, as for gRPC
    for name in ("temperature", "top_p", "min_p"):
        value = _number(body, name)
        if value is not None:
            setattr(req.sampling, name, value)
    top_k = _integer(body, "top_k", low=-1)
    if top_k is not None:
        req.sampling.top_k = max(0, top_k)          # vLLM's -1 (off) is Tidal's 0
    if body.get("ignore_eos") is not None:
        if not isinstance(body["ignore_eos"], bool):
            raise bad("ignore_eos", "must be true or false")
        req.sampling.ignore_eos = body["ignore_eos"]
    seed = _integer(body, "seed", low=0, high=2**63 - 1)
    if seed is not None:
        req.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad("stop", "must be a string or a list of strings")
        req.stop.extend(stop)
    priority = _integer(body, "priority")
    if priority is not None:
        req.priority = priority
    rid = body.get("request_id")
    if rid is not None:
        if not isinstance(rid, str):
            raise bad("request_id", "must be a string")
        req.request_id = rid

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "must be true or false")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options", "is only allowed with stream: true")
        if not isinstance(options, dict):
            raise bad("stream_options", "must be an object")
        include_usage = bool(options.get("include_usage", False))
    timeout = _number(body, "timeout")
    if timeout is not None and timeout <= 0:
        raise bad("timeout", f"must be a positive number of seconds, got {timeout}")
    return_ids = body.get("return_token_ids", False)
    if not isinstance(return_ids, bool):
        raise bad("return_token_ids", "must be true or false")
    return Parsed(req, stream, include_usage, timeout, return_ids)


# ----- responses -------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Formatter:
    """Builds one request's response objects (whole, or as stream chunks)."""

    def __init__(self, chat: bool, request_id: str, model: str, token_ids: bool = False):
        self.chat, self.model, self.token_ids = chat, model, token_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
              token_ids: list[int] = ()) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if self.token_ids:
            choice["token_ids"] = list(token_ids)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None, first: bool = False,
              with_usage: bool = False, token_ids=()) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if first else \
                ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        if self.token_ids:
            choice["token_ids"] = list(token_ids)
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}
        if with_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [],
                "usage": usage(prompt_tokens, completion_tokens)}


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
