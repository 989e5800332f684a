"""`TransferRegistry`: the prefill side's book of outgoing KV transfers, their readiness and their leases.

Ownership of a transfer's blocks is explicit: while the request is prefilling, the prefill engine owns them;
once the prefill completes (`complete`), the registry holds them under a lease until the decode side releases
them, either side aborts, or the lease runs out. A transfer being read (`pin`: a pull or a NIXL reader) does
not expire, and if it ends meanwhile its blocks are freed (or its prefill dropped) only when the last reader
unpins, so no block is reused while a peer may still read it. Engine-thread calls (`layer_done`, `complete`)
and channel threads meet under one condition variable; `subscribe` lets an event loop wait without a thread.
"""

from __future__ import annotations

import enum
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from overfill_serve.errors import TransferAbortedError, TransferNotFoundError
from overfill_serve.kv.block_pool import BlockPool
from overfill_serve.request import Request, TokenLogprob

MAX_TOMBSTONES = 10_000  # ended transfers remembered so a late caller learns why, not just "unknown"


class TransferState(str, enum.Enum):
    PREFILLING = "prefilling"  # the engine owns the blocks
    READY = "ready"  # prefill done; the registry holds the blocks under a lease
    RELEASED = "released"
    ABORTED = "aborted"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Completion:
    """What the decode side needs besides the KV: the teacher's first token (None: the KV stops at the
    request's continuation start, and the decode side computes the rest of the prompt) and, when asked for,
    the prompt tokens the teacher scored."""

    first_token: int | None
    num_tokens: int  # prompt tokens whose KV is transferred
    logprob: TokenLogprob | None = None
    finished: bool = False  # the first token ends the request: no more KV is sent, none is needed
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    num_cached_tokens: int = 0  # prompt tokens whose KV the prefill side's prefix cache held


class Ready(Protocol):
    """Completes when a layer's KV is really in memory: on a GPU, a CUDA event recorded after the layer's
    kernels (which `layer_done` runs right after *queueing*)."""

    def synchronize(self) -> None: ...


@dataclass(eq=False)
class Transfer:
    transfer_id: str
    request: Request
    state: TransferState = TransferState.PREFILLING
    # Teacher layers whose final KV is computed, or queued to be (then `Ready` says when it is).
    layers_done: dict[int, Ready | None] = field(default_factory=dict)
    completion: Completion | None = None
    lease_deadline: float = float("inf")
    reason: str = ""
    readers: int = 0  # pulls or NIXL reads in progress: while > 0, the blocks stay put
    held: bool = False  # the registry (not the engine) owns the blocks: the prefill completed

    @property
    def block_ids(self) -> list[int]:
        return self.request.block_table

    @property
    def finished(self) -> bool:
        """The request ended on its first token: a reader sends no further layers."""
        completion = self.completion  # set once, by `complete`
        return completion is not None and completion.finished


class TransferRegistry:
    def __init__(
        self, pool: BlockPool, lease_seconds: float = 30.0, abort_prefill: Callable[[str], None] | None = None
    ) -> None:
        self.pool = pool
        self.lease_seconds = lease_seconds
        self._abort_prefill = abort_prefill  # asks the engine thread to drop a request still prefilling
        self._transfers: dict[str, Transfer] = {}
        self._ended: OrderedDict[str, tuple[TransferState, str]] = OrderedDict()  # recent, for clear errors
        self._draining: dict[str, Transfer] = {}  # ended, but still read: disposed of at the last unpin
        self._listeners: list[Callable[[], None]] = []
        self._cond = threading.Condition()

    # -- engine side ---------------------------------------------------------------------------------------
    def open(self, request: Request) -> str:
        transfer_id = uuid.uuid4().hex
        with self._cond:
            self._transfers[transfer_id] = Transfer(transfer_id, request)
        return transfer_id

    def layer_done(self, transfer_id: str, layer: int, ready: Ready | None = None) -> None:
        with self._cond:
            transfer = self._transfers.get(transfer_id)
            if transfer is not None:
                transfer.layers_done[layer] = ready
                self._changed()

    def complete(self, transfer_id: str, request: Request, completion: Completion) -> None:
        """The prefill finished: the registry takes over the request's blocks and starts the lease."""
        with self._cond:
            transfer = self._transfers.get(transfer_id)
            if transfer is None:
                draining = self._draining.get(transfer_id)
                if draining is not None:  # aborted while read: the last reader frees the blocks
                    draining.held = True
                    return
                # Aborted while the engine was finishing it: the blocks are ours to return now.
                self.pool.free(request.block_table)
                request.block_table = []
                return
            transfer.completion = completion
            transfer.state, transfer.held = TransferState.READY, True
            transfer.lease_deadline = time.monotonic() + self.lease_seconds
            self._changed()

    # -- channel side --------------------------------------------------------------------------------------
    def layer(self, transfer_id: str, layer: int) -> tuple[Transfer, Ready | None] | None:
        """(transfer, readiness) once `layer`'s KV is final (or the whole prefill is), else None; raises if
        the transfer is gone. Nobody may read the layer before `readiness` completes (on a GPU its kernels
        may only be queued: an RDMA read would see stale KV)."""
        with self._cond:
            transfer = self._live(transfer_id)
            if layer in transfer.layers_done:
                return transfer, transfer.layers_done[layer]
            return (transfer, None) if transfer.completion is not None else None

    def completion(self, transfer_id: str) -> Completion | None:
        """The transfer's completion once the prefill is done, else None; raises if the transfer is gone."""
        with self._cond:
            return self._live(transfer_id).completion

    def is_open(self, transfer_id: str) -> bool:
        with self._cond:
            return transfer_id in self._transfers

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` (under the registry's lock: it must only schedule work) on every change; returns
        the function that unsubscribes it."""
        with self._cond:
            self._listeners.append(listener)
        return lambda: self._unsubscribe(listener)

    def pin(self, transfer_id: str) -> None:
        """A reader starts: until its `unpin`, the lease cannot expire and the blocks are not reused."""
        with self._cond:
            self._live(transfer_id).readers += 1

    def unpin(self, transfer_id: str) -> None:
        with self._cond:
            transfer = self._transfers.get(transfer_id) or self._draining.get(transfer_id)
            assert transfer is not None and transfer.readers > 0, "unpin without pin"
            transfer.readers -= 1
            if transfer.readers or self._draining.get(transfer_id) is not transfer:
                return
            del self._draining[transfer_id]
            drop_prefill = self._dispose(transfer)
            self._changed()
        if drop_prefill:
            self._drop_prefill(transfer)

    def release(self, transfer_id: str) -> None:
        """The decode side has the KV: free the blocks now."""
        self._end(transfer_id, TransferState.RELEASED, "released")

    def abort(self, transfer_id: str, reason: str) -> None:
        self._end(transfer_id, TransferState.ABORTED, reason)

    def renew(self, transfer_id: str) -> float:
        """Extend the lease by a full term; seconds left."""
        with self._cond:
            transfer = self._live(transfer_id)
            if transfer.state is TransferState.READY:
                transfer.lease_deadline = time.monotonic() + self.lease_seconds
            return min(transfer.lease_deadline - time.monotonic(), self.lease_seconds)

    def sweep(self) -> list[str]:
        """Expire the transfers whose lease ran out; returns their ids."""
        now = time.monotonic()
        with self._cond:
            expired = [
                t.transfer_id for t in self._transfers.values() if t.lease_deadline <= now and not t.readers
            ]
        for transfer_id in expired:
            self._end(transfer_id, TransferState.EXPIRED, "lease expired")
        return expired

    def get(self, transfer_id: str) -> Transfer:
        with self._cond:
            return self._live(transfer_id)

    def wait_empty(self, timeout: float) -> bool:
        """Block until no transfer is open (each pulled, aborted or expired), within `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._transfers and not self._draining, timeout)

    @property
    def num_open(self) -> int:
        """Transfers whose blocks are still held (ended ones included while a reader finishes)."""
        with self._cond:
            return len(self._transfers) + len(self._draining)

    @property
    def num_readers(self) -> int:
        with self._cond:
            return sum(t.readers for t in (*self._transfers.values(), *self._draining.values()))

    # -- internals -----------------------------------------------------------------------------------------
    def _live(self, transfer_id: str) -> Transfer:
        transfer = self._transfers.get(transfer_id)
        if transfer is not None:
            return transfer
        state, reason = self._ended.get(transfer_id, (None, ""))
        if state is TransferState.ABORTED:
            raise TransferAbortedError(f"transfer {transfer_id} was aborted: {reason}")
        if state is not None:
            raise TransferNotFoundError(f"transfer {transfer_id} is gone: {reason}")
        raise TransferNotFoundError(f"transfer {transfer_id!r} is unknown")

    def _end(self, transfer_id: str, state: TransferState, reason: str) -> None:
        with self._cond:
            transfer = self._transfers.pop(transfer_id, None)
            if transfer is None:
                return
            transfer.state, transfer.reason = state, reason
            self._ended[transfer_id] = (state, reason)
            while len(self._ended) > MAX_TOMBSTONES:
                self._ended.popitem(last=False)
            drop_prefill = False
            if transfer.readers:
                self._draining[transfer_id] = transfer
            else:
                drop_prefill = self._dispose(transfer)
            self._changed()
        if drop_prefill:
            self._drop_prefill(transfer)

    def _dispose(self, transfer: Transfer) -> bool:
        """Free a held transfer's blocks (under the lock); True if its prefill must be dropped instead (the
        engine owns the blocks: `complete` will find nothing and free them)."""
        if not transfer.held:
            return True
        self.pool.free(transfer.block_ids)
        transfer.request.block_table = []
        return False

    def _drop_prefill(self, transfer: Transfer) -> None:
        if self._abort_prefill is not None:
            self._abort_prefill(transfer.request.request_id)

    def _changed(self) -> None:
        self._cond.notify_all()
        for listener in self._listeners:
            listener()

    def _unsubscribe(self, listener: Callable[[], None]) -> None:
        with self._cond:
            self._listeners.remove(listener)
