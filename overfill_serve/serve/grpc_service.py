"""`add_GenerateServicer_to_server`: the gRPC servicer function the Serve config names (`grpc_options`).

It registers the generated `overfill.v1.Generate` method table with one change: requests reach the ingress as
the bytes the client sent, and the ingress parses them (`grpc_requests.parse_request`). A malformed message
is then INVALID_ARGUMENT naming the message; when grpc's own deserializer fails (in Ray Serve's proxy) the
client gets UNKNOWN.
"""

from __future__ import annotations

from typing import Any

import grpc

from overfill_serve._proto.overfill.v1 import generate_pb2_grpc


class _Capture:
    """Stands in for a server: keeps the generated method table."""

    def __init__(self) -> None:
        self.service, self.handlers = "", dict[str, Any]()

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same table arrives below

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


def add_GenerateServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 (grpc's naming)
    captured = _Capture()
    generate_pb2_grpc.add_GenerateServicer_to_server(servicer, captured)
    handlers = {name: h._replace(request_deserializer=None) for name, h in captured.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(captured.service, handlers),))
