"""Every Serve config in cluster/ is one the application accepts: known args, valid transfer settings,
deployment names that exist, and the gRPC servicer the ingress implements."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from overfill_serve.serve.config import ServeConfig

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
CONFIGS = sorted(CLUSTER.glob("config*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_is_valid(path):
    config = yaml.safe_load(path.read_text())
    app = config["applications"][0]
    assert app["import_path"] == "overfill_serve.serve.app:build_app"
    serve_config = ServeConfig.from_args(app["args"])
    assert serve_config.pair_name
    assert {d["name"] for d in app["deployments"]} <= {"PrefillServer", "DecodeServer", "Ingress"}
    from ray.serve.config import AutoscalingConfig

    for deployment in app["deployments"]:
        if "autoscaling_config" in deployment:  # Serve validates it at deploy time; fail here instead
            AutoscalingConfig(**deployment["autoscaling_config"])
    [servicer] = config["grpc_options"]["grpc_servicer_functions"]
    module, _, name = servicer.rpartition(".")
    assert hasattr(__import__(module, fromlist=[name]), name)


def test_unknown_arg_is_refused():
    from overfill_serve.errors import ModelConfigError

    with pytest.raises(ModelConfigError, match="unknown application args"):
        ServeConfig.from_args({"prefil_model": "/typo"})


def test_short_kv_secret_is_refused_at_build_time():
    from overfill_serve.errors import ModelConfigError

    with pytest.raises(ModelConfigError, match="at least 16 bytes"):
        ServeConfig.from_args({"transfer": {"secret": "too-short"}})
