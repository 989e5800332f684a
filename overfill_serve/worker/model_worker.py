"""`ModelWorker`: one model, its paged KV pool and an engine thread — the shared part of the prefill and decode
workers. On its own it generates locally, both stages on its model: the `full` mode on a prefill worker
(teacher) and the `pruned` mode on a decode worker (student).

Callers stream a request's outputs with `generate()` (blocking iterator) or `agenerate()` (async iterator);
leaving either early aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from overfill_serve.engine.decode import DecodeEngine
from overfill_serve.engine.output_processor import OutputProcessor, StepOutput
from overfill_serve.engine.prefill import PrefillEngine
from overfill_serve.engine.runner import ModelRunner
from overfill_serve.engine.sampler import Sampler
from overfill_serve.errors import InvalidRequestError, OverfillError, PreemptedError
from overfill_serve.kv.block_pool import BlockPool
from overfill_serve.kv.paged_cache import PagedKVCache
from overfill_serve.kv.swap_space import SwapSpace
from overfill_serve.model.loader import load_model, parse_dtype
from overfill_serve.request import Request
from overfill_serve.sampling_params import SamplingParams
from overfill_serve.tokenizer import load_tokenizer
from overfill_serve.worker.engine_loop import EngineLoop
from overfill_serve.worker.latency_window import LatencyWindow
from overfill_serve.worker.output_stream import END, OutputStream

log = logging.getLogger(__name__)


class ModelWorker:
    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        block_size: int = 16,
        num_kv_blocks: int = 1024,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        num_swap_blocks: int = 0,
        name: str = "worker",
    ) -> None:
        self.model_dir = Path(model_dir)
        self.model = load_model(model_dir, dtype, device)
        spec = self.model.spec
        self.dtype = dtype
        self.cache = PagedKVCache(
            spec.num_layers,
            num_kv_blocks,
            block_size,
            spec.num_kv_heads,
            spec.head_dim,
            parse_dtype(dtype),
            device,
        )
        self.pool = BlockPool(num_kv_blocks)
        self.max_model_len = min(spec.max_position_embeddings, num_kv_blocks * block_size)
        self.tokenizer = load_tokenizer(model_dir)
        self.output = OutputProcessor(self.tokenizer, spec.eos_token_ids, self.max_model_len)
        self.sampler = Sampler()
        self.runner = ModelRunner(self.model, self.cache, tuple(range(spec.num_layers)))
        self.prefill_engine = PrefillEngine(
            self.runner, self.pool, self.sampler, self.output, max_num_batched_tokens, max_num_seqs
        )
        # A preempted decode swaps its KV to host memory when it has room: for a remote request that
        # saves a trip back to the prefill pool.
        swap = SwapSpace(self.cache, num_swap_blocks) if num_swap_blocks else None
        self.decode_engine = DecodeEngine(
            self.runner, self.pool, self.sampler, self.output, self._preempted, max_num_seqs, swap
        )
        self.loop = EngineLoop(f"{name}-engine", self._step, self._crash)
        self._streams: dict[str, OutputStream] = {}  # engine thread only
        self._local: set[str] = set()  # requests whose prompt KV this model computes: re-prefillable here
        self._ids = itertools.count()
        self.num_finished = 0  # requests this worker's engine ran to the end
        self.tpot = LatencyWindow()  # time between decode steps while requests decode: their TPOT
        self._last_decode_at: float | None = None

    def start(self) -> ModelWorker:
        self.loop.start()
        return self

    def stop(self) -> None:
        self.loop.stop()

    def stats(self) -> dict[str, float]:
        return {
            "free_blocks": self.pool.num_free,
            "total_blocks": self.pool.num_blocks,
            "waiting": len(self.prefill_engine.waiting)
            + len(self.decode_engine.waiting)
            + len(self.decode_engine.swapped),
            "running": len(self.prefill_engine.running) + len(self.decode_engine.running),
            "swapped": len(self.decode_engine.swapped),  # also counted in "waiting"
            "finished": self.num_finished,
            "tpot_s": self.tpot.mean(),
        }

    # -- local generation ----------------------------------------------------------------------------------
    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> Iterator[StepOutput]:
        request = self._new_request(prompt_token_ids, params, request_id)
        stream = OutputStream()
        self.loop.call(lambda: self._admit_local(request, stream))
        return self._iterate(request.request_id, stream)

    def agenerate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[StepOutput]:
        request = self._new_request(prompt_token_ids, params, request_id)
        stream = OutputStream(asyncio.get_running_loop())
        self.loop.call(lambda: self._admit_local(request, stream))
        return self._aiterate(request.request_id, stream)

    def abort(self, request_id: str) -> None:
        self.loop.call(lambda: self._abort_now(request_id))

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        vocab = self.model.spec.vocab_size
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", field="prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_token_ids)} tokens; the context limit is {self.max_model_len}",
                field="prompt",
            )
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", field="prompt")

    def _new_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None,
        generated_token_ids: list[int] | None = None,
    ) -> Request:
        self.validate_prompt(prompt_token_ids)
        return Request(
            request_id or f"{self.loop.name}-{next(self._ids)}",
            list(prompt_token_ids),
            params,
            output_token_ids=list(generated_token_ids or []),
        )

    def _iterate(self, request_id: str, stream: OutputStream) -> Iterator[StepOutput]:
        done = False
        try:
            while True:
                item = stream.get()
                if item is END:
                    done = True
                    return
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
        finally:
            if not done:  # the caller left early: free the request's blocks
                self.abort(request_id)

    async def _aiterate(self, request_id: str, stream: OutputStream) -> AsyncIterator[StepOutput]:
        done = False
        try:
            while True:
                item = await stream.aget()
                if item is END:
                    done = True
                    return
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
        finally:
            if not done:
                self.abort(request_id)

    # -- engine thread -------------------------------------------------------------------------------------
    def _admit_local(self, request: Request, stream: OutputStream) -> None:
        self._streams[request.request_id] = stream
        self._local.add(request.request_id)
        self.prefill_engine.add(request)

    def _step(self) -> bool:
        worked = False
        if self.prefill_engine.has_work():
            result = self.prefill_engine.step()
            for out in result.outputs:
                self._emit(out)
            for request in result.handed_over:
                self.decode_engine.add(request)
            worked = True
        worked |= self._step_more()
        if self.decode_engine.has_work():
            for out in self.decode_engine.step():
                self._emit(out)
            now = time.perf_counter()
            if self._last_decode_at is not None:
                self.tpot.add(now - self._last_decode_at)
            self._last_decode_at = now if self.decode_engine.running else None
            worked = True
        else:
            self._last_decode_at = None
        return worked

    def _step_more(self) -> bool:
        """Subclasses' extra engines (a prefill worker's remote prefill); True if they did work."""
        return False

    def _emit(self, out: StepOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        stream.put(out)
        if out.finished:
            self.num_finished += 1
            stream.put(END)
            del self._streams[out.request_id]
            self._local.discard(out.request_id)

    def _preempted(self, request: Request) -> None:
        if request.request_id in self._local:
            self.prefill_engine.add(request, front=True)  # this model computed the prompt: redo it here
            return
        # The prompt KV came from another model: hand the request back to whoever can re-prefill it.
        self.output.release(request.request_id)
        self._fail(request.request_id, PreemptedError(request.request_id, list(request.output_token_ids)))

    def _abort_now(self, request_id: str) -> None:
        self.prefill_engine.abort(request_id)
        self.decode_engine.abort(request_id)
        self._streams.pop(request_id, None)
        self._local.discard(request_id)

    def _fail(self, request_id: str, error: BaseException) -> None:
        self._local.discard(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put(error)

    def _crash(self, error: BaseException) -> None:
        for request_id in list(self._streams):
            self._fail(request_id, OverfillError(f"engine failed: {error}"))
