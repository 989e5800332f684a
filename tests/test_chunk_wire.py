"""The KVChunk wire form the KV channel builds and reads by hand, checked against protobuf's own encoding, and the
pool's block views against `read_blocks`."""

from __future__ import annotations

import random

import pytest
import torch

from overfill_serve._proto.overfill.v1 import kv_transfer_pb2 as pb
from overfill_serve.errors import ChunkError
from overfill_serve.kv.paged_cache import PagedKVCache
from overfill_serve.transfer.chunk import decode_chunk_message, encode_chunk_message, make_chunk


@pytest.mark.parametrize("payload_size", [0, 1, 127, 128, 300, 1 << 20])
def test_encoding_equals_protobuf(payload_size):
    payload = random.Random(payload_size).randbytes(payload_size)
    header = make_chunk("t" * 32, 3, 0, 1, payload).encode()
    parts = [memoryview(payload)[: len(payload) // 3], memoryview(payload)[len(payload) // 3 :]]
    wire = encode_chunk_message(header, parts)
    reference = pb.KVChunk(header=header, payload=payload)
    assert pb.KVChunk.FromString(wire) == reference
    h, p, done = decode_chunk_message(reference.SerializeToString())
    assert bytes(h) == header and bytes(p) == payload and done is None


def test_done_message_decodes():
    completion = pb.Completion(first_token=7, num_tokens=12, has_logprob=True, logprob=-0.5, top_ids=[1, 2])
    header, payload, done = decode_chunk_message(pb.KVChunk(done=completion).SerializeToString())
    assert len(header) == 0 and len(payload) == 0 and pb.Completion.FromString(done) == completion


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a\x05abc",  # shorter than its length says
        b"\x22\x01x",  # a field KVChunk does not have
        b"\x0a\xff\xff\xff\xff\xff\xff",  # a length varint that never ends
    ],
)
def test_malformed_messages_are_refused(data):
    with pytest.raises(ChunkError, match="malformed"):
        decode_chunk_message(data)


def test_block_parts_are_the_blocks_read_back():
    cache = PagedKVCache(2, 16, 4, 2, 8, torch.float32)
    cache.tensor.copy_(torch.randn_like(cache.tensor))
    blocks = [5, 6, 7, 2, 11, 12]  # three runs
    parts = cache.block_bytes_parts(1, blocks)
    assert len(parts) == 6  # K runs, then V runs
    expected = cache.read_blocks(1, blocks).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    assert b"".join(parts) == expected
    # and writing them into other blocks of another cache gives the same K and V back
    other = PagedKVCache(2, 16, 4, 2, 8, torch.float32)
    other.write_block_bytes(0, [0, 1, 2, 3, 4, 5], memoryview(b"".join(parts)))
    assert torch.equal(other.read_blocks(0, [0, 1, 2, 3, 4, 5]), cache.read_blocks(1, blocks))
