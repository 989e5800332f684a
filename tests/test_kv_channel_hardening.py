"""The KV channel under pressure and after restarts (issue 11): control RPCs never wait behind pulls, waits hold
no threads, leases live while the decode side waits for blocks, the peer's first token is checked, cached
channels survive a prefill restart, and the server binds the interface its config names."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from kv_helpers import decode_kwargs, pool_full, wait_until
from peer_process import SECRET

from overfill_serve import SamplingParams
from overfill_serve._proto.overfill.v1 import kv_transfer_pb2 as pb
from overfill_serve.errors import ChunkError, PeerUnavailableError, PreemptedError, TransferAbortedError
from overfill_serve.serve.config import ServeConfig
from overfill_serve.transfer import server as server_module
from overfill_serve.transfer.channel import KVChannel
from overfill_serve.transfer.config import TransferConfig
from overfill_serve.transfer.control import TransferControl
from overfill_serve.worker.decode_worker import DecodeWorker
from overfill_serve.worker.prefill_worker import PrefillWorker

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPT = list(range(10, 47))


@pytest.fixture(autouse=True)
def secret(monkeypatch):
    monkeypatch.setenv("OVERFILL_CLUSTER_SECRET", SECRET)


def _workers(pairs, **transfer):
    pair = pairs["depth"]
    config = TransferConfig(**{"chunk_bytes": 1024, "timeout_seconds": 5.0, **transfer})
    prefill = PrefillWorker(pair.teacher, transfer=config, block_size=4, num_kv_blocks=64).start()
    decode = DecodeWorker(pair.student, transfer=config, **decode_kwargs(pair)).start()
    return prefill, decode


def _tokens(decode, ticket):
    return [t for out in decode.generate_from(ticket) for t in out.token_ids]


def test_control_rpcs_answer_while_many_pulls_wait(pairs):
    """More pulls than the server ever had threads wait on prefills that never finish: release, renew and
    abort still answer at once."""
    prefill, decode = _workers(pairs)
    try:
        stalled = [
            prefill.registry.open(prefill._new_request([5, 6, 7], GREEDY, None, None)) for _ in range(40)
        ]
        channel = decode.channel(prefill.address)
        pulls = [
            channel.link.pull_raw(pb.PullRequest(transfer_id=t), metadata=channel.metadata, timeout=10)
            for t in stalled
        ]
        wait_until(lambda: prefill.registry.num_readers == 40, what="every pull waiting")
        ticket = prefill.submit(PROMPT, GREEDY)
        wait_until(lambda: prefill.registry.get(ticket.transfer_id).completion is not None)
        start = time.monotonic()
        assert channel.renew(ticket.transfer_id) > 0
        channel.abort(ticket.transfer_id, "not needed")
        channel.release(stalled[0])
        assert time.monotonic() - start < 1.0
        with pytest.raises(TransferAbortedError):
            _tokens(decode, ticket)
        for call in pulls:
            call.cancel()
        wait_until(lambda: prefill.registry.num_open == 0 and pool_full(prefill.stats()))
    finally:
        decode.stop()
        prefill.stop()


def test_waiting_for_blocks_holds_no_thread(pairs):
    """Pulls waiting for decode blocks are coroutines: a one-thread executor stays free for other work, and
    each pull goes on as soon as blocks are freed."""
    prefill, decode = _workers(pairs)
    held = decode.core.pool.allocate(decode.core.pool.num_blocks)
    tickets = [prefill.submit(PROMPT, GREEDY) for _ in range(3)]

    async def run() -> list[list[int]]:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=1))

        async def collect(ticket):
            return [t async for out in decode.agenerate_from(ticket) for t in out.token_ids]

        tasks = [asyncio.create_task(collect(t)) for t in tickets]
        await asyncio.sleep(0.5)  # all three waiting for blocks
        start = time.monotonic()
        assert await asyncio.get_running_loop().run_in_executor(None, lambda: 42) == 42
        assert time.monotonic() - start < 0.3
        decode.core.pool.free(held)
        return await asyncio.gather(*tasks)

    try:
        outputs = asyncio.run(run())
        assert len({tuple(o) for o in outputs}) == 1 and len(outputs[0]) == 6
        wait_until(lambda: pool_full(prefill.stats()) and pool_full(decode.stats()))
    finally:
        decode.stop()
        prefill.stop()


def test_lease_renewed_while_waiting_for_blocks(pairs):
    prefill, decode = _workers(pairs, lease_seconds=0.6)
    held = decode.core.pool.allocate(decode.core.pool.num_blocks)
    try:
        ticket = prefill.submit(PROMPT, GREEDY)
        threading.Timer(2.0, decode.core.pool.free, (held,)).start()  # three leases later
        assert len(_tokens(decode, ticket)) == 6
        wait_until(lambda: pool_full(prefill.stats()) and pool_full(decode.stats()))
    finally:
        decode.stop()
        prefill.stop()


def test_no_blocks_in_time_gives_the_request_back(pairs):
    prefill, decode = _workers(pairs, timeout_seconds=1.0)
    held = decode.core.pool.allocate(decode.core.pool.num_blocks)
    try:
        ticket = prefill.submit(PROMPT, GREEDY)
        with pytest.raises(PreemptedError):
            _tokens(decode, ticket)
        decode.core.pool.free(held)
        wait_until(lambda: pool_full(prefill.stats()) and pool_full(decode.stats()))
    finally:
        decode.stop()
        prefill.stop()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("first_token", 10**6, "first token"), ("first_token", -1, "first token"), ("num_tokens", 3, "covers")],
)
def test_peer_completion_checked_at_the_edge(pairs, monkeypatch, field, value, message):
    real = server_module.completion_to_pb

    def forged(completion):
        msg = real(completion)
        setattr(msg, field, value)
        return msg

    monkeypatch.setattr(server_module, "completion_to_pb", forged)
    prefill, decode = _workers(pairs)
    try:
        with pytest.raises(ChunkError, match=message):
            _tokens(decode, prefill.submit(PROMPT, GREEDY))
        assert decode.loop.error is None and pool_full(decode.stats())
        wait_until(lambda: pool_full(prefill.stats()))
    finally:
        decode.stop()
        prefill.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cached_channels_reconnect_after_a_prefill_restart(pairs):
    pair = pairs["depth"]
    config = TransferConfig(port=_free_port(), timeout_seconds=5.0)
    prefill = PrefillWorker(pair.teacher, transfer=config, block_size=4, num_kv_blocks=64).start()
    decode = DecodeWorker(pair.student, transfer=config, **decode_kwargs(pair)).start()
    control = TransferControl(config)
    try:
        expected = _tokens(decode, prefill.submit(PROMPT, GREEDY))
        control.abort(prefill.address, "unknown", "warm the cached channel")
        prefill.stop()
        prefill = PrefillWorker(pair.teacher, transfer=config, block_size=4, num_kv_blocks=64).start()
        assert _tokens(decode, prefill.submit(PROMPT, GREEDY)) == expected
        ticket = prefill.submit(PROMPT, GREEDY)
        control.abort(ticket.address, ticket.transfer_id, "after the restart")
        wait_until(lambda: prefill.registry.num_open == 0 and pool_full(prefill.stats()))
    finally:
        control.stop()
        decode.stop()
        prefill.stop()


def test_server_binds_only_the_configured_interface(pairs):
    prefill, _ = _workers(pairs, host="127.0.0.1")
    try:
        port = int(prefill.address.rsplit(":", 1)[1])
        KVChannel(f"127.0.0.1:{port}", TransferConfig(timeout_seconds=2.0)).connect().close()
        with pytest.raises(PeerUnavailableError):
            KVChannel(f"127.0.0.2:{port}", TransferConfig(timeout_seconds=2.0)).connect()
    finally:
        prefill.stop()


def test_serve_config_binds_the_configured_host_and_advertises_the_node():
    default = ServeConfig.from_args({"transfer": {"secret": SECRET}}).transfer_config("10.1.2.3")
    assert (default.host, default.address_host) == ("10.1.2.3", "10.1.2.3")
    loopback = ServeConfig.from_args({"transfer": {"secret": SECRET, "host": "127.0.0.1"}})
    assert loopback.transfer_config("10.1.2.3").address_host == "127.0.0.1"
    wildcard = ServeConfig.from_args({"transfer": {"secret": SECRET, "host": "0.0.0.0"}})
    config = wildcard.transfer_config("10.1.2.3")
    assert (config.host, config.address_host) == ("0.0.0.0", "10.1.2.3")
