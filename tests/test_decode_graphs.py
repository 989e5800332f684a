"""The CUDA-graph decode path's bookkeeping, run on CPU without capture: buckets, padded rows that write
nowhere, static buffers reused while the batch shrinks and grows, and the same tokens as the eager path."""

from __future__ import annotations

import pytest
import torch

from overfill_serve import LLM, SamplingParams
from overfill_serve.engine.batch import Batch, ScheduledSeq
from overfill_serve.engine.decode_graphs import buckets

PARAMS = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (3, 9, 14, 6, 11, 2, 8, 12)]
PROMPTS = [list(range(10 + i, 10 + i + length)) for i, length in enumerate((5, 17, 3, 30, 9, 21, 4, 12))]


def test_buckets():
    assert buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert buckets(3) == [1, 2, 8] and buckets(1) == [8]
    assert buckets(20)[-1] == 24  # the largest bucket covers max_num_seqs


def _staggered(llm: LLM) -> dict[str, list[int]]:
    """Half the requests at once, the rest while those decode: the batch grows, then shrinks as they end."""
    tokens: dict[str, list[int]] = {}
    ids = [llm.add_request(p, sp) for p, sp in zip(PROMPTS[:4], PARAMS[:4])]
    for _ in range(3):
        for out in llm.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    ids += [llm.add_request(p, sp) for p, sp in zip(PROMPTS[4:], PARAMS[4:])]
    while llm.has_unfinished():
        for out in llm.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    return {i: tokens[i] for i in ids}


@pytest.mark.parametrize("kind", ["width", "depth"])
def test_static_decode_matches_eager(pairs, kind, monkeypatch):
    pair = pairs[kind]
    engine = dict(num_kv_blocks=128, block_size=4, max_num_seqs=8)
    eager = _staggered(LLM(pair.teacher, pair.student, **engine))
    static = LLM(pair.teacher, pair.student, cuda_graphs=True, **engine)
    graphs = static.core.decode["student"].runner.graphs
    assert graphs is not None and graphs.buckets == [1, 2, 4, 8]
    sizes: list[int] = []
    run = graphs.run
    monkeypatch.setattr(graphs, "run", lambda batch: (sizes.append(len(batch.seqs)), run(batch))[1])
    assert _staggered(static) == eager
    assert max(sizes) > 4 and min(sizes) < 4  # grew past one bucket and shrank back through others
    assert static.core.pool.num_free == static.core.pool.num_blocks


def test_padded_rows_write_nowhere(width_pair):
    llm = LLM(width_pair.teacher, width_pair.student, num_kv_blocks=32, block_size=4, cuda_graphs=True)
    runner = llm.core.decode["student"].runner
    assert runner.graphs is not None
    seqs = tuple(
        ScheduledSeq(f"r{i}", (7 + i,), 4 * i + 2, (3 * i, 3 * i + 1, 3 * i + 2), True) for i in range(3)
    )  # contexts of 3, 7 and 11 tokens: the new token's slot is block table[pos // 4] * 4 + pos % 4
    before = llm.core.cache.tensor.clone()
    logits = runner.run(Batch(seqs))  # 3 rows in bucket 4: one padded row
    assert logits.shape[0] == 3 and torch.isfinite(logits).all()
    changed = (llm.core.cache.tensor != before).flatten(4).any(-1)  # [layers, 2, blocks, block_size]
    written = {(int(b), int(o)) for b, o in changed.any(0).any(0).nonzero()}
    expected = {(s.block_table[(s.context_len - 1) // 4], (s.context_len - 1) % 4) for s in seqs}
    assert written == expected
    eager = runner.model(*_eager_inputs(runner, Batch(seqs)))
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)


def _eager_inputs(runner, batch):
    tokens, positions, meta, logits_index = runner._inputs(batch)
    return tokens, positions, runner.kv, meta, logits_index
