"""Batched token sampling: penalties, temperature, top-k / top-p / min-p, per-request seeds and logprobs.

Every row is processed in float32 regardless of the model's dtype. Rows are grouped by which transforms they
need so that the common cases (all greedy, or plain temperature sampling) cost one or two batched kernels.
Sampling uses the exponential race (argmax of p / Exp(1)), which draws exactly V exponentials per row and
step: a seeded request therefore produces the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from overfill_serve.request import Request, TokenLogprob
from overfill_serve.sampling_params import SamplingParams

# Exp(1) draws can in principle be 0; dividing by it would turn a masked (p == 0) token into NaN.
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None  # None unless request.params.logprobs is not None


class Sampler:
    """Turns a [B, V] batch of next-token logits into one token per request.

    `seed` seeds the generator shared by the unseeded rows (one per device); None uses torch's global RNG.
    A request with `params.seed` samples from its own generator, re-seeded at every step from the seed and
    the step number, so its tokens do not depend on where (or next to what) each step runs.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[SampledToken]:
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {len(requests)} requests")
        if not requests:
            return []
        raw = logits.float()
        # Penalties and filters write in place. They must not touch the caller's tensor nor `raw` when it
        # feeds logprobs (reported before any transform), so copy unless `raw` is already a private copy.
        edits = any(not r.params.greedy or _has_penalty(r.params) for r in requests)
        wants_logprobs = any(r.params.logprobs is not None for r in requests)
        private = logits.dtype != torch.float32 and raw.is_contiguous() and not wants_logprobs
        work = raw.clone(memory_format=torch.contiguous_format) if edits and not private else raw
        _apply_penalties(work, requests)

        greedy = [i for i, r in enumerate(requests) if r.params.greedy]
        sampled = [i for i, r in enumerate(requests) if not r.params.greedy]
        if not sampled:
            token_ids = work.argmax(dim=-1)
        elif not greedy:
            token_ids = self._sample(work, list(requests))
        else:
            token_ids = torch.empty(len(requests), dtype=torch.long, device=work.device)
            rows = _index(greedy, work.device)
            token_ids[rows] = work[rows].argmax(dim=-1)
            rows = _index(sampled, work.device)
            token_ids[rows] = self._sample(work[rows], [requests[i] for i in sampled])

        ids: list[int] = token_ids.tolist()
        logprobs = _logprobs(raw, token_ids, ids, requests)
        return [SampledToken(tid, logprobs.get(i)) for i, tid in enumerate(ids)]

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then one draw per row; `logits` is a private [S, V] copy."""
        device = logits.device
        vocab = logits.shape[1]
        params = [r.params for r in requests]
        if any(p.temperature != 1.0 for p in params):
            temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
            logits.div_(temps.unsqueeze(1))

        k_rows = [j for j, p in enumerate(params) if 0 < p.top_k < vocab]
        if k_rows:
            ks = [params[j].top_k for j in k_rows]
            with _RowSubset(logits, k_rows) as sub:
                # One topk with the largest k serves every row; each row's own k-th value is its threshold.
                top = sub.topk(max(ks), dim=-1).values
                kth = top.gather(1, _index([k - 1 for k in ks], device).unsqueeze(1))
                sub.masked_fill_(sub < kth, float("-inf"))

        p_rows = [j for j, p in enumerate(params) if p.top_p < 1.0]
        if p_rows:
            top_p = torch.tensor([params[j].top_p for j in p_rows], dtype=torch.float32, device=device)
            with _RowSubset(logits, p_rows) as sub:
                sub.masked_fill_(sub < _top_p_threshold(sub, top_p), float("-inf"))

        m_rows = [j for j, p in enumerate(params) if p.min_p > 0.0]
        if m_rows:
            log_min_p = torch.tensor(
                [params[j].min_p for j in m_rows], dtype=torch.float32, device=device
            ).log()
            with _RowSubset(logits, m_rows) as sub:
                # p < min_p * p_max  <=>  logit < max_logit + log(min_p): no softmax needed.
                threshold = sub.amax(dim=-1, keepdim=True) + log_min_p.unsqueeze(1)
                sub.masked_fill_(sub < threshold, float("-inf"))

        # Unnormalised probabilities suffice: the race takes an argmax, which a row-wise scale cannot change.
        probs = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        out = torch.empty(len(requests), dtype=torch.long, device=device)
        unseeded = [j for j, p in enumerate(params) if p.seed is None]
        if unseeded:
            with _RowSubset(probs, unseeded) as sub:
                q = _exponential(torch.empty_like(sub), self._shared_generator(device))
                out[_index(unseeded, device)] = sub.div_(q).argmax(dim=-1)
        for j, req in enumerate(requests):
            if req.params.seed is None:
                continue
            # Seeded draws are made on the CPU so a seed means the same tokens on every device.
            q = _exponential(torch.empty(vocab), _request_generator(req)).to(device)
            out[j] = (probs[j] / q).argmax()
        return out

    def _shared_generator(self, device: torch.device) -> torch.Generator | None:
        if self._seed is None:
            return None
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            self._generators[device] = gen
        return gen


def _exponential(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fill `out` with Exp(1) draws as -log(1 - U): several times faster than Tensor.exponential_ on CPU.

    A draw of 0 would turn a masked token's p / q into NaN (0 / 0), so it is clamped to the tiniest float;
    a draw of +inf (U == 1 on some backends) only makes that token lose this race.
    """
    return out.uniform_(generator=generator).neg_().log1p_().neg_().clamp_min_(_TINY)


def _has_penalty(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    )


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


class _RowSubset:
    """`with _RowSubset(x, rows) as sub:` edits rows of x in place: x itself when rows are all of x,
    otherwise a gathered copy that is written back on exit (advanced indexing cannot give a view)."""

    def __init__(self, tensor: torch.Tensor, rows: list[int]) -> None:
        self._tensor = tensor
        self._all = len(rows) == tensor.shape[0]  # rows are sorted and unique, so this means all of them
        self._index = None if self._all else _index(rows, tensor.device)

    def __enter__(self) -> torch.Tensor:
        if self._index is None:
            return self._tensor
        self._sub = self._tensor[self._index]
        return self._sub

    def __exit__(self, *exc: object) -> None:
        if self._index is not None:
            self._tensor[self._index] = self._sub


def _top_p_threshold(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest logit kept by nucleus filtering: tokens are kept, most likely first, until the
    mass before the next one reaches top_p (so the top token always stays)."""
    vocab = logits.shape[1]
    lse = logits.logsumexp(dim=-1, keepdim=True)
    threshold = torch.empty_like(lse)
    pending = torch.arange(logits.shape[0], device=logits.device)
    # A full sort of a 50k vocabulary dominates sampling time, and the nucleus of a real model's distribution
    # lies within its top few hundred tokens: sort growing candidate sets, re-trying only uncovered rows.
    for k in (1024, 8192, vocab):
        k = min(k, vocab)
        rows = logits if len(pending) == logits.shape[0] else logits[pending]
        values = rows.topk(k, dim=-1).values if k < vocab else rows.sort(dim=-1, descending=True).values
        cut, covered = _nucleus_cut(values, lse[pending], top_p[pending])
        if k == vocab:
            covered.fill_(True)  # the whole vocabulary always covers the nucleus (up to rounding)
        threshold[pending[covered]] = cut[covered]
        pending = pending[~covered]
        if len(pending) == 0:
            break
    return threshold


def _nucleus_cut(
    sorted_logits: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(threshold logit [R, 1], whether the nucleus lies within these sorted candidates [R])."""
    probs = (sorted_logits - lse).exp()
    cum = probs.cumsum(dim=-1)
    keep = ((cum - probs) < top_p.unsqueeze(1)).sum(dim=-1, keepdim=True)
    covered = cum[:, -1] >= top_p
    return sorted_logits.gather(1, keep - 1), covered


def _request_generator(request: Request) -> torch.Generator:
    """The request's generator, re-seeded from (seed, number of tokens sampled so far).

    Deriving each step's stream from the request alone makes a seeded request reproducible wherever its steps
    run: the teacher's first token and the student's continuation in another process, or a request migrated
    to another decode replica, draw exactly what one process would have drawn.
    """
    if request.generator is None:
        request.generator = torch.Generator()
    seed = request.params.seed
    assert seed is not None
    step = len(request.output_token_ids)
    request.generator.manual_seed((seed * 0x9E3779B1 + step * 0x85EBCA77) % (1 << 63))
    return request.generator


def _token_pairs(
    rows: list[int], token_lists: list[list[int]], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) index pairs of every token in every list, dropping ids outside [0, vocab)."""
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    cols = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    row_ids = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), lengths)
    keep = (cols >= 0) & (cols < vocab)
    return row_ids[keep].to(device), cols[keep].to(device)


def _apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """Repetition penalty (HF) over prompt + output, then presence / frequency (OpenAI) over output only.

    Both touch only the (row, token) pairs that occurred, so they cost O(tokens), not O(batch * vocab).
    """
    device = logits.device
    vocab = logits.shape[1]

    rep = [i for i, r in enumerate(requests) if r.params.repetition_penalty != 1.0]
    if rep:
        rows, cols = _token_pairs(rep, [requests[i].all_token_ids for i in rep], vocab, device)
        penalty = torch.ones(len(requests), dtype=torch.float32, device=device)
        penalty[_index(rep, device)] = torch.tensor(
            [requests[i].params.repetition_penalty for i in rep], dtype=torch.float32, device=device
        )
        # Repeated tokens give duplicate pairs; every duplicate writes the same value computed from the
        # original logit, so the penalty is applied once.
        values = logits[rows, cols]
        row_penalty = penalty[rows]
        logits[rows, cols] = torch.where(values > 0, values / row_penalty, values * row_penalty)

    pf = [
        i
        for i, r in enumerate(requests)
        if (r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0) and r.output_token_ids
    ]
    if pf:
        rows, cols = _token_pairs(pf, [requests[i].output_token_ids for i in pf], vocab, device)
        flat, counts = torch.unique(rows * vocab + cols, return_counts=True)
        presence = torch.zeros(len(requests), dtype=torch.float32, device=device)
        frequency = torch.zeros(len(requests), dtype=torch.float32, device=device)
        idx = _index(pf, device)
        presence[idx] = torch.tensor([requests[i].params.presence_penalty for i in pf], device=device)
        frequency[idx] = torch.tensor([requests[i].params.frequency_penalty for i in pf], device=device)
        row_of = flat // vocab
        logits.view(-1)[flat] -= presence[row_of] + frequency[row_of] * counts.float()


def _logprobs(
    raw: torch.Tensor, token_ids: torch.Tensor, ids: list[int], requests: Sequence[Request]
) -> dict[int, TokenLogprob]:
    """Log-probabilities under the raw logits (before penalties and temperature, as vLLM reports them)."""
    wanted = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if not wanted:
        return {}
    idx = _index(wanted, raw.device)
    logp = torch.log_softmax(raw[idx], dim=-1)
    chosen: list[float] = logp.gather(1, token_ids[idx].unsqueeze(1)).squeeze(1).tolist()
    ks = [requests[i].params.logprobs or 0 for i in wanted]
    k_max = min(max(ks), raw.shape[1])
    top_vals: list[list[float]] = []
    top_ids: list[list[int]] = []
    if k_max > 0:
        values, indices = logp.topk(k_max, dim=-1)
        top_vals, top_ids = values.tolist(), indices.tolist()
    out = {}
    for n, i in enumerate(wanted):
        k = min(ks[n], k_max)
        top = tuple(zip(top_ids[n][:k], top_vals[n][:k], strict=True)) if k else ()
        out[i] = TokenLogprob(ids[i], chosen[n], top)
    return out
