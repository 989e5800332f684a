"""Ray's own errors, recognised by class name (any class in the MRO; ray is not imported): one classification
for the HTTP and the gRPC status mappings."""

from __future__ import annotations

KINDS = {
    "BackPressureError": "overloaded",
    "RayActorError": "unavailable",
    "ActorUnavailableError": "unavailable",
    "DeploymentUnavailableError": "unavailable",
    "ReplicaUnavailableError": "unavailable",
    "RequestCancelledError": "cancelled",
}


def ray_kind(exc: BaseException) -> str | None:
    """ "overloaded", "unavailable" or "cancelled" for an error of Ray's own; None otherwise."""
    return next((KINDS[c.__name__] for c in type(exc).__mro__ if c.__name__ in KINDS), None)


def unwrap(exc: BaseException) -> BaseException:
    """The deployment's own exception inside Ray's wrappers: RayTaskError (whose str() is a whole traceback)
    and Serve's gRPCStatusError (raised for a gRPC call that set its status before failing)."""
    for attribute in ("cause", "original_exception"):
        inner = getattr(exc, attribute, None)
        if isinstance(inner, BaseException) and inner is not exc:
            return unwrap(inner)
    return exc
