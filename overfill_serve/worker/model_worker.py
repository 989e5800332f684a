"""`ModelWorker`: one model, its `EngineCore` and an engine thread — the shared part of the prefill and decode
workers. On its own it generates locally, both stages on its model: the `full` mode on a prefill worker
(teacher) and the `pruned` mode on a decode worker (student).

Callers stream a request's outputs with `generate()` (blocking iterator) or `agenerate()` (async iterator);
leaving either early aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from overfill_serve.engine.batch import Batch
from overfill_serve.engine.config import EngineConfig
from overfill_serve.engine.core import EngineCore
from overfill_serve.engine.output_processor import StepOutput
from overfill_serve.engine.stage import Prefilled
from overfill_serve.errors import OverfillError, PreemptedError
from overfill_serve.model.loader import load_model
from overfill_serve.prompt import PromptEncoder
from overfill_serve.request import Request, Resume
from overfill_serve.sampling_params import SamplingParams
from overfill_serve.tokenizer import load_tokenizer
from overfill_serve.worker.engine_loop import EngineLoop
from overfill_serve.worker.latency_window import LatencyWindow
from overfill_serve.worker.output_stream import OutputStream
from overfill_serve.worker.worker_stats import WorkerStats


class ModelWorker:
    role = ""  # "prefill" or "decode": names the engine thread and the request ids made here
    model_name = ""  # "teacher" or "student"

    def __init__(
        self,
        model_dir: str | Path,
        on_prefill_layer: Callable[[Batch, int], None] | None = None,
        **engine: Any,
    ) -> None:
        """`engine`: `EngineConfig` fields. `on_prefill_layer` runs after each layer of a prefill step."""
        self.config = EngineConfig(**engine).resolved()
        self.model = load_model(
            model_dir, self.config.dtype, self.config.device, pad_to_multiple=self.config.pad_to_multiple
        )
        spec = self.model.spec
        self.tokenizer = load_tokenizer(model_dir)
        models = {self.model_name: (self.model, tuple(range(spec.num_layers)))}
        self.core = EngineCore(self.config, self.tokenizer, models, on_prefill_layer)
        self.prompts = PromptEncoder(self.tokenizer, spec.vocab_size, self.core.max_model_len)
        self.loop = EngineLoop(f"{self.role}-engine", self._step, self._crash)
        self._streams: dict[str, OutputStream] = {}  # engine thread only
        self._ids = itertools.count()
        self.num_finished = 0  # requests this worker's engine ran to the end
        self.tpot = LatencyWindow()  # time between decode steps while requests decode: their TPOT
        self._last_decode_at: float | None = None

    def start(self) -> ModelWorker:
        self.loop.start()
        return self

    def stats(self) -> WorkerStats:
        core = self.core
        swapped = sum(len(d.swapped) for d in core.decode.values())
        return WorkerStats(
            free_blocks=core.pool.num_free,
            total_blocks=core.pool.num_blocks,
            waiting=sum(len(e.waiting) for e in core.engines()) + swapped,
            running=sum(len(e.running) for e in core.engines()),
            swapped=swapped,
            queued_prompt_tokens=sum(p.queued_prompt_tokens for p in core.prefill.values()),
            finished=self.num_finished,
            tpot_s=self.tpot.mean(),
            prefix_queries=sum(p.prefix_queries for p in core.prefill.values()),
            prefix_hits=sum(p.prefix_hits for p in core.prefill.values()),
            prefill_tokens=sum(p.computed_tokens for p in core.prefill.values()),
            block_size=self.config.block_size,
        )

    def stop(self) -> None:
        self.loop.stop()

    # -- local generation ----------------------------------------------------------------------------------
    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> Iterator[StepOutput]:
        request = self._new_request(prompt_token_ids, params, request_id)
        return self._iterate(request.request_id, self._open(partial(self._admit_local, request)))

    def agenerate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[StepOutput]:
        request = self._new_request(prompt_token_ids, params, request_id)
        stream = self._open(partial(self._admit_local, request), asyncio.get_running_loop())
        return self._aiterate(request.request_id, stream)

    def abort(self, request_id: str) -> None:
        self.loop.call(lambda: self._abort_now(request_id))

    def _new_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None,
        resume: Resume | None = None,
    ) -> Request:
        return Request(
            request_id or f"{self.role}-{next(self._ids)}",
            self.prompts.check(prompt_token_ids),
            params,
            output_token_ids=list(resume.token_ids) if resume else [],
            emitted_chars=resume.emitted_chars if resume else None,
        )

    def _open(
        self, admit: Callable[[OutputStream], None], loop: asyncio.AbstractEventLoop | None = None
    ) -> OutputStream:
        """A request's output stream, the request admitted on the engine thread."""
        stream = OutputStream(loop)
        self.loop.call(lambda: admit(stream))
        return stream

    def _iterate(self, request_id: str, stream: OutputStream) -> Iterator[StepOutput]:
        try:
            while not stream.done:
                yield stream.get()
        finally:
            if not stream.done:  # the caller left early: free the request's blocks
                self.abort(request_id)

    async def _aiterate(self, request_id: str, stream: OutputStream) -> AsyncIterator[StepOutput]:
        try:
            while not stream.done:
                yield await stream.aget()
        finally:
            if not stream.done:
                self.abort(request_id)

    # -- engine thread -------------------------------------------------------------------------------------
    def _admit_local(self, request: Request, stream: OutputStream) -> None:
        self._streams[request.request_id] = stream
        self.core.add(request, self.model_name, self.model_name)

    def _step(self) -> bool:
        if not self.core.has_work():
            self._last_decode_at = None
            return False
        result = self.core.step()
        for out in result.outputs:
            self._emit(out)
        for request in result.preempted:
            # Its prompt KV came from another model: give it back to whoever can prefill it again.
            error = PreemptedError(request.request_id, list(request.output_token_ids))
            request.fail(error)
            self._fail(request.request_id, error)
        self._hand_over(result.prefilled)
        now = time.perf_counter()
        decoding = any(d.running for d in self.core.decode.values())
        if decoding and self._last_decode_at is not None:
            self.tpot.add(now - self._last_decode_at)
        self._last_decode_at = now if decoding else None
        return True

    def _hand_over(self, prefilled: tuple[Prefilled, ...]) -> None:
        """Prefills whose decode runs elsewhere (a prefill worker offers their KV)."""
        assert not prefilled, "this worker prefills only what it decodes itself"

    def _emit(self, out: StepOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        stream.put(out)
        if out.finished:
            self.num_finished += 1
            del self._streams[out.request_id]

    def _abort_now(self, request_id: str) -> None:
        self.core.abort(request_id)
        self._streams.pop(request_id, None)

    def _fail(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put(error)

    def _crash(self, error: BaseException) -> None:
        failure = OverfillError(f"engine failed: {error}")
        for request_id in list(self._streams):
            self.core.abort(request_id, failure)
            self._fail(request_id, failure)
