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
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import MiB, command_line, corpus_token_ids, cpu_name, load_average, median, print_head
from channel_throughput import KV_BLOCK_SIZE, KV_MODEL, Row, channel_throughput, kv_bytes_per_token
from copy_baselines import memcpy, raw_tcp
from prefill_peer import GREEDY_1, SECRET, TIMEOUT, PrefillPeer


# ----------------------------------------------------------------------------------------------------------
# KV throughput
# ----------------------------------------------------------------------------------------------------------
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
    print_head(header)
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


def part2(args, log) -> None:
    from overfill_serve.errors import ModelConfigError
    from overfill_serve.tools.default_model import default_model_dir
    from overfill_serve.transfer.config import TransferConfig
    from overfill_serve.worker.decode_worker import DecodeWorker

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
    corpus = corpus_token_ids(decode.tokenizer, verbose=False)
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
    try:
        for run in range(runs + 1):
            for mode, prefill in prefills.items():
                offset = (run * 2 + int(mode)) * 997 % max(1, len(corpus) - prompt_len)
                prompt = corpus[offset : offset + prompt_len]
                start = time.perf_counter()
                ticket = prefill.call("submit", prompt, GREEDY_1)
                gen = decode.generate_from(ticket)
                first = next(gen)
                ttft = time.perf_counter() - start
                for _ in gen:
                    pass
                assert first.token_ids
                prefill_s = prefill.call("done_at", ticket.transfer_id, 60.0) - start
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
    print_head(header)
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
    print(f"command: {command_line('benchmarks/kv_transfer.py', prefix='PYTHONPATH=. python')}")
    print()
    start = time.perf_counter()
    if not args.skip_throughput:
        part1(args, log)
    if not args.skip_ttft:
        part2(args, log)
    print(f"total {time.perf_counter() - start:.0f} s; load average at end {load_average()}")


if __name__ == "__main__":
    main()
