"""The API key check both APIs share: `Authorization: Bearer <key>` (an HTTP header or gRPC metadata)."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from overfill_serve.errors import UnauthenticatedError


def check_api_key(metadata: Iterable[tuple[str, str | bytes]] | None, api_key: str | None) -> None:
    """Raise `UnauthenticatedError` unless `api_key` is None or the metadata has `authorization: Bearer <key>`."""
    if not api_key:
        return
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return
    raise UnauthenticatedError("missing or invalid API key (metadata authorization: Bearer <key>)")
