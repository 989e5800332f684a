"""The KV channel over gRPC: prefill and decode in two processes give the single-process tokens; every
fault (bad secret, layout, chunks, lease, aborts, stalls, a killed peer) ends in a typed error with both
pools full again."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from kv_helpers import decode_kwargs, fragment, pool_full, wait_until
from peer_process import SECRET, PeerError, PeerProcess

from overfill_serve import LLM, SamplingParams
from overfill_serve._proto.overfill.v1 import kv_transfer_pb2 as pb
from overfill_serve.errors import (
    AuthenticationError,
    ChunkError,
    LayoutMismatchError,
    PeerUnavailableError,
    TransferAbortedError,
    TransferError,
    TransferNotFoundError,
    TransferTimeoutError,
)
from overfill_serve.transfer.channel import KVChannel
from overfill_serve.transfer.chunk import ChunkHeader
from overfill_serve.transfer.config import TransferConfig
from overfill_serve.transfer.control import TransferControl
from overfill_serve.worker.decode_worker import DecodeWorker
from overfill_serve.worker.prefill_worker import PrefillWorker

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [list(range(10, 47)), [7, 8, 9], list(range(100, 180))]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def secret(monkeypatch):
    monkeypatch.setenv("OVERFILL_CLUSTER_SECRET", SECRET)


def test_generated_code_is_up_to_date():
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"], check=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["identity", "depth"])
def test_two_processes_match_single_process(pairs, kind, dtype):
    pair = pairs[kind]
    llm = LLM(pair.teacher, pair.student, dtype=dtype, num_kv_blocks=96, block_size=4)
    # One prompt at a time, as the workers run them here: in bf16 the batch shape changes GEMM rounding.
    expected = [llm.generate(p, GREEDY)[0] for p in PROMPTS]
    prefill = PeerProcess(
        "prefill", pair.teacher, dict(dtype=dtype, block_size=4, num_kv_blocks=96), dict(chunk_bytes=2048)
    )
    decode = DecodeWorker(
        pair.student, transfer=TransferConfig(chunk_bytes=2048), **decode_kwargs(pair, dtype)
    )
    decode.start()
    try:
        for prompt, want in zip(PROMPTS, expected):
            ticket = prefill.call("submit", prompt, GREEDY)
            tokens = [t for out in decode.generate_from(ticket) for t in out.token_ids]
            assert tokens == want.token_ids
            # Only the kept layers travel: a depth-pruned student pulls half the teacher's KV.
            assert decode.last_transfer.nbytes == 2 * len(
                decode.layout.kept_layers
            ) * decode.core.cache.block_bytes * (-(-len(prompt) // 4))
        wait_until(lambda: pool_full(prefill.call("stats")))
        assert pool_full(decode.stats())
    finally:
        decode.stop()
        prefill.close()


@pytest.fixture
def workers(pairs):
    """In-process prefill and decode workers joined by a real gRPC channel on 127.0.0.1."""
    pair = pairs["depth"]
    config = TransferConfig(chunk_bytes=1024, timeout_seconds=5.0)
    prefill = PrefillWorker(pair.teacher, transfer=config, block_size=4, num_kv_blocks=64).start()
    decode = DecodeWorker(pair.student, transfer=config, **decode_kwargs(pair)).start()
    yield prefill, decode
    decode.stop()
    prefill.stop()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kv_byte_exact_with_scattered_blocks(workers, seed):
    prefill, decode = workers
    rng = random.Random(seed)
    held_p, held_d = fragment(prefill.core.pool, rng), fragment(decode.core.pool, rng)
    prompt = [rng.randrange(3, 400) for _ in range(rng.randint(5, 40))]
    ticket = prefill.submit(prompt, GREEDY)
    wait_until(lambda: prefill.registry.get(ticket.transfer_id).completion is not None)
    src = list(prefill.registry.get(ticket.transfer_id).block_ids)
    expected = [prefill.core.cache.read_blocks(layer, src).clone() for layer in decode.layout.kept_layers]
    dest = decode.core.pool.allocate(len(src))
    assert src != sorted(src) and dest != sorted(dest) and src != dest
    completion, stats = decode.channel(prefill.address).pull(ticket.transfer_id, dest, len(prompt))
    for j, want in enumerate(expected):
        assert torch.equal(decode.core.cache.read_blocks(j, dest), want)
    assert stats.nbytes == sum(t.numel() * t.element_size() for t in expected)
    decode.core.pool.free(dest + held_d)
    prefill.core.pool.free(held_p)
    wait_until(lambda: pool_full(prefill.stats()))
    assert pool_full(decode.stats())


def test_wrong_secret_is_refused(workers, pairs):
    prefill, _ = workers
    intruder = DecodeWorker(
        pairs["depth"].student,
        transfer=TransferConfig(secret="not-the-cluster-secret!"),
        **decode_kwargs(pairs["depth"]),
    )
    with pytest.raises(AuthenticationError, match="cluster-secret"):
        intruder.channel(prefill.address)
    ticket = prefill.submit(PROMPTS[0], GREEDY)
    with pytest.raises(AuthenticationError):
        intruder.generate_from(ticket).__next__()
    prefill.abort_transfer(ticket.transfer_id)
    assert pool_full(intruder.stats())
    wait_until(lambda: pool_full(prefill.stats()))


def test_layout_mismatch_lists_fields(workers, pairs):
    prefill, _ = workers
    other = DecodeWorker(
        pairs["depth"].student,
        transfer=TransferConfig(),
        **{**decode_kwargs(pairs["depth"]), "dtype": "bfloat16", "block_size": 8},
    )
    with pytest.raises(LayoutMismatchError) as e:
        other.channel(prefill.address)
    assert {m.split(":")[0] for m in e.value.mismatches} == {"dtype", "block_size"}
    assert pool_full(prefill.stats())


def _tamper(prefill, fn):
    prefill.server.servicer.chunk_filter = fn


def _rewrite_header(**changes):
    def fn(header, payload):
        h = ChunkHeader.decode(header)
        return ChunkHeader(**{**h.__dict__, **changes}).encode(), payload

    return fn


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_rewrite_header(block_start=10_000), "outside the transfer"),
        (_rewrite_header(block_start=-1), "outside the transfer"),
        (_rewrite_header(layer=1), "does not carry"),  # a teacher layer the depth-pruned student dropped
        (_rewrite_header(transfer_id="someone-else"), "arrived on transfer"),
        (lambda h, p: (h, p[:-8]), "must carry"),  # short
        (lambda h, p: (h, p + b"\0" * 8), "must carry"),  # oversized
        (lambda h, p: (h, p[:5] + bytes([p[5] ^ 0xFF]) + p[6:]), "checksum"),  # corrupted
        (lambda h, p: (b"\xc1garbage", p), "unreadable chunk header"),
    ],
)
def test_bad_chunks_rejected_and_cleaned_up(workers, tamper, message):
    prefill, decode = workers
    _tamper(prefill, tamper)
    ticket = prefill.submit(PROMPTS[0], GREEDY)
    before = decode.core.cache.tensor.clone()
    with pytest.raises(ChunkError, match=message):
        list(decode.generate_from(ticket))
    assert torch.equal(decode.core.cache.tensor, before)  # nothing was written by the bad chunk
    assert pool_full(decode.stats())
    wait_until(lambda: pool_full(prefill.stats()))


def test_unpulled_transfer_expires(pairs):
    config = TransferConfig(lease_seconds=0.3)
    prefill = PrefillWorker(pairs["depth"].teacher, transfer=config, block_size=4, num_kv_blocks=64).start()
    decode = DecodeWorker(pairs["depth"].student, transfer=config, **decode_kwargs(pairs["depth"])).start()
    try:
        ticket = prefill.submit(PROMPTS[2], GREEDY)
        wait_until(lambda: prefill.stats().open_transfers == 1 and not pool_full(prefill.stats()))
        wait_until(lambda: pool_full(prefill.stats()), timeout=3)
        # KV the prefill side no longer holds is a migration (the dispatcher re-prefills), not a client error.
        with pytest.raises(PeerUnavailableError, match="lease expired") as e:
            list(decode.generate_from(ticket))
        assert isinstance(e.value.__cause__, TransferNotFoundError)
        assert pool_full(decode.stats())
    finally:
        decode.stop()
        prefill.stop()


def test_renewed_lease_survives(pairs):
    config = TransferConfig(lease_seconds=0.5)
    prefill = PrefillWorker(pairs["depth"].teacher, transfer=config, block_size=4, num_kv_blocks=64).start()
    decode = DecodeWorker(pairs["depth"].student, transfer=config, **decode_kwargs(pairs["depth"])).start()
    try:
        ticket = prefill.submit(PROMPTS[0], GREEDY)
        channel = decode.channel(prefill.address)
        wait_until(lambda: prefill.registry.get(ticket.transfer_id).completion is not None)
        for _ in range(4):
            time.sleep(0.25)
            assert channel.renew(ticket.transfer_id) > 0.3
        assert len([t for o in decode.generate_from(ticket) for t in o.token_ids]) == 10
        wait_until(lambda: pool_full(prefill.stats()))
    finally:
        decode.stop()
        prefill.stop()


def test_drain_waits_for_open_transfers(pairs):
    """A prefill worker shutting down serves the KV it offered: drain returns once it is pulled, or once an
    unpulled transfer's lease runs out; both pools are full after."""
    pair = pairs["depth"]
    llm = LLM(pair.teacher, pair.student, num_kv_blocks=96, block_size=4)
    config = TransferConfig(lease_seconds=2.0)
    prefill = PrefillWorker(pair.teacher, transfer=config, block_size=4, num_kv_blocks=64).start()
    decode = DecodeWorker(pair.student, transfer=config, **decode_kwargs(pair)).start()
    try:
        pulled, _ = prefill.submit(PROMPTS[0], GREEDY), prefill.submit(PROMPTS[2], GREEDY)
        assert not prefill.drain(timeout=0.2)  # both still open
        tokens = [t for o in decode.generate_from(pulled) for t in o.token_ids]
        assert tokens == llm.generate(PROMPTS[0], GREEDY)[0].token_ids
        assert prefill.registry.num_open == 1  # the unpulled one holds on until its lease ends
        start = time.monotonic()
        assert prefill.drain(timeout=6.0)
        assert 0.2 < time.monotonic() - start < 4.0
        assert pool_full(prefill.stats()) and pool_full(decode.stats())
    finally:
        decode.stop()
        prefill.stop()


def test_abort_from_decode_side(workers):
    prefill, decode = workers
    ticket = prefill.submit(PROMPTS[1], GREEDY)
    decode.channel(prefill.address).abort(ticket.transfer_id, "client went away")
    wait_until(lambda: pool_full(prefill.stats()))
    with pytest.raises(TransferAbortedError, match="client went away"):
        list(decode.generate_from(ticket))
    assert pool_full(decode.stats())


class GatedReady:
    """A layer's readiness the test controls: the CPU stand-in for a CUDA event the GPU has not reached."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.done_at: float | None = None

    def synchronize(self) -> None:
        assert self.gate.wait(10), "never released"
        self.done_at = time.monotonic()


def test_a_layer_is_read_only_once_its_kv_is_ready(workers):
    """Layer-wise publishing hands the channel each layer as soon as its kernels are queued, with a handle
    that says when they ran: no KV of a layer is read before that."""
    prefill, decode = workers
    expected = [t for o in decode.generate_from(prefill.submit(PROMPTS[2], GREEDY)) for t in o.token_ids]
    ready: dict[int, GatedReady] = {}
    publish, read = prefill.registry.layer_done, prefill.core.cache.block_bytes_parts
    reads: list[tuple[int, float]] = []

    def gated(transfer_id, layer, _ready=None):
        publish(transfer_id, layer, ready.setdefault(layer, GatedReady()))

    def recorded(layer, blocks):
        reads.append((layer, time.monotonic()))
        return read(layer, blocks)

    prefill.registry.layer_done, prefill.core.cache.block_bytes_parts = gated, recorded
    ticket = prefill.submit(PROMPTS[2], GREEDY)
    tokens: list[int] = []
    puller = threading.Thread(
        target=lambda: tokens.extend(t for o in decode.generate_from(ticket) for t in o.token_ids)
    )
    puller.start()
    wait_until(lambda: len(ready) == 4)  # the teacher's four layers computed (queued, on a GPU)
    time.sleep(0.3)
    assert reads == []
    for layer in sorted(ready):
        ready[layer].gate.set()
        time.sleep(0.05)
    puller.join(10)
    assert tokens == expected
    assert {layer for layer, _ in reads} == set(decode.layout.kept_layers)
    assert all(at >= ready[layer].done_at for layer, at in reads)  # type: ignore[operator]


def test_control_only_peer_aborts_but_cannot_pull(workers):
    """The ingress holds no model: its control-only channel (no layout) aborts a transfer, which frees the
    prefill side's blocks, and is refused the data plane."""
    prefill, decode = workers
    ticket = prefill.submit(PROMPTS[2], GREEDY)
    wait_until(lambda: prefill.stats().open_transfers == 1 and not pool_full(prefill.stats()))
    control = KVChannel(prefill.address, TransferConfig(), client_id="ingress").connect()
    try:
        with pytest.raises(grpc.RpcError) as e:
            list(
                control.stub.Describe(
                    pb.PullRequest(transfer_id=ticket.transfer_id), metadata=control.metadata
                )
            )
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "control-only" in e.value.details()
    finally:
        control.close()
    transfers = TransferControl(TransferConfig())
    transfers.abort(ticket.address, ticket.transfer_id, "nobody will pull it")
    transfers.stop()
    wait_until(lambda: pool_full(prefill.stats()) and prefill.stats().open_transfers == 0)
    with pytest.raises(TransferAbortedError, match="nobody will pull it"):
        list(decode.generate_from(ticket))
    assert pool_full(decode.stats())


def test_abort_from_prefill_side_mid_pull(workers):
    prefill, decode = workers

    def slow(header, payload):
        time.sleep(0.05)
        return header, payload

    _tamper(prefill, slow)
    ticket = prefill.submit(PROMPTS[2], GREEDY)
    threading.Timer(0.2, prefill.abort_transfer, (ticket.transfer_id, "operator abort")).start()
    with pytest.raises(TransferAbortedError, match="operator abort"):
        list(decode.generate_from(ticket))
    assert pool_full(decode.stats())
    wait_until(lambda: pool_full(prefill.stats()))


def test_stalled_peer_times_out(pairs):
    config = TransferConfig(timeout_seconds=1.0, chunk_bytes=1024)
    prefill = PrefillWorker(pairs["depth"].teacher, transfer=config, block_size=4, num_kv_blocks=64).start()
    decode = DecodeWorker(pairs["depth"].student, transfer=config, **decode_kwargs(pairs["depth"])).start()

    def stall(header, payload):
        time.sleep(3)
        return header, payload

    _tamper(prefill, stall)
    try:
        ticket = prefill.submit(PROMPTS[0], GREEDY)
        start = time.monotonic()
        with pytest.raises(TransferTimeoutError):
            list(decode.generate_from(ticket))
        assert time.monotonic() - start < 2.5
        assert pool_full(decode.stats())
        wait_until(lambda: pool_full(prefill.stats()), timeout=6)
    finally:
        decode.stop()
        prefill.stop()


def test_prefill_peer_killed_mid_transfer(pairs):
    pair = pairs["depth"]
    prefill = PeerProcess(
        "prefill", pair.teacher, dict(block_size=4, num_kv_blocks=96), dict(chunk_bytes=512), chunk_delay=0.1
    )
    decode = DecodeWorker(pair.student, transfer=TransferConfig(chunk_bytes=512), **decode_kwargs(pair))
    decode.start()
    try:
        ticket = prefill.call("submit", PROMPTS[2], GREEDY)
        threading.Timer(0.5, prefill.kill).start()
        start = time.monotonic()
        with pytest.raises(PeerUnavailableError):
            list(decode.generate_from(ticket))
        assert time.monotonic() - start < 5
        assert pool_full(decode.stats())
    finally:
        decode.stop()
        prefill.close()


def test_decode_peer_killed_mid_transfer(pairs):
    pair = pairs["depth"]
    config = TransferConfig(chunk_bytes=512)
    prefill = PrefillWorker(pair.teacher, transfer=config, block_size=4, num_kv_blocks=64).start()

    def slow(header, payload):
        time.sleep(0.1)
        return header, payload

    _tamper(prefill, slow)
    decode = PeerProcess("decode", pair.student, decode_kwargs(pair), dict(chunk_bytes=512))
    try:
        ticket = prefill.submit(PROMPTS[2], GREEDY)
        decode.send("generate", ticket)
        wait_until(lambda: prefill.stats().open_transfers == 1)
        time.sleep(0.5)  # mid-stream
        decode.kill()
        wait_until(lambda: pool_full(prefill.stats()) and prefill.stats().open_transfers == 0, timeout=5)
    finally:
        decode.close()
        prefill.stop()


def test_peer_error_names_are_typed():
    """The two-process harness reports errors by their type name; keep the names the tests rely on."""
    for cls in (PeerUnavailableError, TransferAbortedError, TransferError, ChunkError):
        assert issubclass(cls, TransferError)
    assert PeerError("ChunkError", "m", "").name == "ChunkError"
