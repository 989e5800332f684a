from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChallengeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChallengeResponse(_message.Message):
    __slots__ = ("server_nonce",)
    SERVER_NONCE_FIELD_NUMBER: _ClassVar[int]
    server_nonce: bytes
    def __init__(self, server_nonce: _Optional[bytes] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("client_id", "server_nonce", "client_nonce", "layout", "mac", "backend", "nixl_agent_metadata")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_NONCE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    NIXL_AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    server_nonce: bytes
    client_nonce: bytes
    layout: bytes
    mac: bytes
    backend: str
    nixl_agent_metadata: bytes
    def __init__(self, client_id: _Optional[str] = ..., server_nonce: _Optional[bytes] = ..., client_nonce: _Optional[bytes] = ..., layout: _Optional[bytes] = ..., mac: _Optional[bytes] = ..., backend: _Optional[str] = ..., nixl_agent_metadata: _Optional[bytes] = ...) -> None: ...

class HandshakeResponse(_message.Message):
    __slots__ = ("session", "mac", "layout", "nixl_agent_metadata", "nixl_agent_name")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NIXL_AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    NIXL_AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    session: str
    mac: bytes
    layout: bytes
    nixl_agent_metadata: bytes
    nixl_agent_name: str
    def __init__(self, session: _Optional[str] = ..., mac: _Optional[bytes] = ..., layout: _Optional[bytes] = ..., nixl_agent_metadata: _Optional[bytes] = ..., nixl_agent_name: _Optional[str] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("transfer_id", "max_chunk_bytes", "first_block")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    max_chunk_bytes: int
    first_block: int
    def __init__(self, transfer_id: _Optional[str] = ..., max_chunk_bytes: _Optional[int] = ..., first_block: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("header", "payload", "done", "mac")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    header: bytes
    payload: bytes
    done: Completion
    mac: bytes
    def __init__(self, header: _Optional[bytes] = ..., payload: _Optional[bytes] = ..., done: _Optional[_Union[Completion, _Mapping]] = ..., mac: _Optional[bytes] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("first_token", "num_tokens", "has_logprob", "logprob", "top_ids", "top_logprobs", "finished", "prompt_logprobs", "prompt_continues", "rank", "num_cached_tokens")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HAS_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CONTINUES_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    first_token: int
    num_tokens: int
    has_logprob: bool
    logprob: float
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    finished: bool
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[ScoredToken]
    prompt_continues: bool
    rank: int
    num_cached_tokens: int
    def __init__(self, first_token: _Optional[int] = ..., num_tokens: _Optional[int] = ..., has_logprob: _Optional[bool] = ..., logprob: _Optional[float] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., finished: _Optional[bool] = ..., prompt_logprobs: _Optional[_Iterable[_Union[ScoredToken, _Mapping]]] = ..., prompt_continues: _Optional[bool] = ..., rank: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class ScoredToken(_message.Message):
    __slots__ = ("token_id", "logprob", "top_ids", "top_logprobs", "rank")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    rank: int
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., rank: _Optional[int] = ...) -> None: ...

class LayerReady(_message.Message):
    __slots__ = ("layer", "base_address", "addresses", "block_bytes", "done", "pool_bytes", "mac")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BASE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    layer: int
    base_address: int
    addresses: _containers.RepeatedScalarFieldContainer[int]
    block_bytes: int
    done: Completion
    pool_bytes: int
    mac: bytes
    def __init__(self, layer: _Optional[int] = ..., base_address: _Optional[int] = ..., addresses: _Optional[_Iterable[int]] = ..., block_bytes: _Optional[int] = ..., done: _Optional[_Union[Completion, _Mapping]] = ..., pool_bytes: _Optional[int] = ..., mac: _Optional[bytes] = ...) -> None: ...

class TransferRef(_message.Message):
    __slots__ = ("transfer_id",)
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    def __init__(self, transfer_id: _Optional[str] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("transfer_id", "reason")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    reason: str
    def __init__(self, transfer_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaseResponse(_message.Message):
    __slots__ = ("seconds_left",)
    SECONDS_LEFT_FIELD_NUMBER: _ClassVar[int]
    seconds_left: float
    def __init__(self, seconds_left: _Optional[float] = ...) -> None: ...
