"""The Serve application: `serve run cluster/config.yaml` imports `build_app` with the config's `args`.

Deployment resources, replicas and autoscaling come from the config file's `deployments:` section, by name
(`PrefillServer`, `DecodeServer`, `Router`); the defaults below start on a 2-core CPU machine.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from overfill_serve.serve.config import ServeConfig
from overfill_serve.serve.deployments import DecodeServer, PrefillServer
from overfill_serve.serve.replica_router import request_router_config
from overfill_serve.serve.router import Router


def build_app(args: dict[str, Any] | None = None) -> Application:
    config = ServeConfig.from_args(args)
    prefill = PrefillServer.options(request_router_config=request_router_config("prefill")).bind(config)  # type: ignore[attr-defined]
    decode = DecodeServer.options(request_router_config=request_router_config("decode")).bind(config)  # type: ignore[attr-defined]
    return Router.bind(config, prefill, decode)  # type: ignore[attr-defined]
