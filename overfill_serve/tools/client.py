"""Clients for a running overfill-serve application (the `overfill-serve client` command is in `client_cli`).

`HTTPClient` speaks the OpenAI-compatible HTTP API (standard library only); `GRPCClient` the gRPC API of
protos/overfill/v1/generate.proto. Both raise `ClientError` subclasses: `APIError` (HTTP status and the
OpenAI error message), `GRPCError` (gRPC status code, details and, for INVALID_ARGUMENT, the field), and
`APIConnectionError` (server unreachable, stream cut short).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import re
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload
from urllib.parse import urlsplit

import grpc

from overfill_serve._proto.overfill.v1 import generate_pb2 as pb
from overfill_serve._proto.overfill.v1 import generate_pb2_grpc
from overfill_serve.errors import OverfillError

MODES = {"overfill": pb.MODE_OVERFILL, "full": pb.MODE_FULL, "pruned": pb.MODE_PRUNED}
_FIELD_RE = re.compile(r"\(field: ([\w.]+)\)$")
# An error event inside a 200 stream has no status of its own: take it from the OpenAI error type.
_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "server_error": 500,
    "service_unavailable": 503,
}


class ClientError(OverfillError):
    """Base class of the clients' errors."""


class APIConnectionError(ClientError):
    """The server could not be reached, or a response stream ended before its end marker."""


class APIError(ClientError):
    """The HTTP API answered with an error: `status` and the OpenAI error object's fields."""

    def __init__(
        self, status: int, message: str, type: str | None = None, code: Any = None, param: str | None = None
    ) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


class GRPCError(ClientError):
    """The gRPC API answered with a non-OK status. `field` names the bad field of an INVALID_ARGUMENT."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details
        match = _FIELD_RE.search(details or "")
        self.field = match.group(1) if match else None


@dataclass(frozen=True)
class Completion:
    """A non-streamed HTTP completion (or chat completion: `text` is the message's content)."""

    id: str
    model: str
    text: str
    finish_reason: str | None
    usage: dict[str, int] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


def api_error(status: int, body: Any, in_stream: bool = False) -> APIError:
    """From an OpenAI error body {"error": {"message", "type", "param", "code"}} (bytes or parsed). In a stream
    (HTTP status 200) the status comes from an integer `code`, else the error type, else 500."""
    try:
        err = (json.loads(body) if isinstance(body, bytes) else body)["error"]
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
        return APIError(status, text.strip() or http.client.responses.get(status, ""))
    if not isinstance(err, dict):
        return APIError(status, str(err))
    code = err.get("code")
    if in_stream:
        status = code if isinstance(code, int) else _TYPE_STATUS.get(str(err.get("type")), 500)
    return APIError(status, str(err.get("message")), err.get("type"), code, err.get("param"))


def iter_sse(lines: Iterable[bytes]) -> Iterator[str]:
    """The data payloads of a server-sent-event stream, up to `data: [DONE]`. Raises `APIConnectionError`
    if the stream ends without it."""
    data: list[str] = []
    for raw in itertools.chain(lines, [b""]):
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                payload, data = "\n".join(data), []
                if payload == "[DONE]":
                    return
                yield payload
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    raise APIConnectionError("the event stream ended before [DONE]")


class HTTPClient:
    """The OpenAI-compatible HTTP API. `model=None` uses the first model the server lists."""

    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 120.0
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be http(s)://host[:port][/path], got {base_url!r}")
        self.base_url, self.api_key, self.timeout = base_url, api_key, timeout
        self._https, self._host, self._port = parts.scheme == "https", parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self._default_model: str | None = None

    @contextlib.contextmanager
    def _open(self, method: str, path: str, body: dict | None = None) -> Iterator[http.client.HTTPResponse]:
        """The response to one request on a fresh connection (closed on exit); `APIError` on a status >= 400."""
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout)
        headers = {"Accept": "application/json, text/event-stream", "User-Agent": "overfill-serve-client"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            try:
                conn.request(method, self._prefix + path, body=data, headers=headers)
                resp = conn.getresponse()
            except OSError as e:
                raise APIConnectionError(f"cannot reach {self.base_url}: {e}") from e
            if resp.status >= 400:
                raise api_error(resp.status, resp.read())
            yield resp
        finally:
            conn.close()

    def _json(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        with self._open(method, path, body) as resp:
            try:
                return json.loads(resp.read())
            except ValueError as e:
                raise APIError(resp.status, f"the response is not JSON: {e}") from e

    def _events(self, path: str, body: dict) -> Iterator[dict[str, Any]]:
        with self._open("POST", path, body) as resp:
            try:
                for payload in iter_sse(iter(resp.readline, b"")):
                    event = json.loads(payload)
                    if "error" in event:
                        raise api_error(resp.status, event, in_stream=True)
                    yield event
            except OSError as e:
                raise APIConnectionError(f"the stream from {self.base_url} broke: {e}") from e

    def _texts(self, path: str, body: dict, chat: bool) -> Iterator[str]:
        for event in self._events(path, body):
            for choice in event.get("choices") or ():
                text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if text:
                    yield text

    def _body(self, model: str | None, stream: bool, params: dict[str, Any]) -> dict[str, Any]:
        body = {k: v for k, v in params.items() if v is not None}
        return {"model": model or self.default_model(), "stream": stream, **body}

    @overload
    def complete(
        self, prompt: str | list[int], *, model: str | None = ..., stream: Literal[False] = ..., **params: Any
    ) -> Completion: ...
    @overload
    def complete(
        self, prompt: str | list[int], *, model: str | None = ..., stream: Literal[True], **params: Any
    ) -> Iterator[str]: ...
    def complete(
        self, prompt: str | list[int], *, model: str | None = None, stream: bool = False, **params: Any
    ) -> Completion | Iterator[str]:
        """POST /v1/completions. `params`: OpenAI fields (max_tokens, temperature, stop, seed, ...). With
        stream=True, an iterator of text deltas."""
        body = {**self._body(model, stream, params), "prompt": prompt}
        return self._create("/v1/completions", body, stream)

    @overload
    def chat(
        self, messages: list[dict], *, model: str | None = ..., stream: Literal[False] = ..., **params: Any
    ) -> Completion: ...
    @overload
    def chat(
        self, messages: list[dict], *, model: str | None = ..., stream: Literal[True], **params: Any
    ) -> Iterator[str]: ...
    def chat(
        self, messages: list[dict], *, model: str | None = None, stream: bool = False, **params: Any
    ) -> Completion | Iterator[str]:
        """POST /v1/chat/completions with [{"role": ..., "content": ...}, ...]."""
        body = {**self._body(model, stream, params), "messages": messages}
        return self._create("/v1/chat/completions", body, stream)

    def _create(self, path: str, body: dict[str, Any], stream: bool) -> Completion | Iterator[str]:
        chat = path.endswith("/chat/completions")
        if stream:
            return self._texts(path, body, chat)
        raw = self._json("POST", path, body)
        choice = raw["choices"][0]
        text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
        usage = raw.get("usage") or {}
        return Completion(
            raw.get("id", ""), raw.get("model", ""), text or "", choice.get("finish_reason"), usage, raw
        )

    def tokenize(self, prompt: str, *, add_special_tokens: bool = True) -> dict[str, Any]:
        """POST /tokenize (vLLM's): the served tokenizer's {"count", "max_model_len", "tokens"} for `prompt`."""
        return self._json("POST", "/tokenize", {"prompt": prompt, "add_special_tokens": add_special_tokens})

    def models(self) -> list[dict[str, Any]]:
        """GET /v1/models: the `data` entries ({"id", "object", "owned_by", ...})."""
        return list(self._json("GET", "/v1/models").get("data") or [])

    def default_model(self) -> str:
        if self._default_model is None:
            models = self.models()
            if not models:
                raise ClientError(f"{self.base_url} serves no model")
            self._default_model = str(models[0]["id"])
        return self._default_model

    def health(self) -> bool:
        """True when GET /health (or Ray Serve's /-/healthz) answers 200; False otherwise or if unreachable."""
        for path in ("/health", "/-/healthz"):
            try:
                with self._open("GET", path):
                    return True
            except APIError as e:
                if e.status != 404:
                    return False
            except APIConnectionError:
                return False
        return False


def make_request(
    prompt: str | Sequence[int] | None = None,
    *,
    messages: Sequence[dict[str, str]] | None = None,
    model: str = "",
    mode: str | None = None,
    request_id: str | None = None,
    **params: Any,
) -> pb.GenerateRequest:
    """A GenerateRequest. Give `prompt` (text or token ids) or chat `messages`; `params` are SamplingOptions
    fields (None: the server's default)."""
    if (prompt is None) == (messages is None):
        raise TypeError("give exactly one of prompt and messages")
    request = pb.GenerateRequest(model=model)
    if mode is not None:
        key = str(getattr(mode, "value", mode))
        if key not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        request.mode = MODES[key]
    if isinstance(prompt, str):
        request.text = prompt
    elif prompt is not None:
        request.token_ids.ids.extend(int(t) for t in prompt)
    else:
        request.chat.messages.extend(pb.Message(role=m["role"], content=m["content"]) for m in messages or ())
    if request_id is not None:
        request.request_id = request_id
    request.sampling.SetInParent()
    for name, value in params.items():
        if name not in pb.SamplingOptions.DESCRIPTOR.fields_by_name:
            raise TypeError(f"unknown sampling option {name!r}")
        if value is None:
            continue
        if name in ("stop", "stop_token_ids"):
            getattr(request.sampling, name).extend([value] if isinstance(value, (str, int)) else value)
        elif name == "logit_bias":  # a mapping, or SamplingParams' (id, bias) pairs
            request.sampling.logit_bias.update(dict(value))
        else:
            setattr(request.sampling, name, value)
    return request


class GRPCClient:
    """The gRPC API. Every call sends `application` (Ray Serve routes by it) and the API key as metadata."""

    def __init__(
        self,
        target: str = "127.0.0.1:9000",
        application: str | None = "overfill",
        api_key: str | None = None,
        *,
        timeout: float | None = 120.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target, self.timeout = target, timeout
        self._channel = (
            grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        )
        self._stub = generate_pb2_grpc.GenerateStub(self._channel)
        self.metadata: list[tuple[str, str]] = [("application", application)] if application else []
        if api_key:
            self.metadata.append(("authorization", f"Bearer {api_key}"))

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise _grpc_error(e) from None

    def generate(self, prompt: str | Sequence[int] | None = None, **kwargs: Any) -> pb.GenerateResponse:
        """Unary Generate; keyword arguments as `make_request`'s, plus `timeout`."""
        timeout = kwargs.pop("timeout", self.timeout)
        return self._unary(self._stub.Generate, make_request(prompt, **kwargs), timeout)

    def generate_stream(
        self, prompt: str | Sequence[int] | None = None, **kw: Any
    ) -> Generator[pb.GenerateChunk]:
        """GenerateStream: chunks as they arrive (the last has finish_reason, usage and served_by). Closing the
        iterator early cancels the call."""
        timeout = kw.pop("timeout", self.timeout)
        request = make_request(prompt, **kw)
        return self._chunks(self._stub.GenerateStream(request, metadata=self.metadata, timeout=timeout))

    @staticmethod
    def _chunks(call: Any) -> Generator[pb.GenerateChunk]:
        try:
            yield from call
        except grpc.RpcError as e:
            raise _grpc_error(e) from None
        finally:
            call.cancel()

    def list_models(self) -> list[pb.Model]:
        return list(self._unary(self._stub.ListModels, pb.ListModelsRequest(), self.timeout).models)

    def health(self) -> bool:
        """Ray Serve's /ray.serve.RayServeAPIService/Healthz on the same port: True when it answers OK."""
        call = self._channel.unary_unary("/ray.serve.RayServeAPIService/Healthz")
        try:
            call(b"", timeout=self.timeout)
            return True
        except grpc.RpcError:
            return False

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GRPCClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _grpc_error(e: grpc.RpcError) -> ClientError:
    code, details = e.code(), e.details()
    if code == grpc.StatusCode.UNAVAILABLE and details and "failed to connect" in details.lower():
        return APIConnectionError(f"cannot reach the gRPC server: {details}")
    return GRPCError(code, details or "")
