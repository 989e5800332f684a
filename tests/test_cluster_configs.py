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


def test_engine_settings_per_pool():
    """Engine fields at the top level apply to both pools, a pool's section to it alone; the flat keys of
    earlier configs mean the same as the sections."""
    config = ServeConfig.from_args(
        {"block_size": 4, "max_num_seqs": 8, "prefill": {"num_kv_blocks": 100}, "decode": {"max_num_seqs": 2}}
    )
    assert (config.prefill.block_size, config.decode.block_size) == (4, 4)
    assert (config.prefill.max_num_seqs, config.decode.max_num_seqs) == (8, 2)
    assert (config.prefill.num_kv_blocks, config.decode.num_kv_blocks) == (100, 512)  # 512: the pool default
    assert config.decode.num_swap_blocks == 256 and config.prefill.num_swap_blocks == 0
    legacy = {"prefill_kv_blocks": 64, "decode_kv_blocks": 32, "decode_swap_blocks": 8}
    sections = {"prefill": {"num_kv_blocks": 64}, "decode": {"num_kv_blocks": 32, "num_swap_blocks": 8}}
    assert ServeConfig.from_args(legacy).prefill == ServeConfig.from_args(sections).prefill
    assert ServeConfig.from_args(legacy).decode == ServeConfig.from_args(sections).decode


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"decode": {"num_kv_block": 10}}, "unknown decode engine settings"),
        ({"prefill": {"num_kv_blocks": 0}}, "num_kv_blocks must be a positive integer"),
        ({"decode": {"dtype": "bfloat16"}}, "dtype must match"),
        ({"dtype": "float8"}, "dtype 'float8' is not supported"),
        ({"prefill": 512}, "prefill must be a mapping"),
    ],
)
def test_bad_engine_settings_are_refused(args, message):
    from overfill_serve.errors import ModelConfigError

    with pytest.raises(ModelConfigError, match=message):
        ServeConfig.from_args(args)
