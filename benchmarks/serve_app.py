"""The overfill-serve Ray Serve application started in this process for the serve benchmarks (load, soak), as
tests/serve_harness.py does (a local Ray with logical CPUs, cluster/config.yaml's application args and
deployment options, HTTP on a loopback port, gRPC optionally), the model pair it serves, and probes of its
replicas (pool stats asked of each replica actor, resident memory of each replica process)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from bench_common import cpu_name, free_port, load_average

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "cluster" / "config.yaml"
APP_NAME = "overfill-load"
MODE_SUFFIX = {"overfill": "", "full": ":full", "pruned": ":pruned"}


def machine_line() -> str:
    """The report's `machine:` line for a Serve benchmark on this CPU machine."""
    import ray
    import torch

    return (
        f"machine: {platform.machine()} {platform.system()}, nproc {os.cpu_count()} ({cpu_name('?')}), no GPU "
        f"used, python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}; "
        f"load average at start {load_average()}"
    )


def start_app(
    prefill_dir: Path,
    decode_dir: Path,
    http_port: int | None = None,
    grpc_port: int | None = None,
    **overrides: Any,
) -> tuple[str, Any]:
    """Start Ray and the app, HTTP on loopback `http_port` (default: a free port) and, with `grpc_port`, the
    gRPC API (cluster/config.yaml's servicer); `overrides`: application args over the file's. Returns (url,
    its ServeConfig)."""
    import yaml

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import logging

    import ray
    from ray import serve

    from overfill_serve.serve.app import build_app_with
    from overfill_serve.serve.config import ServeConfig

    config = yaml.safe_load(CONFIG.read_text())
    app = config["applications"][0]
    args = {**app["args"], "prefill_model": str(prefill_dir), "decode_model": str(decode_dir), **overrides}
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}
    ray.init(
        address="local",  # never attach to another Ray on this machine
        num_cpus=8,  # logical: every replica's fractional num_cpus fits on 2 cores
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"OVERFILL_CACHE_DIR": str(prefill_dir.parent)}},
    )
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    port = http_port or free_port()
    grpc: dict[str, Any] = {}
    if grpc_port:
        from ray.serve.config import gRPCOptions

        functions = config["grpc_options"]["grpc_servicer_functions"]
        grpc = {"grpc_options": gRPCOptions(port=grpc_port, grpc_servicer_functions=functions)}
    serve.start(http_options={"host": "127.0.0.1", "port": port}, **grpc)
    serve_config = ServeConfig.from_args(args)
    serve.run(build_app_with(serve_config, options), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}", serve_config


def replica_threads() -> int:
    import ray

    @ray.remote(num_cpus=0.5)
    def probe() -> int:
        import torch

        return torch.get_num_threads()

    return ray.get(probe.remote())


def handle_rtt(n: int = 20) -> float:
    from ray import serve

    handle = serve.get_deployment_handle("DecodeServer", app_name=APP_NAME)
    handle.stats.remote().result()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        handle.stats.remote().result()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def replica_stats(deployment: str) -> list[dict[str, Any]]:
    """Stats of every running replica of a deployment, asked of each replica actor directly (a handle call
    goes where the request router sends it), as tests/serve_harness.py's `replica_stats` does."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None, "Serve is not running"
    details = client.get_serve_details()["applications"][APP_NAME]["deployments"][deployment]
    stats: list[dict[str, Any]] = []
    for replica in details["replicas"]:
        if replica["state"] != "RUNNING":
            continue
        try:
            actor = ray.get_actor(replica["actor_name"], namespace="serve")
            stats.append(dict(ray.get(actor.record_routing_stats.remote(), timeout=30)))
        except (ValueError, ray.exceptions.RayActorError):
            continue
    return stats


def replica_rss() -> dict[str, int]:
    """Resident memory (bytes) of each replica process of this app: this process's descendants (the local
    Ray started here) whose title names `ServeReplica:<app>:`; keyed "<deployment> pid <pid>"."""
    import psutil

    tag = f"ServeReplica:{APP_NAME}:"
    rss = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
            if tag in title:
                name = title.split(tag, 1)[1].split()[0]
                rss[f"{name} pid {proc.pid}"] = proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
    return dict(sorted(rss.items()))


def kv_check(wait_s: float = 15.0) -> bool:
    """Print every replica's pool stats once they settle; True when every pool is whole again."""

    def snapshot() -> list[tuple[str, dict[str, Any]]]:
        return [(name, s) for name in ("PrefillServer", "DecodeServer") for s in replica_stats(name)]

    def whole(stats: list[tuple[str, dict[str, Any]]]) -> bool:
        return bool(stats) and all(
            s["free_blocks"] == s["total_blocks"]
            and s.get("open_transfers", 0) == 0
            and s["waiting"] == 0
            and s["running"] == 0
            for _, s in stats
        )

    deadline = time.monotonic() + wait_s
    stats = snapshot()
    while not whole(stats) and time.monotonic() < deadline:
        time.sleep(0.5)
        stats = snapshot()
    for name, s in stats:
        extra = f", open_transfers {s['open_transfers']}" if "open_transfers" in s else ""
        print(
            f"{name} {s['replica_id'][:8]}: free_blocks {s['free_blocks']}/{s['total_blocks']}, "
            f"waiting {s['waiting']}, running {s['running']}{extra}"
        )
    ok = whole(stats)
    print("KV pools whole again: " + ("yes" if ok else f"NO (after waiting {wait_s:.0f} s): LEAK"))
    return ok


def make_pair(which: str, tmp: Path, hidden: int, intermediate: int) -> tuple[Path, Path, str]:
    from overfill_serve.tools.default_model import default_model_dir

    if which == "tiny":
        return tiny_pair(tmp)
    teacher = default_model_dir()
    if which == "default":
        return teacher, teacher, f"default: {teacher.name} on both stages (overfill == full in speed)"
    from overfill_serve.model.prune import prune_model

    t = time.perf_counter()
    rep = prune_model(
        teacher,
        tmp / f"{teacher.name}-pruned-h{hidden}-i{intermediate}",
        hidden_size=hidden,
        intermediate_size=intermediate,
    )
    desc = (
        f"pruned: teacher {teacher.name} (hidden {rep.teacher_hidden_size}, intermediate "
        f"{rep.teacher_intermediate_size}, {rep.teacher_parameters / 1e6:.1f}M params) prefills; student "
        f"hidden {rep.student_hidden_size}, intermediate {rep.student_intermediate_size}, layers "
        f"{rep.student_num_layers}/{rep.teacher_num_layers}, {rep.student_parameters / 1e6:.1f}M params "
        f"(prune_model, {time.perf_counter() - t:.1f} s).\n"
        "NOTE: the student is NOT distilled, so its text is garbage; only speed is measured."
    )
    return teacher, rep.out_dir, desc


def tiny_pair(tmp: Path) -> tuple[Path, Path, str]:
    """A random-weight Llama teacher (4 layers, hidden 64, its own 512-token tokenizer) and a width-pruned
    student (hidden 48, intermediate 96): the serving path under load at little compute."""
    from overfill_serve.model.prune import prune_model
    from overfill_serve.model.random_model import make_random_model

    teacher = make_random_model(tmp / "tiny-teacher", num_layers=4, hidden_size=64, intermediate_size=128)
    rep = prune_model(teacher, tmp / "tiny-student", hidden_size=48, intermediate_size=96)
    desc = (
        "tiny: random-weight Llama teacher (4 layers, hidden 64, intermediate 128) prefills; prune_model "
        f"student (hidden {rep.student_hidden_size}, intermediate {rep.student_intermediate_size}) decodes"
    )
    return teacher, rep.out_dir, desc
