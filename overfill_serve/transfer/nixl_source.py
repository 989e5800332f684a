"""`NixlSource`: the prefill side of the NIXL backend (the design is in `nixl_agent`): its pool registered once,
block descriptors for `Describe`, transfers freed on the decode side's notification, and the bursts of polls
that stand in for NIXL's progress thread."""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from overfill_serve._proto.overfill.v1 import kv_transfer_pb2 as pb
from overfill_serve.errors import TransferError
from overfill_serve.kv.paged_cache import PagedKVCache
from overfill_serve.transfer.nixl_agent import (
    ENVELOPE_VERSION,
    POLL_MAX_SECONDS,
    POLL_MIN_SECONDS,
    NixlAgent,
    decode_hello,
)

if TYPE_CHECKING:
    from overfill_serve.transfer.registry import TransferRegistry

log = logging.getLogger(__name__)


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
        self._agent = NixlAgent(f"overfill-prefill-{uuid.uuid4().hex}", cache.tensor)
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
        name, metadata = decode_hello(hello)
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


def _close_source(bursts: _ProgressBursts, agent: NixlAgent) -> None:
    bursts.stop()
    agent.close()
