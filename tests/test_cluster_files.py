"""cluster/ray-cluster.yaml (Ray cluster launcher) and cluster/kuberay.yaml (KubeRay RayService), checked without
a cloud: the launcher config against Ray's own schema and config preparation, both files' GPU pools (sizes,
GPUs, the `accelerator_type` Serve asks for, the `overfill.io/pool` labels, the KV-channel secret, the model
mount) against cluster/config.gpu.yaml, the RayService's serveConfigV2 against config.gpu.yaml itself, and
the paths cluster/README.md names. No Ray start, no network."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray._private.label_utils import validate_node_label_syntax

from overfill_serve.transfer.auth import SECRET_ENV

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
POOL_LABEL = "overfill.io/pool"
# pool (node type / worker group) -> (its pool label, the Serve deployment pinned to it)
LAUNCHER_POOLS = {"prefill_h100": ("prefill", "PrefillServer"), "decode_l4": ("decode", "DecodeServer")}
KUBERAY_POOLS = {"prefill-h100": ("prefill", "PrefillServer"), "decode-l4": ("decode", "DecodeServer")}


def _load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.fixture(scope="module")
def launcher() -> dict:
    return _load("ray-cluster.yaml")


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return _load("kuberay.yaml")


@pytest.fixture(scope="module")
def gpu_config() -> dict:
    return _load("config.gpu.yaml")


def _deployment(config: dict, name: str) -> dict:
    [app] = config["applications"]
    return next(d for d in app["deployments"] if d["name"] == name)


def _max_replicas(deployment: dict) -> int:
    if "autoscaling_config" in deployment:
        return deployment["autoscaling_config"]["max_replicas"]
    return deployment.get("num_replicas", 1)


def _check_pool(
    where: str,
    gpus: float,
    resources: dict,
    labels: dict,
    size: tuple[int, int],
    pool: str,
    deployment: dict,
) -> None:
    """One GPU pool against the deployment pinned to it: GPUs, accelerator type, label, room for its max replicas."""
    low, high = size
    assert 0 <= low <= high, f"{where}: min {low} > max {high}"
    assert gpus >= 1, f"{where}: no GPU"
    assert labels.get(POOL_LABEL) == pool, (
        f"{where}: label {POOL_LABEL} is {labels.get(POOL_LABEL)!r}, not {pool!r}"
    )
    validate_node_label_syntax(labels)
    assert not any(k.startswith("ray.io/") for k in labels), f"{where}: ray.io/ labels are Ray's"
    actor = deployment["ray_actor_options"]
    accelerator = actor.get("accelerator_type")
    if accelerator:  # the autoscaler can only add a node for a resource the pool declares
        assert float(resources.get(f"accelerator_type:{accelerator}", 0)) > 0, (
            f"{where}: {deployment['name']} asks for accelerator_type {accelerator}, the pool does not declare it"
        )
    selector = (actor.get("label_selector") or {}).get(POOL_LABEL)
    assert selector in (None, pool), f"{where}: {deployment['name']} selects {POOL_LABEL}={selector}"
    max_replicas = _max_replicas(deployment)
    assert high * gpus >= max_replicas * actor.get("num_gpus", 0), (
        f"{where}: {high} x {gpus} GPUs cannot hold {deployment['name']}'s {max_replicas} replicas"
    )


# ---- cluster/ray-cluster.yaml ------------------------------------------------------------------------------


def test_launcher_config_matches_ray_schema(launcher):
    schema = json.loads(RAY_SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(launcher), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_launcher_config_passes_ray_preparation(launcher):
    """What `ray up` does to the file before launching anything: defaults, docker and min/max-worker checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(launcher))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is the CPU node"
    assert head.get("max_workers", 0) == 0
    assert POOL_LABEL not in head.get("labels", {})


@pytest.mark.parametrize("node_type", sorted(LAUNCHER_POOLS))
def test_launcher_gpu_pool(launcher, gpu_config, node_type):
    pool, deployment = LAUNCHER_POOLS[node_type]
    node = launcher["available_node_types"].get(node_type)
    assert node is not None, f"no node type {node_type}"
    assert node["node_config"].get("InstanceType"), f"{node_type}: no InstanceType"
    _check_pool(
        node_type,
        node["resources"].get("GPU", 0),
        node["resources"],
        node.get("labels", {}),
        (node.get("min_workers", 0), node["max_workers"]),
        pool,
        _deployment(gpu_config, deployment),
    )
    assert launcher["max_workers"] >= node["max_workers"]


def test_launcher_sets_the_secret_on_every_node(launcher):
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    mounts = launcher["file_mounts"]
    for command in ray_starts:
        match = re.search(rf'export {SECRET_ENV}="\$\(cat ([^)]+)\)"', command)
        assert match, f"{SECRET_ENV} is not exported before: {command}"
        secret_file = match.group(1)
        assert any(secret_file.startswith(remote.rstrip("/") + "/") for remote in mounts), (
            f"{secret_file} is not under any file_mounts path {sorted(mounts)}"
        )
        assert command.index(SECRET_ENV) < command.index("ray start")


def test_launcher_puts_the_models_on_every_node(launcher, gpu_config):
    [app] = gpu_config["applications"]
    host_commands = launcher["initialization_commands"]
    for key in ("prefill_model", "decode_model"):
        path = app["args"][key]
        target = re.compile(rf"(?:^|\s){re.escape(path)}/?(?:\s|$)")  # a copy's destination, not a source URL
        assert any(target.search(c) for c in host_commands), (
            f"initialization_commands do not put {key} {path} there"
        )
        assert any(
            re.fullmatch(rf"-v (\S+):{re.escape(str(Path(path).parent))}(:ro)?", option)
            for option in launcher["docker"]["run_options"]
        ), f"{Path(path).parent} is not mounted into the containers"


def test_launcher_images_are_the_installed_ray(launcher):
    for key in ("head_image", "worker_image"):
        image = launcher["docker"][key]
        assert f":{ray.__version__}-" in image, f"{key} {image} is not Ray {ray.__version__}"


# ---- cluster/kuberay.yaml ----------------------------------------------------------------------------------


def test_rayservice_kind_and_ray_version(rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert rayservice["kind"] == "RayService"
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    assert {g["groupName"] for g in cluster["workerGroupSpecs"]} == set(KUBERAY_POOLS)


def test_rayservice_deploys_config_gpu(rayservice, gpu_config):
    """serveConfigV2 is config.gpu.yaml's Serve config: the two never drift."""
    served = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert served == gpu_config


@pytest.mark.parametrize("group_name", sorted(KUBERAY_POOLS))
def test_rayservice_gpu_group(rayservice, gpu_config, group_name):
    pool, deployment = KUBERAY_POOLS[group_name]
    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    group = groups[group_name]
    [container] = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    gpus = int(limits.get("nvidia.com/gpu", 0))
    resources = group.get("resources", {})
    assert float(resources.get("GPU", gpus)) == gpus, (
        f"{group_name}: Ray GPU {resources['GPU']} != limit {gpus}"
    )
    assert group["template"]["spec"].get("nodeSelector"), f"{group_name}: no nodeSelector for the GPU type"
    assert "labels" not in group.get("rayStartParams", {}), "KubeRay wants the group-level `labels` field"
    low, high = group["minReplicas"], group["maxReplicas"]
    assert low <= group.get("replicas", low) <= high
    _check_pool(
        group_name,
        gpus,
        resources,
        group.get("labels", {}),
        (low, high),
        pool,
        _deployment(gpu_config, deployment),
    )


def _pods(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]})
    return pods


def test_rayservice_sets_the_secret_in_every_container(rayservice):
    refs = set()
    for name, pod in _pods(rayservice).items():
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert SECRET_ENV in env, f"{name}/{container['name']}: no {SECRET_ENV}"
            ref = env[SECRET_ENV].get("valueFrom", {}).get("secretKeyRef")
            assert ref, f"{name}: {SECRET_ENV} must come from a Kubernetes Secret, not a literal"
            refs.add((ref["name"], ref["key"]))
    assert len(refs) == 1, f"every pod must read the same Secret: {refs}"


def test_rayservice_mounts_the_models_in_every_pod(rayservice, gpu_config):
    [app] = gpu_config["applications"]
    model_paths = [app["args"]["prefill_model"], app["args"]["decode_model"]]
    for name, pod in _pods(rayservice).items():
        claims = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        for container in pod["containers"]:
            mounts = [m for m in container.get("volumeMounts", []) if m["name"] in claims]
            for path in model_paths:
                assert any(path.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), (
                    f"{name}/{container['name']}: {path} is not on a mounted PVC"
                )


def test_rayservice_exposes_the_serve_ports(rayservice, gpu_config):
    [head] = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports.get("serve") == gpu_config["http_options"]["port"]
    assert ports.get("serve-grpc") == gpu_config["grpc_options"]["port"]


# ---- cluster/README.md -------------------------------------------------------------------------------------

_SERVE_RUN = re.compile(r"serve run(?:\s+--?[\w-]+)*\s+([\w./-]+\.ya?ml)")
_REPO_PATH = re.compile(r"(?<![\w/~.-])((?:cluster|tests)/[\w.-]+\.(?:ya?ml|md|py))")
_MAKE = re.compile(r"`make ([\w-]+)`")


def test_readme_names_only_files_that_exist():
    text = (CLUSTER / "README.md").read_text()
    paths = set(_SERVE_RUN.findall(text)) | set(_REPO_PATH.findall(text))
    for needed in ("config.yaml", "config.gpu.yaml", "ray-cluster.yaml", "kuberay.yaml"):
        assert f"cluster/{needed}" in paths, f"README.md does not mention {needed}"
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert not missing, f"README.md names files that do not exist: {missing}"
    makefile = (ROOT / "Makefile").read_text()
    targets = set(_MAKE.findall(text))
    assert "serve" in targets
    unknown = sorted(t for t in targets if not re.search(rf"^{re.escape(t)}:", makefile, re.M))
    assert not unknown, f"README.md names make targets the Makefile lacks: {unknown}"


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "kuberay.yaml"])
def test_cluster_file_comments_name_files_that_exist(name):
    text = (CLUSTER / name).read_text()
    paths = set(_SERVE_RUN.findall(text)) | set(_REPO_PATH.findall(text))
    assert {"cluster/config.gpu.yaml", "cluster/README.md"} <= paths, f"{name} should point at both: {paths}"
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert not missing, f"{name} names files that do not exist: {missing}"
