"""`Registration`: the generated method table of the KV service, registered on the real grpc.aio server with
two changes. `Pull`'s responses go out as the bytes the servicer built (no protobuf object or
re-serialization on the data path). Every request is parsed here rather than by grpc, so a malformed one is
INVALID_ARGUMENT: grpc answers UNKNOWN when its own deserializer fails.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


async def _parse(parse: Callable[[bytes], Any], raw: bytes, context: Any) -> Any:
    try:
        return parse(raw)
    except DecodeError:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request message")


def _parsing(handler: Any) -> Any:
    """The handler taking raw bytes and parsing them itself."""
    parse = handler.request_deserializer
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_unary(raw: bytes, context: Any) -> Any:
            return await unary(await _parse(parse, raw, context), context)

        return handler._replace(request_deserializer=None, unary_unary=unary_unary)
    assert handler.unary_stream is not None  # the KV service has no client-streaming methods
    stream = handler.unary_stream

    async def unary_stream(raw: bytes, context: Any) -> AsyncIterator[Any]:
        async for response in stream(await _parse(parse, raw, context), context):
            yield response

    return handler._replace(request_deserializer=None, unary_stream=unary_stream)


class Registration:
    def __init__(self, server: Any) -> None:
        self.server = server  # a grpc.aio.Server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # rebuilt below from the same method table

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        handlers = {name: _parsing(h) for name, h in handlers.items()}
        handlers["Pull"] = handlers["Pull"]._replace(response_serializer=None)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        self.server.add_registered_method_handlers(service, handlers)
