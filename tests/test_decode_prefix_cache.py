"""Decode-side prefix caching and partial KV transfer (issue 13 item 3): a decode worker keeps the teacher's
prompt blocks it received in its own prefix cache, under the block hashes the handover names, and pulls only
the blocks it lacks — over gRPC and (where installed) NIXL. Real workers on loopback, a depth-pruned pair
(only the kept layers travel); outputs against transformers' OverFill by hand (reference.py)."""

from __future__ import annotations

import shutil

import pytest
from conftest import edited_checkpoint
from kv_helpers import BACKENDS, decode_kwargs, wait_pools_returned, worker_pair
from reference import load_hf, overfill_greedy

from overfill_serve import SamplingParams
from overfill_serve.errors import ChunkError, TransferError
from overfill_serve.kv.paged_cache import blocks_for
from overfill_serve.model.loader import checkpoint_fingerprint
from overfill_serve.transfer.config import TransferConfig
from overfill_serve.worker.decode_worker import DecodeWorker
from overfill_serve.worker.prefill_worker import PrefillWorker

BS = 4
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def hf(pairs):
    pair = pairs["depth"]
    return load_hf(pair.teacher), load_hf(pair.student), pair.kept_layers


@pytest.fixture(scope="module", params=BACKENDS)
def workers(pairs, request):
    config = TransferConfig(backend=request.param, chunk_bytes=1024, timeout_seconds=10.0)
    with worker_pair(pairs["depth"], config) as (prefill, decode):
        yield prefill, decode, request.param


def _kv_bytes(decode: DecodeWorker, blocks: int) -> int:
    return blocks * 2 * len(decode.layout.kept_layers) * decode.core.cache.block_bytes


def _disaggregated(prefill: PrefillWorker, decode: DecodeWorker, prompt: list[int]) -> list[int]:
    return [t for out in decode.generate_from(prefill.submit(prompt, GREEDY)) for t in out.token_ids]


def test_a_conversation_pulls_only_each_turns_new_blocks(workers, hf):
    prefill, decode, _ = workers
    teacher, student, kept = hf
    prompt, hits = list(range(10, 33)), decode.stats().prefix_hits  # 23 tokens: 5 full blocks
    previous = 0  # the previous turn's prompt length
    for turn in range(3):
        tokens = _disaggregated(prefill, decode, prompt)
        assert tokens == overfill_greedy(teacher, student, prompt, GREEDY.max_tokens, kept)[0]
        # Every full block of the previous turn's prompt is the teacher's KV of the same tokens: held here.
        cached = previous // BS
        last = decode.last_transfer
        assert last.saved_bytes == _kv_bytes(decode, cached)
        assert last.nbytes == _kv_bytes(decode, blocks_for(len(prompt), BS) - cached)
        assert decode.stats().prefix_hits - hits == cached * BS
        hits, previous = decode.stats().prefix_hits, len(prompt)
        prompt = prompt + tokens + [200 + turn, 201 + turn]  # the answer and the next user message
    wait_pools_returned(prefill, decode)


def test_the_students_own_prefill_never_takes_the_teachers_blocks(workers, hf):
    prefill, decode, _ = workers
    _, student, _ = hf
    prompt = list(range(40, 61))
    _disaggregated(prefill, decode, prompt)  # the teacher's blocks of the prompt now cached here
    (pruned,) = [decode.core.prefill["student"]]
    hits = pruned.prefix_hits
    tokens = [t for out in decode.generate(prompt, GREEDY) for t in out.token_ids]
    assert pruned.prefix_hits == hits  # the pruned mode computes the prompt with the student
    assert tokens == overfill_greedy(student, student, prompt, GREEDY.max_tokens)[0]
    wait_pools_returned(prefill, decode)


def test_a_pull_from_beyond_the_transfer_is_refused_and_cleaned_up(workers):
    prefill, decode, _ = workers
    prompt = list(range(70, 79))  # 3 blocks
    ticket = prefill.submit(prompt, GREEDY)
    blocks = decode.core.pool.allocate(1)
    with pytest.raises(TransferError, match="none from block 3 on"):
        decode.channel(ticket.address).pull(ticket.transfer_id, blocks, len(prompt), first_block=3)
    decode.core.pool.free(blocks)
    wait_pools_returned(prefill, decode)  # the refused pull aborted the transfer: its blocks came back


def test_a_failed_pull_caches_nothing_and_keeps_the_cached_prefix(workers, hf):
    prefill, decode, backend = workers
    if backend != "grpc":
        pytest.skip("tampers with gRPC chunks")
    teacher, student, kept = hf
    first = list(range(90, 103))  # 13 tokens: 3 full blocks, then cached on the decode side
    second = first + list(range(300, 310))  # 23 tokens: its blocks 3 and 4 travel
    _disaggregated(prefill, decode, first)

    def corrupt(header: bytes, payload: bytes) -> tuple[bytes, bytes]:
        return header, bytes([payload[0] ^ 0xFF]) + payload[1:]

    prefill.server.servicer.chunk_filter = corrupt
    try:
        with pytest.raises(ChunkError, match="checksum"):
            _disaggregated(prefill, decode, second)
    finally:
        prefill.server.servicer.chunk_filter = None
    wait_pools_returned(prefill, decode)
    tokens = _disaggregated(prefill, decode, second)  # the failed pull's blocks were never cached
    assert tokens == overfill_greedy(teacher, student, second, GREEDY.max_tokens, kept)[0]
    assert decode.last_transfer.saved_bytes == _kv_bytes(decode, 3)
    wait_pools_returned(prefill, decode)


def test_a_decode_worker_without_prefix_caching_pulls_everything(pairs, workers):
    prefill, _, _ = workers
    pair = pairs["depth"]
    config = prefill.server.config
    decode = DecodeWorker(
        pair.student, transfer=config, **decode_kwargs(pair), enable_prefix_caching=False
    ).start()
    try:
        prompt = list(range(120, 141))
        for _ in range(2):
            _disaggregated(prefill, decode, prompt)
            last = decode.last_transfer
            assert last.saved_bytes == 0 and last.nbytes == _kv_bytes(decode, blocks_for(len(prompt), BS))
        assert decode.core.pool.num_cached == 0 and decode.stats().prefix_queries == 0
        wait_pools_returned(prefill, decode)
    finally:
        decode.stop()


def _scale_k_proj(tensors):
    tensors["model.layers.0.self_attn.k_proj.weight"] *= 2  # layer 0: one the depth-pruned student keeps


def test_a_checkpoint_fingerprint_names_the_weights_not_the_copy(pairs, tmp_path):
    teacher = pairs["depth"].teacher
    copy = shutil.copytree(teacher, tmp_path / "copy")  # e.g. the same checkpoint on another node
    resaved = edited_checkpoint(teacher, tmp_path / "resaved", lambda tensors: None)
    edited = edited_checkpoint(resaved, tmp_path / "edited", _scale_k_proj)
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(teacher)
    assert checkpoint_fingerprint(edited) != checkpoint_fingerprint(resaved)


def test_blocks_another_teacher_checkpoint_computed_are_never_shared(workers, hf, pairs, tmp_path):
    """Two prefill workers whose teachers differ in one tensor (as mid-redeploy): the decode worker holds the
    first one's blocks of a prompt, yet pulls the second one's in full, and decodes on them."""
    prefill, decode, _ = workers
    _, student, kept = hf
    edited = edited_checkpoint(pairs["depth"].teacher, tmp_path / "edited", _scale_k_proj)
    other = PrefillWorker(edited, transfer=prefill.server.config, block_size=BS, num_kv_blocks=64).start()
    try:
        prompt = list(range(150, 171))
        _disaggregated(prefill, decode, prompt)  # the first teacher's blocks now cached on the decode side
        tokens = _disaggregated(other, decode, prompt)
        assert decode.last_transfer.saved_bytes == 0
        assert tokens == overfill_greedy(load_hf(edited), student, prompt, GREEDY.max_tokens, kept)[0]
        _disaggregated(prefill, decode, prompt)
        assert decode.last_transfer.saved_bytes == _kv_bytes(decode, (len(prompt) - 1) // BS)
        wait_pools_returned(other, decode)
    finally:
        other.stop()
