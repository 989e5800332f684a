"""The NIXL backend of the KV channel: the decode side READs the prefill side's registered pool (RDMA over UCX).

The decode side owns its destination blocks and knows when they are allocated, so it is the initiator: for
each kept layer the prefill side announces as ready (`Describe`, over the gRPC control channel) it validates
the block descriptors and posts one READ into its own blocks; the reads of earlier layers overlap the prefill
of later ones. When every read is done it sends the transfer id as a NIXL notification, and the prefill side
frees the transfer's blocks as soon as it sees it (the gRPC `Release` that follows is then a no-op), so the
prefill side stays passive: it only exposes registered memory and never waits on the decode side.

Both sides register their whole pool (`PagedKVCache.tensor`, one allocation) once. Agents run without NIXL's
progress thread (in NIXL 1.5 its poll delay is hard-coded to 0: it spins a whole core); progress is made by
polling with a growing sleep between polls:

- decode side: while it waits for its reads (`check_xfer_state`), 50 us growing to 1 ms;
- prefill side: the KV server's sweeper calls `NixlSource.poll_notifications` every <= 0.2 s, and each
  `add_peer` / `describe` starts a short burst of polls (50 us growing to 1 ms, for `linger_seconds`) so a
  peer's UCX connection setup and any transport that needs the target's progress (UCX's software RMA over
  TCP between hosts without RDMA) are not held to the sweeper's period. Idle, the burst thread sleeps on an
  event: no CPU.

Handshake payloads (the proto's `nixl_agent_metadata` fields) are msgpack envelopes around NIXL's agent
metadata. The prefill side's also describes its pool (base address, size, geometry, memory type), which is
what the decode side checks every descriptor against: it never reads outside the pool, never across layers or
between K and V, and writes only into the blocks it was given.

Environment: UCX reads `UCX_*` when an agent is created. UCX's default transport list (`all`) is right; a
restricted `UCX_TLS` must keep `tcp` (or an RDMA transport) next to `cma`/shared memory: shared-memory-only
endpoints fail under the peer-failure error mode NIXL uses. On a multi-homed host set `UCX_NET_DEVICES`.

The code: this module (one agent with its pool registered, `NixlAgent`, and the handshake envelopes),
`nixl_source` (the prefill side) and `nixl_transport` (the decode side).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from overfill_serve._proto.overfill.v1 import kv_transfer_pb2 as pb
from overfill_serve.errors import ChunkError, PeerUnavailableError, TransferError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ENVELOPE_VERSION = 1
POLL_MIN_SECONDS = 50e-6  # first sleep between two polls of a NIXL agent; doubles up to POLL_MAX_SECONDS
POLL_MAX_SECONDS = 1e-3
INSTALL_HINT = "pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1"


def _nixl_api() -> Any:
    from nixl import _api  # the CUDA-major dispatcher; works on CPU-only hosts too

    return _api


def backoff() -> Callable[[], None]:
    delay = POLL_MIN_SECONDS

    def sleep() -> None:
        nonlocal delay
        time.sleep(delay)
        delay = min(2 * delay, POLL_MAX_SECONDS)

    return sleep


def nixl_error(e: Exception, what: str) -> TransferError:
    """A NIXL call failed. The descriptors were checked before, so it is the peer (dead, or its metadata
    stale): the transfer is retried elsewhere, not blamed on the data."""
    if type(e).__name__ == "nixlRemoteDisconnectError":
        return PeerUnavailableError(f"{what}: the NIXL peer disconnected")
    return PeerUnavailableError(f"{what}: NIXL failed ({type(e).__name__}: {e})")


class NixlAgent:
    """One NIXL agent (UCX backend, no progress thread) with its pool registered, and the lock that
    serializes every call into it: without the progress thread an agent and its UCX worker are not
    thread-safe (NIXL's own sync mode is NONE then)."""

    def __init__(self, name: str, tensor: torch.Tensor) -> None:
        try:
            api = _nixl_api()
        except ImportError as e:
            raise TransferError(f"the NIXL backend needs the nixl package ({INSTALL_HINT}): {e}") from None
        config = api.nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False, backends=["UCX"])
        self.agent = api.nixl_agent(name, config)
        if "UCX" not in self.agent.backends:
            raise TransferError("NIXL has no UCX plugin: cannot register the KV pool")
        assert tensor.is_contiguous(), "the KV pool is one contiguous allocation"
        self.name, self.tensor = name, tensor
        self.lock = threading.Lock()
        self.mem_type = "VRAM" if tensor.is_cuda else "DRAM"
        self.device_id = (tensor.device.index or 0) if tensor.is_cuda else 0
        self.registration = self.agent.register_memory(tensor)
        self.metadata: bytes = self.agent.get_agent_metadata()
        self._peers: dict[str, tuple[bytes, int]] = {}  # remote agent name -> (its metadata, users)

    def add_peer(self, name: str, metadata: bytes) -> None:
        """Load remote agent `name` (idempotent: loading the same metadata again only counts one more user;
        new metadata under a known name, an agent that re-registered, replaces the old)."""
        with self.lock:
            known, users = self._peers.get(name, (None, 0))
            if known == metadata:
                self._peers[name] = (metadata, users + 1)
                return
            if known is not None:
                self.agent.remove_remote_agent(name)
                del self._peers[name]
            loaded = self.agent.add_remote_agent(metadata)
            loaded = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
            if loaded != name:
                self.agent.remove_remote_agent(loaded)
                raise TransferError(f"the NIXL metadata is agent {loaded!r}, announced as {name!r}")
            self._peers[name] = (metadata, users + 1)

    def remove_peer(self, name: str) -> None:
        with self.lock:
            entry = self._peers.get(name)
            if entry is None:
                return
            if entry[1] > 1:
                self._peers[name] = (entry[0], entry[1] - 1)
                return
            del self._peers[name]
            try:
                self.agent.remove_remote_agent(name)
            except Exception as e:  # already gone: nothing to undo
                log.debug("removing NIXL peer %s: %s", name, e)

    def knows(self, name: str) -> bool:
        with self.lock:
            return name in self._peers

    def poll_notifs(self) -> dict[str, list[bytes]]:
        """Progress the UCX worker and take the notifications that arrived."""
        with self.lock:
            return self.agent.get_new_notifs()

    def close(self) -> None:
        with self.lock:
            for name in list(self._peers):
                try:
                    self.agent.remove_remote_agent(name)
                except Exception as e:
                    log.debug("removing NIXL peer %s: %s", name, e)
            self._peers.clear()
            try:
                self.agent.deregister_memory(self.registration)
            except Exception as e:
                log.debug("deregistering the KV pool from %s: %s", self.name, e)


# -- handshake envelopes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemotePool:
    """The prefill side's registered pool, as announced in its handshake: [num_layers, 2, num_blocks, ...]
    blocks of block_bytes from base_address."""

    agent_name: str
    agent_metadata: bytes
    base_address: int
    pool_bytes: int
    num_layers: int
    num_blocks: int
    block_bytes: int
    mem_type: str
    device_id: int

    @classmethod
    def decode(cls, data: bytes) -> RemotePool:
        try:
            d = msgpack.unpackb(data)
            pool = cls(
                str(d["name"]),
                bytes(d["agent"]),
                int(d["base"]),
                int(d["pool_bytes"]),
                int(d["num_layers"]),
                int(d["num_blocks"]),
                int(d["block_bytes"]),
                str(d["mem"]),
                int(d["device"]),
            )
            version = int(d["v"])
        except Exception as e:
            raise TransferError(f"unreadable NIXL handshake from the prefill side: {e}") from None
        if version != ENVELOPE_VERSION:
            raise TransferError(f"NIXL handshake version {version}, this side speaks {ENVELOPE_VERSION}")
        if pool.mem_type not in ("DRAM", "VRAM"):
            raise TransferError(f"NIXL handshake: unknown memory type {pool.mem_type!r}")
        if min(pool.num_layers, pool.num_blocks, pool.block_bytes) <= 0 or pool.base_address <= 0:
            raise TransferError(f"NIXL handshake: empty or misplaced pool {pool}")
        if pool.pool_bytes != pool.num_layers * 2 * pool.num_blocks * pool.block_bytes:
            raise TransferError(
                f"NIXL handshake: pool of {pool.pool_bytes} bytes does not match its geometry"
            )
        return pool

    def check(self, msg: pb.LayerReady, num_blocks: int) -> np.ndarray:
        """The message's 2 * num_blocks addresses (K blocks then V blocks of teacher layer msg.layer), after
        checking each is a whole block of that layer's K (resp. V) region and that K[i], V[i] are one block."""
        layer, n, bb = msg.layer, num_blocks, self.block_bytes
        where = f"layer {layer}"
        if msg.base_address != self.base_address:
            raise ChunkError(
                f"{where}: pool base {msg.base_address:#x} is not the handshake's {self.base_address:#x}"
            )
        if msg.block_bytes != bb:
            raise ChunkError(f"{where}: blocks of {msg.block_bytes} bytes, the pool's are {bb}")
        if not 0 <= layer < self.num_layers:
            raise ChunkError(f"{where}: the prefill pool has {self.num_layers} layers")
        if len(msg.addresses) != 2 * n:
            raise ChunkError(f"{where}: {len(msg.addresses)} block addresses, expected 2 x {n}")
        addrs = np.fromiter(msg.addresses, dtype=np.uint64, count=2 * n)
        if (addrs < np.uint64(self.base_address)).any() or (
            addrs >= np.uint64(self.base_address + self.pool_bytes)
        ).any():
            raise ChunkError(f"{where}: a block address lies outside the prefill pool")
        offsets = addrs - np.uint64(self.base_address)
        if (offsets % np.uint64(bb)).any():
            raise ChunkError(f"{where}: a block address is not aligned to the pool's blocks")
        index = (offsets // np.uint64(bb)).astype(np.int64)  # < pool_bytes / bb: fits
        k_blocks = index[:n] - 2 * layer * self.num_blocks
        v_blocks = index[n:] - (2 * layer + 1) * self.num_blocks
        if (k_blocks < 0).any() or (k_blocks >= self.num_blocks).any():
            raise ChunkError(f"{where}: a K block address lies outside the layer's K blocks")
        if not np.array_equal(k_blocks, v_blocks):
            raise ChunkError(f"{where}: the V block addresses are not the K blocks' V")
        if len(np.unique(k_blocks)) != n:
            raise ChunkError(f"{where}: a block is listed twice")
        return addrs


def encode_hello(agent: NixlAgent) -> bytes:
    return msgpack.packb({"v": ENVELOPE_VERSION, "name": agent.name, "agent": agent.metadata})


def decode_hello(hello: bytes) -> tuple[str, bytes]:
    try:
        d = msgpack.unpackb(hello)
        version, name, metadata = int(d["v"]), str(d["name"]), bytes(d["agent"])
    except Exception as e:
        raise TransferError(f"unreadable NIXL handshake from the decode side: {e}") from None
    if version != ENVELOPE_VERSION:
        raise TransferError(f"NIXL handshake version {version}, this side speaks {ENVELOPE_VERSION}")
    return name, metadata
