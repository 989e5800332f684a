"""`add_GenerateServicer_to_server`: the gRPC servicer function the Serve config names (`grpc_options`).

It registers the app's whole gRPC surface on Serve's gRPC port:
- `overfill.v1.Generate` (generate.proto) and `grpc.health.v1.Health` (grpc_health.py), both routed by Serve's
  proxy to the ingress's methods of the same names. Their generated method tables are used with one change:
  requests reach the ingress as the bytes the client sent, and the ingress parses them
  (`grpc_requests.parse_request`). A malformed message is then INVALID_ARGUMENT naming the message; when
  grpc's own deserializer fails (in Ray Serve's proxy) the client gets UNKNOWN.
- server reflection v1 (grpc_reflection.py), on the proxy itself, beside the v1alpha Ray Serve adds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from overfill_serve._proto.overfill.v1 import generate_pb2_grpc
from overfill_serve.serve.grpc_reflection import enable_reflection_v1


class _Capture:
    """Stands in for a server: keeps the generated method table."""

    def __init__(self) -> None:
        self.service, self.handlers = "", dict[str, Any]()

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same table arrives below

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


def _add_raw(add_to_server: Callable[[Any, Any], None], servicer: Any, server: Any) -> None:
    """Register a generated service whose requests reach the ingress unparsed."""
    captured = _Capture()
    add_to_server(servicer, captured)
    handlers = {name: h._replace(request_deserializer=None) for name, h in captured.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(captured.service, handlers),))


def add_GenerateServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 (grpc's naming)
    _add_raw(generate_pb2_grpc.add_GenerateServicer_to_server, servicer, server)
    _add_raw(health_pb2_grpc.add_HealthServicer_to_server, servicer, server)
    enable_reflection_v1(server)
