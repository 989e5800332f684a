"""The Serve application: `serve run cluster/config.yaml` imports `build_app` with the config's `args`.

Deployment resources, replicas and autoscaling come from the config file's `deployments:` section, by name
(`PrefillServer`, `DecodeServer`, `Ingress`); the defaults below start on a 2-core CPU machine.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from overfill_serve.serve.config import ServeConfig
from overfill_serve.serve.deployments import DecodeServer, PrefillServer
from overfill_serve.serve.ingress import Ingress
from overfill_serve.serve.replica_router import request_router_config


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The `import_path` target: Serve calls it with the config file's `args`."""
    return build_app_with(ServeConfig.from_args(args))


def build_app_with(config: ServeConfig, options: dict[str, dict[str, Any]] | None = None) -> Application:
    """The application with per-deployment option overrides (what a config file's `deployments:` section
    does under `serve run`), for Python callers: tests and benchmarks."""
    options = options or {}
    prefill = PrefillServer.options(  # type: ignore[attr-defined]
        request_router_config=request_router_config("prefill", config.prefill),
        **options.get("PrefillServer", {}),
    ).bind(config)
    decode = DecodeServer.options(  # type: ignore[attr-defined]
        request_router_config=request_router_config("decode", config.decode),
        **options.get("DecodeServer", {}),
    ).bind(config)
    return Ingress.options(**options.get("Ingress", {})).bind(config, prefill, decode)  # type: ignore[attr-defined]
