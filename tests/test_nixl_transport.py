"""The KV channel's NIXL backend, for real: NIXL agents over UCX (cma + tcp on loopback) and gRPC on 127.0.0.1.

The decode side READs the prefill side's registered pool: greedy tokens equal the single-process LLM, the
KV arrives byte-exact into scattered blocks, forged descriptors are refused before any read, the decode
side's notification alone frees the prefill side's blocks, a dead peer ends typed, both pools end full,
and nothing spins while idle."""

from __future__ import annotations

import random
import threading
import time

import grpc
import msgpack
import numpy as np
import pytest
import torch

try:
    from nixl._api import nixl_agent  # noqa: F401
except Exception as e:  # ImportError, or no usable NIXL backend module
    pytest.skip(
        f"NIXL is not installed ({e}); pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1",
        allow_module_level=True,
    )

from kv_helpers import decode_kwargs, fragment, pool_full, wait_until
from peer_process import SECRET, PeerProcess

from overfill_serve import LLM, SamplingParams
from overfill_serve._proto.overfill.v1 import kv_transfer_pb2 as pb
from overfill_serve._proto.overfill.v1 import kv_transfer_pb2_grpc as pb_grpc
from overfill_serve.errors import ChunkError, PeerUnavailableError, TransferError
from overfill_serve.transfer import auth
from overfill_serve.transfer import nixl_transport as nixl_module
from overfill_serve.transfer.channel import KVChannel
from overfill_serve.transfer.config import TransferConfig
from overfill_serve.transfer.nixl_agent import RemotePool
from overfill_serve.transfer.nixl_transport import coalesce
from overfill_serve.transfer.transport import KVTransport
from overfill_serve.worker.decode_worker import DecodeWorker
from overfill_serve.worker.prefill_worker import PrefillWorker

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [list(range(10, 47)), [7, 8, 9], list(range(100, 180))]
NIXL = TransferConfig(backend="nixl", timeout_seconds=10.0)


@pytest.fixture(autouse=True)
def env(monkeypatch):
    monkeypatch.setenv("OVERFILL_CLUSTER_SECRET", SECRET)
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")  # read by UCX when an agent is created


def _tokens(decode, ticket):
    return [t for out in decode.generate_from(ticket) for t in out.token_ids]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["identity", "depth"])
def test_matches_single_process(pairs, kind, dtype):
    pair = pairs[kind]
    llm = LLM(pair.teacher, pair.student, dtype=dtype, num_kv_blocks=96, block_size=4)
    expected = [llm.generate(p, GREEDY)[0].token_ids for p in PROMPTS]  # one at a time, as the workers run
    prefill = PrefillWorker(pair.teacher, transfer=NIXL, dtype=dtype, block_size=4, num_kv_blocks=96).start()
    decode = DecodeWorker(pair.student, transfer=NIXL, **decode_kwargs(pair, dtype)).start()
    try:
        for prompt, want in zip(PROMPTS, expected):
            assert _tokens(decode, prefill.submit(prompt, GREEDY)) == want
            stats = decode.last_transfer
            assert stats.backend == "nixl"
            # Only the kept layers travel: a depth-pruned student reads half the teacher's KV.
            blocks = -(-len(prompt) // 4)
            assert stats.nbytes == 2 * len(decode.layout.kept_layers) * decode.core.cache.block_bytes * blocks
        wait_until(lambda: pool_full(prefill.stats()) and prefill.stats().open_transfers == 0)
        assert pool_full(decode.stats())
    finally:
        decode.stop()
        prefill.stop()


@pytest.fixture
def workers(pairs):
    """In-process prefill and decode workers (depth pair: teacher layers 0 and 3 travel) over NIXL."""
    pair = pairs["depth"]
    prefill = PrefillWorker(pair.teacher, transfer=NIXL, block_size=4, num_kv_blocks=64).start()
    decode = DecodeWorker(pair.student, transfer=NIXL, **decode_kwargs(pair)).start()
    yield prefill, decode
    decode.stop()
    prefill.stop()


def _ready(prefill, prompt):
    ticket = prefill.submit(prompt, GREEDY)
    wait_until(lambda: prefill.registry.get(ticket.transfer_id).completion is not None)
    return ticket, list(prefill.registry.get(ticket.transfer_id).block_ids)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kv_byte_exact_with_scattered_blocks(workers, seed):
    prefill, decode = workers
    rng = random.Random(seed)
    held_p, held_d = fragment(prefill.core.pool, rng), fragment(decode.core.pool, rng)
    prompt = [rng.randrange(3, 400) for _ in range(rng.randint(5, 40))]
    ticket, src = _ready(prefill, prompt)
    expected = [prefill.core.cache.read_blocks(layer, src).clone() for layer in decode.layout.kept_layers]
    dest = decode.core.pool.allocate(len(src))
    assert src != sorted(src) and dest != sorted(dest) and src != dest
    untouched = [b for b in range(decode.core.cache.num_blocks) if b not in dest]
    before = decode.core.cache.tensor[:, :, untouched].clone()
    completion, stats = decode.channel(prefill.address).pull(ticket.transfer_id, dest, len(prompt))
    assert completion.num_tokens == len(prompt)
    for j, want in enumerate(expected):
        assert torch.equal(decode.core.cache.read_blocks(j, dest), want)
    assert torch.equal(decode.core.cache.tensor[:, :, untouched], before)  # nothing outside dest was written
    assert stats.nbytes == sum(t.numel() * t.element_size() for t in expected)
    decode.core.pool.free(dest + held_d)
    prefill.core.pool.free(held_p)
    wait_until(lambda: pool_full(prefill.stats()))
    assert pool_full(decode.stats())


def test_notification_alone_frees_the_prefill_blocks(workers):
    """The transport's own end: after the reads, the NIXL notification releases the transfer (no gRPC
    Release is sent here)."""
    prefill, decode = workers
    ticket, src = _ready(prefill, PROMPTS[0])
    channel = decode.channel(prefill.address)
    dest = decode.core.pool.allocate(len(src))
    received = channel.transport.receive(channel._link(), ticket.transfer_id, dest, len(PROMPTS[0]))
    assert received.nbytes > 0 and received.first_byte_at > 0
    wait_until(lambda: prefill.stats().open_transfers == 0 and pool_full(prefill.stats()), timeout=2)
    channel.release(ticket.transfer_id)  # what KVChannel.pull does next: a no-op now
    decode.core.pool.free(dest)


def _forge(field, value_of):
    def rewrite(msg: pb.LayerReady, source) -> pb.LayerReady:
        forged = pb.LayerReady()
        forged.CopyFrom(msg)
        value = value_of(msg, source)
        if field == "addresses":
            del forged.addresses[:]
            forged.addresses.extend(value)
        else:
            setattr(forged, field, value)
        return forged

    return rewrite


def _pool_end(msg, source):
    return source.cache.tensor.data_ptr() + source.cache.nbytes


@pytest.mark.parametrize(
    ("forgery", "message"),
    [
        (
            _forge("addresses", lambda m, s: [_pool_end(m, s)] + list(m.addresses)[1:]),
            "outside the prefill pool",
        ),
        (_forge("addresses", lambda m, s: [m.base_address - 4096] + list(m.addresses)[1:]), "outside"),
        (_forge("addresses", lambda m, s: [m.addresses[0] + 8] + list(m.addresses)[1:]), "not aligned"),
        (_forge("addresses", lambda m, s: list(m.addresses)[:-1]), "block addresses, expected"),
        # another layer's blocks, in bounds and aligned: still refused
        (
            _forge(
                "addresses",
                lambda m, s: [
                    a + 2 * s.cache.num_blocks * m.block_bytes
                    if m.layer == 0
                    else a - 2 * s.cache.num_blocks * m.block_bytes
                    for a in m.addresses
                ],
            ),
            "outside the layer's K blocks",
        ),
        (
            _forge(
                "addresses",
                lambda m, s: (
                    list(m.addresses)[len(m.addresses) // 2 :] + list(m.addresses)[: len(m.addresses) // 2]
                ),
            ),
            "K blocks",
        ),
        (_forge("base_address", lambda m, s: m.base_address + 4096), "handshake"),
        (_forge("block_bytes", lambda m, s: m.block_bytes * 2), "bytes"),
        (_forge("layer", lambda m, s: 1), "not one this side keeps"),  # the depth-pruned student dropped 1
        (_forge("layer", lambda m, s: 0), "described twice"),
    ],
)
def test_forged_descriptors_refused_before_reading(workers, monkeypatch, forgery, message):
    prefill, decode = workers
    decode.channel(prefill.address)  # the handshake creates the prefill side's NixlSource
    source = prefill.server.servicer.nixl_source
    describe = source.describe
    monkeypatch.setattr(source, "describe", lambda layer, blocks: forgery(describe(layer, blocks), source))
    before = decode.core.cache.tensor.clone()
    with pytest.raises(ChunkError, match=message):
        list(decode.generate_from(prefill.submit(PROMPTS[2], GREEDY)))
    if message != "described twice":  # (there the first, genuine, layer was read)
        assert torch.equal(decode.core.cache.tensor, before)  # refused before any read was posted
    assert pool_full(decode.stats())
    wait_until(lambda: pool_full(prefill.stats()) and prefill.stats().open_transfers == 0)
    monkeypatch.undo()  # the channel still works
    assert len(_tokens(decode, prefill.submit(PROMPTS[1], GREEDY))) == 10
    wait_until(lambda: pool_full(prefill.stats()))


def test_idle_workers_do_not_spin(workers):
    prefill, decode = workers
    assert len(_tokens(decode, prefill.submit(PROMPTS[0], GREEDY))) == 10
    time.sleep(1.2)  # past the prefill side's burst of polls after its last describe
    start = time.process_time()
    time.sleep(1.0)
    assert time.process_time() - start < 0.2  # every thread of both workers, NIXL's included


def test_concurrent_pulls_share_one_agent(workers):
    prefill, decode = workers
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 400) for _ in range(rng.randint(5, 30))] for _ in range(4)]
    ready = [_ready(prefill, p) for p in prompts]
    expected = [
        [prefill.core.cache.read_blocks(layer, src).clone() for layer in decode.layout.kept_layers]
        for _, src in ready
    ]
    channel = decode.channel(prefill.address)
    dests = [decode.core.pool.allocate(len(src)) for _, src in ready]
    errors = []

    def pull(i):
        try:
            channel.pull(ready[i][0].transfer_id, dests[i], len(prompts[i]))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=pull, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    for dest, want in zip(dests, expected):
        for j, layer_kv in enumerate(want):
            assert torch.equal(decode.core.cache.read_blocks(j, dest), layer_kv)
    for dest in dests:
        decode.core.pool.free(dest)
    wait_until(lambda: pool_full(prefill.stats()) and prefill.stats().open_transfers == 0)


class _BadHello(KVTransport):
    """A decode side whose NIXL hello is not an envelope."""

    name = "nixl"

    def hello(self) -> bytes:
        return b"\xc1"

    def receive(self, link, transfer_id, dest_blocks, num_tokens):
        raise AssertionError("never connected")


def test_handshake_failure_is_typed_and_stop_closes_the_source(workers):
    """A TransferError in the prefill side's NIXL handshake reaches the peer with its status (not UNKNOWN);
    stopping the KV server deregisters the pool."""
    prefill, decode = workers
    bad = KVChannel(
        prefill.address,
        NIXL,
        decode.layout,
        decode.core.cache,
        client_id="bad",
        transport=_BadHello(decode.core.cache),
    )
    with pytest.raises(TransferError, match="INTERNAL: unreadable NIXL handshake from the decode side"):
        bad.connect()
    bad.close()
    source = prefill.server.servicer.nixl_source
    assert source is not None  # created by that handshake: a good peer still connects
    assert len(_tokens(decode, prefill.submit(PROMPTS[1], GREEDY))) == 10
    prefill.server.stop()
    assert not source._finalizer.alive  # closed: agent's peers removed, pool deregistered


def test_handshake_macs_cover_the_nixl_envelopes(workers):
    """A decode side's NIXL hello swapped in transit fails the cluster-secret check; the prefill side's
    envelope is signed by its MAC."""
    prefill, decode = workers
    secret = auth.load_secret(SECRET)
    layout = msgpack.packb(decode.layout.to_dict())
    genuine = decode.channel(prefill.address).transport.hello()
    forged = msgpack.packb({"v": 1, "name": "mallory", "agent": b"not an agent"})

    def handshake(stub, sent: bytes, signed: bytes) -> tuple[pb.HandshakeResponse, bytes, bytes]:
        server_nonce = stub.Challenge(pb.ChallengeRequest(), timeout=10).server_nonce
        client_nonce = auth.new_nonce()
        request = pb.HandshakeRequest(
            client_id="test",
            server_nonce=server_nonce,
            client_nonce=client_nonce,
            layout=layout,
            mac=auth.client_mac(secret, server_nonce, client_nonce, layout, signed),
            backend="nixl",
            nixl_agent_metadata=sent,
        )
        return stub.Handshake(request, timeout=10), server_nonce, client_nonce

    with grpc.insecure_channel(prefill.address) as channel:
        stub = pb_grpc.KVTransferStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            handshake(stub, forged, genuine)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        response, server_nonce, client_nonce = handshake(stub, genuine, genuine)
    assert response.nixl_agent_metadata
    signed = auth.server_mac(
        secret, client_nonce, server_nonce, response.session, response.layout, response.nixl_agent_metadata
    )
    assert auth.verify(signed, response.mac)
    unsigned = auth.server_mac(secret, client_nonce, server_nonce, response.session, response.layout, b"")
    assert not auth.verify(unsigned, response.mac)


def test_blocks_stay_put_while_reads_are_in_flight(pairs, monkeypatch):
    """The decode side waits for its READs after `done`: the lease runs out meanwhile, yet the prefill side
    neither expires the transfer nor frees (so never reuses) its blocks until the reader is done."""
    config = TransferConfig(backend="nixl", timeout_seconds=10.0, lease_seconds=0.3)
    prefill = PrefillWorker(pairs["depth"].teacher, transfer=config, block_size=4, num_kv_blocks=64).start()
    decode = DecodeWorker(pairs["depth"].student, transfer=config, **decode_kwargs(pairs["depth"])).start()
    wait, seen = nixl_module._Reads.wait, []

    def slow_reads(self, timeout):
        time.sleep(1.0)  # three leases
        seen.append((prefill.registry.num_open, pool_full(prefill.stats())))
        return wait(self, timeout)

    monkeypatch.setattr(nixl_module._Reads, "wait", slow_reads)
    try:
        expected = _tokens(decode, prefill.submit(PROMPTS[0], GREEDY))
        assert seen == [(1, False)] and len(expected) == 10
        wait_until(lambda: pool_full(prefill.stats()) and prefill.registry.num_open == 0, timeout=3)
        assert pool_full(decode.stats())
    finally:
        decode.stop()
        prefill.stop()


def test_prefill_killed_before_the_read(pairs, monkeypatch):
    """Across two processes: one pull reads the other process's pool; then the prefill process dies
    between describing a layer and our read of it: NIXL reports the disconnect, typed, nothing leaks."""
    pair = pairs["depth"]
    prefill = PeerProcess("prefill", pair.teacher, dict(block_size=4, num_kv_blocks=96), dict(backend="nixl"))
    decode = DecodeWorker(pair.student, transfer=NIXL, **decode_kwargs(pair)).start()
    try:
        ticket = prefill.call("submit", PROMPTS[0], GREEDY)
        assert len(_tokens(decode, ticket)) == 10
        wait_until(lambda: pool_full(prefill.call("stats")))
        post = nixl_module._Reads.post

        def die_first(self, *args):
            prefill.kill()
            return post(self, *args)

        monkeypatch.setattr(nixl_module._Reads, "post", die_first)
        ticket = prefill.call("submit", PROMPTS[2], GREEDY)
        start = time.monotonic()
        with pytest.raises(PeerUnavailableError, match="NIXL"):
            list(decode.generate_from(ticket))
        assert time.monotonic() - start < 5
        assert pool_full(decode.stats())
    finally:
        decode.stop()
        prefill.close()


# -- descriptor checks and run merging, without agents -------------------------------------------------------

BASE, LAYERS, BLOCKS, BB = 1 << 20, 4, 16, 256
POOL = RemotePool("p", b"", BASE, LAYERS * 2 * BLOCKS * BB, LAYERS, BLOCKS, BB, "DRAM", 0)


def _msg(layer, blocks, **changes):
    k = [BASE + ((2 * layer) * BLOCKS + b) * BB for b in blocks]
    v = [BASE + ((2 * layer + 1) * BLOCKS + b) * BB for b in blocks]
    fields = dict(layer=layer, base_address=BASE, block_bytes=BB, addresses=k + v)
    fields.update(changes)
    return pb.LayerReady(**fields)


def test_descriptor_checks():
    assert POOL.check(_msg(3, [15, 0, 7]), 3).tolist() == list(_msg(3, [15, 0, 7]).addresses)
    bad = {
        "outside": _msg(3, [16, 0]),  # block 16 of layer 3's K is layer 3's V block 0
        "listed twice": _msg(1, [2, 2]),
        "layers": _msg(4, [0, 1]),
        "V block addresses": _msg(0, [0, 1], addresses=_msg(0, [0, 1]).addresses[:3] + [BASE]),
        "not aligned": _msg(0, [0, 1], addresses=[a + 1 for a in _msg(0, [0, 1]).addresses]),
        "outside the prefill pool": _msg(0, [0], addresses=[BASE + POOL.pool_bytes, BASE]),
    }
    for message, msg in bad.items():
        with pytest.raises(ChunkError, match=message):
            POOL.check(msg, len(msg.addresses) // 2)


def test_handshake_envelope_checked():
    with pytest.raises(TransferError, match="unreadable"):
        RemotePool.decode(b"\xc1")


def test_coalesce_merges_runs_contiguous_on_both_sides():
    local = np.array([0, 1, 2, 7, 8, 3], dtype=np.uint64) * 10
    remote = np.array([5, 6, 9, 10, 11, 0], dtype=np.uint64) * 10
    starts_l, starts_r, sizes = coalesce(local, remote, 10)
    assert starts_l.tolist() == [0, 20, 70, 30]
    assert starts_r.tolist() == [50, 90, 100, 0]
    assert sizes.tolist() == [20, 10, 20, 10]
