"""OpenAI-compatible errors: `ApiError` (status, OpenAI error body, headers) and the mapping of every exception
to one (`from_exception`), pydantic's validation errors included. Pure protocol code (no Ray, no HTTP
framework); Ray's own errors are classified by `ray_errors`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from overfill_serve.errors import (
    InvalidRequestError,
    ModelConfigError,
    ModelNotFoundError,
    OutOfBlocksError,
    OverloadedError,
    PairMismatchError,
    PoolUnavailableError,
    PreemptedError,
    RequestTooLargeError,
    ServiceUnavailableError,
    TransferError,
    UnauthenticatedError,
    WeightLoadError,
)
from overfill_serve.serve.ray_errors import ray_kind, unwrap

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the HTTP layer returns as `{"error": {...}}` with `status` (and `headers`, e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.message = status, type, message
        self.param, self.code, self.retry_after = param, code, retry_after

    @classmethod
    def invalid(cls, message: str, param: str | None = None) -> ApiError:
        return cls(400, "invalid_request_error", message, param)

    @classmethod
    def unauthorized(cls, message: str = "Invalid or missing API key") -> ApiError:
        return cls(401, "authentication_error", message, code="invalid_api_key")

    @classmethod
    def unavailable(cls, message: str, code: str = "overloaded", retry_after: float = 1.0) -> ApiError:
        return cls(503, "service_unavailable", message, code=code, retry_after=retry_after)

    @classmethod
    def internal(cls, message: str = "The server had an error while processing the request") -> ApiError:
        return cls(500, "server_error", message)

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(math.ceil(self.retry_after))}

    def to_json(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_exception(e: BaseException) -> ApiError:
    """The API error for any exception; unknown ones become a 500 that does not leak internals."""
    e = unwrap(e)
    if isinstance(e, ApiError):
        return e
    names, kind = {c.__name__ for c in type(e).__mro__}, ray_kind(e)
    if isinstance(e, ModelNotFoundError):
        return ApiError(
            404, "not_found_error", f"The model '{e.model}' does not exist", "model", "model_not_found"
        )
    if isinstance(e, RequestTooLargeError):
        return ApiError(413, "invalid_request_error", str(e), e.field, "request_too_large")
    if isinstance(e, InvalidRequestError):
        return ApiError.invalid(str(e), e.field)
    if isinstance(e, UnauthenticatedError):
        return ApiError.unauthorized()
    if isinstance(e, OverloadedError):
        retry_after = 1.0 if e.retry_after_s is None else e.retry_after_s
        return ApiError.unavailable(f"{e}; retry shortly", code="overloaded", retry_after=retry_after)
    if isinstance(e, PoolUnavailableError):  # which pool, and what it lacks (or that it is starting)
        return ApiError.unavailable(str(e), code=e.code, retry_after=e.retry_after_s)
    if isinstance(e, ServiceUnavailableError):
        return ApiError.unavailable(
            "A serving worker is unavailable; retry shortly", code="service_unavailable"
        )
    if isinstance(e, ValidationError) or "RequestValidationError" in names:  # pydantic / FastAPI body errors
        return from_validation_errors(e.errors())  # type: ignore[attr-defined]
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
        return ApiError.invalid("The request body is not valid JSON")
    if isinstance(e, (OutOfBlocksError, PreemptedError)) or kind == "overloaded":
        return ApiError.unavailable("The server is overloaded; retry shortly", code="overloaded")
    if isinstance(e, TransferError) or kind == "unavailable":
        # Includes errors.AuthenticationError: a KV peer failed the cluster handshake, not the client.
        return ApiError.unavailable(
            "A serving worker is unavailable; retry shortly", code="service_unavailable"
        )
    if isinstance(e, (ModelConfigError, WeightLoadError, PairMismatchError)):
        return ApiError(500, "server_error", "The model pair is misconfigured", code="model_config_error")
    log.error("unexpected error, answered 500", exc_info=e)  # the client sees no internals: log them here
    return ApiError.internal()


def _param(loc: Sequence[int | str]) -> str | None:
    # pydantic adds union-branch tags ("str", "list[int]", "function-after[...]") to loc: not field names.
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:  # FastAPI prefixes "body"
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" not in part and part not in {"str", "int", "float", "bool", "list", "dict", "none"}:
            out += f".{part}" if out else part
    return out or None


def from_validation_errors(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """A 400 naming the field of the first error (its deepest variant when a union produced several)."""
    if not errors:
        return ApiError.invalid("Invalid request body")
    if errors[0].get("type") == "json_invalid":
        why = errors[0].get("ctx", {}).get("error", "")
        return ApiError.invalid(f"The request body is not valid JSON: {why}")
    params = [_param(e.get("loc", ())) or "" for e in errors]

    def top(p: str) -> str:
        return p.split(".")[0].split("[")[0]

    same = [i for i, p in enumerate(params) if top(p) == top(params[0])]
    i = max(same, key=lambda i: len(params[i]))
    param, msg = params[i] or None, str(errors[i].get("msg", "invalid value"))
    if param is None:
        is_object = errors[i].get("type") not in ("model_type", "model_attributes_type")
        return ApiError.invalid(msg if is_object else "The request body must be a JSON object")
    if params.count(params[i]) > 1:  # every branch of a union failed here: name the type actually sent
        msg = f"invalid type ({_json_type(errors[i].get('input'))})"
    return ApiError.invalid(f"{param}: {msg}", param)


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
