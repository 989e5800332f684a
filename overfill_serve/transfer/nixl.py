"""NIXL backend of the KV channel: the decode side READs the prefill side's registered pool (RDMA over UCX).

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
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import msgpack
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
from overfill_serve.transfer.status import error_from_rpc
from overfill_serve.transfer.transport import KVTransport, Received, completion_from_pb

if TYPE_CHECKING:
    import torch

    from overfill_serve.transfer.channel import KVChannel
    from overfill_serve.transfer.registry import TransferRegistry

log = logging.getLogger(__name__)

ENVELOPE_VERSION = 1
POLL_MIN_SECONDS = 50e-6  # first sleep between two polls of a NIXL agent; doubles up to POLL_MAX_SECONDS
POLL_MAX_SECONDS = 1e-3
CANCEL_GRACE_SECONDS = 5.0  # how long a failed receive waits for a read NIXL could not cancel
INSTALL_HINT = "pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1"


def nixl_available() -> bool:
    try:
        _nixl_api()
    except ImportError:
        return False
    return True


def _nixl_api() -> Any:
    from nixl import _api  # the CUDA-major dispatcher; works on CPU-only hosts too

    return _api


def _backoff() -> Callable[[], None]:
    delay = POLL_MIN_SECONDS

    def sleep() -> None:
        nonlocal delay
        time.sleep(delay)
        delay = min(2 * delay, POLL_MAX_SECONDS)

    return sleep


def _nixl_error(e: Exception, what: str) -> TransferError:
    """A NIXL call failed. The descriptors were checked before, so it is the peer (dead, or its metadata
    stale): the transfer is retried elsewhere, not blamed on the data."""
    if type(e).__name__ == "nixlRemoteDisconnectError":
        return PeerUnavailableError(f"{what}: the NIXL peer disconnected")
    return PeerUnavailableError(f"{what}: NIXL failed ({type(e).__name__}: {e})")


class _Agent:
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


def _hello(agent: _Agent) -> bytes:
    return msgpack.packb({"v": ENVELOPE_VERSION, "name": agent.name, "agent": agent.metadata})


def _peer_hello(hello: bytes) -> tuple[str, bytes]:
    try:
        d = msgpack.unpackb(hello)
        version, name, metadata = int(d["v"]), str(d["name"]), bytes(d["agent"])
    except Exception as e:
        raise TransferError(f"unreadable NIXL handshake from the decode side: {e}") from None
    if version != ENVELOPE_VERSION:
        raise TransferError(f"NIXL handshake version {version}, this side speaks {ENVELOPE_VERSION}")
    return name, metadata


# -- prefill side ------------------------------------------------------------------------------------------


class _ProgressBursts:
    """A thread that polls `poll` for `linger` seconds after each kick, with a sleep that grows from 50 us to
    1 ms from the first kick of a burst (and from each urgent one), and otherwise sleeps on an event. Kicks in
    the middle of a burst keep it going without restarting the fast polls (the burst thread would otherwise
    contend for the GIL with the thread streaming the descriptors). Holds `poll` weakly: ends with its owner."""

    def __init__(self, poll: Callable[[], Any], linger: float, name: str) -> None:
        self._poll = weakref.WeakMethod(poll)
        self._linger, self._name = linger, name
        self._kick = threading.Event()
        self._until = 0.0
        self._urgent = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def kick(self, urgent: bool = False) -> None:
        self._until = time.monotonic() + self._linger
        self._urgent = self._urgent or urgent
        if self._thread is None:
            with self._start_lock:
                if self._thread is None and not self._stopped:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()
        self._kick.set()

    def stop(self) -> None:
        self._stopped = True
        self._kick.set()

    def _run(self) -> None:
        delay = POLL_MIN_SECONDS
        while not self._stopped:
            if time.monotonic() >= self._until:
                self._kick.wait()  # idle: no CPU until the next kick
                delay = POLL_MIN_SECONDS
            self._kick.clear()
            if self._urgent:
                self._urgent, delay = False, POLL_MIN_SECONDS
            if self._stopped:
                return
            poll = self._poll()
            if poll is None:
                return
            poll()
            del poll
            self._kick.wait(delay)  # a kick cuts the sleep short
            delay = min(2 * delay, POLL_MAX_SECONDS)


class NixlSource:
    """The prefill side: one NIXL agent with the KV pool registered once; stays passive. `describe` gives
    the descriptors of one layer's blocks; `poll_notifications` frees the transfers whose reads are done."""

    def __init__(
        self, cache: PagedKVCache, registry: TransferRegistry, *, linger_seconds: float = 1.0
    ) -> None:
        self.cache, self.registry = cache, registry
        self._agent = _Agent(f"overfill-prefill-{uuid.uuid4().hex}", cache.tensor)
        self.name = self._agent.name
        self.metadata: bytes = msgpack.packb(
            {
                "v": ENVELOPE_VERSION,
                "name": self.name,
                "agent": self._agent.metadata,
                "base": cache.tensor.data_ptr(),
                "pool_bytes": cache.nbytes,
                "num_layers": cache.num_layers,
                "num_blocks": cache.num_blocks,
                "block_bytes": cache.block_bytes,
                "mem": self._agent.mem_type,
                "device": self._agent.device_id,
            }
        )
        self._bursts = _ProgressBursts(self.poll_notifications, linger_seconds, "nixl-prefill-progress")
        self._finalizer = weakref.finalize(self, _close_source, self._bursts, self._agent)

    def add_peer(self, hello: bytes) -> str:
        """Load a decode side's agent from its handshake (idempotent); returns its NIXL name."""
        name, metadata = _peer_hello(hello)
        try:
            self._agent.add_peer(name, metadata)
        except TransferError:
            raise
        except Exception as e:
            raise TransferError(f"cannot load the decode side's NIXL agent: {e}") from None
        self._bursts.kick(urgent=True)  # the peer's connection setup needs this side's progress
        return name

    def remove_peer(self, name: str) -> None:
        """Forget a decode side's agent (e.g. when its session ends); unknown names are ignored."""
        self._agent.remove_peer(name)

    def describe(self, layer: int, block_ids: list[int]) -> pb.LayerReady:
        """Where layer `layer`'s blocks are: K blocks then V blocks, in transfer order."""
        blocks = np.asarray(block_ids, dtype=np.uint64) * np.uint64(self.cache.block_bytes)
        k = np.uint64(self.cache.block_address(layer, 0, 0)) + blocks
        v = np.uint64(self.cache.block_address(layer, 1, 0)) + blocks
        msg = pb.LayerReady(
            layer=layer, base_address=self.cache.tensor.data_ptr(), block_bytes=self.cache.block_bytes
        )
        msg.addresses.extend(np.concatenate([k, v]).tolist())
        self._bursts.kick()  # the read that follows may need this side's progress
        return msg

    def poll_notifications(self) -> list[str]:
        """Progress the agent; release every transfer a peer notified as read. Returns their ids."""
        try:
            notifs = self._agent.poll_notifs()
        except Exception as e:
            log.warning("polling NIXL notifications failed: %s", e)
            return []
        released = []
        for peer, messages in notifs.items():
            peer_name = peer.decode(errors="replace") if isinstance(peer, bytes) else str(peer)
            if not self._agent.knows(peer_name):
                log.warning("ignored %d NIXL notification(s) from unknown agent %r", len(messages), peer_name)
                continue
            for message in messages:
                try:
                    transfer_id = bytes(message).decode("ascii")
                except UnicodeDecodeError:
                    log.warning("ignored a NIXL notification that is not a transfer id: %r", message[:64])
                    continue
                self.registry.release(transfer_id)  # an unknown or ended id is a no-op
                released.append(transfer_id)
        return released

    def close(self) -> None:
        self._finalizer()


def _close_source(bursts: _ProgressBursts, agent: _Agent) -> None:
    bursts.stop()
    agent.close()


# -- decode side -------------------------------------------------------------------------------------------

_decode_agents: dict[int, tuple[_Agent, int]] = {}  # id(pool tensor) -> (agent, users): one per pool
_decode_agents_lock = threading.Lock()


def _acquire_decode_agent(cache: PagedKVCache) -> _Agent:
    with _decode_agents_lock:
        agent, users = _decode_agents.get(id(cache.tensor), (None, 0))
        if agent is None or agent.tensor is not cache.tensor:
            agent, users = _Agent(f"overfill-decode-{uuid.uuid4().hex}", cache.tensor), 0
        _decode_agents[id(cache.tensor)] = (agent, users + 1)
        return agent


def _release_decode_agent(agent: _Agent) -> None:
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

    def __init__(self, agent: _Agent, remote: RemotePool, remote_name: str, transfer_id: str) -> None:
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
                raise _nixl_error(e, self.what) from None
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
                    raise _nixl_error(e, self.what) from None
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
        deadline, sleep = time.monotonic() + timeout, _backoff()
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
        deadline, sleep = time.monotonic() + CANCEL_GRACE_SECONDS, _backoff()
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

    def __init__(self, cache: PagedKVCache | None = None) -> None:
        self._agent: _Agent | None = None
        self._cache: PagedKVCache | None = None
        self._remote: RemotePool | None = None
        self._remote_name: str | None = None
        if cache is not None:
            self.prepare(cache)

    def prepare(self, cache: PagedKVCache) -> None:
        """Register (once per pool) the pool the reads land in: before `hello`."""
        if self._agent is not None:
            if cache is not self._cache:
                raise ValueError("this NixlTransport is bound to another KV pool")
            return
        self._agent, self._cache = _acquire_decode_agent(cache), cache

    def hello(self) -> bytes:
        if self._agent is None:
            raise TransferError("NixlTransport.prepare(cache) must run before the handshake")
        return _hello(self._agent)

    def connected(self, channel: KVChannel, response: pb.HandshakeResponse) -> None:
        agent, cache = self._agent, self._cache
        assert agent is not None and cache is not None and channel.cache is cache, (
            "prepare(channel.cache) first"
        )
        remote = RemotePool.decode(response.nixl_agent_metadata)
        if remote.agent_name != response.nixl_agent_name:
            raise TransferError(f"NIXL agent {remote.agent_name!r} announced as {response.nixl_agent_name!r}")
        problems = []
        if remote.block_bytes != cache.block_bytes:
            problems.append(f"NIXL block bytes: {cache.block_bytes} != {remote.block_bytes}")
        if (
            channel.remote_layout is not None
            and remote.num_layers != channel.remote_layout.num_teacher_layers
        ):
            problems.append(
                f"NIXL pool layers: {remote.num_layers} != {channel.remote_layout.num_teacher_layers}"
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
        self, channel: KVChannel, transfer_id: str, dest_blocks: list[int], num_tokens: int
    ) -> Received:
        agent, remote, remote_name, cache = self._agent, self._remote, self._remote_name, self._cache
        if agent is None or remote is None or remote_name is None or cache is None:
            raise TransferError("the NIXL transport is not connected")
        assert channel.cache is cache, "the channel's pool is the one this transport registered"
        config = channel.config
        local_layer = {teacher_layer: j for j, teacher_layer in enumerate(channel.layout.kept_layers)}
        dest = np.asarray(dest_blocks, dtype=np.int64)
        assert dest.size and dest.min() >= 0 and dest.max() < cache.num_blocks, (
            "destination blocks in the pool"
        )
        dest_offsets = np.multiply(dest.astype(np.uint64), cache.block_bytes, dtype=np.uint64)
        seen: set[int] = set()
        nbytes, first_byte_at = 0, 0.0
        reads = _Reads(agent, remote, remote_name, transfer_id)
        stream = channel.stub.Describe(
            pb.PullRequest(transfer_id=transfer_id), metadata=channel.metadata, timeout=config.timeout_seconds
        )
        try:
            for msg in stream:
                if msg.HasField("done"):
                    completion = completion_from_pb(msg.done, num_tokens)
                    missing = sorted(set(local_layer) - seen)
                    if missing:
                        raise ChunkError(
                            f"transfer {transfer_id} completed with layers {missing} never described"
                        )
                    reads.wait(config.timeout_seconds)
                    reads.notify(transfer_id)
                    return Received(completion, nbytes, first_byte_at)
                if msg.layer not in local_layer:
                    raise ChunkError(f"transfer {transfer_id}: layer {msg.layer} is not one this side keeps")
                if msg.layer in seen:
                    raise ChunkError(f"transfer {transfer_id}: layer {msg.layer} described twice")
                seen.add(msg.layer)
                remote_addrs = remote.check(msg, len(dest_blocks))
                j = local_layer[msg.layer]
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
