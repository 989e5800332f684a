"""`ServeConfig`: the application's settings, read from the `args` of a Serve config file."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from overfill_serve.errors import ModelConfigError
from overfill_serve.transfer.auth import SECRET_ENV, load_secret
from overfill_serve.transfer.config import TransferConfig

API_KEY_ENV = "OVERFILL_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    pair_name: str = "smollm2-135m"  # the OpenAI model name; ":full" / ":pruned" select the other modes
    prefill_model: str | None = None  # full-model directory; None: the embedded default
    decode_model: str | None = None  # pruned-model directory; None: the prefill model
    kept_layers: str | list[int] | None = None  # depth-pruned student's map, if not in its config.json
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    prefill_kv_blocks: int = 512
    decode_kv_blocks: int = 512
    decode_swap_blocks: int = 256  # host memory for preempted decodes' KV (0: hand them back for re-prefill)
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_inflight_requests: int = 64  # per router replica; beyond it: 503 / RESOURCE_EXHAUSTED
    max_migrations: int = 2  # re-prefill + continue elsewhere when a decode replica dies or preempts
    pool_check_period_s: float = 5.0  # how often the router re-reads the pools' replicas and placement
    api_key: str | None = None  # Bearer token for the HTTP and gRPC APIs; None: $OVERFILL_API_KEY or open
    transfer: dict[str, Any] = field(default_factory=dict)  # TransferConfig fields

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> ServeConfig:
        args = dict(args or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ModelConfigError(f"unknown application args {unknown}; known: {sorted(known)}")
        transfer = dict(args.pop("transfer", None) or {})
        # Replicas of one application share the KV-channel secret; without one, make it per application.
        transfer.setdefault("secret", os.environ.get(SECRET_ENV) or secrets.token_hex(32))
        # Validate here, where `serve run` reports it, not in every replica's constructor.
        TransferConfig(**{k: v for k, v in transfer.items() if k != "host"})
        load_secret(transfer["secret"])
        api_key = args.pop("api_key", None) or os.environ.get(API_KEY_ENV)
        return cls(**args, transfer=transfer, api_key=api_key)

    def transfer_config(self, host: str) -> TransferConfig:
        return TransferConfig(**{**self.transfer, "host": host})

    def model_dirs(self) -> tuple[Path, Path]:
        """(prefill, decode) model directories; converts the embedded default on first use."""
        if self.prefill_model is None:
            from overfill_serve.default_model import default_model_dir

            prefill = default_model_dir()
        else:
            prefill = Path(self.prefill_model).expanduser()
        decode = Path(self.decode_model).expanduser() if self.decode_model is not None else prefill
        return prefill, decode
