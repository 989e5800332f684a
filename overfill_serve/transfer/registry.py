"""`TransferRegistry`: the prefill side's book of outgoing KV transfers, their readiness and their leases.

Ownership of a transfer's blocks is explicit: while the request is prefilling, the prefill engine owns them;
once the prefill completes (`complete`), the registry holds them under a lease until the decode side releases
them, either side aborts, or the lease runs out. Engine-thread calls (`layer_done`, `complete`) and channel
threads (`wait_*`, `release`, `abort`, `sweep`) meet under one condition variable.
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

from overfill_serve.errors import TransferAbortedError, TransferNotFoundError, TransferTimeoutError
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
    """What the decode side needs besides the KV: the teacher's first token."""

    first_token: int
    num_tokens: int  # prompt tokens whose KV is transferred
    logprob: TokenLogprob | None = None


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

    @property
    def block_ids(self) -> list[int]:
        return self.request.block_table


class TransferRegistry:
    def __init__(
        self, pool: BlockPool, lease_seconds: float = 30.0, abort_prefill: Callable[[str], None] | None = None
    ) -> None:
        self.pool = pool
        self.lease_seconds = lease_seconds
        self._abort_prefill = abort_prefill  # asks the engine thread to drop a request still prefilling
        self._transfers: dict[str, Transfer] = {}
        self._ended: OrderedDict[str, tuple[TransferState, str]] = OrderedDict()  # recent, for clear errors
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
                self._cond.notify_all()

    def complete(self, transfer_id: str, request: Request, completion: Completion) -> None:
        """The prefill finished: the registry takes over the request's blocks and starts the lease."""
        with self._cond:
            transfer = self._transfers.get(transfer_id)
            if transfer is None:
                # Aborted while the engine was finishing it: the blocks are ours to return now.
                self.pool.free(request.block_table)
                request.block_table = []
                return
            transfer.completion = completion
            transfer.state = TransferState.READY
            transfer.lease_deadline = time.monotonic() + self.lease_seconds
            self._cond.notify_all()

    # -- channel side --------------------------------------------------------------------------------------
    def wait_layer(self, transfer_id: str, layer: int, timeout: float) -> Transfer:
        """Block until `layer`'s KV is final and in memory (or the whole prefill is), within `timeout` seconds:
        nobody reads a layer whose kernels are only queued (an RDMA read would see stale KV)."""
        transfer = self._wait(
            transfer_id, timeout, lambda t: layer in t.layers_done or t.completion is not None
        )
        ready = transfer.layers_done.get(layer)
        if ready is not None:
            ready.synchronize()  # outside the lock: only this reader waits
        return transfer

    def wait_complete(self, transfer_id: str, timeout: float) -> Completion:
        transfer = self._wait(transfer_id, timeout, lambda t: t.completion is not None)
        assert transfer.completion is not None
        return transfer.completion

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
            expired = [t.transfer_id for t in self._transfers.values() if t.lease_deadline <= now]
        for transfer_id in expired:
            self._end(transfer_id, TransferState.EXPIRED, "lease expired")
        return expired

    def get(self, transfer_id: str) -> Transfer:
        with self._cond:
            return self._live(transfer_id)

    def wait_empty(self, timeout: float) -> bool:
        """Block until no transfer is open (each pulled, aborted or expired), within `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._transfers, timeout)

    @property
    def num_open(self) -> int:
        with self._cond:
            return len(self._transfers)

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

    def _wait(self, transfer_id: str, timeout: float, ready: Callable[[Transfer], bool]) -> Transfer:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                transfer = self._live(transfer_id)
                if ready(transfer):
                    return transfer
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferTimeoutError(
                        f"transfer {transfer_id}: prefill not ready within {timeout:.1f}s"
                    )
                self._cond.wait(left)

    def _end(self, transfer_id: str, state: TransferState, reason: str) -> None:
        with self._cond:
            transfer = self._transfers.pop(transfer_id, None)
            if transfer is None:
                return
            prefilling = transfer.state is TransferState.PREFILLING
            transfer.state, transfer.reason = state, reason
            self._ended[transfer_id] = (state, reason)
            while len(self._ended) > MAX_TOMBSTONES:
                self._ended.popitem(last=False)
            if not prefilling:
                self.pool.free(transfer.block_ids)
                transfer.request.block_table = []
            # A transfer still prefilling is gone from the book: `complete` will find nothing and free.
            self._cond.notify_all()
        if prefilling and self._abort_prefill is not None:
            self._abort_prefill(transfer.request.request_id)
