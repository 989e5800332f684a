"""KV transfer, part 1's KV-channel rows: `KVChannel.pull` from a `PrefillPeer` serving a synthetic KV-heavy
random Llama, over gRPC at several chunk sizes and over NIXL, each pull timed once its prefill has completed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_common import MiB, median
from prefill_peer import GREEDY_1, TIMEOUT, PrefillPeer

# The synthetic KV-heavy teacher: KV bytes per token = layers * 2 (K, V) * kv_heads * head_dim * 4 (fp32).
KV_MODEL: dict[str, Any] = dict(
    num_layers=32, hidden_size=16, intermediate_size=32, num_heads=16, num_kv_heads=16, head_dim=512
)
KV_BLOCK_SIZE = 16


def kv_bytes_per_token() -> int:
    m = KV_MODEL
    return m["num_layers"] * 2 * m["num_kv_heads"] * m["head_dim"] * 4


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


@dataclass
class Row:
    payload: int  # bytes per transfer
    path: str
    detail: str
    seconds: list[float]  # one per run
    note: str = ""  # "n/a (...)" when the row could not run

    @property
    def gbps(self) -> float:
        return gbps(self.payload, median(self.seconds)) if self.seconds else float("nan")

    @property
    def best_gbps(self) -> float:
        return gbps(self.payload, min(self.seconds)) if self.seconds else float("nan")


def grpc_name(chunk_bytes: int) -> str:
    return f"grpc/{chunk_bytes / MiB:g}MiB"


def channel_throughput(
    model_dir: Path, sizes: list[int], chunk_sizes: list[int], runs: int, log
) -> tuple[list[Row], str | None]:
    """gRPC rows per (size, chunk) and NIXL rows per size; the second value says why NIXL did not run."""
    from overfill_serve.transfer.channel import KVChannel
    from overfill_serve.transfer.config import TransferConfig
    from overfill_serve.worker.decode_worker import DecodeWorker

    per_token = kv_bytes_per_token()
    tokens = {n: n // per_token for n in sizes}
    num_blocks = -(-max(tokens.values()) // KV_BLOCK_SIZE) + 1
    server_chunk = max(chunk_sizes)  # a pull asks for min(its own, the server's) chunk size
    prefill = PrefillPeer(
        model_dir,
        dict(num_kv_blocks=num_blocks, block_size=KV_BLOCK_SIZE),
        dict(chunk_bytes=server_chunk, timeout_seconds=TIMEOUT),
    )
    decode = DecodeWorker(
        model_dir, transfer=TransferConfig(), num_kv_blocks=num_blocks, block_size=KV_BLOCK_SIZE
    )
    channels: dict[str, KVChannel] = {}
    for c in chunk_sizes:
        channels[grpc_name(c)] = KVChannel(
            prefill.address,
            TransferConfig(chunk_bytes=c, timeout_seconds=TIMEOUT),
            decode.layout,
            decode.core.cache,
        ).connect()
    nixl_reason: str | None = None
    try:
        channels["nixl"] = KVChannel(
            prefill.address,
            TransferConfig(backend="nixl", timeout_seconds=TIMEOUT),
            decode.layout,
            decode.core.cache,
        ).connect()
    except Exception as e:  # noqa: BLE001 - reported in the table
        nixl_reason = f"NIXL channel failed to connect: {type(e).__name__}: {e}"

    def chunk_detail(c: int, n: int) -> str:
        """A chunk carries whole blocks of one layer: the effective payload per message."""
        block_kv = 2 * decode.core.cache.block_bytes  # K + V of one block of one layer
        blocks_per_layer = -(-tokens[n] // KV_BLOCK_SIZE)
        effective = min(max(1, c // block_kv), blocks_per_layer) * block_kv
        return f"chunk_bytes {c / MiB:g} MiB (sends {effective / MiB:g} MiB)"

    times: dict[tuple[int, str], list[float]] = {(n, name): [] for n in sizes for name in channels}
    failures: dict[str, str] = {}
    prompt_base = 3
    try:
        for run in range(runs + 1):  # run 0 warms every channel up
            for n in sizes:
                for name, channel in channels.items():
                    if name in failures:
                        continue
                    prompt = [prompt_base + (i + run) % 200 for i in range(tokens[n])]
                    ticket = prefill.call("submit", prompt, GREEDY_1)
                    prefill.call("done_at", ticket.transfer_id, 120.0)  # time the transfer only
                    blocks = decode.core.pool.allocate(-(-tokens[n] // KV_BLOCK_SIZE))
                    assert blocks is not None
                    try:
                        _, stats = channel.pull(ticket.transfer_id, blocks, tokens[n])
                    except Exception as e:  # noqa: BLE001 - a backend that fails is reported, not fatal
                        failures[name] = f"{type(e).__name__}: {e}"
                        log(f"  {name}: pull failed: {failures[name]}")
                        continue
                    finally:
                        decode.core.pool.free(blocks)
                    assert stats.nbytes == n, (stats.nbytes, n)
                    if run:
                        times[(n, name)].append(stats.seconds)
                    log(
                        f"  run {run} {n // MiB:4d} MiB {name:12s} {stats.seconds * 1e3:8.1f} ms "
                        f"{gbps(n, stats.seconds):6.2f} GB/s (queue {stats.queue_seconds * 1e3:.1f} ms)"
                    )
    finally:
        for channel in channels.values():
            channel.close()
        prefill.close()

    rows = []
    for n in sizes:
        for c in chunk_sizes:
            name = grpc_name(c)
            note = f"n/a ({failures[name]})" if name in failures else ""
            rows.append(Row(n, "gRPC", chunk_detail(c, n), times[(n, name)], note))
        if "nixl" in channels:
            note = f"n/a ({failures['nixl']})" if "nixl" in failures else ""
            rows.append(Row(n, "NIXL", "RDMA READ (UCX)", times[(n, "nixl")], note))
        else:
            rows.append(Row(n, "NIXL", "", [], f"n/a ({nixl_reason})"))
    return rows, nixl_reason
