"""`KVTransferServer`: the prefill side of the KV channel, a gRPC server on the worker's KV pool.

Control plane for every backend (challenge/handshake, release, lease renewal, abort) and the gRPC data plane
(`Pull` streams each kept layer's blocks as soon as the prefill has computed that layer). A decode peer that
disconnects mid-pull aborts its transfer, so its blocks come back at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import msgpack

from overfill_serve._proto.overfill.v1 import kv_transfer_pb2 as pb
from overfill_serve._proto.overfill.v1 import kv_transfer_pb2_grpc as pb_grpc
from overfill_serve.errors import LayoutMismatchError, TransferError
from overfill_serve.kv.paged_cache import PagedKVCache
from overfill_serve.model.spec import KVLayout
from overfill_serve.transfer import auth
from overfill_serve.transfer.chunk import encode_chunk_message, make_chunk
from overfill_serve.transfer.config import SESSION_KEY, TransferConfig
from overfill_serve.transfer.registry import Completion, TransferRegistry
from overfill_serve.transfer.status import status_of

log = logging.getLogger(__name__)
ChunkFilter = Callable[[bytes, bytes], tuple[bytes, bytes]]  # test hook: (header, payload) -> sent pair


@dataclass(frozen=True)
class Session:
    client_id: str
    layout: KVLayout | None  # the decode side's: its kept layers are what it pulls (None: control only)
    backend: str


def completion_to_pb(c: Completion) -> pb.Completion:
    msg = pb.Completion(first_token=c.first_token, num_tokens=c.num_tokens, has_logprob=c.logprob is not None)
    if c.logprob is not None:
        msg.logprob = c.logprob.logprob
        msg.top_ids.extend(t for t, _ in c.logprob.top)
        msg.top_logprobs.extend(lp for _, lp in c.logprob.top)
    return msg


class KVTransferServicer(pb_grpc.KVTransferServicer):
    def __init__(
        self,
        cache: PagedKVCache,
        registry: TransferRegistry,
        layout: KVLayout,
        config: TransferConfig,
        secret: bytes,
        nixl_source: Any = None,
    ) -> None:
        self.cache, self.registry, self.layout, self.config = cache, registry, layout, config
        self.secret = secret
        self.nixl_source = nixl_source  # created on the first NIXL handshake (the pool registered once)
        self._nonces: set[bytes] = set()
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.chunk_filter: ChunkFilter | None = None

    # -- control plane -------------------------------------------------------------------------------------
    def Challenge(self, request: pb.ChallengeRequest, context: grpc.ServicerContext) -> pb.ChallengeResponse:
        nonce = auth.new_nonce()
        with self._lock:
            self._nonces.add(nonce)
        return pb.ChallengeResponse(server_nonce=nonce)

    def Handshake(self, request: pb.HandshakeRequest, context: grpc.ServicerContext) -> pb.HandshakeResponse:
        with self._lock:
            fresh = request.server_nonce in self._nonces
            self._nonces.discard(request.server_nonce)  # each challenge answers once: no replays
        expected = auth.client_mac(
            self.secret,
            request.server_nonce,
            request.client_nonce,
            request.layout,
            request.nixl_agent_metadata,
        )
        if not fresh or not auth.verify(expected, request.mac):
            log.warning("refused KV-channel peer %r: bad secret or stale challenge", request.client_id)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "peer failed the cluster-secret challenge")
        # A control-only peer (no layout) may release, renew and abort, never pull.
        theirs = self._peer_layout(request.layout, context) if request.layout else None
        response = pb.HandshakeResponse(layout=msgpack.packb(self.layout.to_dict()))
        if request.backend == "nixl":
            from overfill_serve.transfer.nixl_source import NixlSource

            try:
                with self._lock:
                    if self.nixl_source is None:
                        self.nixl_source = NixlSource(self.cache, self.registry)
                self.nixl_source.add_peer(request.nixl_agent_metadata)
            except TransferError as e:  # no NIXL here, or an unreadable hello: typed, not UNKNOWN
                log.warning("NIXL handshake with %r failed: %s", request.client_id, e)
                context.abort(status_of(e), str(e))
            response.nixl_agent_metadata = self.nixl_source.metadata
            response.nixl_agent_name = self.nixl_source.name
        session = auth.new_session()
        with self._lock:
            self._sessions[session] = Session(request.client_id, theirs, request.backend)
        response.session = session
        response.mac = auth.server_mac(
            self.secret,
            request.client_nonce,
            request.server_nonce,
            session,
            response.layout,
            response.nixl_agent_metadata,
        )
        return response

    def Release(self, request: pb.TransferRef, context: grpc.ServicerContext) -> pb.Ack:
        self._session(context)
        self.registry.release(request.transfer_id)
        return pb.Ack()

    def RenewLease(self, request: pb.TransferRef, context: grpc.ServicerContext) -> pb.LeaseResponse:
        self._session(context)
        return pb.LeaseResponse(seconds_left=self._call(context, self.registry.renew, request.transfer_id))

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.Ack:
        self._session(context)
        self.registry.abort(request.transfer_id, f"aborted by the decode side: {request.reason}")
        return pb.Ack()

    # -- data plane ----------------------------------------------------------------------------------------
    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Serialized `KVChunk`s (see `KVTransferServer`: Pull's responses go out as bytes, built here with
        one copy of each run of blocks)."""
        _, layout = self._pulling_session(context)
        tid, timeout = request.transfer_id, self.config.timeout_seconds
        chunk_bytes = min(request.max_chunk_bytes or self.config.chunk_bytes, self.config.chunk_bytes)
        per_chunk = max(1, chunk_bytes // (2 * self.cache.block_bytes))
        complete = self._abort_unless_completed(context, tid)
        for layer in layout.kept_layers:
            transfer = self._call(context, self.registry.wait_layer, tid, layer, timeout)
            blocks = list(transfer.block_ids)
            for start in range(0, len(blocks), per_chunk):
                run = blocks[start : start + per_chunk]
                parts = self.cache.block_bytes_parts(layer, run)
                header = make_chunk(tid, layer, start, len(run), parts).encode()
                payload: list[memoryview] | bytes = parts
                if self.chunk_filter is not None:
                    header, payload = self.chunk_filter(header, b"".join(parts))
                yield encode_chunk_message(header, payload)
        completion = self._call(context, self.registry.wait_complete, tid, timeout)
        complete.set()
        yield pb.KVChunk(done=completion_to_pb(completion)).SerializeToString()

    def Describe(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.LayerReady]:
        session, layout = self._pulling_session(context)
        if self.nixl_source is None or session.backend != "nixl":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Describe needs a NIXL handshake")
        tid, timeout = request.transfer_id, self.config.timeout_seconds
        complete = self._abort_unless_completed(context, tid)
        for layer in layout.kept_layers:
            transfer = self._call(context, self.registry.wait_layer, tid, layer, timeout)
            yield self.nixl_source.describe(layer, list(transfer.block_ids))
        completion = self._call(context, self.registry.wait_complete, tid, timeout)
        complete.set()
        yield pb.LayerReady(done=completion_to_pb(completion))

    # -- helpers -------------------------------------------------------------------------------------------
    def _session(self, context: grpc.ServicerContext) -> Session:
        token = dict(context.invocation_metadata()).get(SESSION_KEY)
        with self._lock:
            session = self._sessions.get(token) if isinstance(token, str) else None
        if session is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid session: handshake first")
        return session  # type: ignore[return-value]

    def _pulling_session(self, context: grpc.ServicerContext) -> tuple[Session, KVLayout]:
        session = self._session(context)
        if session.layout is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a control-only session cannot pull")
        return session, session.layout  # type: ignore[return-value]

    def _peer_layout(self, raw: bytes, context: grpc.ServicerContext) -> KVLayout:
        """The decode side's layout, if this teacher's KV fits it; else the handshake is refused."""
        try:
            theirs = KVLayout.from_dict(msgpack.unpackb(raw))
        except Exception as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unreadable KV layout: {e}")
        problems = self.layout.mismatches(theirs)
        if problems:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(LayoutMismatchError(problems)))
        return theirs

    def _call(self, context: grpc.ServicerContext, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except TransferError as e:
            context.abort(status_of(e), str(e))

    def _abort_unless_completed(self, context: grpc.ServicerContext, transfer_id: str) -> threading.Event:
        """A pull that ends before its last message (the peer died, cancelled or stalled past the bound)
        aborts the transfer, so its blocks come back now rather than at the end of the lease."""
        complete = threading.Event()

        def on_rpc_done() -> None:
            if not complete.is_set():
                self.registry.abort(transfer_id, "the pull ended before the transfer completed")

        context.add_callback(on_rpc_done)
        return complete


class _PullAsBytes:
    """The generated registration, passed to the real server with `Pull`'s responses sent as the bytes the
    servicer built (no protobuf object or re-serialization on the data path)."""

    def __init__(self, server: grpc.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # rebuilt below from the same method table

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        handlers = {**handlers, "Pull": handlers["Pull"]._replace(response_serializer=None)}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        self.server.add_registered_method_handlers(service, handlers)


class KVTransferServer:
    """Owns the grpc.Server, and a sweeper thread that expires leases."""

    def __init__(self, servicer: KVTransferServicer, config: TransferConfig) -> None:
        self.servicer, self.config = servicer, config
        opts = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
        ]
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers), options=opts)
        pb_grpc.add_KVTransferServicer_to_server(servicer, _PullAsBytes(self.server))
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="kv-lease-sweeper", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> KVTransferServer:
        self.server.start()
        self._sweeper.start()
        return self

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving, then deregister the NIXL pool (after the sweeper's last poll of it)."""
        self._stop.set()
        self.server.stop(grace).wait()
        if self._sweeper.is_alive():
            self._sweeper.join(timeout=5.0)
        if self.servicer.nixl_source is not None:
            self.servicer.nixl_source.close()

    def _sweep(self) -> None:
        period = min(0.2, self.config.lease_seconds / 4)
        while not self._stop.wait(period):
            expired = self.servicer.registry.sweep()
            if expired:
                log.info("expired %d KV transfer lease(s)", len(expired))
            if self.servicer.nixl_source is not None:
                self.servicer.nixl_source.poll_notifications()
