"""Can a deployment's replica be placed on this cluster? A pure check of one replica's requirements (Ray
resources, `accelerator_type` as the `accelerator_type:<T>` resource, `label_selector`) against the alive
nodes, returning what is missing in words, so an operator reads "no alive node has accelerator_type:L4"
instead of a replica left STARTING.

It checks feasibility (a node's total resources), not momentary availability: a pool whose nodes are busy
is waiting, not misconfigured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Labels Ray sets on every node: not worth listing when telling an operator which labels exist.
_RAY_LABEL_PREFIX = "ray.io/"


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    resources: Mapping[str, float]  # totals
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_ray(cls, node: Mapping) -> NodeInfo:
        """From one entry of `ray.nodes()`."""
        return cls(node["NodeID"], dict(node.get("Resources") or {}), dict(node.get("Labels") or {}))


def label_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Ray's label-selector semantics: `value`, `!value`, `in(a,b)`, `!in(a,b)` per key."""
    for key, expr in selector.items():
        value = labels.get(key)
        negate = expr.startswith("!")
        expr = expr[1:] if negate else expr
        if expr.startswith("in(") and expr.endswith(")"):
            allowed = {v.strip() for v in expr[3:-1].split(",")}
        else:
            allowed = {expr}
        if (value in allowed) == negate:
            return False
    return True


def _fits(required: Mapping[str, float], node: NodeInfo) -> bool:
    return all(node.resources.get(name, 0.0) >= amount for name, amount in required.items() if amount > 0)


def placement_problem(
    required: Mapping[str, float], label_selector: Mapping[str, str], nodes: Sequence[NodeInfo]
) -> str | None:
    """None if some alive node could host one replica; otherwise why none can, naming what is missing."""
    if not nodes:
        return "no alive node in the cluster"
    candidates = [n for n in nodes if label_matches(label_selector, n.labels)]
    if not candidates:
        seen = sorted(
            {f"{k}={v}" for n in nodes for k, v in n.labels.items() if not k.startswith(_RAY_LABEL_PREFIX)}
        )
        return (
            f"no alive node matches label_selector {dict(label_selector)} "
            f"(node labels in the cluster: {seen or 'none'})"
        )
    if any(_fits(required, n) for n in candidates):
        return None
    where = f" with labels {dict(label_selector)}" if label_selector else ""
    missing = [
        f"{name} >= {amount:g}"
        for name, amount in sorted(required.items())
        if amount > 0 and not any(n.resources.get(name, 0.0) >= amount for n in candidates)
    ]
    if missing:
        return f"no alive node{where} has {', '.join(missing)} (a replica needs {dict(required)})"
    return f"no single alive node{where} has all of {dict(required)} at once"
