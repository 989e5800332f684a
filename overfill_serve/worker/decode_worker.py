"""`DecodeWorker`: hosts the pruned (student) model, pulls each request's prompt KV from a prefill worker
through the KV channel into its own pool (kept layers only) and decodes it with continuous batching.

`generate_from(ticket)` pulls in the caller's thread, then streams the engine thread's outputs, the
teacher's first token first. A request whose KV does not arrive leaves nothing behind: its blocks are freed
and the prefill side is told to abort. As a `ModelWorker` it also generates locally with the student alone
(the `pruned` mode).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from overfill_serve.engine.output_processor import StepOutput
from overfill_serve.engine.sampler import SampledToken
from overfill_serve.errors import OutOfBlocksError
from overfill_serve.kv.paged_cache import blocks_for
from overfill_serve.model.spec import KeptLayers, KVLayout
from overfill_serve.request import Request, RequestStatus
from overfill_serve.transfer.channel import KVChannel, TransferStats
from overfill_serve.transfer.config import TransferConfig
from overfill_serve.transfer.registry import Completion
from overfill_serve.worker.model_worker import ModelWorker
from overfill_serve.worker.output_stream import OutputStream
from overfill_serve.worker.prefill_worker import TransferTicket


class DecodeWorker(ModelWorker):
    role, model_name = "decode", "student"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        transfer: TransferConfig,
        kept_layers: KeptLayers = None,
        num_teacher_layers: int | None = None,
        **engine: Any,
    ) -> None:
        super().__init__(model_dir, **engine)
        self.layout = KVLayout.of_student(
            self.model.spec, kept_layers, num_teacher_layers, self.config.dtype, self.config.block_size
        )
        self.transfer = transfer
        self._channels: dict[str, KVChannel] = {}
        self._lock = threading.Lock()
        self.last_transfer: TransferStats | None = None
        self.on_transfer: Callable[[TransferStats], None] | None = None  # per-transfer metrics hook

    def stop(self) -> None:
        super().stop()
        for channel in self._channels.values():
            channel.close()

    def channel(self, address: str) -> KVChannel:
        """The authenticated channel to a prefill worker, opened on first use."""
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = KVChannel(address, self.transfer, self.layout, self.core.cache).connect()
                self._channels[address] = channel
            return channel

    def generate_from(self, ticket: TransferTicket) -> Iterator[StepOutput]:
        """Pull the ticket's KV, then stream the request's outputs. Raises a `TransferError` if the KV does
        not arrive, `PreemptedError` if this worker has to give the request back."""
        request, completion = self._pull(ticket)
        stream = self._open(partial(self._admit_remote, request, completion))
        return self._iterate(request.request_id, stream)

    async def agenerate_from(self, ticket: TransferTicket) -> AsyncIterator[StepOutput]:
        pull = asyncio.get_running_loop().run_in_executor(None, self._pull, ticket)
        try:
            request, completion = await asyncio.shield(pull)
        except asyncio.CancelledError:
            # The caller left while the pull runs on: when it ends, give its blocks back.
            pull.add_done_callback(self._discard_pull)
            raise
        stream = self._open(partial(self._admit_remote, request, completion), asyncio.get_running_loop())
        async for out in self._aiterate(request.request_id, stream):
            yield out

    def _discard_pull(self, pull: asyncio.Future) -> None:
        if not pull.cancelled() and pull.exception() is None:
            request, _ = pull.result()
            self.core.pool.free(request.block_table)
            request.block_table = []

    def _pull(self, ticket: TransferTicket) -> tuple[Request, Completion]:
        request = self._new_request(
            list(ticket.prompt_token_ids),
            ticket.params,
            ticket.request_id,
            list(ticket.generated_token_ids),
            ticket.emitted_chars,  # what the client has of the text so far
        )
        blocks = self._allocate(blocks_for(ticket.num_prompt_tokens, self.config.block_size))
        try:
            completion, self.last_transfer = self.channel(ticket.address).pull(
                ticket.transfer_id, blocks, ticket.num_prompt_tokens
            )
        except BaseException:
            self.core.pool.free(blocks)
            raise
        if self.on_transfer is not None:
            self.on_transfer(self.last_transfer)
        request.block_table = blocks
        request.num_computed_tokens = ticket.num_prompt_tokens
        request.mark(RequestStatus.KV_IN_FLIGHT)
        return request, completion

    # -- engine thread -------------------------------------------------------------------------------------
    def _admit_remote(self, request: Request, completion: Completion, stream: OutputStream) -> None:
        self._streams[request.request_id] = stream
        # A resumed request's tokens are known (the student recomputes their KV); a new one starts with the
        # teacher's first token.
        first = None if request.output_token_ids else SampledToken(completion.first_token, completion.logprob)
        out = self.core.start_decode(request, first, self.model_name)
        if out is not None:
            self._emit(out)

    def _allocate(self, n: int) -> list[int]:
        """Blocks for an incoming transfer, waiting (bounded) for running requests to free some. Swapped-out
        requests come first: a new request takes no blocks while one waits to come back."""
        deadline = time.monotonic() + self.transfer.timeout_seconds
        pool, decode = self.core.pool, self.core.decode[self.model_name]
        while decode.swapped or (blocks := pool.allocate(n)) is None:
            if n > pool.num_blocks or time.monotonic() > deadline:
                raise OutOfBlocksError(f"no room for {n} KV blocks ({pool.num_free} free)")
            time.sleep(0.01)
        return blocks
