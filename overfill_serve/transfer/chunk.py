"""`ChunkHeader`: the msgpack header of a gRPC KV chunk, the receiver's checks on every chunk, and the
`KVChunk` message's wire form, which both ends build and read by hand so a chunk's payload is copied once
(from the pool into the message) rather than through protobuf objects on either side.

A chunk carries one layer's run of consecutive blocks of a transfer (block indices count within the
transfer, never raw pool ids): the K blocks, then the V blocks. The receiver checks everything against what it
expects itself — its transfer, its kept layers, its allocation, the byte size its own layout implies, the
checksum — before a byte is written.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import msgpack

from overfill_serve.errors import ChunkError

_FIELDS = ("transfer_id", "layer", "block_start", "block_count", "nbytes", "crc32")


@dataclass(frozen=True)
class ChunkHeader:
    transfer_id: str
    layer: int  # teacher layer id
    block_start: int  # index into the transfer's block list
    block_count: int
    nbytes: int
    crc32: int

    def encode(self) -> bytes:
        return msgpack.packb(asdict(self))

    @classmethod
    def decode(cls, data: bytes | memoryview) -> ChunkHeader:
        try:
            raw: Any = msgpack.unpackb(data)
        except Exception as e:  # msgpack raises several unrelated types on garbage
            raise ChunkError(f"unreadable chunk header: {e}") from None
        if not isinstance(raw, dict) or set(raw) != set(_FIELDS):
            raise ChunkError(f"chunk header must have exactly the fields {_FIELDS}")
        if not isinstance(raw["transfer_id"], str) or not all(
            isinstance(raw[f], int) and not isinstance(raw[f], bool) for f in _FIELDS[1:]
        ):
            raise ChunkError("chunk header fields have the wrong types")
        return cls(**raw)


def make_chunk(
    transfer_id: str, layer: int, block_start: int, block_count: int, payload: Sequence[memoryview] | bytes
) -> ChunkHeader:
    """The header for a payload given whole or as parts (a run of pool blocks each, K runs then V runs)."""
    parts = [payload] if isinstance(payload, bytes) else payload
    crc, nbytes = 0, 0
    for part in parts:
        crc, nbytes = zlib.crc32(part, crc), nbytes + memoryview(part).nbytes
    return ChunkHeader(transfer_id, layer, block_start, block_count, nbytes, crc)


# -- the KVChunk message on the wire (kv_transfer.proto: header = 1, payload = 2, done = 3, mac = 5)
_HEADER_TAG, _PAYLOAD_TAG, _DONE_TAG, _MAC_TAG = b"\x0a", b"\x12", b"\x1a", b"\x2a"  # field << 3 | 2
_TAGS = (_HEADER_TAG, _PAYLOAD_TAG, _DONE_TAG, _MAC_TAG)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_chunk_message(header: bytes, payload: Sequence[memoryview] | bytes, mac: bytes = b"") -> bytes:
    """A `KVChunk` with header, payload and the header's MAC (none if empty), serialized: the payload parts
    are copied once, into it."""
    parts = [payload] if isinstance(payload, bytes) else payload
    size = sum(memoryview(p).nbytes for p in parts)
    signed = (_MAC_TAG, _varint(len(mac)), mac) if mac else ()
    return b"".join((_HEADER_TAG, _varint(len(header)), header, *signed, _PAYLOAD_TAG, _varint(size), *parts))


def encode_done_message(done: bytes, mac: bytes) -> bytes:
    """The last `KVChunk`: a serialized `Completion` and its MAC."""
    return b"".join((_DONE_TAG, _varint(len(done)), done, _MAC_TAG, _varint(len(mac)), mac))


def decode_chunk_message(data: bytes) -> tuple[memoryview, memoryview, bytes | None]:
    """`decode_signed_chunk` without the MAC."""
    return decode_signed_chunk(data)[:3]


def decode_signed_chunk(data: bytes) -> tuple[memoryview, memoryview, bytes | None, bytes]:
    """(header, payload, done, mac) of a serialized `KVChunk`; header and payload are views into `data`,
    `done` the serialized `Completion` of the last message (else None). Raises `ChunkError` on anything
    else."""
    view, pos, fields = memoryview(data), 0, {}
    while pos < len(view):
        tag = bytes(view[pos : pos + 1])
        length, shift, pos = 0, 0, pos + 1
        while True:
            if pos >= len(view) or shift > 35:
                raise ChunkError("malformed KV chunk message")
            byte = view[pos]
            length, shift, pos = length | (byte & 0x7F) << shift, shift + 7, pos + 1
            if byte < 0x80:
                break
        if tag not in _TAGS or pos + length > len(view):
            raise ChunkError("malformed KV chunk message")
        fields[tag], pos = view[pos : pos + length], pos + length
    done = fields.get(_DONE_TAG)
    empty = memoryview(b"")
    return (
        fields.get(_HEADER_TAG, empty),
        fields.get(_PAYLOAD_TAG, empty),
        None if done is None else bytes(done),
        bytes(fields.get(_MAC_TAG, empty)),
    )


def check_chunk(
    header: ChunkHeader,
    payload: bytes | memoryview,
    *,
    transfer_id: str,
    layers: frozenset[int],
    num_blocks: int,
    block_bytes: int,
) -> None:
    """Raise `ChunkError` unless the chunk belongs to this transfer and fits it exactly."""
    if header.transfer_id != transfer_id:
        raise ChunkError(f"chunk for transfer {header.transfer_id!r} arrived on transfer {transfer_id!r}")
    if header.layer not in layers:
        raise ChunkError(f"chunk for layer {header.layer}, which this transfer does not carry")
    if (
        header.block_count <= 0
        or header.block_start < 0
        or header.block_start + header.block_count > num_blocks
    ):
        raise ChunkError(
            f"chunk blocks [{header.block_start}, {header.block_start + header.block_count}) fall outside "
            f"the transfer's {num_blocks} blocks"
        )
    expected = 2 * header.block_count * block_bytes
    if header.nbytes != expected or len(payload) != expected:
        raise ChunkError(
            f"chunk of {header.block_count} blocks must carry {expected} bytes; header says {header.nbytes}, "
            f"payload has {len(payload)}"
        )
    if zlib.crc32(payload) != header.crc32:
        raise ChunkError(f"chunk checksum mismatch (layer {header.layer}, block {header.block_start})")
