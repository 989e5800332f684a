"""`KVTransferServer`: the prefill side of the KV channel, an asyncio gRPC server on the worker's KV pool.

Control plane for every backend (challenge/handshake, release, lease renewal, abort) and the gRPC data plane
(`Pull` streams each kept layer's blocks as soon as the prefill has computed that layer). Every call is a
coroutine on one event loop: a pull waiting for a layer holds no thread, so control calls never queue behind
data calls. A transfer is pinned while a call reads it (its blocks are not reused under a reader), and a peer
that disconnects mid-pull aborts its transfer, so its blocks come back at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
import msgpack

from overfill_serve._proto.overfill.v1 import kv_transfer_pb2 as pb
from overfill_serve._proto.overfill.v1 import kv_transfer_pb2_grpc as pb_grpc
from overfill_serve.errors import LayoutMismatchError, TransferError, TransferTimeoutError
from overfill_serve.kv.paged_cache import PagedKVCache
from overfill_serve.model.spec import KVLayout
from overfill_serve.transfer import auth
from overfill_serve.transfer.chunk import encode_chunk_message, encode_done_message, make_chunk
from overfill_serve.transfer.config import READ_GRACE_SECONDS, SESSION_KEY, TransferConfig
from overfill_serve.transfer.registration import Registration
from overfill_serve.transfer.registry import Completion, Transfer, TransferRegistry
from overfill_serve.transfer.status import status_of
from overfill_serve.transfer.waiting import until_changed

log = logging.getLogger(__name__)
ChunkFilter = Callable[[bytes, bytes], tuple[bytes, bytes]]  # test hook: (header, payload) -> sent pair
T = TypeVar("T")


@dataclass(frozen=True)
class Session:
    client_id: str
    layout: KVLayout | None  # the decode side's: its kept layers are what it pulls (None: control only)
    backend: str
    chunk_key: bytes  # signs this session's chunk headers and completions
    expires_at: float  # time.monotonic(); then the peer must handshake again


def completion_to_pb(c: Completion) -> pb.Completion:
    msg = pb.Completion(
        first_token=c.first_token or 0,
        num_tokens=c.num_tokens,
        has_logprob=c.logprob is not None,
        finished=c.finished,
        prompt_continues=c.first_token is None,
        num_cached_tokens=c.num_cached_tokens,
    )
    if c.logprob is not None:
        msg.logprob, msg.rank = c.logprob.logprob, c.logprob.rank or 0
        msg.top_ids.extend(t for t, _ in c.logprob.top)
        msg.top_logprobs.extend(lp for _, lp in c.logprob.top)
    msg.prompt_logprobs.extend(
        pb.ScoredToken(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top_ids=[t for t, _ in lp.top],
            top_logprobs=[v for _, v in lp.top],
            rank=lp.rank or 0,
        )
        for lp in c.prompt_logprobs
    )
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
        self._nonces = auth.Nonces(config.timeout_seconds, config.max_challenges)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()  # sessions: the loop and the sweeper
        self.chunk_filter: ChunkFilter | None = None
        self.blocking: ThreadPoolExecutor | None = None  # the server's, for the few steps that block

    # -- control plane -------------------------------------------------------------------------------------
    async def Challenge(self, request: pb.ChallengeRequest, context: Any) -> pb.ChallengeResponse:
        return pb.ChallengeResponse(server_nonce=self._nonces.issue())

    async def Handshake(self, request: pb.HandshakeRequest, context: Any) -> pb.HandshakeResponse:
        fresh = self._nonces.redeem(request.server_nonce)  # each challenge answers once: no replays
        expected = auth.client_mac(
            self.secret,
            request.server_nonce,
            request.client_nonce,
            request.layout,
            request.nixl_agent_metadata,
        )
        if not fresh or not auth.verify(expected, request.mac):
            log.warning("refused KV-channel peer %r: bad secret or stale challenge", request.client_id)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "peer failed the cluster-secret challenge")
        # A control-only peer (no layout) may release, renew and abort, never pull.
        theirs = await self._peer_layout(request.layout, context) if request.layout else None
        response = pb.HandshakeResponse(layout=msgpack.packb(self.layout.to_dict()))
        if request.backend == "nixl":
            try:
                source = await self._blocking(self._nixl_peer, request.nixl_agent_metadata)
            except TransferError as e:  # no NIXL here, or an unreadable hello: typed, not UNKNOWN
                log.warning("NIXL handshake with %r failed: %s", request.client_id, e)
                await self._abort(context, e)
            response.nixl_agent_metadata, response.nixl_agent_name = source.metadata, source.name
        session = auth.new_session()
        key = auth.chunk_key(self.secret, request.client_nonce, request.server_nonce, session)
        expires_at = time.monotonic() + self.config.session_seconds
        with self._lock:
            self._sessions[session] = Session(request.client_id, theirs, request.backend, key, expires_at)
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

    async def Release(self, request: pb.TransferRef, context: Any) -> pb.Ack:
        await self._session(context)
        self.registry.release(request.transfer_id)
        return pb.Ack()

    async def RenewLease(self, request: pb.TransferRef, context: Any) -> pb.LeaseResponse:
        await self._session(context)
        return pb.LeaseResponse(
            seconds_left=await self._call(context, self.registry.renew, request.transfer_id)
        )

    async def Abort(self, request: pb.AbortRequest, context: Any) -> pb.Ack:
        await self._session(context)
        self.registry.abort(request.transfer_id, f"aborted by the decode side: {request.reason}")
        return pb.Ack()

    @property
    def pending_challenges(self) -> int:
        return len(self._nonces)

    def expire_sessions(self) -> int:
        now = time.monotonic()
        with self._lock:
            stale = [token for token, s in self._sessions.items() if s.expires_at <= now]
            for token in stale:
                del self._sessions[token]
        return len(stale)

    # -- data plane ----------------------------------------------------------------------------------------
    async def Pull(self, request: pb.PullRequest, context: Any) -> AsyncIterator[bytes]:
        """Serialized `KVChunk`s (see `KVTransferServer`: Pull's responses go out as bytes, built here with
        one copy of each run of blocks), each header signed with the session's chunk key."""
        session, layout = await self._pulling_session(context)
        tid = request.transfer_id
        chunk_bytes = min(request.max_chunk_bytes or self.config.chunk_bytes, self.config.chunk_bytes)
        per_chunk = max(1, chunk_bytes // (2 * self.cache.block_bytes))
        complete = await self._read(context, tid)
        async for layer, blocks in self._layers(context, request, layout):
            for start in range(0, len(blocks), per_chunk):
                run = blocks[start : start + per_chunk]
                parts = self.cache.block_bytes_parts(layer, run)
                header = make_chunk(tid, layer, start, len(run), parts).encode()
                payload: list[memoryview] | bytes = parts
                if self.chunk_filter is not None:
                    header, payload = await self._blocking(self.chunk_filter, header, b"".join(parts))
                yield encode_chunk_message(header, payload, auth.chunk_mac(session.chunk_key, header))
        done = completion_to_pb(await self._completion(context, tid)).SerializeToString()
        complete.set()
        yield encode_done_message(done, auth.chunk_mac(session.chunk_key, done))

    async def Describe(self, request: pb.PullRequest, context: Any) -> AsyncIterator[pb.LayerReady]:
        session, layout = await self._pulling_session(context)
        if self.nixl_source is None or session.backend != "nixl":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Describe needs a NIXL handshake")
        tid = request.transfer_id
        complete = await self._read(context, tid, linger=READ_GRACE_SECONDS)
        async for layer, blocks in self._layers(context, request, layout):
            yield auth.sign_message(session.chunk_key, self.nixl_source.describe(layer, blocks))
        completion = await self._completion(context, tid)
        complete.set()
        yield auth.sign_message(session.chunk_key, pb.LayerReady(done=completion_to_pb(completion)))
        # The reader's READs may still be in flight: keep the pin until it is done with them (its NIXL
        # notification or Release ends the transfer, or it ends this call), within its own bound.
        bound = self.config.timeout_seconds + READ_GRACE_SECONDS
        await until_changed(
            self.registry.subscribe, lambda: None if self.registry.is_open(tid) else True, bound
        )

    # -- helpers -------------------------------------------------------------------------------------------
    async def _read(self, context: Any, transfer_id: str, linger: float = 0.0) -> threading.Event:
        """Pin the transfer for this call. A call that ends before its last message (the peer died, cancelled
        or stalled past the bound) aborts the transfer, so its blocks come back now rather than at the end
        of the lease; `linger`: how long they stay pinned after such an end (a NIXL reader may still be
        cancelling reads of the layers it was given)."""
        await self._call(context, self.registry.pin, transfer_id)
        complete, loop = threading.Event(), asyncio.get_running_loop()

        def on_done(_: Any) -> None:
            if complete.is_set():
                self.registry.unpin(transfer_id)
                return
            self.registry.abort(transfer_id, "the pull ended before the transfer completed")
            loop.call_later(linger, self.registry.unpin, transfer_id)

        context.add_done_callback(on_done)
        return complete

    async def _layers(
        self, context: Any, request: pb.PullRequest, layout: KVLayout
    ) -> AsyncIterator[tuple[int, list[int]]]:
        """Each kept layer with the transfer's blocks to send (from the pull's first block on), once that layer
        is final; none after the completion says the request ended on its first token (the decode side
        needs no KV then: `done` follows at once)."""
        for layer in layout.kept_layers:
            transfer = await self._layer(context, request.transfer_id, layer)
            if transfer.finished:
                return
            blocks = list(transfer.block_ids)
            if request.first_block >= len(blocks):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"transfer {request.transfer_id} has {len(blocks)} blocks: none from block "
                    f"{request.first_block} on",
                )
            yield layer, blocks[request.first_block :]

    async def _layer(self, context: Any, transfer_id: str, layer: int) -> Transfer:
        """The transfer once `layer`'s KV is final and in memory."""
        found = await self._wait(context, transfer_id, lambda: self.registry.layer(transfer_id, layer))
        transfer, ready = found
        if ready is not None:
            await self._blocking(ready.synchronize)  # a GPU event: only its kernels' tail
        return transfer

    async def _completion(self, context: Any, transfer_id: str) -> Completion:
        return await self._wait(context, transfer_id, lambda: self.registry.completion(transfer_id))

    async def _wait(self, context: Any, transfer_id: str, check: Callable[[], T | None]) -> T:
        timeout = self.config.timeout_seconds
        try:
            found = await until_changed(self.registry.subscribe, check, timeout)
        except TransferError as e:
            await self._abort(context, e)
        if found is None:
            await self._abort(
                context,
                TransferTimeoutError(f"transfer {transfer_id}: prefill not ready within {timeout:.1f}s"),
            )
        return found

    async def _session(self, context: Any) -> Session:
        token = dict(context.invocation_metadata()).get(SESSION_KEY)
        with self._lock:
            session = self._sessions.get(token) if isinstance(token, str) else None
        if session is None or session.expires_at <= time.monotonic():
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid session: handshake first")
        return session  # type: ignore[return-value]

    async def _pulling_session(self, context: Any) -> tuple[Session, KVLayout]:
        session = await self._session(context)
        if session.layout is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a control-only session cannot pull")
        return session, session.layout  # type: ignore[return-value]

    async def _peer_layout(self, raw: bytes, context: Any) -> KVLayout:
        """The decode side's layout, if this teacher's KV fits it; else the handshake is refused."""
        try:
            theirs = KVLayout.from_dict(msgpack.unpackb(raw))
        except Exception as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unreadable KV layout: {e}")
        problems = self.layout.mismatches(theirs)
        if problems:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(LayoutMismatchError(problems)))
        return theirs

    def _nixl_peer(self, hello: bytes) -> Any:
        """The NIXL source (created on first use), with the decode side's agent loaded."""
        from overfill_serve.transfer.nixl_source import NixlSource

        with self._lock:
            if self.nixl_source is None:
                self.nixl_source = NixlSource(self.cache, self.registry)
        self.nixl_source.add_peer(hello)
        return self.nixl_source

    async def _call(self, context: Any, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except TransferError as e:
            await self._abort(context, e)

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.blocking, fn, *args)

    @staticmethod
    async def _abort(context: Any, error: TransferError) -> NoReturn:
        await context.abort(status_of(error), str(error))
        raise AssertionError("context.abort returns only by raising")


class KVTransferServer:
    """Owns the asyncio gRPC server and the thread its event loop runs on, an executor for the few blocking
    steps, and a sweeper thread that expires leases and sessions."""

    def __init__(self, servicer: KVTransferServicer, config: TransferConfig) -> None:
        self.servicer, self.config = servicer, config
        self._executor = ThreadPoolExecutor(config.max_workers, thread_name_prefix="kv-server")
        servicer.blocking = self._executor
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kv-server", daemon=True)
        self._thread.start()
        self.server, self.port = self._run(self._build())
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="kv-lease-sweeper", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.config.address_host}:{self.port}"

    def start(self) -> KVTransferServer:
        self._run(self.server.start())
        self._sweeper.start()
        return self

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving, then deregister the NIXL pool (after the sweeper's last poll of it)."""
        self._stop.set()
        if self._loop.is_running():
            self._run(self.server.stop(grace))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5.0)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._sweeper.is_alive():
            self._sweeper.join(timeout=5.0)
        if self.servicer.nixl_source is not None:
            self.servicer.nixl_source.close()

    async def _build(self) -> tuple[Any, int]:
        config = self.config
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", config.max_message_bytes),
                # Requests are small; a bigger one is refused before it is read (or hashed).
                ("grpc.max_receive_message_length", config.max_request_bytes),
            ]
        )
        pb_grpc.add_KVTransferServicer_to_server(self.servicer, Registration(server))
        bind = f"{config.host}:{config.port}"
        if config.tls:
            cert, key, ca = config.tls_files()
            creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
            )
            return server, server.add_secure_port(bind, creds)
        return server, server.add_insecure_port(bind)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _sweep(self) -> None:
        period = min(0.2, self.config.lease_seconds / 4)
        while not self._stop.wait(period):
            expired = self.servicer.registry.sweep()
            if expired:
                log.info("expired %d KV transfer lease(s)", len(expired))
            self.servicer.expire_sessions()
            if self.servicer.nixl_source is not None:
                self.servicer.nixl_source.poll_notifications()
