"""`DecodeWorker`: hosts the pruned (student) model, pulls each request's prompt KV from a prefill worker
through the KV channel into its own pool (kept layers only) and decodes it with continuous batching.

`agenerate_from(ticket)` waits for blocks (a coroutine woken when blocks are freed, renewing the prefill
side's lease meanwhile), pulls on an executor thread, then streams the engine thread's outputs, the teacher's
first token first. A request that ended on that token (the completion says `finished`: a stop token) gets
no further KV and never runs the student: the engine finishes it on that token and its blocks go back at
once. A request whose KV does not arrive leaves nothing behind: its blocks are freed and the
prefill side is told to abort. KV the prefill side no longer holds (lease expired, replica restarted) and no
blocks in time both end in an error the dispatcher answers by re-prefilling (migration), not a client error.
As a `ModelWorker` it also generates locally with the student alone (the `pruned` mode).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from overfill_serve.engine.output_processor import StepOutput
from overfill_serve.engine.sampler import SampledToken
from overfill_serve.errors import (
    ChunkError,
    OutOfBlocksError,
    PeerUnavailableError,
    PreemptedError,
    TransferNotFoundError,
)
from overfill_serve.kv.paged_cache import blocks_for
from overfill_serve.model.spec import KeptLayers, KVLayout
from overfill_serve.request import Request, RequestStatus
from overfill_serve.transfer.channel import KVChannel, TransferStats
from overfill_serve.transfer.config import TransferConfig
from overfill_serve.transfer.registry import Completion
from overfill_serve.transfer.waiting import until_changed
from overfill_serve.worker.model_worker import ModelWorker
from overfill_serve.worker.output_stream import OutputStream
from overfill_serve.worker.prefill_worker import TransferTicket
from overfill_serve.worker.worker_stats import WorkerStats

RECHECK_SECONDS = 0.1  # a waiter for blocks also re-checks this often (a swapped request may have come back)


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
        self.prefix_queries = self.prefix_hits = 0  # offered KV tokens looked up in / found in the cache

    def stop(self) -> None:
        super().stop()
        for channel in self._channels.values():
            channel.close()

    def stats(self) -> WorkerStats:
        """The student's own prefill (the `pruned` mode) and the received KV both count in the prefix cache's
        queries and hits."""
        stats = super().stats()
        return replace(
            stats,
            prefix_queries=stats.prefix_queries + self.prefix_queries,
            prefix_hits=stats.prefix_hits + self.prefix_hits,
        )

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
        request, completion = asyncio.run(self._pull(ticket))
        stream = self._open(partial(self._admit_remote, request, completion))
        return self._iterate(request.request_id, stream)

    async def agenerate_from(self, ticket: TransferTicket) -> AsyncIterator[StepOutput]:
        request, completion = await self._pull(ticket)
        stream = self._open(partial(self._admit_remote, request, completion), asyncio.get_running_loop())
        async for out in self._aiterate(request.request_id, stream):
            yield out

    async def _pull(self, ticket: TransferTicket) -> tuple[Request, Completion]:
        request = self._new_request(
            list(ticket.prompt_token_ids),
            ticket.params,
            ticket.request_id,
            ticket.resume,
        )
        try:
            # The whole prompt's blocks (after a continuation start the student computes the rest here), the
            # first ones shared from the prefix cache when it holds the teacher's KV of them; the block with
            # the last offered token always travels (a pull sends at least one block).
            bs = self.config.block_size
            cached = self._cacheable(ticket)[: (ticket.num_kv_tokens - 1) // bs]
            blocks, shared = await self._allocate(blocks_for(ticket.num_prompt_tokens, bs), cached, ticket)
            receive = asyncio.get_running_loop().run_in_executor(None, self._receive, ticket, blocks, shared)
            try:
                completion, blocks = await asyncio.shield(receive)
            except asyncio.CancelledError:
                # The caller left while the pull runs on: when it ends, give its blocks back.
                receive.add_done_callback(self._discard)
                raise
        except TransferNotFoundError as e:  # expired, or the prefill replica restarted: prefill it again
            raise PeerUnavailableError(f"{e}: the KV is no longer offered") from e
        request.block_table = blocks
        request.num_computed_tokens = ticket.num_kv_tokens
        request.prompt_logprobs = list(completion.prompt_logprobs)
        request.num_cached_tokens = completion.num_cached_tokens
        request.mark(RequestStatus.KV_IN_FLIGHT)
        return request, completion

    def _receive(
        self, ticket: TransferTicket, blocks: list[int], shared: int
    ) -> tuple[Completion, list[int]]:
        """The completion and the request's blocks, the KV in the first ones (the first `shared` of them from
        the prefix cache, the rest pulled, then cached in turn): none when the request ended on its first token
        (the pull stopped early; the engine finishes it on that token, so its blocks go back now)."""
        try:
            kv_blocks = blocks[: blocks_for(ticket.num_kv_tokens, self.config.block_size)]
            completion, self.last_transfer = self.channel(ticket.address).pull(
                ticket.transfer_id, kv_blocks[shared:], ticket.num_kv_tokens, first_block=shared
            )
            self._check_completion(ticket, completion)
            if self.on_transfer is not None:
                self.on_transfer(self.last_transfer)
        except BaseException:
            self.core.pool.free(blocks)
            raise
        if completion.finished:
            self.core.pool.free(blocks)
            return completion, []
        for block, block_hash in zip(blocks[shared:], self._cacheable(ticket)[shared:]):
            self.core.pool.register(block, block_hash)
        return completion, blocks

    def _cacheable(self, ticket: TransferTicket) -> list[bytes]:
        """The teacher's hashes of the offered KV's full blocks, when this replica caches prefixes (each is the
        teacher's KV of its tokens whoever pulls it; the student writes only after the prompt)."""
        whole = len(ticket.block_hashes) == ticket.num_kv_tokens // self.config.block_size
        return list(ticket.block_hashes) if self.config.enable_prefix_caching and whole else []

    def _check_completion(self, ticket: TransferTicket, completion: Completion) -> None:
        """What the peer says must fit the request: a first token unless its KV stops at the continuation
        start; as many scored prompt tokens as it asked for; and if the KV is incomplete (finished), this
        engine's own stop rule must agree that the first token ends the request (it never runs here then)."""
        fresh = ticket.resume is None
        continues = ticket.num_kv_tokens < ticket.num_prompt_tokens
        scored = min(ticket.num_kv_tokens, ticket.num_prompt_tokens - 1)
        wanted = scored if fresh and ticket.params.prompt_logprobs is not None else 0
        first, why = completion.first_token, None
        if (first is None) != continues:
            why = "a first token" if first is not None else "no first token"
            why += f" with the KV of {ticket.num_kv_tokens} of {ticket.num_prompt_tokens} prompt tokens"
        elif len(completion.prompt_logprobs) != wanted:
            why = f"{len(completion.prompt_logprobs)} scored prompt tokens, expected {wanted}"
        elif completion.finished and not (
            fresh and first is not None and self.core.output.stops_on(first, ticket.params, generated=1)
        ):
            why = f"finished on its first token {first}, which does not stop it"
        if why is not None:
            raise ChunkError(
                f"transfer {ticket.transfer_id}: the peer's completion does not fit the request: {why}"
            )

    def _discard(self, receive: asyncio.Future) -> None:
        if not receive.cancelled() and receive.exception() is None:
            self.core.pool.free(receive.result()[1])

    async def _allocate(self, n: int, hashes: list[bytes], ticket: TransferTicket) -> tuple[list[int], int]:
        """n blocks for an incoming transfer, the cached blocks of the longest prefix of `hashes` first (and
        how many those are), waiting (bounded) for running requests to free some, while the prefill side's
        lease on the KV is renewed. Swapped-out requests come first: a new request takes no
        blocks while one waits to come back. No blocks in time: the request is given back (re-prefilled and
        placed again by the dispatcher)."""
        pool, decode = self.core.pool, self.core.decode[self.model_name]
        if n > pool.num_blocks:
            raise OutOfBlocksError(f"no room for {n} KV blocks (the pool has {pool.num_blocks})")
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline, renew_at = now + self.transfer.timeout_seconds, now  # the lease may be nearly over already
        while True:
            wait = max(0.0, min(RECHECK_SECONDS, renew_at - now, deadline - now))
            taken = await until_changed(
                pool.subscribe, lambda: None if decode.swapped else pool.acquire(hashes, n), wait
            )
            if taken is not None:
                self.prefix_queries += ticket.num_kv_tokens if self.config.enable_prefix_caching else 0
                self.prefix_hits += taken[1] * self.config.block_size
                return taken
            now = loop.time()
            if now >= deadline:  # the KV will be prefilled again: this copy need not wait for its lease
                reason = "the decode replica had no room for it in time"
                await loop.run_in_executor(None, self._abort, ticket, reason)
                raise PreemptedError(
                    ticket.request_id, list(ticket.resume.token_ids) if ticket.resume else []
                )
            if now >= renew_at:
                left = await loop.run_in_executor(None, self._renew, ticket)
                renew_at = loop.time() + max(left / 3, RECHECK_SECONDS)

    def _renew(self, ticket: TransferTicket) -> float:
        return self.channel(ticket.address).renew(ticket.transfer_id)

    def _abort(self, ticket: TransferTicket, reason: str) -> None:
        self.channel(ticket.address).abort(ticket.transfer_id, reason)

    # -- engine thread -------------------------------------------------------------------------------------
    def _admit_remote(self, request: Request, completion: Completion, stream: OutputStream) -> None:
        self._streams[request.request_id] = stream
        # A resumed request's tokens are known (the student recomputes their KV); a new one starts with the
        # teacher's first token, which ends one pulled without KV (finished) before it joins a batch.
        first = None
        if not request.output_token_ids and completion.first_token is not None:
            first = SampledToken(completion.first_token, completion.logprob)
        out = self.core.start_decode(request, first, self.model_name)
        if out is not None:
            self._emit(out)
