"""`NixlTransport`: the decode side of the NIXL backend (the design is in `nixl_agent`), the initiator: checks
each layer's block descriptors against the announced pool and READs them into its own blocks (`_Reads`)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import grpc
import numpy as np

from overfill_serve._proto.overfill.v1 import kv_transfer_pb2 as pb
from overfill_serve.errors import (
    ChunkError,
    LayoutMismatchError,
    PeerUnavailableError,
    TransferError,
    TransferTimeoutError,
)
from overfill_serve.kv.paged_cache import PagedKVCache
from overfill_serve.transfer import auth
from overfill_serve.transfer.config import READ_GRACE_SECONDS
from overfill_serve.transfer.nixl_agent import NixlAgent, RemotePool, backoff, encode_hello, nixl_error
from overfill_serve.transfer.status import error_from_rpc
from overfill_serve.transfer.transport import KVTransport, Link, Received, completion_from_pb

log = logging.getLogger(__name__)

CANCEL_GRACE_SECONDS = READ_GRACE_SECONDS  # how long a failed receive waits for a read NIXL could not cancel


_decode_agents: dict[int, tuple[NixlAgent, int]] = {}  # id(pool tensor) -> (agent, users): one per pool
_decode_agents_lock = threading.Lock()


def _acquire_decode_agent(cache: PagedKVCache) -> NixlAgent:
    with _decode_agents_lock:
        agent, users = _decode_agents.get(id(cache.tensor), (None, 0))
        if agent is None or agent.tensor is not cache.tensor:
            agent, users = NixlAgent(f"overfill-decode-{uuid.uuid4().hex}", cache.tensor), 0
        _decode_agents[id(cache.tensor)] = (agent, users + 1)
        return agent


def _release_decode_agent(agent: NixlAgent) -> None:
    with _decode_agents_lock:
        entry = _decode_agents.get(id(agent.tensor))
        if entry is None or entry[0] is not agent:
            return
        if entry[1] > 1:
            _decode_agents[id(agent.tensor)] = (agent, entry[1] - 1)
            return
        del _decode_agents[id(agent.tensor)]
    agent.close()


def _descs(addresses: np.ndarray, run_bytes: np.ndarray, device_id: int) -> np.ndarray:
    return np.stack([addresses, run_bytes, np.full(len(addresses), device_id, dtype=np.uint64)], axis=1)


def coalesce(local: np.ndarray, remote: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge consecutive (local, remote) block pairs that are contiguous on both sides into runs:
    (local starts, remote starts, run lengths in bytes)."""
    step = np.uint64(size)
    breaks = (np.diff(local) != step) | (np.diff(remote) != step)
    starts = np.flatnonzero(np.concatenate(([True], breaks)))
    counts = np.diff(np.append(starts, len(local))).astype(np.uint64)
    return local[starts], remote[starts], counts * step


class _Reads:
    """The READs posted for one transfer: post, poll, wait, cancel."""

    def __init__(self, agent: NixlAgent, remote: RemotePool, remote_name: str, transfer_id: str) -> None:
        self.agent, self.remote, self.remote_name = agent, remote, remote_name
        self.what = f"reading transfer {transfer_id}"
        self.pending: list[Any] = []

    def post(self, local: np.ndarray, remote: np.ndarray, block_bytes: int) -> None:
        loc, rem, sizes = coalesce(local, remote, block_bytes)
        nixl = self.agent.agent
        handle = None
        with self.agent.lock:
            try:
                local_descs = nixl.get_xfer_descs(
                    _descs(loc, sizes, self.agent.device_id), self.agent.mem_type
                )
                remote_descs = nixl.get_xfer_descs(
                    _descs(rem, sizes, self.remote.device_id), self.remote.mem_type
                )
                handle = nixl.initialize_xfer("READ", local_descs, remote_descs, self.remote_name)
                state = nixl.transfer(handle)
            except Exception as e:
                if handle is not None:
                    self._release(handle)
                raise nixl_error(e, self.what) from None
            if state == "DONE":  # done within the call (UCX cma: a process_vm_readv)
                self._release(handle)
                return
        if state != "PROC":
            self.pending.append(handle)  # released (or cancelled) by close()
            raise PeerUnavailableError(f"{self.what}: NIXL could not post the read ({state})")
        self.pending.append(handle)

    def poll(self) -> bool:
        """Progress; drop the finished reads. True when none is left."""
        still: list[Any] = []
        with self.agent.lock:
            for i, handle in enumerate(self.pending):
                try:
                    state = self.agent.agent.check_xfer_state(handle)
                except Exception as e:
                    self.pending = still + self.pending[i:]
                    raise nixl_error(e, self.what) from None
                if state == "DONE":
                    self._release(handle)
                elif state == "PROC":
                    still.append(handle)
                else:
                    self.pending = still + self.pending[i:]
                    raise PeerUnavailableError(f"{self.what}: a read failed ({state})")
            self.pending = still
        return not still

    def wait(self, timeout: float) -> None:
        deadline, sleep = time.monotonic() + timeout, backoff()
        while not self.poll():
            if time.monotonic() > deadline:
                raise TransferTimeoutError(
                    f"{self.what}: {len(self.pending)} read(s) not done in {timeout:.1f}s"
                )
            sleep()

    def notify(self, transfer_id: str) -> None:
        """Every read is done: tell the prefill side it may free the blocks (best effort: the channel's
        gRPC Release follows anyway)."""
        with self.agent.lock:
            try:
                self.agent.agent.send_notif(self.remote_name, transfer_id.encode())
                stray = self.agent.agent.get_new_notifs()  # progress: push the message out now
            except Exception as e:
                log.debug("NIXL notification for %s not sent: %s", transfer_id, e)
                return
        if stray:
            log.debug("ignored NIXL notifications to the decode side: %s", stray)

    def close(self) -> None:
        """Cancel (or, where NIXL cannot, wait out) whatever is still in flight, so nothing writes into the
        destination blocks once the caller frees them."""
        deadline, sleep = time.monotonic() + CANCEL_GRACE_SECONDS, backoff()
        while self.pending:
            with self.agent.lock:
                left = []
                for handle in self.pending:
                    try:
                        state = self.agent.agent.check_xfer_state(handle)
                    except Exception:
                        state = "ERR"
                    if state == "PROC" and not self._release(handle, quiet=True):
                        left.append(handle)
                    elif state != "PROC":
                        self._release(handle)
                self.pending = left
            if not self.pending:
                return
            if time.monotonic() > deadline:
                log.error("%s: %d NIXL read(s) could neither be cancelled nor finished", self.what, len(left))
                self.pending = []
                return
            sleep()

    def _release(self, handle: Any, quiet: bool = False) -> bool:
        try:
            self.agent.agent.release_xfer_handle(handle)
            return True
        except Exception as e:
            if not quiet:
                log.debug("%s: releasing a NIXL handle: %s", self.what, e)
            return False


class NixlTransport(KVTransport):
    """The decode side: one NIXL agent per pool (shared by the channels of a worker), READs into the
    transfer's destination blocks."""

    name = "nixl"

    def __init__(self, cache: PagedKVCache) -> None:
        super().__init__(cache)
        self._agent: NixlAgent | None = _acquire_decode_agent(cache)  # registers the pool, once per pool
        self._remote: RemotePool | None = None
        self._remote_name: str | None = None

    def hello(self) -> bytes:
        if self._agent is None:
            raise TransferError("this NIXL transport is closed")
        return encode_hello(self._agent)

    def connected(self, link: Link, response: pb.HandshakeResponse) -> None:
        agent = self._agent
        if agent is None:
            raise TransferError("this NIXL transport is closed")
        remote = RemotePool.decode(response.nixl_agent_metadata)
        if remote.agent_name != response.nixl_agent_name:
            raise TransferError(f"NIXL agent {remote.agent_name!r} announced as {response.nixl_agent_name!r}")
        problems = []
        if remote.block_bytes != self.cache.block_bytes:
            problems.append(f"NIXL block bytes: {self.cache.block_bytes} != {remote.block_bytes}")
        if remote.num_layers != link.remote_layout.num_teacher_layers:
            problems.append(
                f"NIXL pool layers: {remote.num_layers} != {link.remote_layout.num_teacher_layers}"
            )
        if problems:
            raise LayoutMismatchError(problems)
        if self._remote_name is not None:  # a reconnect
            agent.remove_peer(self._remote_name)
            self._remote = self._remote_name = None
        try:
            agent.add_peer(remote.agent_name, remote.agent_metadata)
        except TransferError:
            raise
        except Exception as e:
            raise PeerUnavailableError(f"cannot load the prefill side's NIXL agent: {e}") from None
        self._remote, self._remote_name = remote, remote.agent_name

    def receive(
        self, link: Link, transfer_id: str, dest_blocks: list[int], num_tokens: int, first_block: int = 0
    ) -> Received:
        agent, remote, remote_name, cache = self._agent, self._remote, self._remote_name, self.cache
        if agent is None or remote is None or remote_name is None:
            raise TransferError("the NIXL transport is not connected")
        dest = np.asarray(dest_blocks, dtype=np.int64)
        assert dest.size and dest.min() >= 0 and dest.max() < cache.num_blocks, (
            "destination blocks in the pool"
        )
        dest_offsets = np.multiply(dest.astype(np.uint64), cache.block_bytes, dtype=np.uint64)
        seen: set[int] = set()
        nbytes, first_byte_at = 0, 0.0
        reads = _Reads(agent, remote, remote_name, transfer_id)
        # The prefill side keeps the blocks pinned while this call is open: it must outlast our reads (and
        # their cancellation), so the call's deadline covers them and our own waits end before it.
        timeout = link.config.timeout_seconds
        deadline = time.monotonic() + 2 * timeout + 2 * CANCEL_GRACE_SECONDS
        stream = link.stub.Describe(
            pb.PullRequest(transfer_id=transfer_id, first_block=first_block),
            metadata=link.metadata,
            timeout=deadline - time.monotonic(),
        )
        try:
            for msg in stream:
                if not auth.verify_message(link.chunk_key, msg):  # addresses a man in the middle rewrote
                    raise ChunkError(f"transfer {transfer_id}: a layer description fails its MAC")
                if msg.HasField("done"):
                    completion = completion_from_pb(msg.done, num_tokens, link.layout.vocab_size)
                    missing = sorted(set(link.layout.kept_layers) - seen)
                    if missing and not completion.finished:  # finished: the rest is not needed
                        raise ChunkError(
                            f"transfer {transfer_id} completed with layers {missing} never described"
                        )
                    reads.wait(min(timeout, deadline - time.monotonic() - 2 * CANCEL_GRACE_SECONDS))
                    reads.notify(transfer_id)
                    return Received(completion, nbytes, first_byte_at)
                j = link.layout.local_layer(msg.layer)
                if j is None:
                    raise ChunkError(f"transfer {transfer_id}: layer {msg.layer} is not one this side keeps")
                if msg.layer in seen:
                    raise ChunkError(f"transfer {transfer_id}: layer {msg.layer} described twice")
                seen.add(msg.layer)
                remote_addrs = remote.check(msg, len(dest_blocks))
                local_addrs = np.concatenate(
                    [
                        np.uint64(cache.block_address(j, 0, 0)) + dest_offsets,
                        np.uint64(cache.block_address(j, 1, 0)) + dest_offsets,
                    ]
                )
                reads.post(local_addrs, remote_addrs, cache.block_bytes)
                first_byte_at = first_byte_at or time.perf_counter()
                nbytes += 2 * len(dest_blocks) * cache.block_bytes
                reads.poll()  # progress the earlier layers' reads while the prefill goes on
            raise ChunkError(f"transfer {transfer_id}: the stream ended without a completion")
        except grpc.RpcError as e:
            raise error_from_rpc(e, f"describing transfer {transfer_id}") from None
        finally:
            reads.close()  # a no-op after success; cancels what is in flight after an error
            stream.cancel()

    def close(self) -> None:
        agent, self._agent = self._agent, None
        if agent is None:
            return
        if self._remote_name is not None:
            agent.remove_peer(self._remote_name)
        self._remote = self._remote_name = None
        _release_decode_agent(agent)
