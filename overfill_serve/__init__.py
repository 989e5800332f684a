"""overfill-serve: serving for OverFill two-stage language models (full-model prefill, pruned-model decode)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from overfill_serve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from overfill_serve.llm import LLM, RequestOutput

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # LLM pulls in torch: imported on first use, so the clients (overfill_serve.tools.client) stay light.
    if name in ("LLM", "RequestOutput"):
        from overfill_serve import llm

        return getattr(llm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
