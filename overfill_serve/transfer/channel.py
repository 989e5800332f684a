"""`KVChannel`: an authenticated connection to one prefill worker's KV server — a decode worker's, which pulls
KV into its pool through a transport, or a control-only one (release / renew / abort), as the ingress uses
through `TransferControl`.

A call refused as unauthenticated (the prefill worker restarted on the same address, or the session expired)
re-handshakes once and is retried: a cached channel outlives its peer's restarts."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import msgpack

from overfill_serve._proto.overfill.v1 import kv_transfer_pb2 as pb
from overfill_serve._proto.overfill.v1 import kv_transfer_pb2_grpc as pb_grpc
from overfill_serve.errors import AuthenticationError, LayoutMismatchError, TransferError
from overfill_serve.kv.paged_cache import PagedKVCache
from overfill_serve.model.spec import KVLayout
from overfill_serve.transfer import auth
from overfill_serve.transfer.config import SESSION_KEY, TransferConfig
from overfill_serve.transfer.grpc_stream import GrpcStreamTransport
from overfill_serve.transfer.registry import Completion
from overfill_serve.transfer.status import error_from_rpc
from overfill_serve.transfer.transport import KVTransport, Link

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class TransferStats:
    transfer_id: str
    backend: str
    nbytes: int
    seconds: float  # from the pull's start to the completion
    queue_seconds: float  # from the pull's start to the first KV byte (waiting on the prefill included)
    saved_bytes: int = 0  # KV not sent: the blocks this side's prefix cache held already

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def make_transport(backend: str, cache: PagedKVCache) -> KVTransport:
    if backend == "nixl":
        from overfill_serve.transfer.nixl_transport import NixlTransport  # needs the nixl package

        return NixlTransport(cache)
    return GrpcStreamTransport(cache)


class KVChannel:
    def __init__(
        self,
        address: str,
        config: TransferConfig,
        layout: KVLayout | None = None,
        cache: PagedKVCache | None = None,
        client_id: str = "decode",
        transport: KVTransport | None = None,
    ) -> None:
        """Without `layout` and `cache`: a control-only channel, which can release, renew and abort but not
        pull. With them: the kept layers to receive, and the pool they land in."""
        assert (layout is None) == (cache is None), "a channel that pulls needs both its layout and its pool"
        assert cache is None or layout is None or cache.num_layers == len(layout.kept_layers), (
            "the pool holds the kept layers"
        )
        self.address, self.config, self.layout, self.client_id = address, config, layout, client_id
        self.secret = auth.load_secret(config.secret)
        if transport is None and cache is not None:
            transport = make_transport(config.backend, cache)
        self.transport = transport
        opts = [
            ("grpc.max_send_message_length", config.max_request_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
        ]
        if config.tls:
            cert, key, ca = config.tls_files()
            creds = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key, certificate_chain=cert
            )
            self.grpc_channel = grpc.secure_channel(address, creds, options=opts)
        else:
            self.grpc_channel = grpc.insecure_channel(address, options=opts)
        self.stub = pb_grpc.KVTransferStub(self.grpc_channel)
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.link: Link | None = None
        self._handshake_lock = threading.Lock()

    def connect(self) -> KVChannel:
        """Challenge-response handshake: both sides prove the secret, both check the layouts."""
        t = self.config.timeout_seconds
        layout_bytes = msgpack.packb(self.layout.to_dict()) if self.layout is not None else b""
        hello = self.transport.hello() if self.transport is not None else b""
        try:
            server_nonce = self.stub.Challenge(pb.ChallengeRequest(), timeout=t).server_nonce
            client_nonce = auth.new_nonce()
            response = self.stub.Handshake(
                pb.HandshakeRequest(
                    client_id=self.client_id,
                    server_nonce=server_nonce,
                    client_nonce=client_nonce,
                    layout=layout_bytes,
                    mac=auth.client_mac(self.secret, server_nonce, client_nonce, layout_bytes, hello),
                    backend=self.transport.name if self.transport is not None else "",
                    nixl_agent_metadata=hello,
                ),
                timeout=t,
            )
        except grpc.RpcError as e:
            raise error_from_rpc(e, f"handshake with {self.address}") from None
        expected = auth.server_mac(
            self.secret,
            client_nonce,
            server_nonce,
            response.session,
            response.layout,
            response.nixl_agent_metadata,
        )
        if not auth.verify(expected, response.mac):
            raise AuthenticationError(f"{self.address} failed to prove the cluster secret")
        metadata = ((SESSION_KEY, response.session),)
        if self.layout is None or self.transport is None:
            self.metadata = metadata
            return self  # control only
        remote = KVLayout.from_dict(msgpack.unpackb(response.layout))
        problems = remote.mismatches(self.layout)
        if problems:
            raise LayoutMismatchError(problems)
        # Pull's responses arrive as bytes, decoded by hand (chunk.py: no copy of the payload on the way).
        pull_raw = self.grpc_channel.unary_stream(
            "/overfill.v1.KVTransfer/Pull", request_serializer=pb.PullRequest.SerializeToString
        )
        key = auth.chunk_key(self.secret, client_nonce, server_nonce, response.session)
        link = Link(self.address, self.stub, pull_raw, metadata, self.layout, remote, self.config, key)
        self.transport.connected(link, response)
        self.metadata, self.link = metadata, link
        return self

    def pull(
        self, transfer_id: str, dest_blocks: list[int], num_tokens: int, first_block: int = 0
    ) -> tuple[Completion, TransferStats]:
        """Receive a transfer's blocks from `first_block` on (this side holds the KV of the ones before) into
        dest_blocks, then release it on the prefill side. On any failure the prefill side is told to abort
        (best effort) and a `TransferError` is raised."""
        assert self.link is not None and self.transport is not None, (
            "connect() first, on a channel that pulls"
        )
        transport = self.transport
        start = time.perf_counter()
        try:
            received = self._authenticated(
                lambda: transport.receive(self._link(), transfer_id, dest_blocks, num_tokens, first_block)
            )
        except TransferError as e:
            self.abort(transfer_id, str(e))
            raise
        end = time.perf_counter()
        self.release(transfer_id)
        stats = TransferStats(
            transfer_id,
            self.transport.name,
            received.nbytes,
            end - start,
            (received.first_byte_at or end) - start,
            first_block * 2 * transport.cache.block_bytes * transport.cache.num_layers,
        )
        log.debug(
            "transfer %s: %d bytes in %.4fs (%.2f GB/s, queued %.4fs) over %s",
            transfer_id,
            stats.nbytes,
            stats.seconds,
            stats.gbps,
            stats.queue_seconds,
            stats.backend,
        )
        return received.completion, stats

    def release(self, transfer_id: str) -> None:
        self._control(self.stub.Release, pb.TransferRef(transfer_id=transfer_id), "release")

    def renew(self, transfer_id: str) -> float:
        return self._control(
            self.stub.RenewLease, pb.TransferRef(transfer_id=transfer_id), "renew"
        ).seconds_left

    def abort(self, transfer_id: str, reason: str) -> None:
        """Best effort: a dead peer's transfers are cleaned up on its side by its own lease or restart."""
        try:
            self._control(self.stub.Abort, pb.AbortRequest(transfer_id=transfer_id, reason=reason), "abort")
        except TransferError as e:
            log.debug("abort of %s not delivered: %s", transfer_id, e)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.grpc_channel.close()

    def _control(self, rpc: Any, request: Any, what: str) -> Any:
        def call() -> Any:
            try:
                return rpc(request, metadata=self.metadata, timeout=self.config.timeout_seconds)
            except grpc.RpcError as e:
                raise error_from_rpc(e, f"{what} with {self.address}") from None

        return self._authenticated(call)

    def _authenticated(self, call: Callable[[], T]) -> T:
        """`call()`, and if the peer no longer knows our session, once more after a new handshake. (A refused
        session fails a call before it reads or writes any KV, so the retry is safe.)"""
        session = self.metadata
        try:
            return call()
        except AuthenticationError:
            with self._handshake_lock:
                if self.metadata == session:  # not already renewed by a concurrent call
                    log.info("KV channel to %s: session refused, handshaking again", self.address)
                    self.connect()
            return call()

    def _link(self) -> Link:
        assert self.link is not None, "connect() first, on a channel that pulls"
        return self.link
