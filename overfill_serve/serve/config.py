"""`ServeConfig`: the application's settings, read from the `args` of a Serve config file.

Each pool's engine is an `EngineConfig` (`prefill:` / `decode:` sections in the file, any `EngineConfig`
field); an engine field at the top level of `args` applies to both pools, a section's to its pool only.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from overfill_serve.engine.config import EngineConfig
from overfill_serve.errors import ModelConfigError
from overfill_serve.model.spec import KeptLayers
from overfill_serve.transfer.auth import SECRET_ENV, load_secret
from overfill_serve.transfer.config import WILDCARD_HOSTS, TransferConfig

API_KEY_ENV = "OVERFILL_API_KEY"
ROLES = ("prefill", "decode")
# Sized for a 2-core CPU machine; a swap space lets a squeezed decode replica keep its remote requests.
POOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "prefill": {"num_kv_blocks": 512, "max_num_seqs": 32},
    "decode": {"num_kv_blocks": 512, "max_num_seqs": 32, "num_swap_blocks": 256},
}
# Flat keys of earlier config files: (pool, EngineConfig field).
LEGACY_KEYS = {
    "prefill_kv_blocks": ("prefill", "num_kv_blocks"),
    "decode_kv_blocks": ("decode", "num_kv_blocks"),
    "decode_swap_blocks": ("decode", "num_swap_blocks"),
}
ENGINE_FIELDS = frozenset(f.name for f in fields(EngineConfig))


@dataclass(frozen=True)
class ServeConfig:
    pair_name: str = "smollm2-135m"  # the OpenAI model name; ":full" / ":pruned" select the other modes
    prefill_model: str | None = None  # full-model (teacher) directory; None: the embedded default
    decode_model: str | None = None  # pruned-model (student) directory; None: the prefill model
    kept_layers: KeptLayers = None  # depth-pruned student's map, if not in its config.json
    prefill: EngineConfig = field(default_factory=lambda: EngineConfig(**POOL_DEFAULTS["prefill"]))
    decode: EngineConfig = field(default_factory=lambda: EngineConfig(**POOL_DEFAULTS["decode"]))
    max_inflight_requests: int = 64  # per ingress replica; beyond it: 503 / RESOURCE_EXHAUSTED
    max_migrations: int = 2  # re-prefill + continue elsewhere when a decode replica dies or preempts
    pool_check_period_s: float = 5.0  # how often the ingress re-reads the pools' replicas and placement
    api_key: str | None = None  # Bearer token for the HTTP and gRPC APIs; None: $OVERFILL_API_KEY or open
    allow_unauthenticated: bool = False  # serve without an API key although the APIs reach the network
    max_request_bytes: int = 4 << 20  # a larger HTTP body or gRPC request: 413 / RESOURCE_EXHAUSTED
    transfer: dict[str, Any] = field(default_factory=dict)  # TransferConfig fields

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> ServeConfig:
        args = dict(args or {})
        known = {f.name for f in fields(cls)} | ENGINE_FIELDS | set(LEGACY_KEYS)
        unknown = sorted(set(args) - known)
        if unknown:
            raise ModelConfigError(f"unknown application args {unknown}; known: {sorted(known)}")
        shared = {k: args.pop(k) for k in list(args) if k in ENGINE_FIELDS}
        pools = {role: {**POOL_DEFAULTS[role], **shared} for role in ROLES}
        for key, (role, name) in LEGACY_KEYS.items():
            if key in args:
                pools[role][name] = args.pop(key)
        engines = {role: _engine_config(role, pools[role], args.pop(role, None)) for role in ROLES}
        for key in ("dtype", "block_size"):  # the KV moves between the pools as it is
            if getattr(engines["prefill"], key) != getattr(engines["decode"], key):
                raise ModelConfigError(f"the prefill and decode pools' {key} must match")
        transfer = dict(args.pop("transfer", None) or {})
        # Replicas of one application share the KV-channel secret; without one, make it per application.
        transfer.setdefault("secret", os.environ.get(SECRET_ENV) or secrets.token_hex(32))
        # Validate here, where `serve run` reports it, not in every replica's constructor (the node's address,
        # known there, stands in for the advertised host).
        TransferConfig(**{"advertise_host": "node", **transfer})
        load_secret(transfer["secret"])
        api_key = args.pop("api_key", None) or os.environ.get(API_KEY_ENV)
        return cls(
            **args, prefill=engines["prefill"], decode=engines["decode"], transfer=transfer, api_key=api_key
        )

    def check_exposure(self, http_host: str, grpc_enabled: bool) -> None:
        """Refuse to open the APIs to the network without an API key, unless the config says so."""
        if self.api_key is not None or self.allow_unauthenticated:
            return
        exposed = [] if _is_loopback(http_host) else [f"HTTP on {http_host}"]
        if grpc_enabled:
            exposed.append("gRPC (Ray Serve listens on every interface)")
        if exposed:
            raise ModelConfigError(
                f"{' and '.join(exposed)} would serve anyone on the network without an API key: set api_key "
                f"(or ${API_KEY_ENV}), or set allow_unauthenticated: true to accept that"
            )

    def transfer_config(self, host: str) -> TransferConfig:
        """The KV channel of a replica on the node at `host` (its address; "" for a control-only client):
        its server binds `transfer.host` (default: that address, which other nodes can reach) and advertises
        that host, or the node's address when the bind host is a wildcard."""
        bind = self.transfer.get("host") or host
        advertise = self.transfer.get("advertise_host") or (host if bind in WILDCARD_HOSTS else None)
        return TransferConfig(**{**self.transfer, "host": bind, "advertise_host": advertise})

    def model_dirs(self) -> tuple[Path, Path]:
        """(teacher, student) model directories; converts the embedded default on first use."""
        if self.prefill_model is None:
            from overfill_serve.tools.default_model import default_model_dir

            teacher = default_model_dir()
        else:
            teacher = Path(self.prefill_model).expanduser()
        student = Path(self.decode_model).expanduser() if self.decode_model is not None else teacher
        return teacher, student


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it reaches the network
        return False


def _engine_config(role: str, settings: dict[str, Any], section: Any) -> EngineConfig:
    """A pool's engine: its settings so far, then its own section of the config."""
    if section is not None and not isinstance(section, dict):
        raise ModelConfigError(f"{role} must be a mapping of engine settings, got {section!r}")
    settings = {**settings, **(section or {})}
    unknown = sorted(set(settings) - ENGINE_FIELDS)
    if unknown:
        raise ModelConfigError(f"unknown {role} engine settings {unknown}; known: {sorted(ENGINE_FIELDS)}")
    return EngineConfig(**settings)
