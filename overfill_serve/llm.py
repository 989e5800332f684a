"""`LLM`: the offline API — load a pair, generate from prompts or chats, with paged KV and continuous batching.

One `EngineCore` holds both models: they share one KV pool sized for the teacher's layers, so the handover
from prefill to decode passes the block table, not the bytes. A depth-pruned student reads and writes only its
kept layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overfill_serve.engine.config import EngineConfig
from overfill_serve.engine.core import EngineCore
from overfill_serve.engine.output_processor import StepOutput
from overfill_serve.errors import InvalidRequestError
from overfill_serve.model.pair import ModelPair
from overfill_serve.model.spec import KeptLayers
from overfill_serve.prompt import Prompt, PromptEncoder
from overfill_serve.request import Mode, Request, TokenLogprob
from overfill_serve.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestMetrics:
    """Seconds, from the request's arrival."""

    ttft: float | None
    e2e: float
    tpot: float | None  # mean time per output token after the first
    num_preemptions: int


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    stop_reason: str | int | None
    logprobs: list[TokenLogprob] | None
    mode: str
    metrics: RequestMetrics
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (as in vLLM).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV the prefix cache held


class LLM:
    def __init__(
        self,
        prefill_model: str | Path | None = None,
        decode_model: str | Path | None = None,
        *,
        kept_layers: KeptLayers = None,
        **engine: Any,
    ) -> None:
        """The teacher (prefill) and student (decode) model directories, by default the embedded model for
        both; `engine`: `EngineConfig` fields (dtype, device, num_kv_blocks, max_num_seqs, ...)."""
        if prefill_model is None:
            from overfill_serve.tools.default_model import default_model_dir

            prefill_model = default_model_dir()
        decode_model = decode_model if decode_model is not None else prefill_model
        config = EngineConfig(**engine).resolved()
        self.pair = ModelPair.load(
            prefill_model, decode_model, kept_layers, config.dtype, config.device, config.block_size,
            config.pad_to_multiple,
        )  # fmt: skip
        self.tokenizer = self.pair.tokenizer
        layout = self.pair.layout
        all_layers = tuple(range(layout.num_teacher_layers))
        models = {
            "teacher": (self.pair.teacher, all_layers),
            "student": (self.pair.student, layout.kept_layers),
        }
        self.core = EngineCore(config, self.tokenizer, models)
        self.prompts = PromptEncoder(self.tokenizer, layout.vocab_size, self.core.max_model_len)
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()

    # -- request API ---------------------------------------------------------------------------------------
    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        mode: str | Mode = "overfill",
        request_id: str | None = None,
    ) -> str:
        """Queue one request; `step()` then streams its `StepOutput`s."""
        return self._add(prompt, params, mode, request_id).request_id

    def _add(
        self, prompt: Prompt, params: SamplingParams | None, mode: str | Mode, request_id: str | None
    ) -> Request:
        mode = Mode.parse(mode)
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling params must be a SamplingParams", field="sampling_params")
        self.prompts.check_params(params)  # its token ids must be in the vocabulary, as over HTTP and gRPC
        request = Request(request_id or f"req-{next(self._ids)}", self.prompts.encode(prompt), params, mode)
        if request.request_id in self._requests:
            raise InvalidRequestError(
                f"request id {request.request_id!r} is already in use", field="request_id"
            )
        self._requests[request.request_id] = request
        self.core.add(request, *mode.models)
        return request

    def abort(self, request_id: str) -> bool:
        self._requests.pop(request_id, None)
        return self.core.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.core.has_work()

    def step(self) -> list[StepOutput]:
        """One round: every prefill engine with work, then every decode engine with work. A failing step fails
        every request in flight (marked failed, blocks freed) before it raises."""
        try:
            outputs = list(self.core.step().outputs)
        except Exception as e:
            for request_id in list(self._requests):
                self._requests.pop(request_id)
                self.core.abort(request_id, e)
            raise
        for out in outputs:
            if out.finished:
                self._requests.pop(out.request_id, None)
        return outputs

    # -- batch API -----------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        mode: str | Mode = "overfill",
    ) -> list[RequestOutput]:
        prompt_list = _as_prompt_list(prompts)
        params = _broadcast(sampling_params, len(prompt_list))
        requests: list[Request] = []
        try:
            for prompt, p in zip(prompt_list, params):
                requests.append(self._add(prompt, p, mode, None))
        except Exception:
            for r in requests:  # all or nothing: no half-submitted batch keeps blocks
                self.abort(r.request_id)
            raise
        texts: dict[str, list[str]] = {r.request_id: [] for r in requests}
        while not all(r.is_finished for r in requests):
            for out in self.step():
                if out.request_id in texts:
                    texts[out.request_id].append(out.text)
        return [_to_output(r, "".join(texts[r.request_id]), p) for r, p in zip(requests, prompt_list)]

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        mode: str | Mode = "overfill",
    ) -> list[RequestOutput]:
        """Generate the assistant's reply to one conversation or to several."""
        conversations: Any = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.prompts.chat(conv) for conv in conversations], sampling_params, mode)


def _as_prompt_list(prompts: Any) -> list[Prompt]:
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InvalidRequestError(
            "prompts must be a string, a token-id list or a non-empty list of them", field="prompt"
        )
    return list(prompts)


def _broadcast(params: Any, n: int) -> list[SamplingParams | None]:
    if params is None or isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise InvalidRequestError(f"{len(params)} sampling params for {n} prompts", field="sampling_params")
    return params


def _to_output(request: Request, text: str, prompt: Prompt | None = None) -> RequestOutput:
    t = request.timeline
    start = t["received"]
    end = t[request.status.value] if request.is_finished else start
    first = t.get("first_token")
    n = len(request.output_token_ids)
    return RequestOutput(
        request_id=request.request_id,
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=request.prompt_token_ids,
        token_ids=list(request.output_token_ids),
        text=text,
        finish_reason=request.finish_reason.value if request.finish_reason else None,
        stop_reason=request.stop_reason,
        logprobs=list(request.output_logprobs) if request.params.logprobs is not None else None,
        mode=request.mode.value,
        num_cached_tokens=request.num_cached_tokens,
        prompt_logprobs=[None, *request.prompt_logprobs]
        if request.params.prompt_logprobs is not None
        else None,
        metrics=RequestMetrics(
            ttft=None if first is None else first - start,
            e2e=end - start,
            tpot=None if first is None or n < 2 else (end - first) / (n - 1),
            num_preemptions=request.num_preemptions,
        ),
    )
