"""Start Ray and an overfill-serve application inside pytest, the way `serve run` would."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from kv_helpers import wait_until  # noqa: F401 (re-exported for the serve tests)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "cluster" / "config.yaml"
HTTP_PORT, GRPC_PORT = 18000, 19000  # not the config's 8000/9000: a `serve run` smoke test may hold those


def load_app_config(path: Path = CONFIG) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the whole Serve config, its first application)."""
    config = yaml.safe_load(path.read_text())
    return config, config["applications"][0]


def start_ray(env: dict[str, str], metrics_port: int | None = None) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Logical CPUs: a 2-core machine still fits every replica's fractional num_cpus.
    extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env}, **extra)


def run_app(
    args: dict[str, Any],
    name: str,
    grpc_functions: list[str],
    route_prefix: str = "/",
    options: dict[str, dict[str, Any]] | None = None,
) -> None:
    from ray import serve
    from ray.serve.config import gRPCOptions

    from overfill_serve.serve.app import build_app_with
    from overfill_serve.serve.config import ServeConfig

    serve.start(
        http_options={"host": "127.0.0.1", "port": HTTP_PORT},
        grpc_options=gRPCOptions(port=GRPC_PORT, grpc_servicer_functions=grpc_functions),
    )
    serve.run(build_app_with(ServeConfig.from_args(args), options), name=name, route_prefix=route_prefix)


def replica_stats(app: str, deployment: str, calls: int = 8) -> list[dict[str, Any]]:
    """Stats of the replicas a few handle calls reach (every replica, with one or two per deployment)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app)
    seen: dict[Any, dict[str, Any]] = {}
    for _ in range(calls):
        stats = handle.stats.remote().result()
        seen[stats["replica_id"]] = stats
    return list(seen.values())
