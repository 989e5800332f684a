"""`ChunkHeader`: the msgpack header of a gRPC KV chunk, and the receiver's checks on every chunk.

A chunk carries one layer's run of consecutive blocks of a transfer (block indices count within the
transfer, never raw pool ids): the K blocks, then the V blocks. The receiver checks everything against what it
expects itself — its transfer, its kept layers, its allocation, the byte size its own layout implies, the
checksum — before a byte is written.
"""

from __future__ import annotations

import zlib
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
    def decode(cls, data: bytes) -> ChunkHeader:
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
    transfer_id: str, layer: int, block_start: int, block_count: int, payload: bytes
) -> ChunkHeader:
    return ChunkHeader(transfer_id, layer, block_start, block_count, len(payload), zlib.crc32(payload))


def check_chunk(
    header: ChunkHeader,
    payload: bytes,
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
