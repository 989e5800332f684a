"""A request that ends on the teacher's first token (a stop token id; eos follows the same rule) ships no
more KV than it must (issue 11 item 12): the completion says it finished, the prefill side stops sending
layers at the next layer boundary, and the decode side finishes the request with that one token, never
running the student. Real workers on loopback, over gRPC and (where installed) NIXL; the offline `LLM` is
the reference."""

from __future__ import annotations

import pytest
from kv_helpers import BACKENDS, decode_kwargs, wait_pools_returned
from peer_process import SECRET

from overfill_serve import LLM, SamplingParams
from overfill_serve.errors import ChunkError
from overfill_serve.transfer.config import TransferConfig
from overfill_serve.worker.decode_worker import DecodeWorker
from overfill_serve.worker.prefill_worker import PrefillWorker

PROMPT = list(range(10, 47))


@pytest.fixture(autouse=True)
def env(monkeypatch):
    monkeypatch.setenv("OVERFILL_CLUSTER_SECRET", SECRET)
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")  # NIXL's UCX over loopback


@pytest.fixture(scope="module")
def reference(pairs):
    """(params whose stop token is the teacher's own greedy first token, the offline LLM's output)."""
    pair = pairs["depth"]
    llm = LLM(pair.teacher, pair.student, num_kv_blocks=96, block_size=4)
    first = llm.generate(PROMPT, SamplingParams(max_tokens=1, temperature=0))[0].token_ids[0]
    params = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(first,))
    want = llm.generate(PROMPT, params)[0]
    assert want.token_ids == [first] and want.finish_reason == "stop"
    return params, want


def _workers(pairs, backend, layerwise):
    pair = pairs["depth"]
    config = TransferConfig(backend=backend, layerwise=layerwise, chunk_bytes=1024, timeout_seconds=10.0)
    prefill = PrefillWorker(pair.teacher, transfer=config, block_size=4, num_kv_blocks=64).start()
    decode = DecodeWorker(pair.student, transfer=config, **decode_kwargs(pair)).start()
    return prefill, decode


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_on_first_token_ships_no_kv(pairs, reference, backend):
    """Without layer-wise publishing the pull starts after the completion: not one KV byte travels."""
    params, want = reference
    prefill, decode = _workers(pairs, backend, layerwise=False)
    try:
        outs = list(decode.generate_from(prefill.submit(PROMPT, params)))
        assert [t for o in outs for t in o.token_ids] == want.token_ids
        assert "".join(o.text for o in outs) == want.text
        assert outs[-1].finished and outs[-1].finish_reason.value == want.finish_reason
        assert decode.last_transfer.backend == backend and decode.last_transfer.nbytes == 0
        assert decode.stats().finished == 1
        wait_pools_returned(prefill, decode)
    finally:
        decode.stop()
        prefill.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_on_first_token_with_layerwise_publishing(pairs, reference, backend):
    """Layers published before the completion may have travelled; the output and the pools are the same."""
    params, want = reference
    prefill, decode = _workers(pairs, backend, layerwise=True)
    try:
        outs = list(decode.generate_from(prefill.submit(PROMPT, params)))
        assert [t for o in outs for t in o.token_ids] == want.token_ids
        assert outs[-1].finish_reason.value == want.finish_reason
        full = 2 * len(decode.layout.kept_layers) * decode.core.cache.block_bytes * (-(-len(PROMPT) // 4))
        assert 0 <= decode.last_transfer.nbytes <= full
        wait_pools_returned(prefill, decode)
    finally:
        decode.stop()
        prefill.stop()


def test_request_going_on_still_gets_its_kv(pairs, reference):
    """A stop token that is not the first token changes nothing: the whole KV travels."""
    _, want = reference
    prefill, decode = _workers(pairs, "grpc", layerwise=False)
    go_on = SamplingParams(
        max_tokens=4, temperature=0, ignore_eos=True, stop_token_ids=(want.token_ids[0] + 1,)
    )
    try:
        outs = list(decode.generate_from(prefill.submit(PROMPT, go_on)))
        full = 2 * len(decode.layout.kept_layers) * decode.core.cache.block_bytes * (-(-len(PROMPT) // 4))
        assert decode.last_transfer.nbytes == full
        assert sum(len(o.token_ids) for o in outs) >= 1
        wait_pools_returned(prefill, decode)
    finally:
        decode.stop()
        prefill.stop()


def test_finished_claim_checked_by_the_decode_side(pairs, monkeypatch):
    """A completion that says finished for a token this request does not stop on is refused (typed), and
    both pools come back whole."""
    prefill, decode = _workers(pairs, "grpc", layerwise=False)
    monkeypatch.setattr(prefill.core.output, "stops_on", lambda token, params, **_: True)
    go_on = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    try:
        with pytest.raises(ChunkError, match="finished"):
            list(decode.generate_from(prefill.submit(PROMPT, go_on)))
        wait_pools_returned(prefill, decode)
    finally:
        decode.stop()
        prefill.stop()


def test_a_failing_transfer_hook_leaks_no_blocks(pairs, reference):
    """The per-transfer metrics hook raising (a bug) fails the request loudly but frees its blocks."""
    params, _ = reference
    prefill, decode = _workers(pairs, "grpc", layerwise=False)

    def broken(stats):
        raise ValueError("metrics bug")

    decode.on_transfer = broken
    try:
        with pytest.raises(ValueError, match="metrics bug"):
            list(decode.generate_from(prefill.submit(PROMPT, SamplingParams(max_tokens=4, temperature=0))))
        wait_pools_returned(prefill, decode)
    finally:
        decode.stop()
        prefill.stop()
