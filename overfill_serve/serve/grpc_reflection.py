"""gRPC server reflection v1 (`grpc.reflection.v1.ServerReflection`) beside Ray Serve's v1alpha.

Ray Serve 2.60 registers only v1alpha (`grpc_options.enable_reflection`, on by default), after every servicer
function; grpcurl and current clients ask for v1 first. grpcio-reflection ships only v1alpha, whose messages
are the same on the wire as v1's (v1 renamed the package), so v1 is served by grpcio-reflection's servicer
under the v1 method name, and a v1 copy of its file descriptor is added to the default pool so that v1 can
describe itself too. Like Ray's v1alpha, it runs on the proxy itself (a passthrough service), never on a
replica. The services it lists are read when a client asks: every service registered on the port but Ray's
own API, so it includes the v1alpha service Ray adds after it.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as alpha_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
RAY_API_SERVICE = "ray.serve.RayServeAPIService"


def add_v1_descriptor(pool: Any = None) -> None:
    """Add grpc/reflection/v1/reflection.proto to `pool` (default: protobuf's default pool), once."""
    pool = pool or descriptor_pool.Default()
    try:
        pool.FindFileByName("grpc/reflection/v1/reflection.proto")
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    proto.options.Clear()
    for message in proto.message_type:
        for fld in message.field:
            if fld.type_name:
                fld.type_name = fld.type_name.replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1.")
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace("v1alpha", "v1")
        method.output_type = method.output_type.replace("v1alpha", "v1")
    pool.Add(proto)


def registered_services(server: Any) -> list[str]:
    """The services on a Ray Serve gRPC server (its `generic_rpc_handlers`), Ray's own API left out."""
    names = {
        method.split("/")[1]
        for handlers in getattr(server, "generic_rpc_handlers", [])
        for method in handlers[0]._method_handlers
    }
    return sorted(names - {RAY_API_SERVICE})


class _ReflectionV1(ReflectionServicer):
    def __init__(self, server: Any, service_names: list[str] | None) -> None:
        super().__init__(service_names or [])
        self._server, self._fixed = server, service_names is not None

    def _list_services(self, request: Any) -> Any:
        if not self._fixed:  # read now: services registered after this one (Ray's v1alpha) are listed too
            self._service_names = tuple(registered_services(self._server))
        return super()._list_services(request)


def enable_reflection_v1(server: Any, service_names: list[str] | None = None) -> None:
    """Serve reflection v1 on `server`; `service_names`: what it lists (default: what the server has when
    asked). On Ray Serve's gRPC proxy it is a passthrough service: it runs on the proxy."""
    add_v1_descriptor()
    servicer = _ReflectionV1(server, service_names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
    if hasattr(server, "add_passthrough_service"):  # Ray Serve's gRPCGenericServer
        server.add_passthrough_service(SERVICE_NAME)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"ServerReflectionInfo": handler}),)
    )
