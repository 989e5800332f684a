"""Sampler: greedy, filters, sampling frequencies, per-request seeds, penalties and logprobs."""

from __future__ import annotations

import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from overfill_serve.engine import sampler as sampler_module
from overfill_serve.engine.sampler import Sampler, _apply_penalties, _top_p_threshold
from overfill_serve.request import Request
from overfill_serve.sampling_params import SamplingParams


def make_requests(n: int, params: SamplingParams, prefix: str = "r") -> list[Request]:
    return [Request(f"{prefix}{i}", [1, 2, 3], params) for i in range(n)]


def draws(logits_row: torch.Tensor, params: SamplingParams, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """n independent draws from one distribution, as one batch of n identical rows."""
    sampler = Sampler(seed=seed)
    out = sampler(logits_row.unsqueeze(0).expand(n, -1), make_requests(n, params))
    return torch.tensor([s.token_id for s in out])


def test_greedy_is_argmax_for_any_dtype() -> None:
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = logits.to(dtype)
        out = Sampler()(x, make_requests(8, SamplingParams(temperature=0.0)))
        assert [s.token_id for s in out] == x.float().argmax(-1).tolist()
        assert all(s.logprob is None for s in out)


def test_greedy_ties_pick_lowest_index_and_input_is_not_modified() -> None:
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0]])
    before = logits.clone()
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5, presence_penalty=1.0)
    (tok,) = Sampler()(logits, [Request("a", [3], params)])
    assert tok.token_id == 1
    assert torch.equal(logits, before)


def test_top_k_one_is_argmax() -> None:
    logits = torch.randn(16, 500, generator=torch.Generator().manual_seed(1))
    out = Sampler(seed=0)(logits, make_requests(16, SamplingParams(temperature=1.0, top_k=1)))
    assert [s.token_id for s in out] == logits.argmax(-1).tolist()


def test_mixed_greedy_and_sampled_rows() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(2))
    reqs = [
        Request(str(i), [0], SamplingParams(temperature=0.0 if i % 2 == 0 else 0.8, top_k=1 if i % 2 else 0))
        for i in range(6)
    ]
    out = Sampler(seed=0)(logits, reqs)
    assert [s.token_id for s in out] == logits.argmax(-1).tolist()


LOGITS = torch.log(torch.tensor([0.05, 0.30, 0.02, 0.40, 0.15, 0.08]))  # order: 3, 1, 4, 5, 0, 2


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(top_k=3), {3, 1, 4}),
        (SamplingParams(top_k=1, temperature=2.0), {3}),
        (SamplingParams(top_p=0.6), {3, 1}),  # 0.40 + 0.30 >= 0.6
        (SamplingParams(top_p=0.8), {3, 1, 4}),  # 0.70 < 0.8 so 0.15 is needed too
        (SamplingParams(top_p=0.01), {3}),  # the top token is always kept
        (SamplingParams(min_p=0.3), {3, 1, 4}),  # threshold 0.12
        (SamplingParams(min_p=0.5), {3, 1}),  # threshold 0.20
        (SamplingParams(top_k=4, top_p=0.9, min_p=0.25), {3, 1, 4}),
    ],
)
def test_filters_never_leave_the_allowed_set(params: SamplingParams, allowed: set[int]) -> None:
    got = draws(LOGITS, params, n=3000)
    assert set(got.tolist()) == allowed  # nothing outside, and every allowed token does occur


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_frequencies_match_softmax(temperature: float) -> None:
    n = 20000
    got = draws(LOGITS, SamplingParams(temperature=temperature), n=n, seed=123)
    counts = torch.bincount(got, minlength=6).float()
    probs = torch.softmax(LOGITS / temperature, -1)
    # 5 degrees of freedom: P(chi2 > 30) ~ 1.5e-5, and the sampler seed makes the test deterministic.
    assert chi_square(counts, probs) < 30.0


def test_top_p_renormalises_the_kept_tokens() -> None:
    got = draws(LOGITS, SamplingParams(top_p=0.6), n=20000, seed=7)
    counts = torch.bincount(got, minlength=6).float()[[3, 1]]
    assert chi_square(counts, torch.tensor([0.4, 0.3]) / 0.7) < 20.0


def test_top_p_candidate_tiers_match_a_full_sort() -> None:
    # Peaked rows are resolved within the top-1024 candidates, flat ones need 8192 or the full sort.
    gen = torch.Generator().manual_seed(5)
    vocab = 20_000
    logits = torch.cat([torch.randn(3, vocab, generator=gen) * 8, torch.randn(3, vocab, generator=gen) * 0.5])
    top_p = torch.tensor([0.5, 0.9, 0.99, 0.3, 0.9, 0.999])
    got = _top_p_threshold(logits, top_p).squeeze(1)
    values = logits.sort(dim=-1, descending=True).values
    probs = torch.softmax(values, -1)
    before = probs.cumsum(-1) - probs
    for row in range(6):
        kept = int((before[row] < top_p[row]).sum())
        assert float(got[row]) == float(values[row, kept - 1])


def run_seeded(steps: int, seed: int, others: int, position: int, other_seed: int) -> list[int]:
    """Tokens of one seeded request decoded for `steps` steps amid `others` unrelated rows."""
    vocab = 1000
    target = Request("target", [5, 6], SamplingParams(temperature=0.9, top_p=0.95, seed=seed))
    rng = torch.Generator().manual_seed(99)  # the same logits sequence for the target in every run
    other_rng = torch.Generator().manual_seed(other_seed)
    neighbours = [
        Request(f"o{i}", [1], SamplingParams(temperature=1.0, seed=(i if i % 2 else None)))
        for i in range(others)
    ]
    sampler = Sampler(seed=other_seed)
    tokens = []
    for _ in range(steps):
        row = torch.randn(1, vocab, generator=rng) * 3
        batch = list(neighbours)
        batch.insert(position, target)
        logits = torch.randn(len(batch), vocab, generator=other_rng) * 3
        logits[position] = row[0]
        out = sampler(logits, batch)
        tokens.append(out[position].token_id)
        target.output_token_ids.append(out[position].token_id)
    return tokens


def test_same_seed_same_tokens_regardless_of_batch() -> None:
    alone = run_seeded(30, seed=1234, others=0, position=0, other_seed=0)
    assert alone == run_seeded(30, seed=1234, others=0, position=0, other_seed=0)
    assert alone == run_seeded(30, seed=1234, others=7, position=3, other_seed=1)
    assert alone == run_seeded(30, seed=1234, others=4, position=4, other_seed=2)
    assert alone != run_seeded(30, seed=4321, others=0, position=0, other_seed=0)


def test_each_step_draws_a_fresh_stream() -> None:
    """Re-seeding from (seed, step) must not repeat the same draw at every step."""
    req = Request("a", [1], SamplingParams(seed=5))
    logits = torch.zeros(1, 10000)  # uniform: each draw is a fresh, seed-determined token
    sampler = Sampler()
    for _ in range(4):
        req.output_token_ids.append(sampler(logits, [req])[0].token_id)
    assert len(set(req.output_token_ids)) == 4
    again = Request("b", [1], SamplingParams(seed=5))
    for _ in range(4):
        again.output_token_ids.append(sampler(logits, [again])[0].token_id)
    assert again.output_token_ids == req.output_token_ids


def test_penalties_match_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0, 0.0], [2.0, -1.0, 0.5, -0.5, 3.0, 0.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    penalised = Request("p", [0, 1], params, output_token_ids=[1, 2, 2])
    plain = Request("q", [0, 1], SamplingParams(), output_token_ids=[1, 2, 2])
    _apply_penalties(logits, [penalised, plain])
    # repetition over {0, 1, 2}: 2 -> 1, -1 -> -2, 0.5 -> 0.25; then counts {1: 1, 2: 2} over the output:
    # token 1 -= 0.5 + 0.25, token 2 -= 0.5 + 2 * 0.25.
    expected = torch.tensor([1.0, -2.75, -0.75, -0.5, 3.0, 0.0])
    torch.testing.assert_close(logits[0], expected)
    torch.testing.assert_close(logits[1], torch.tensor([2.0, -1.0, 0.5, -0.5, 3.0, 0.0]))


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.tensor([[4.0, 3.0, 1.0]])
    assert Sampler()(logits, [Request("a", [2], SamplingParams(temperature=0.0))])[0].token_id == 0
    # Token 0 is in the prompt: 4 / 2 = 2 < 3.
    rep = SamplingParams(repetition_penalty=2.0, temperature=0.0)
    assert Sampler()(logits, [Request("a", [0], rep)])[0].token_id == 1
    # Presence / frequency only count the output, so a prompt occurrence does not matter.
    freq = SamplingParams(frequency_penalty=0.6, temperature=0.0)
    assert Sampler()(logits, [Request("a", [0], freq)])[0].token_id == 0
    assert Sampler()(logits, [Request("a", [2], freq, output_token_ids=[0, 0])])[0].token_id == 1


def test_logprobs_are_of_the_raw_logits() -> None:
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    reqs = [
        Request("a", [0, 1], SamplingParams(temperature=0.7, repetition_penalty=1.3, logprobs=5, seed=1)),
        Request("b", [0], SamplingParams(temperature=0.0, logprobs=0)),
        Request("c", [0], SamplingParams()),
    ]
    out = Sampler()(logits, reqs)
    expected = torch.log_softmax(logits.float(), -1)
    for row in (0, 1):
        lp = out[row].logprob
        assert lp is not None and lp.token_id == out[row].token_id
        assert lp.logprob == pytest.approx(float(expected[row, lp.token_id]), abs=1e-5)
    top = out[0].logprob.top  # type: ignore[union-attr]
    assert len(top) == 5
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    values, indices = expected[0].topk(5)
    assert [t for t, _ in top] == indices.tolist()
    torch.testing.assert_close(torch.tensor([v for _, v in top]), values)
    assert out[1].logprob.top == ()  # type: ignore[union-attr]
    assert out[2].logprob is None
    only_zero = Sampler()(logits[:1], [Request("d", [0], SamplingParams(logprobs=0))])[0].logprob
    assert only_zero is not None and only_zero.top == ()


def test_batch_of_32_with_50k_vocab_is_fast() -> None:
    vocab = 50_000
    logits = torch.randn(32, vocab, generator=torch.Generator().manual_seed(4))
    kinds = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_p=0.9, seed=3),
        SamplingParams(temperature=1.0, top_k=50, min_p=0.05),
        SamplingParams(temperature=0.7, repetition_penalty=1.1, frequency_penalty=0.5, logprobs=5),
    ]
    reqs = [
        Request(str(i), list(range(i, 500 + i)), kinds[i % 4], output_token_ids=list(range(100)))
        for i in range(32)
    ]
    sampler = Sampler(seed=0)
    elapsed = []
    for _ in range(3):
        start = time.perf_counter()
        out = sampler(logits, reqs)
        elapsed.append(time.perf_counter() - start)
    assert len(out) == 32 and all(0 <= s.token_id < vocab for s in out)
    # ~0.1 s on one idle core; the bound only catches per-token Python work, on a loaded CI machine too.
    assert min(elapsed) < 3.0, f"sampling took {min(elapsed):.3f}s"


def test_rejects_mismatched_batch() -> None:
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 5), make_requests(3, SamplingParams()))
    assert Sampler()(torch.zeros(0, 5), []) == []


def test_seeded_step_depends_only_on_request_history() -> None:
    """A fresh Request with the same seed and the same tokens so far (another process after a KV handover,
    or a migrated request) samples the same next token as the original."""
    logits = torch.randn(1, 400, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, seed=42)
    original = Request("a", [1, 2], params)
    sampler = Sampler()
    for _ in range(5):
        original.output_token_ids.append(sampler(logits, [original])[0].token_id)
    elsewhere = Request("b", [1, 2], params, output_token_ids=list(original.output_token_ids[:3]))
    replay = [Sampler()(logits, [elsewhere])[0].token_id]
    assert replay[0] == original.output_token_ids[3]


# --- device residency: one device->host read per call, batch-independent seeds, device-side penalties ---

aten = torch.ops.aten
# Ops after which the host must wait for a GPU: a scalar read, or an output shape that depends on the data.
_SYNCING_OPS = {
    aten._local_scalar_dense.default,  # item(), float(t), int(t), bool(t)
    aten.nonzero.default,
    aten.masked_select.default,
    aten.repeat_interleave.Tensor,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.is_nonzero.default,
    aten.equal.default,
}
_INDEX_OPS = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class HostReads(TorchDispatchMode):
    """Records every op, and separately those that would make the host wait for a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        masks = func in _INDEX_OPS and any(
            t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1]
        )  # boolean indexing is a nonzero in disguise
        if func in _SYNCING_OPS or masks:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@contextmanager
def host_reads() -> Iterator[HostReads]:
    """Counts device->host reads of a CPU run: data-dependent ops, plus tolist / cpu / numpy, which on a CPU
    tensor never reach the dispatcher."""
    mode = HostReads()

    def counted(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            mode.syncs.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    with pytest.MonkeyPatch.context() as mp, mode:
        for name in ("tolist", "cpu", "numpy"):
            mp.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        yield mode


BATCH_KINDS = {
    "greedy": [SamplingParams(temperature=0.0)],
    "greedy+logprobs": [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=0.0)],
    "greedy+penalties": [SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4)],
    "sampled": [SamplingParams(temperature=0.8), SamplingParams(top_p=0.7, top_k=20)],
    "seeded": [SamplingParams(seed=1, top_p=0.9), SamplingParams(seed=2, min_p=0.1)],
    "biased": [  # logit_bias, and min_tokens masking the stop token ids, next to plain rows
        SamplingParams(temperature=0.0, logit_bias={3: 5.0, 7: -100.0}),
        SamplingParams(seed=5, max_tokens=64, min_tokens=40, stop_token_ids=(9, 11), logit_bias={2: 1.5}),
        SamplingParams(temperature=0.0),
    ],
    "mixed": [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, presence_penalty=0.5, logprobs=0),
        SamplingParams(seed=3, top_p=0.8, repetition_penalty=1.2, logprobs=4),
        SamplingParams(temperature=0.7, top_k=50, min_p=0.02),
        SamplingParams(seed=4, temperature=1.3, frequency_penalty=-0.5),
        SamplingParams(top_p=0.95, logprobs=2),
    ],
}


def batch_of(kind: str, rows: int = 12, vocab: int = 5000) -> tuple[torch.Tensor, list[Request]]:
    params = BATCH_KINDS[kind]
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(rows, vocab, generator=gen) * 2
    reqs = [
        Request(f"{kind}{i}", torch.randint(0, vocab, (40,), generator=gen).tolist(), params[i % len(params)])
        for i in range(rows)
    ]
    for i, r in enumerate(reqs):
        r.output_token_ids = torch.randint(0, vocab, (i,), generator=gen).tolist()
    return logits, reqs


@pytest.mark.parametrize("kind", sorted(BATCH_KINDS))
def test_one_host_read_per_call(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CPU sorts top-p candidates in tiers, a data-dependent branch that is free there; without them the
    # CPU runs exactly what CUDA runs.
    monkeypatch.setattr(sampler_module, "_CPU_TOP_P_TIERS", ())
    logits, reqs = batch_of(kind)
    sampler = Sampler(seed=0)
    for _ in range(2):
        with host_reads() as reads:
            out = sampler(logits, reqs)
        assert len(reads.syncs) == 1, reads.syncs
        for r, tok in zip(reqs, out):
            assert (tok.logprob is None) == (r.params.logprobs is None)
            r.output_token_ids.append(tok.token_id)


def test_host_read_counter_sees_the_cpu_top_p_tiers() -> None:
    """The counter is not blind: the CPU-only top-p tiers index by boolean masks."""
    logits, reqs = batch_of("sampled")
    with host_reads() as reads:
        Sampler(seed=0)(logits, reqs)
    assert len(reads.syncs) > 1


def test_all_greedy_batch_is_one_kernel() -> None:
    logits, reqs = batch_of("greedy")
    with host_reads() as reads:
        out = Sampler()(logits, reqs)
    assert reads.ops == ["aten.argmax.default"] and reads.syncs == ["tolist"]
    assert [t.token_id for t in out] == logits.argmax(-1).tolist()


@CUDA
@pytest.mark.parametrize("kind", sorted(BATCH_KINDS))
def test_one_sync_per_call_on_cuda(kind: str) -> None:
    logits, reqs = batch_of(kind, rows=32, vocab=128_000)
    logits = logits.cuda().bfloat16()
    sampler = Sampler(seed=0)
    sampler(logits, reqs)  # warm-up: generators, pinned host blocks
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sampler(logits, reqs)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs


NEIGHBOURS = [p for kind in ("mixed", "sampled", "greedy+penalties") for p in BATCH_KINDS[kind]]


def decode_seeded(device: str, seed: int, crowd: int, steps: int = 8) -> list[int]:
    """A seeded request decoded for `steps` steps, each step amid a fresh random crowd of up to `crowd`
    different requests (at a random position, and with the crowd's own logits)."""
    vocab = 3000
    kw: dict[str, Any] = {"temperature": 0.8, "top_k": 300, "top_p": 0.9, "min_p": 0.01, "logprobs": 2}
    params = SamplingParams(repetition_penalty=1.2, presence_penalty=0.3, seed=seed, **kw)
    target = Request("target", [4, 5, 6], params)
    rows = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(11)) * 4
    pick, gen = random.Random(crowd), torch.Generator().manual_seed(crowd)
    sampler = Sampler(seed=crowd)
    for step in range(steps):
        batch = [Request(f"n{j}", [1, 2], pick.choice(NEIGHBOURS)) for j in range(pick.randint(0, crowd))]
        position = pick.randint(0, len(batch))
        batch.insert(position, target)
        logits = torch.randn(len(batch), vocab, generator=gen) * 4
        logits[position] = rows[step]
        tok = sampler(logits.to(device), batch)[position]
        target.output_token_ids.append(tok.token_id)
    return target.output_token_ids


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_seeded_row_same_alone_and_in_changing_batches(device: str) -> None:
    alone = decode_seeded(device, seed=77, crowd=0)
    assert alone == decode_seeded(device, seed=77, crowd=5)
    assert alone == decode_seeded(device, seed=77, crowd=12)
    assert alone != decode_seeded(device, seed=78, crowd=0)


def reference_penalties(row: torch.Tensor, request: Request) -> torch.Tensor:
    """The penalties one token at a time, as the definitions read."""
    row, p, vocab = row.clone(), request.params, row.shape[0]
    if p.repetition_penalty != 1.0:
        for t in set(request.prompt_token_ids + request.output_token_ids):
            if 0 <= t < vocab:
                row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t, n in Counter(request.output_token_ids).items():
        if 0 <= t < vocab:
            row[t] -= p.presence_penalty + p.frequency_penalty * n
    return row


def test_device_penalties_match_a_per_token_reference() -> None:
    vocab, pick = 400, random.Random(3)
    kinds = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.7),
        SamplingParams(repetition_penalty=0.6, frequency_penalty=0.3),
        SamplingParams(presence_penalty=-0.7),
        SamplingParams(presence_penalty=1.1, frequency_penalty=-0.4, repetition_penalty=1.25),
    ]
    reqs = []
    for i in range(15):
        prompt = [pick.randrange(-3, vocab + 3) for _ in range(pick.randint(0, 60))]  # some ids out of range
        output = [pick.randrange(0, 40) for _ in range(pick.randint(0, 30))]  # plenty of repeats
        reqs.append(Request(str(i), prompt, kinds[i % len(kinds)], output_token_ids=output))
    reqs.append(Request("empty", [], SamplingParams(repetition_penalty=2.0, presence_penalty=1.0)))
    logits = torch.randn(len(reqs), vocab, generator=torch.Generator().manual_seed(6)) * 3
    expected = torch.stack([reference_penalties(row, r) for row, r in zip(logits, reqs)])
    got = logits.clone()
    _apply_penalties(got, reqs)
    torch.testing.assert_close(got, expected)
    penalised = [i for i, r in enumerate(reqs) if i % len(kinds)]  # every row penalised: no gather
    got = logits[penalised].clone()
    _apply_penalties(got, [reqs[i] for i in penalised])
    torch.testing.assert_close(got, expected[penalised])


def test_top_p_without_tiers_matches_the_tiers() -> None:
    gen = torch.Generator().manual_seed(9)
    logits = torch.cat([torch.randn(3, 20_000, generator=gen) * 8, torch.randn(3, 20_000, generator=gen)])
    top_p = torch.tensor([0.5, 0.9, 0.99, 0.3, 0.9, 0.999])
    assert torch.equal(_top_p_threshold(logits, top_p, tiers=()), _top_p_threshold(logits, top_p))
