"""Start Ray and an overfill-serve application inside pytest, the way `serve run` would."""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from kv_helpers import wait_until  # noqa: F401 (re-exported for the serve tests)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "cluster" / "config.yaml"
# Not the config's 8000/9000: a `serve run` smoke test may hold those. Two test runs on one machine: move one.
HTTP_PORT = int(os.environ.get("OVERFILL_TEST_HTTP_PORT", "18000"))
GRPC_PORT = int(os.environ.get("OVERFILL_TEST_GRPC_PORT", "19000"))


def load_app_config(path: Path = CONFIG) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the whole Serve config, its first application)."""
    config = yaml.safe_load(path.read_text())
    return config, config["applications"][0]


# The tests' HTTP proxy listens on loopback, but Ray Serve's gRPC proxy on every interface: say so.
TEST_EXPOSURE = {"allow_unauthenticated": True}


def pair_args(pair: Any, app: str, **overrides: Any) -> dict[str, Any]:
    """Application args serving a test pair (tests/conftest.py) under the model name `app`, block size 4."""
    return {
        "pair_name": app,
        "prefill_model": str(pair.teacher),
        "decode_model": str(pair.student),
        "block_size": 4,
        **overrides,
    }


def post_json(path: str, body: dict[str, Any], timeout: float = 120) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=timeout)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def completion(body: dict[str, Any], timeout: float = 120) -> tuple[int, str]:
    """(status, the completion's text) of POST /v1/completions; on an error the start of its JSON instead,
    so a failed comparison shows why."""
    status, payload = post_json("/v1/completions", body, timeout)
    return status, payload.get("choices", [{}])[0].get("text") or str(payload)[:300]


def quiet_ray_env() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def start_ray(env: dict[str, str], metrics_port: int | None = None) -> None:
    import ray

    quiet_ray_env()
    # Logical CPUs: a 2-core machine still fits every replica's fractional num_cpus.
    extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env}, **extra)


def _start_serve(grpc_functions: list[str]) -> None:
    from ray import serve
    from ray.serve.config import gRPCOptions

    serve.start(
        proxy_location="HeadOnly",  # one proxy: nodes of a one-machine test cluster share the ports
        http_options={"host": "127.0.0.1", "port": HTTP_PORT},
        grpc_options=gRPCOptions(port=GRPC_PORT, grpc_servicer_functions=grpc_functions),
    )


def deploy_config(
    args: dict[str, Any], name: str, grpc_functions: list[str], deployments: list[dict[str, Any]]
) -> None:
    """Deploy the app from a config, as `serve run config.yaml` and KubeRay do: redeploying with only
    `deployments:` settings changed (e.g. num_replicas) updates the running replicas in place, where a
    Python `serve.run` would replace them all with a new version."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _start_serve(grpc_functions)
    app = {
        "name": name,
        "route_prefix": "/",
        "import_path": "overfill_serve.serve.app:build_app",
        "args": {**TEST_EXPOSURE, **args},
        "deployments": deployments,
    }
    _get_global_client().deploy_apps(ServeDeploySchema(applications=[app]), _blocking=True)


def run_app(
    args: dict[str, Any],
    name: str,
    grpc_functions: list[str],
    route_prefix: str = "/",
    options: dict[str, dict[str, Any]] | None = None,
    wait_running: bool = True,
) -> None:
    """Deploy the app; `wait_running=False` returns once it is created (a pool may never start)."""
    from ray import serve
    from ray.serve.api import _run
    from ray.serve.config import gRPCOptions

    from overfill_serve.serve.app import build_app_with
    from overfill_serve.serve.config import ServeConfig

    serve.start(
        proxy_location="HeadOnly",  # one proxy: nodes of a one-machine test cluster share the ports
        http_options={"host": "127.0.0.1", "port": HTTP_PORT},
        grpc_options=gRPCOptions(port=GRPC_PORT, grpc_servicer_functions=grpc_functions),
    )
    app = build_app_with(ServeConfig.from_args({**TEST_EXPOSURE, **args}), options)
    _run(app, name=name, route_prefix=route_prefix, _blocking=wait_running)


def replica_stats(app: str, deployment: str) -> list[dict[str, Any]]:
    """Stats of every live replica of a deployment, asked of each replica actor directly (a handle call
    would go where the request router sends it: the least loaded replica). A replica just killed may still
    be listed as running by the controller: it is skipped."""
    import ray
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()["applications"][app]["deployments"][deployment]
    stats = []
    for replica in details["replicas"]:
        if replica["state"] != "RUNNING":
            continue
        try:
            actor = ray.get_actor(replica["actor_name"], namespace="serve")
            stats.append(ray.get(actor.record_routing_stats.remote(), timeout=30))
        except (ValueError, ray.exceptions.RayActorError):
            continue
    return stats


def pools_full(app: str) -> bool:
    """Every live replica's KV pool whole again, no transfer open."""
    stats = replica_stats(app, "PrefillServer") + replica_stats(app, "DecodeServer")
    return all(s["free_blocks"] == s["total_blocks"] and s.get("open_transfers", 0) == 0 for s in stats)


def health_status() -> int:
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=30)
    conn.request("GET", "/health")
    return conn.getresponse().status


def serve_pair(pair: Any, app: str, **overrides: Any) -> Iterator[Any]:
    """For a module fixture: Ray and the app on a test pair (`pair_args`), yielded once /health is 200 (both
    pools up), shut down after."""
    import ray
    from ray import serve

    config, _ = load_app_config()
    start_ray({})
    run_app(pair_args(pair, app, **overrides), app, config["grpc_options"]["grpc_servicer_functions"])
    wait_until(lambda: health_status() == 200, timeout=60, what="/health 200 (both pools up)")
    yield pair
    serve.shutdown()
    ray.shutdown()


def openai_client() -> Any:
    """The `openai` client on the test app's HTTP port (no retries: a failure shows at once)."""
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{HTTP_PORT}/v1", api_key="unused", max_retries=0)


def offline_llm(pair: Any, **engine: Any) -> Any:
    """The offline `LLM` on a served test pair, as `pair_args` serves it (block size 4): the reference the
    Serve tests compare with."""
    from overfill_serve import LLM

    return LLM(pair.teacher, pair.student, **{"block_size": 4, "num_kv_blocks": 128, **engine})
