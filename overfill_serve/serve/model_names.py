"""The model ids one pair is served under, and the mode each selects: one resolver for the HTTP and gRPC APIs.

`<pair>` and `<pair>:overfill` run OverFill (full model prefills, pruned model decodes); `<pair>:full` and
`<pair>:pruned` run one model for both stages. Anything else is a `ModelNotFoundError` (HTTP 404, gRPC
NOT_FOUND). The gRPC API also takes an empty model id as the pair's OverFill mode (`allow_empty`).
"""

from __future__ import annotations

from overfill_serve.errors import ModelNotFoundError
from overfill_serve.request import Mode


def model_ids(pair_name: str) -> list[tuple[str, Mode]]:
    """The model ids one pair is served under (as GET /v1/models lists them): `<pair>`, then `<pair>:<mode>`."""
    return [(pair_name, Mode.OVERFILL)] + [(f"{pair_name}:{m.value}", m) for m in Mode]


def resolve_model(model: str, pair_name: str, *, allow_empty: bool = False) -> Mode:
    """The mode a model id selects: "<pair>" → OverFill, "<pair>:<mode>" → that mode, "" → OverFill when
    `allow_empty`. Raises `ModelNotFoundError` listing the ids served."""
    if model == pair_name or (allow_empty and not model):
        return Mode.OVERFILL
    prefix = pair_name + ":"
    if model.startswith(prefix):
        try:
            return Mode(model[len(prefix) :])
        except ValueError:
            pass
    raise ModelNotFoundError(model, [m for m, _ in model_ids(pair_name)])
