"""`DecodeWorker`: hosts the pruned (student) model, pulls each request's prompt KV from a prefill worker
through the KV channel into its own pool (kept layers only) and decodes it with continuous batching.

`generate()` runs in the caller's thread up to the end of the transfer, then streams the engine thread's
outputs. A request whose KV does not arrive leaves nothing behind: its blocks are freed and the prefill side
is told to abort.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from overfill_serve.engine.decode import DecodeEngine
from overfill_serve.engine.output_processor import OutputProcessor, StepOutput
from overfill_serve.engine.runner import ModelRunner
from overfill_serve.engine.sampler import SampledToken, Sampler
from overfill_serve.engine.stage import blocks_for
from overfill_serve.errors import OutOfBlocksError, OverfillError, PreemptedError
from overfill_serve.kv.block_pool import BlockPool
from overfill_serve.kv.paged_cache import PagedKVCache
from overfill_serve.model.loader import load_model, parse_dtype
from overfill_serve.model.spec import KVLayout, resolve_kept_layers
from overfill_serve.request import Request, RequestStatus
from overfill_serve.sampling_params import SamplingParams
from overfill_serve.tokenizer import load_tokenizer
from overfill_serve.transfer.channel import KVChannel, TransferStats
from overfill_serve.transfer.config import TransferConfig
from overfill_serve.transfer.registry import Completion
from overfill_serve.worker.engine_loop import EngineLoop
from overfill_serve.worker.prefill_worker import TransferTicket

log = logging.getLogger(__name__)
_END = object()


class DecodeWorker:
    def __init__(
        self,
        model_dir: str | Path,
        *,
        transfer: TransferConfig,
        dtype: str = "float32",
        device: str = "cpu",
        block_size: int = 16,
        num_kv_blocks: int = 1024,
        max_num_seqs: int = 64,
        kept_layers: str | list[int] | None = None,
        num_teacher_layers: int | None = None,
    ) -> None:
        self.model = load_model(model_dir, dtype, device)
        spec = self.model.spec
        strategy = kept_layers if kept_layers is not None else spec.kept_layers
        teacher_layers = num_teacher_layers or (
            max(strategy) + 1 if isinstance(strategy, tuple | list) else spec.num_layers
        )
        kept = resolve_kept_layers(strategy, teacher_layers, spec.num_layers)
        self.layout = KVLayout(
            teacher_layers,
            kept,
            spec.num_kv_heads,
            spec.head_dim,
            spec.rope,
            spec.vocab_size,
            spec.eos_token_ids,
            dtype,
            block_size,
        )
        self.transfer = transfer
        # The pool holds only the kept layers: layer j here is teacher layer kept[j].
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
        runner = ModelRunner(self.model, self.cache, tuple(range(spec.num_layers)))
        self.engine = DecodeEngine(runner, self.pool, Sampler(), self.output, self._preempted, max_num_seqs)
        self.loop = EngineLoop("decode-engine", self._step, self._crash)
        self._streams: dict[str, queue.SimpleQueue] = {}  # request id -> its outputs (engine thread writes)
        self._channels: dict[str, KVChannel] = {}
        self._lock = threading.Lock()
        self.last_transfer: TransferStats | None = None

    def start(self) -> DecodeWorker:
        self.loop.start()
        return self

    def stop(self) -> None:
        self.loop.stop()
        for channel in self._channels.values():
            channel.close()

    def channel(self, address: str) -> KVChannel:
        """The authenticated channel to a prefill worker, opened on first use."""
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = KVChannel(address, self.layout, self.cache, self.transfer).connect()
                self._channels[address] = channel
            return channel

    def generate(
        self,
        ticket: TransferTicket,
        prompt_token_ids: list[int],
        params: SamplingParams,
        generated_token_ids: list[int] | None = None,
    ) -> Iterator[StepOutput]:
        """Pull the ticket's KV, then stream the request's outputs (the teacher's first token first).

        Raises a `TransferError` if the KV does not arrive, `PreemptedError` if the worker has to give the
        request back. Closing the iterator early aborts the request and frees its blocks."""
        assert len(prompt_token_ids) == ticket.num_prompt_tokens
        blocks = self._allocate(blocks_for(ticket.num_prompt_tokens, self.cache.block_size))
        try:
            completion, self.last_transfer = self.channel(ticket.address).pull(
                ticket.transfer_id, blocks, ticket.num_prompt_tokens
            )
        except BaseException:
            self.pool.free(blocks)
            raise
        request = Request(
            ticket.request_id,
            list(prompt_token_ids),
            params,
            output_token_ids=list(generated_token_ids or []),
            block_table=blocks,
            num_computed_tokens=ticket.num_prompt_tokens,
        )
        request.mark(RequestStatus.KV_IN_FLIGHT)
        stream: queue.SimpleQueue = queue.SimpleQueue()
        self._streams[request.request_id] = stream
        self.loop.call(lambda: self._admit(request, completion))
        finished = False
        try:
            while True:
                item = stream.get()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:  # the caller went away: free the request's blocks
                self.loop.call(lambda: self._abort_now(request.request_id))

    def stats(self) -> dict[str, int]:
        return {
            "free_blocks": self.pool.num_free,
            "total_blocks": self.pool.num_blocks,
            "waiting": len(self.engine.waiting),
            "running": len(self.engine.running),
        }

    # -- engine thread -------------------------------------------------------------------------------------
    def _admit(self, request: Request, completion: Completion) -> None:
        if request.output_token_ids:  # a resumed request: its tokens are known; the student recomputes KV
            self.engine.add(request)
            return
        out = self.output.append(request, SampledToken(completion.first_token, completion.logprob))
        self._emit(out)
        if out.finished:
            self.pool.free(request.block_table)
            request.block_table = []
            request.mark(RequestStatus.FINISHED)
            self.output.release(request.request_id)
        else:
            self.engine.add(request)

    def _step(self) -> bool:
        if not self.engine.has_work():
            return False
        for out in self.engine.step():
            self._emit(out)
        return True

    def _emit(self, out: StepOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        stream.put(out)
        if out.finished:
            stream.put(_END)
            del self._streams[out.request_id]

    def _preempted(self, request: Request) -> None:
        self.output.release(request.request_id)
        self._fail(request.request_id, PreemptedError(request.request_id, list(request.output_token_ids)))

    def _abort_now(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._streams.pop(request_id, None)

    def _fail(self, request_id: str, error: OverfillError) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put(error)

    def _crash(self, error: BaseException) -> None:
        for request_id in list(self._streams):
            self._fail(request_id, OverfillError(f"decode engine failed: {error}"))

    def _allocate(self, n: int) -> list[int]:
        """Blocks for an incoming transfer, waiting (bounded) for running requests to free some."""
        deadline = time.monotonic() + self.transfer.timeout_seconds
        while (blocks := self.pool.allocate(n)) is None:
            if n > self.pool.num_blocks or time.monotonic() > deadline:
                raise OutOfBlocksError(f"no room for {n} KV blocks ({self.pool.num_free} free)")
            time.sleep(0.01)
        return blocks
