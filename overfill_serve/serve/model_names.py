"""The model ids one pair is served under, and the mode each selects: one resolver for the HTTP and gRPC APIs.

`<pair>` and `<pair>:overfill` run OverFill (full model prefills, pruned model decodes); `<pair>:full` and
`<pair>:pruned` run one model for both stages. Anything else is a `ModelNotFoundError` (HTTP 404, gRPC
NOT_FOUND). The gRPC API also takes an empty model id as the pair's OverFill mode (`allow_empty`).
`model_list` / `model_entry` are GET /v1/models and /v1/models/{id}.
"""

from __future__ import annotations

from typing import Any

from overfill_serve.errors import ModelNotFoundError
from overfill_serve.request import Mode
from overfill_serve.serve.served_by import ServedBy


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


MODE_DESCRIPTIONS = {
    Mode.OVERFILL: "full model prefills, pruned model decodes (OverFill)",
    Mode.FULL: "full model for both stages (quality baseline)",
    Mode.PRUNED: "pruned model for both stages (speed baseline)",
}


def model_list(
    pair_name: str, created: int, teacher: str, student: str, owned_by: str = "overfill-serve"
) -> dict[str, Any]:
    """GET /v1/models: the four names; the `overfill` extension says which model runs each stage."""
    data = []
    for name, mode in model_ids(pair_name):
        ext = {"description": MODE_DESCRIPTIONS[mode], **ServedBy.of(mode, teacher, student).to_json()}
        data.append(
            {"id": name, "object": "model", "created": created, "owned_by": owned_by, "overfill": ext}
        )
    return {"object": "list", "data": data}


def model_entry(model_id: str, pair_name: str, created: int, teacher: str, student: str) -> dict[str, Any]:
    """GET /v1/models/{id}: that model's object from the list; `ModelNotFoundError` (404) for any other id."""
    for entry in model_list(pair_name, created, teacher, student)["data"]:
        if entry["id"] == model_id:
            return entry
    raise ModelNotFoundError(model_id, [name for name, _ in model_ids(pair_name)])
