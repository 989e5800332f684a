"""KV transfer: how fast a prompt's KV moves from a prefill worker to a decode worker, and what layer-wise
overlap saves on time to first token.

Part 1 (throughput between two processes on this machine). A prefill worker runs in a spawned process
(`PrefillPeer`: the pipe-driven pattern of tests/peer_process.py, plus a time stamp of each completed prefill);
the decode side is this process. The prefill side serves a synthetic "KV-heavy" random Llama (32 layers, 16 KV
heads x head_dim 512, fp32, hidden 16: 2 MiB of KV per prompt token, tiny weights), so a 32-token prompt carries
64 MiB of KV and a 256-token prompt 512 MiB, while its prefill stays around a second. For every pull the prompt
is prefilled first and the benchmark waits until the prefill has completed, then times `KVChannel.pull` on the
decode side (`TransferStats.seconds`: from the pull's start to the completion, the release RPC excluded), so it
measures the transfer, not the prefill. Rows:

- gRPC: overfill-serve's KV channel (`TransferConfig(backend="grpc")`) at several chunk sizes (a chunk carries
  one layer's run of whole blocks, so the effective payload is rounded to blocks and capped at one layer);
- NIXL: `TransferConfig(backend="nixl")` (when `overfill_serve.transfer.nixl` imports and works);
- raw TCP: a second spawned process `sendall`s the same number of bytes over a plain socket on 127.0.0.1, and
  this process `recv_into`s a preallocated buffer (timed from the request to the last byte);
- memcpy: `dst.copy_(src)` of the same bytes in this process (torch's default thread count, and 1 thread).

Part 2 (TTFT with and without layer-wise overlap). The embedded default model (SmolLM2-135M-Instruct, 30
layers, fp32) prefills a 2048-token prompt in a spawned process; a `DecodeWorker` in this process (the same
model as student) pulls its KV and emits the teacher's first token. TTFT = from `submit` until `generate_from`
yields the first token. `TransferConfig(layerwise=True)` publishes each layer as soon as the prefill has computed
it (the transfer overlaps the rest of the prefill); `layerwise=False` starts the transfer when the prefill is
done. The two prefill workers run side by side and the runs alternate between them. The prefill process stamps
when each prefill completed, so every run also splits TTFT into the prefill and what the KV channel adds after
it: on a shared machine the prefill's own jitter swamps TTFT, while that remainder stays steady.

    python benchmarks/kv_transfer.py [--quick] [--runs 5] [--ttft-runs 5]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import multiprocessing as mp
import operator
import os
import platform
import shlex
import socket
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the two-process harness the KV-channel tests use

from peer_process import SECRET  # noqa: E402  (the cluster secret the test peers use)

MiB = 1 << 20
GREEDY_1: dict[str, Any] = {"max_tokens": 1, "temperature": 0, "ignore_eos": True}

# The synthetic KV-heavy teacher: KV bytes per token = layers * 2 (K, V) * kv_heads * head_dim * 4 (fp32).
KV_MODEL: dict[str, Any] = dict(
    num_layers=32, hidden_size=16, intermediate_size=32, num_heads=16, num_kv_heads=16, head_dim=512
)
KV_BLOCK_SIZE = 16
TIMEOUT = 300.0  # TransferConfig.timeout_seconds: the box is shared, and a stalled run should fail, not hang


def kv_bytes_per_token() -> int:
    m = KV_MODEL
    return m["num_layers"] * 2 * m["num_kv_heads"] * m["head_dim"] * 4


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


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


# ----------------------------------------------------------------------------------------------------------
# raw TCP baseline
# ----------------------------------------------------------------------------------------------------------
def _tcp_sender(port: int, max_bytes: int) -> None:
    """Child: connect, then for every 8-byte request n send n bytes from a preallocated buffer (0 ends)."""
    buf = memoryview(bytearray(os.urandom(1 << 20)) * (max_bytes >> 20))
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            head = b""
            while len(head) < 8:
                part = s.recv(8 - len(head))
                if not part:
                    return
                head += part
            (n,) = struct.unpack("!Q", head)
            if n == 0:
                return
            s.sendall(buf[:n])


def raw_tcp(sizes: list[int], runs: int) -> dict[int, list[float]]:
    ctx = mp.get_context("spawn")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        sender = ctx.Process(target=_tcp_sender, args=(listener.getsockname()[1], max(sizes)), daemon=True)
        sender.start()
        listener.settimeout(120)
        conn, _ = listener.accept()
    dst = bytearray(max(sizes))
    view = memoryview(dst)
    out: dict[int, list[float]] = {n: [] for n in sizes}
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for run in range(runs + 1):  # run 0 warms up
            for n in sizes:
                start = time.perf_counter()
                conn.sendall(struct.pack("!Q", n))
                got = 0
                while got < n:
                    k = conn.recv_into(view[got:n])
                    if k == 0:
                        raise ConnectionError("raw TCP sender went away")
                    got += k
                if run:
                    out[n].append(time.perf_counter() - start)
        conn.sendall(struct.pack("!Q", 0))
    sender.join(30)
    return out


# ----------------------------------------------------------------------------------------------------------
# memcpy baseline
# ----------------------------------------------------------------------------------------------------------
def memcpy(sizes: list[int], runs: int, threads: int) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in sizes:
            src = torch.ones(n, dtype=torch.uint8)
            dst = torch.zeros(n, dtype=torch.uint8)
            times = []
            for run in range(runs + 1):
                start = time.perf_counter()
                dst.copy_(src)
                if run:
                    times.append(time.perf_counter() - start)
            out[n] = times
            del src, dst
    finally:
        torch.set_num_threads(default)
    return out


# ----------------------------------------------------------------------------------------------------------
# the prefill worker in a process of its own
# ----------------------------------------------------------------------------------------------------------
def _prefill_serve(conn, model_dir: str, worker_kwargs: dict, transfer_kwargs: dict) -> None:
    """Child: a PrefillWorker driven over a pipe, as in tests/peer_process.py, that also records when each
    transfer's prefill completed (time.perf_counter(): CLOCK_MONOTONIC, comparable across processes)."""
    import threading

    os.environ["OVERFILL_CLUSTER_SECRET"] = SECRET
    from overfill_serve.sampling_params import SamplingParams
    from overfill_serve.transfer.config import TransferConfig
    from overfill_serve.worker.prefill_worker import PrefillWorker

    worker = PrefillWorker(model_dir, transfer=TransferConfig(**transfer_kwargs), **worker_kwargs).start()
    done: dict[str, float] = {}
    cond = threading.Condition()
    complete = worker.registry.complete

    def timed_complete(transfer_id, request, completion):  # the engine thread, when a prefill is done
        at = time.perf_counter()
        complete(transfer_id, request, completion)
        with cond:
            done[transfer_id] = at
            cond.notify_all()

    worker.registry.complete = timed_complete  # type: ignore[method-assign]
    conn.send(("ready", worker.address))
    while True:
        command, args = conn.recv()
        try:
            if command == "stop":
                worker.stop()
                conn.send(("ok", None))
                return
            if command == "submit":
                prompt, params = args
                ticket = worker.submit(prompt, SamplingParams(**params))
                conn.send(("ok", dict(ticket.__dict__)))
            elif command == "done_at":  # block until the transfer's prefill has completed
                transfer_id, timeout = args
                with cond:
                    ok = cond.wait_for(partial(operator.contains, done, transfer_id), timeout)
                conn.send(
                    ("ok", done.pop(transfer_id)) if ok else ("error", f"prefill of {transfer_id} not done")
                )
        except Exception as e:  # noqa: BLE001 - reported to the parent
            conn.send(("error", f"{type(e).__name__}: {e}"))


class PrefillPeer:
    def __init__(self, model_dir: Path, worker_kwargs: dict, transfer_kwargs: dict) -> None:
        ctx = mp.get_context("spawn")  # a clean child, like a real peer
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_prefill_serve, args=(child, str(model_dir), worker_kwargs, transfer_kwargs), daemon=True
        )
        self.process.start()
        self.address = self.call("ready?", timeout=300, send=False)

    def call(self, command: str, *args, timeout: float = 300, send: bool = True):
        if send:
            self.conn.send((command, args))
        if not self.conn.poll(timeout):
            raise TimeoutError(f"prefill process did not answer {command!r} within {timeout}s")
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"prefill process: {value}")
        return value

    def close(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(EOFError, OSError, TimeoutError, RuntimeError):
                self.call("stop", timeout=20)
            self.process.kill()
        self.process.join(10)


# ----------------------------------------------------------------------------------------------------------
# KV channel throughput
# ----------------------------------------------------------------------------------------------------------
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
            decode.layout,
            decode.cache,
            TransferConfig(chunk_bytes=c, timeout_seconds=TIMEOUT),
        ).connect()
    nixl_reason: str | None = None
    try:
        import overfill_serve.transfer.nixl  # noqa: F401

        channels["nixl"] = KVChannel(
            prefill.address,
            decode.layout,
            decode.cache,
            TransferConfig(backend="nixl", timeout_seconds=TIMEOUT),
        ).connect()
    except ImportError as e:
        nixl_reason = f"overfill_serve.transfer.nixl does not import: {e}"
    except Exception as e:  # noqa: BLE001 - reported in the table
        nixl_reason = f"NIXL channel failed to connect: {type(e).__name__}: {e}"

    def chunk_detail(c: int, n: int) -> str:
        """A chunk carries whole blocks of one layer: the effective payload per message."""
        block_kv = 2 * decode.cache.block_bytes  # K + V of one block of one layer
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
                    prefill.call("done_at", ticket["transfer_id"], 120.0)  # time the transfer only
                    blocks = decode.pool.allocate(-(-tokens[n] // KV_BLOCK_SIZE))
                    assert blocks is not None
                    try:
                        _, stats = channel.pull(ticket["transfer_id"], blocks, tokens[n])
                    except Exception as e:  # noqa: BLE001 - a backend that fails is reported, not fatal
                        failures[name] = f"{type(e).__name__}: {e}"
                        log(f"  {name}: pull failed: {failures[name]}")
                        continue
                    finally:
                        decode.pool.free(blocks)
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


def part1(args, log) -> None:
    sizes = [64 * MiB, 512 * MiB]
    chunk_sizes = [4 * MiB] if args.quick else [1 * MiB, 4 * MiB, 16 * MiB]
    runs = args.runs
    per_token = kv_bytes_per_token()
    print("## Part 1: KV throughput between two processes on this machine (loopback)")
    print(
        f"prefill model: random Llama, {KV_MODEL['num_layers']} layers, {KV_MODEL['num_kv_heads']} KV heads x "
        f"head_dim {KV_MODEL['head_dim']}, hidden {KV_MODEL['hidden_size']}, fp32, block_size {KV_BLOCK_SIZE}: "
        f"{per_token / MiB:g} MiB of KV per token; "
        + ", ".join(f"{n // MiB} MiB = {n // per_token}-token prompt" for n in sizes)
    )
    print(
        f"GB/s = 1e9 B/s of the median of {runs} runs after one warm-up (best: of the fastest run); the KV channel "
        "is timed by KVChannel.pull once the prefill has completed"
    )
    with tempfile.TemporaryDirectory(prefix="kv-bench-") as tmp:
        from overfill_serve.model.random_model import make_random_model

        model_dir = make_random_model(Path(tmp) / "kv-heavy", **KV_MODEL, seed=0)
        log("raw TCP ...")
        tcp = raw_tcp(sizes, runs)
        log("memcpy ...")
        mem = memcpy(sizes, runs, torch.get_num_threads())
        mem1 = memcpy(sizes, runs, 1)
        log("KV channel ...")
        rows, _ = channel_throughput(model_dir, sizes, chunk_sizes, runs, log)

    table: list[Row] = []
    for n in sizes:
        table.append(Row(n, "raw TCP socket", "sendall / recv_into, 2 processes", tcp[n]))
        table.append(Row(n, "memcpy", f"torch dst.copy_(src), {torch.get_num_threads()} threads", mem[n]))
        table.append(Row(n, "memcpy 1 thread", "torch dst.copy_(src), 1 thread", mem1[n]))
        table += [r for r in rows if r.payload == n]

    header = (
        f"{'payload':>8}  {'path':<15} {'detail':<36} {'GB/s':>6} {'best':>6}  {'median ms':>9}  runs (ms)"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in table:
        if r.note:
            print(f"{r.payload // MiB:>5} MiB  {r.path:<15} {r.detail:<36} {r.note}")
            continue
        runs_ms = " ".join(f"{t * 1e3:.0f}" for t in r.seconds)
        print(
            f"{r.payload // MiB:>5} MiB  {r.path:<15} {r.detail:<36} {r.gbps:6.2f} {r.best_gbps:6.2f}  "
            f"{median(r.seconds) * 1e3:9.1f}  {runs_ms}"
        )
    print()
    for n in sizes:
        tcp_row = next(r for r in table if r.payload == n and r.path == "raw TCP socket")
        mem_row = next(r for r in table if r.payload == n and r.path == "memcpy")
        mem1_row = next(r for r in table if r.payload == n and r.path == "memcpy 1 thread")
        grpc_rows = [r for r in table if r.payload == n and r.path == "gRPC" and not r.note]
        nixl_row = next(r for r in table if r.payload == n and r.path == "NIXL")
        if grpc_rows:
            best = max(grpc_rows, key=lambda r: r.gbps)
            ratio = best.gbps / tcp_row.gbps
            print(
                f"{n // MiB:>5} MiB  gRPC (best: {best.detail}) / raw TCP = {best.gbps:.2f} / {tcp_row.gbps:.2f} "
                f"= {ratio:.2f}x  (goal >= 0.6x: {'met' if ratio >= 0.6 else 'NOT met'})"
            )
        if nixl_row.note:
            print(f"{n // MiB:>5} MiB  NIXL / memcpy: {nixl_row.note}")
        else:
            ratio = nixl_row.gbps / mem_row.gbps
            print(
                f"{n // MiB:>5} MiB  NIXL / memcpy = {nixl_row.gbps:.2f} / {mem_row.gbps:.2f} = {ratio:.2f}x  "
                f"(goal >= 0.8x: {'met' if ratio >= 0.8 else 'NOT met'}); "
                f"vs 1-thread memcpy {nixl_row.gbps / mem1_row.gbps:.2f}x"
            )
    print()


# ----------------------------------------------------------------------------------------------------------
# TTFT with and without layer-wise overlap
# ----------------------------------------------------------------------------------------------------------
def part2(args, log) -> None:
    from overfill_serve.default_model import default_model_dir
    from overfill_serve.errors import ModelConfigError
    from overfill_serve.sampling_params import SamplingParams
    from overfill_serve.transfer.config import TransferConfig
    from overfill_serve.worker.decode_worker import DecodeWorker
    from overfill_serve.worker.prefill_worker import TransferTicket

    prompt_len = 512 if args.quick else 2048
    runs = 1 if args.quick else args.ttft_runs
    print(f"## Part 2: TTFT of a {prompt_len}-token prompt, layer-wise overlap on / off")
    try:
        model_dir = default_model_dir(convert=False)
    except ModelConfigError as e:
        print(f"n/a ({e})")
        return
    num_blocks = -(-prompt_len // 16) + 8
    # Long time bounds: on a loaded 2-core box a 2048-token prefill can take longer than the default 30 s.
    decode = DecodeWorker(
        model_dir, transfer=TransferConfig(timeout_seconds=TIMEOUT), num_kv_blocks=num_blocks
    )
    decode.start()
    corpus = corpus_ids(decode.tokenizer)
    prefills = {
        mode: PrefillPeer(
            model_dir,
            dict(num_kv_blocks=num_blocks, max_num_batched_tokens=max(2048, prompt_len)),
            dict(layerwise=mode, timeout_seconds=TIMEOUT),
        )
        for mode in (True, False)
    }
    spec = decode.model.spec
    print(
        f"model {model_dir.name} ({spec.num_layers} layers, {spec.num_kv_heads} KV heads x {spec.head_dim}, "
        f"fp32) as both teacher and student (every layer's KV travels); gRPC, default chunk_bytes; the prompt is "
        f"prefilled in one chunk; median of {runs} runs per mode after one warm-up each, modes alternating"
    )
    # per run: TTFT, prefill (submit -> prefill complete, stamped in the prefill process), pull first byte,
    # pull seconds, bytes
    results: dict[bool, list[tuple[float, float, float, float, int]]] = {True: [], False: []}
    params = SamplingParams(**GREEDY_1)
    try:
        for run in range(runs + 1):
            for mode, prefill in prefills.items():
                offset = (run * 2 + int(mode)) * 997 % max(1, len(corpus) - prompt_len)
                prompt = corpus[offset : offset + prompt_len]
                start = time.perf_counter()
                ticket = prefill.call("submit", prompt, GREEDY_1)
                gen = decode.generate_from(TransferTicket(**ticket), prompt, params)
                first = next(gen)
                ttft = time.perf_counter() - start
                for _ in gen:
                    pass
                assert first.token_ids
                prefill_s = prefill.call("done_at", ticket["transfer_id"], 60.0) - start
                st = decode.last_transfer
                assert st is not None
                if run:
                    results[mode].append((ttft, prefill_s, st.queue_seconds, st.seconds, st.nbytes))
                log(
                    f"  run {run} layerwise={mode!s:5}: TTFT {ttft * 1e3:7.1f} ms, prefill {prefill_s * 1e3:7.1f} ms, "
                    f"after prefill {(ttft - prefill_s) * 1e3:6.1f} ms; pull {st.seconds * 1e3:7.1f} ms "
                    f"(first byte after {st.queue_seconds * 1e3:7.1f} ms), {st.nbytes / MiB:.1f} MiB"
                )
    finally:
        decode.stop()
        for p in prefills.values():
            p.close()

    print()
    header = (
        f"{'layerwise':<10} {'TTFT ms':>8} {'prefill ms':>10} {'TTFT-prefill ms':>15} {'1st KV byte ms':>14} "
        f"{'KV MiB':>7}  TTFT runs (ms)"
    )
    print(header)
    print("-" * len(header))
    med_ttft: dict[bool, float] = {}
    med_tail: dict[bool, float] = {}
    for mode in (False, True):
        rs = results[mode]
        med_ttft[mode] = median([r[0] for r in rs])
        med_tail[mode] = median([r[0] - r[1] for r in rs])
        print(
            f"{mode!s:<10} {med_ttft[mode] * 1e3:8.1f} {median([r[1] for r in rs]) * 1e3:10.1f} "
            f"{med_tail[mode] * 1e3:15.1f} {median([r[2] for r in rs]) * 1e3:14.1f} {rs[0][4] / MiB:7.1f}  "
            + " ".join(f"{r[0] * 1e3:.0f}" for r in rs)
        )
    saving = med_ttft[False] - med_ttft[True]
    tail_saving = med_tail[False] - med_tail[True]
    print(
        f"\nlayer-wise overlap: median TTFT {med_ttft[False] * 1e3:.1f} -> {med_ttft[True] * 1e3:.1f} ms "
        f"(saves {saving * 1e3:.1f} ms, {saving / med_ttft[False] * 100:.1f}%); time from prefill done to first "
        f"token {med_tail[False] * 1e3:.1f} -> {med_tail[True] * 1e3:.1f} ms (saves {tail_saving * 1e3:.1f} ms)"
    )
    print(
        "(prefill: submit -> the prefill worker completes the request, stamped in its process; TTFT-prefill: what "
        "the KV channel and the first-token hand-off add after it; 1st KV byte: from the pull's start)"
    )
    print()


def corpus_ids(tokenizer) -> list[int]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


# ----------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per throughput row (after a warm-up)")
    parser.add_argument("--ttft-runs", type=int, default=5, help="timed TTFT runs per mode (after a warm-up)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 2 runs, one chunk size, 512-token TTFT"
    )
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every run to stderr")
    args = parser.parse_args()
    if args.quick:
        args.runs = min(args.runs, 2)
    os.environ["OVERFILL_CLUSTER_SECRET"] = SECRET  # the peer processes use the test secret
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # NIXL logs each agent's creation to stdout at INFO

    def log(msg: str) -> None:
        if args.verbose:
            print(msg, file=sys.stderr, flush=True)

    import grpc

    print("# KV transfer benchmark")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, {platform.machine()} {platform.system()}, no GPU used; "
        f"python {platform.python_version()}, torch {torch.__version__} (threads {torch.get_num_threads()}), "
        f"grpcio {grpc.__version__}; load average at start {load_average()}"
    )
    print(f"command: PYTHONPATH=. python {shlex.join(['benchmarks/kv_transfer.py', *sys.argv[1:]])}")
    print()
    start = time.perf_counter()
    if not args.skip_throughput:
        part1(args, log)
    if not args.skip_ttft:
        part2(args, log)
    print(f"total {time.perf_counter() - start:.0f} s; load average at end {load_average()}")


if __name__ == "__main__":
    main()
