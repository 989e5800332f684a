"""`LLM`: the offline API — load a pair, generate from prompts or chats, with paged KV and continuous batching.

In one process both stages share one KV pool sized for the teacher's layers: the handover from prefill to
decode passes the block table, not the bytes. A depth-pruned student reads and writes only its kept layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from overfill_serve.engine.decode import DecodeEngine
from overfill_serve.engine.output_processor import OutputProcessor, StepOutput
from overfill_serve.engine.prefill import PrefillEngine
from overfill_serve.engine.runner import ModelRunner
from overfill_serve.engine.sampler import Sampler
from overfill_serve.errors import InvalidRequestError, ModelConfigError
from overfill_serve.kv.block_pool import BlockPool
from overfill_serve.kv.paged_cache import PagedKVCache
from overfill_serve.kv.swap_space import SwapSpace
from overfill_serve.model.loader import parse_dtype
from overfill_serve.model.pair import ModelPair
from overfill_serve.request import Mode, Request, RequestStatus, TokenLogprob
from overfill_serve.sampling_params import SamplingParams
from overfill_serve.tokenizer import encode_chat

Prompt = str | list[int]
DEFAULT_KV_CACHE_BYTES = 1 << 30  # on CPU; on GPU the cache takes a fraction of the free memory


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


class LLM:
    def __init__(
        self,
        prefill_model: str | Path | None = None,
        decode_model: str | Path | None = None,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        kept_layers: str | list[int] | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        num_swap_blocks: int = 0,
    ) -> None:
        if prefill_model is None:
            from overfill_serve.default_model import default_model_dir

            prefill_model = default_model_dir()
        decode_model = decode_model if decode_model is not None else prefill_model
        self.pair = ModelPair.load(prefill_model, decode_model, dtype, device, kept_layers, block_size)
        self.tokenizer = self.pair.tokenizer
        teacher, student, layout = self.pair.teacher, self.pair.student, self.pair.layout
        torch_dtype = parse_dtype(dtype)
        if num_kv_blocks is None:
            budget = kv_cache_bytes or _default_kv_bytes(torch.device(device))
            num_kv_blocks = PagedKVCache.blocks_for_budget(
                budget,
                layout.num_teacher_layers,
                block_size,
                layout.num_kv_heads,
                layout.head_dim,
                torch_dtype,
            )
        if num_kv_blocks < 1:
            raise ModelConfigError(
                "the KV cache budget holds no block; raise kv_cache_bytes or num_kv_blocks"
            )
        self.cache = PagedKVCache(
            layout.num_teacher_layers,
            num_kv_blocks,
            block_size,
            layout.num_kv_heads,
            layout.head_dim,
            torch_dtype,
            device,
        )
        self.pool = BlockPool(num_kv_blocks)
        limit = min(teacher.spec.max_position_embeddings, student.spec.max_position_embeddings)
        # A request running alone must always fit in the pool, so preemption can always make progress.
        self.max_model_len = min(max_model_len or limit, limit, num_kv_blocks * block_size)

        self.output = OutputProcessor(self.tokenizer, layout.eos_token_ids, self.max_model_len)
        self.sampler = Sampler()
        runners = {
            "teacher": ModelRunner(teacher, self.cache, tuple(range(layout.num_teacher_layers))),
            "student": ModelRunner(student, self.cache, layout.kept_layers),
        }
        self.prefill = {
            role: PrefillEngine(r, self.pool, self.sampler, self.output, max_num_batched_tokens, max_num_seqs)
            for role, r in runners.items()
        }
        # Preempted decodes swap their KV to host memory when it has room, else are re-prefilled.
        self.swap = SwapSpace(self.cache, num_swap_blocks) if num_swap_blocks else None
        self.decode = {
            role: DecodeEngine(
                r, self.pool, self.sampler, self.output, self._re_prefill, max_num_seqs, self.swap
            )
            for role, r in runners.items()
        }
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()

    # -- the OverFill routing: which model runs which stage -------------------------------------------------
    @staticmethod
    def _roles(mode: Mode) -> tuple[str, str]:
        return {
            Mode.OVERFILL: ("teacher", "student"),
            Mode.FULL: ("teacher", "teacher"),
            Mode.PRUNED: ("student", "student"),
        }[mode]

    def _re_prefill(self, request: Request) -> None:
        self.prefill[self._roles(request.mode)[0]].add(request, front=True)

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
        token_ids = self._encode(prompt)
        request = Request(request_id or f"req-{next(self._ids)}", token_ids, params, mode)
        if request.request_id in self._requests:
            raise InvalidRequestError(
                f"request id {request.request_id!r} is already in use", field="request_id"
            )
        self._requests[request.request_id] = request
        self.prefill[self._roles(mode)[0]].add(request)
        return request

    def abort(self, request_id: str) -> bool:
        self._requests.pop(request_id, None)
        return any(e.abort(request_id) is not None for e in (*self.prefill.values(), *self.decode.values()))

    def has_unfinished(self) -> bool:
        return any(e.has_work() for e in (*self.prefill.values(), *self.decode.values()))

    def step(self) -> list[StepOutput]:
        """One round: every prefill engine with work, then every decode engine with work."""
        outputs: list[StepOutput] = []
        for prefill in self.prefill.values():
            if prefill.has_work():
                result = prefill.step()
                outputs += result.outputs
                for request in result.handed_over:
                    self.decode[self._roles(request.mode)[1]].add(request)
        for decode in self.decode.values():
            if decode.has_work():
                outputs += decode.step()
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
        return self.generate(
            [encode_chat(self.tokenizer, conv) for conv in conversations], sampling_params, mode
        )

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            token_ids = list(self.tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            token_ids = list(prompt)
            vocab = self.pair.layout.vocab_size
            if any(not 0 <= t < vocab for t in token_ids):
                raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", field="prompt")
        else:
            raise InvalidRequestError("a prompt is a string or a list of token ids", field="prompt")
        if not token_ids:
            raise InvalidRequestError("the prompt is empty", field="prompt")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens; the context limit is {self.max_model_len} "
                "(prompt plus at least one generated token)",
                field="prompt",
            )
        return token_ids


def _default_kv_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    return DEFAULT_KV_CACHE_BYTES


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
    end = t.get(RequestStatus.FINISHED.value) or t.get(RequestStatus.ABORTED.value) or t.get("failed", start)
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
        metrics=RequestMetrics(
            ttft=None if first is None else first - start,
            e2e=end - start,
            tpot=None if first is None or n < 2 else (end - first) / (n - 1),
            num_preemptions=request.num_preemptions,
        ),
    )
