"""`grpc.health.v1.Health` on the gRPC port: Check, Watch and List, answered by the ingress from its pool
monitor, the same readiness as `GET /health`.

Serve's gRPC proxy routes the calls to the ingress like `overfill.v1.Generate` (grpc_service.py registers
both): `Ingress.Check`, `.Watch` and `.List` call the functions here. The services are "" (the server as a
whole) and `overfill.v1.Generate`: SERVING while both pools have a running replica, NOT_SERVING before and
while one has none. Any other name: Check answers NOT_FOUND, Watch SERVICE_UNKNOWN (as the protocol says).
Until the ingress replica itself is up, Serve's proxy answers the calls with an error status of its own,
which a probe reads as not ready too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from grpc_health.v1 import health_pb2

from overfill_serve.errors import ServiceNotFoundError
from overfill_serve.serve import grpc_requests

SERVICES = ("", "overfill.v1.Generate")
WATCH_PERIOD_S = 0.5  # how often a Watch stream re-reads the pools' state
Status = health_pb2.HealthCheckResponse.ServingStatus


def serving_status(service: str, pools_status: str) -> Any:
    """The status of `service` while the pool monitor reports `pools_status` ("ok", "starting", "degraded")."""
    if service not in SERVICES:
        return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    ok = pools_status == "ok"
    return health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING


def check(request: Any, pools_status: str) -> Any:
    """Check: the status, or `ServiceNotFoundError` (NOT_FOUND) for a service this server does not have."""
    service = grpc_requests.parse_request(health_pb2.HealthCheckRequest, request).service
    if service not in SERVICES:
        raise ServiceNotFoundError(service)
    return health_pb2.HealthCheckResponse(status=serving_status(service, pools_status))


def list_all(pools_status: str) -> Any:
    """List: every service with its status."""
    response = health_pb2.HealthListResponse()
    for service in SERVICES:
        response.statuses[service].status = serving_status(service, pools_status)
    return response


def parse_watch(request: Any) -> str:
    """The service a Watch call names (raises `InvalidRequestError` on a malformed message)."""
    return str(grpc_requests.parse_request(health_pb2.HealthCheckRequest, request).service)


async def watch(service: str, pools_status: Callable[[], str]) -> AsyncIterator[Any]:
    """Watch: the status now, then each change, until the client goes away (or Serve's request timeout)."""
    last = None
    while True:
        status = serving_status(service, pools_status())
        if status != last:
            yield health_pb2.HealthCheckResponse(status=status)
            last = status
        await asyncio.sleep(WATCH_PERIOD_S)
