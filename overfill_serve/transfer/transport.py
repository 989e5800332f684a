"""`KVTransport`: how a decode worker receives a transfer's KV into its own blocks (the data plane).

Two implementations, chosen by `TransferConfig.backend`: `GrpcStreamTransport` (chunked bytes over the
control channel's gRPC connection; any TCP network) and `NixlTransport` (RDMA READs of the prefill side's
registered pool; descriptors come over gRPC).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from overfill_serve._proto.overfill.v1 import kv_transfer_pb2 as pb
from overfill_serve._proto.overfill.v1 import kv_transfer_pb2_grpc as pb_grpc
from overfill_serve.errors import ChunkError
from overfill_serve.kv.paged_cache import PagedKVCache
from overfill_serve.model.spec import KVLayout
from overfill_serve.request import TokenLogprob
from overfill_serve.transfer.config import TransferConfig
from overfill_serve.transfer.registry import Completion


@dataclass(frozen=True)
class Link:
    """What a transport needs of a connected channel: its RPCs, its session and what to receive."""

    address: str
    stub: pb_grpc.KVTransferStub
    pull_raw: Callable[..., Any]  # Pull, its responses left as bytes (chunk.py decodes them without copies)
    metadata: tuple[tuple[str, str], ...]  # the handshake's session
    layout: KVLayout  # this side's: the kept layers it receives
    remote_layout: KVLayout
    config: TransferConfig
    chunk_key: bytes  # the session's: signs each chunk header and the completion


@dataclass(frozen=True)
class Received:
    completion: Completion
    nbytes: int
    first_byte_at: float  # time.perf_counter() when the first KV byte arrived (queue time ends there)


class KVTransport(ABC):
    name: str

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache  # this side's pool, where every transfer lands

    def hello(self) -> bytes:
        """What this transport adds to the handshake (a NIXL agent's metadata)."""
        return b""

    def connected(self, link: Link, response: pb.HandshakeResponse) -> None:  # noqa: B027 (optional hook)
        """Handshake done: e.g. load the remote NIXL agent."""

    @abstractmethod
    def receive(
        self, link: Link, transfer_id: str, dest_blocks: list[int], num_tokens: int, first_block: int = 0
    ) -> Received:
        """Fill dest_blocks (this side's pool) with the KV of the transfer's blocks from `first_block` on
        (this side holds the ones before), of its num_tokens prompt tokens, kept layers only (fewer when the
        completion says the request finished on its first token); return the completion. Raises a
        `TransferError`; writes nothing outside dest_blocks."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        pass


def completion_from_pb(msg: pb.Completion, expected_tokens: int, vocab_size: int) -> Completion:
    """The peer's completion, checked: the engine takes its first token and scores as they are."""
    if msg.num_tokens != expected_tokens:
        raise ChunkError(f"completion covers {msg.num_tokens} tokens, expected {expected_tokens}")
    if msg.prompt_continues and (msg.finished or msg.has_logprob):
        raise ChunkError("the peer's completion has no first token, yet says how it ends or scores it")
    tops = [(msg.top_ids, msg.top_logprobs)] if msg.has_logprob else []
    tops += [(s.top_ids, s.top_logprobs) for s in msg.prompt_logprobs]
    ids = [msg.first_token, *(s.token_id for s in msg.prompt_logprobs), *(t for top, _ in tops for t in top)]
    if not all(0 <= t < vocab_size for t in ids):
        raise ChunkError(
            f"the peer's first token (or a scored token) is outside the vocabulary of {vocab_size}"
        )
    if any(len(top) != len(values) for top, values in tops):
        raise ChunkError("the peer's top logprobs do not match its top tokens")
    logprob = None
    if msg.has_logprob:
        top = tuple(zip(msg.top_ids, msg.top_logprobs))
        logprob = TokenLogprob(msg.first_token, msg.logprob, top, msg.rank or None)
    prompt = tuple(
        TokenLogprob(s.token_id, s.logprob, tuple(zip(s.top_ids, s.top_logprobs)), s.rank or None)
        for s in msg.prompt_logprobs
    )
    first = None if msg.prompt_continues else msg.first_token
    if msg.num_cached_tokens > msg.num_tokens:
        raise ChunkError(
            f"the peer says {msg.num_cached_tokens} of {msg.num_tokens} prompt tokens were cached"
        )
    return Completion(first, msg.num_tokens, logprob, msg.finished, prompt, msg.num_cached_tokens)
