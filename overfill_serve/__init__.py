"""overfill-serve: serving for OverFill two-stage language models (full-model prefill, pruned-model decode)."""

from overfill_serve.llm import LLM, RequestOutput
from overfill_serve.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
