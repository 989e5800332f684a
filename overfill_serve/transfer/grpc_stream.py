"""`GrpcStreamTransport`: receive a transfer as a stream of checked chunks over gRPC."""

from __future__ import annotations

import time

import grpc

from overfill_serve._proto.overfill.v1 import kv_transfer_pb2 as pb
from overfill_serve.errors import ChunkError
from overfill_serve.transfer import auth
from overfill_serve.transfer.chunk import ChunkHeader, check_chunk, decode_signed_chunk
from overfill_serve.transfer.status import error_from_rpc
from overfill_serve.transfer.transport import KVTransport, Link, Received, completion_from_pb


class GrpcStreamTransport(KVTransport):
    name = "grpc"

    def receive(
        self, link: Link, transfer_id: str, dest_blocks: list[int], num_tokens: int, first_block: int = 0
    ) -> Received:
        cache, layout, config = self.cache, link.layout, link.config
        received: dict[int, set[int]] = {layer: set() for layer in layout.kept_layers}
        nbytes, first_byte_at = 0, 0.0
        stream = link.pull_raw(
            pb.PullRequest(
                transfer_id=transfer_id, max_chunk_bytes=config.chunk_bytes, first_block=first_block
            ),
            metadata=link.metadata,
            timeout=config.timeout_seconds,
        )
        try:
            for data in stream:
                raw_header, payload, done, mac = decode_signed_chunk(data)  # views into `data`: no copies
                signed = raw_header if done is None else done
                if not auth.verify(auth.chunk_mac(link.chunk_key, signed), mac):
                    raise ChunkError(f"transfer {transfer_id}: a chunk header or completion fails its MAC")
                if done is not None:
                    completion = completion_from_pb(
                        pb.Completion.FromString(done), num_tokens, layout.vocab_size
                    )
                    missing = sum(len(dest_blocks) - len(got) for got in received.values())
                    if missing and not completion.finished:  # finished: the rest is not needed
                        raise ChunkError(f"transfer {transfer_id} completed with {missing} blocks never sent")
                    return Received(completion, nbytes, first_byte_at)
                header = ChunkHeader.decode(raw_header)
                check_chunk(
                    header,
                    payload,
                    transfer_id=transfer_id,
                    layers=frozenset(layout.kept_layers),
                    num_blocks=len(dest_blocks),
                    block_bytes=cache.block_bytes,
                )
                run = range(header.block_start, header.block_start + header.block_count)
                if received[header.layer].intersection(run):
                    raise ChunkError(f"layer {header.layer} blocks {run.start}..{run.stop - 1} sent twice")
                received[header.layer].update(run)
                local = layout.local_layer(header.layer)
                assert local is not None, "check_chunk admits kept layers only"
                cache.write_block_bytes(local, dest_blocks[run.start : run.stop], payload)
                first_byte_at = first_byte_at or time.perf_counter()
                nbytes += len(payload)
            raise ChunkError(f"transfer {transfer_id}: the stream ended without a completion")
        except grpc.RpcError as e:
            raise error_from_rpc(e, f"pulling transfer {transfer_id}") from None
        finally:
            stream.cancel()  # no-op after a clean end; stops the server's sends after an error
