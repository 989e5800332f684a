"""Batched token sampling: logit bias (and min_tokens' masking of eos and stop token ids), penalties,
temperature, top-k / top-p / min-p, per-request seeds and logprobs.

Everything runs on the logits' device, in float32 whatever the model's dtype, and a call reads back from the
device once: the token ids, packed with the logprobs when a request asked for them. Per-request parameters go
the other way in a few non-blocking copies (from pinned memory on CUDA), which never wait for the device.
Sampling uses the exponential race (argmax of p / Exp(1)), which draws exactly V exponentials per row and step:
a seeded request draws them from its own generator on the logits' device, re-seeded from (seed, step), so it
produces the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from overfill_serve.request import Request, TokenLogprob
from overfill_serve.sampling_params import SamplingParams

# Exp(1) draws can in principle be 0; dividing by it would turn a masked (p == 0) token into NaN.
_TINY = torch.finfo(torch.float32).tiny
_NEG_INF = float("-inf")
# Top-p candidate set sizes tried before a full sort; only where a data-dependent branch is free (the CPU).
_CPU_TOP_P_TIERS = (1024, 8192)


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None  # None unless request.params.logprobs is not None


class Sampler:
    """Turns a [B, V] batch of next-token logits into one token per request.

    `seed` seeds the generator shared by the unseeded rows (one per device); None uses torch's global RNG.
    A request with `params.seed` samples from its own generator, re-seeded at every step from the seed and
    the step number, so its tokens do not depend on where (or next to what) each step runs on one kind of
    device. CPU and CUDA generators produce different streams, so the same seed gives different tokens there.
    """

    def __init__(self, seed: int | None = None, eos_token_ids: Sequence[int] = ()) -> None:
        self._seed = seed
        self._eos = tuple(
            eos_token_ids
        )  # masked, with the stop token ids, while a request is under min_tokens
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[SampledToken]:
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {len(requests)} requests")
        if not requests:
            return []
        params = [r.params for r in requests]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        penalised = any(_has_penalty(p) for p in params)
        wants_logprobs = any(p.logprobs is not None for p in params)
        biases = [self._bias(r, logits.shape[1]) for r in requests]
        biased = any(biases)
        if not (sampled or penalised or wants_logprobs or biased):
            # Upcasting is monotone, so the argmax in the model's dtype is the float32 one: one kernel. (The
            # CPU's half-precision argmax is not vectorised: there the upcast first is faster.)
            x = logits.float() if logits.device.type == "cpu" else logits
            return [SampledToken(t, None) for t in x.argmax(dim=-1).tolist()]
        raw = logits.float()
        # Penalties and filters write in place. They must not touch the caller's tensor nor `raw` when it
        # feeds logprobs (reported before any transform), so copy unless `raw` is already a private copy.
        private = logits.dtype != torch.float32 and raw.is_contiguous() and not wants_logprobs
        edits = bool(sampled) or penalised or biased
        work = raw.clone(memory_format=torch.contiguous_format) if edits and not private else raw
        if biased:
            _apply_bias(work, biases)
        if penalised:
            _apply_penalties(work, requests)
        return _collect(raw, self._choose(work, requests, sampled), requests)

    def _bias(self, request: Request, vocab: int) -> list[tuple[int, float]]:
        """What to add to the request's logits: its logit_bias, and -inf on eos (unless ignored) and its stop
        token ids while it has fewer than min_tokens. Ids outside the vocabulary (the APIs refuse them) are
        left out."""
        params = request.params
        entries = list(params.logit_bias)
        if len(request.output_token_ids) < params.min_tokens:
            banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self._eos))
            entries += [(t, _NEG_INF) for t in sorted(banned)]
        return [(t, b) for t, b in entries if t < vocab]

    def _choose(self, work: torch.Tensor, requests: Sequence[Request], sampled: list[int]) -> torch.Tensor:
        """Token ids [B]: the argmax for greedy rows, a draw for the `sampled` ones."""
        if not sampled:
            return work.argmax(dim=-1)
        # Unseeded rows first: their draws then fill one block from the shared generator.
        order = sorted(sampled, key=lambda i: requests[i].params.seed is not None)
        chosen = [requests[i] for i in order]
        if order == list(range(len(requests))):
            return self._sample(work, chosen)  # in place: no greedy row needs `work` afterwards
        if len(sampled) < len(requests):
            out = work.argmax(dim=-1)  # every row, before the sampled ones are filtered: one kernel
        else:
            out = torch.empty(len(requests), dtype=torch.long, device=work.device)
        (rows,) = _upload(work.device, _longs(order))
        return out.index_copy_(0, rows, self._sample(work[rows], chosen))

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then one race per row; `logits` is a private [S, V] tensor whose
        rows are `requests`, unseeded ones first."""
        vocab = logits.shape[1]
        params = [r.params for r in requests]
        k_rows = [j for j, p in enumerate(params) if 0 < p.top_k < vocab]
        p_rows = [j for j, p in enumerate(params) if p.top_p < 1.0]
        m_rows = [j for j, p in enumerate(params) if p.min_p > 0.0]
        temps, k_idx, kth, p_idx, top_p, m_idx, min_p = _upload(
            logits.device,
            _floats([p.temperature for p in params]),
            _longs(k_rows),
            _longs([params[j].top_k - 1 for j in k_rows]),
            _longs(p_rows),
            _floats([params[j].top_p for j in p_rows]),
            _longs(m_rows),
            _floats([params[j].min_p for j in m_rows]),
        )
        if any(p.temperature != 1.0 for p in params):
            logits.div_(temps.unsqueeze(1))
        if k_rows:
            # One topk with the largest k serves every row; each row's own k-th value is its threshold.
            k_max = max(params[j].top_k for j in k_rows)
            _mask_below(logits, k_idx, lambda x: x.topk(k_max, dim=-1).values.gather(1, kth.unsqueeze(1)))
        if p_rows:
            _mask_below(logits, p_idx, lambda x: _top_p_threshold(x, top_p))
        if m_rows:
            # p < min_p * p_max  <=>  logit < max_logit + log(min_p): no softmax needed.
            _mask_below(logits, m_idx, lambda x: x.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1))
        # Unnormalised probabilities suffice: the race takes an argmax, which a row-wise scale cannot change.
        probs = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        return probs.div_(self._race_draws(probs, requests)).argmax(dim=-1)

    def _race_draws(self, like: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Exp(1) draws shaped like `like`: one block from the shared generator for the unseeded rows (which
        come first), then one row per seeded request from its own generator, on the same device."""
        draws = torch.empty_like(like)
        seeded = [r for r in requests if r.params.seed is not None]
        unseeded = len(requests) - len(seeded)
        if unseeded:
            draws[:unseeded].uniform_(generator=self._shared_generator(like.device))
        for row, request in zip(draws[unseeded:], seeded):
            row.uniform_(generator=_request_generator(request, like.device))
        return _exponential(draws)

    def _shared_generator(self, device: torch.device) -> torch.Generator | None:
        if self._seed is None:
            return None
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            self._generators[device] = gen
        return gen


def _exponential(uniform: torch.Tensor) -> torch.Tensor:
    """Turn U(0, 1) draws into Exp(1) ones in place, as -log(1 - U): several times faster than
    Tensor.exponential_ on CPU, and one batched pass however many generators filled `uniform`.

    A draw of 0 would turn a masked token's p / q into NaN (0 / 0), so it is clamped to the tiniest float;
    a draw of +inf (U == 1 on some backends) only makes that token lose this race.
    """
    return uniform.neg_().log1p_().neg_().clamp_min_(_TINY)


def _has_penalty(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    )


def _longs(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def _floats(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _upload(device: torch.device, *host: torch.Tensor) -> list[torch.Tensor]:
    """The `host` tensors on `device`, moved with one copy per dtype.

    On CUDA the copy is non-blocking from pinned memory: one from pageable memory synchronises the stream,
    a wait for the device next to the one the step's result needs. The caching host allocator keeps the
    pinned buffer alive until the copy has run.
    """
    if device.type == "cpu":
        return list(host)
    out = list(host)
    for dtype in {t.dtype for t in host}:
        idx = [i for i, t in enumerate(host) if t.dtype == dtype]
        flat = [host[i].reshape(-1) for i in idx]
        staged = torch.empty(sum(t.numel() for t in flat), dtype=dtype, pin_memory=device.type == "cuda")
        moved = torch.cat(flat, out=staged).to(device, non_blocking=True)
        for i, part in zip(idx, moved.split([t.numel() for t in flat])):
            out[i] = part.view(host[i].shape)
    return out


def _mask_below(
    logits: torch.Tensor, rows: torch.Tensor, threshold: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Set to -inf, in the given (sorted, unique) rows, every logit below its row's threshold [R, 1], which
    is computed on those rows only; the other rows get a threshold of -inf, so one masked_fill serves all."""
    if rows.numel() == logits.shape[0]:
        cut = threshold(logits)
    else:
        cut = torch.full((logits.shape[0], 1), _NEG_INF, device=logits.device)
        cut.index_copy_(0, rows, threshold(logits[rows]))
    logits.masked_fill_(logits < cut, _NEG_INF)


def _top_p_threshold(
    logits: torch.Tensor, top_p: torch.Tensor, tiers: Sequence[int] | None = None
) -> torch.Tensor:
    """Per row, the smallest logit kept by nucleus filtering: tokens are kept, most likely first, until the
    mass before the next one reaches top_p (so the top token always stays).

    A full sort of a 50k vocabulary dominates CPU sampling time, and the nucleus of a real model's
    distribution lies within its top few hundred tokens, so on the CPU growing candidate sets (`tiers`) are
    sorted first, re-trying only uncovered rows. Elsewhere each such re-try would wait for the device to say
    which rows are covered, so one full sort serves every row (what `tiers=()` does on any device).
    """
    if tiers is None:
        tiers = _CPU_TOP_P_TIERS if logits.device.type == "cpu" else ()
    n, vocab = logits.shape
    lse = logits.logsumexp(dim=-1, keepdim=True)
    threshold = torch.empty_like(lse)
    pending = torch.arange(n, device=logits.device)
    for k in tiers:
        if k >= vocab:
            break
        rows = logits if len(pending) == n else logits[pending]
        cut, covered = _nucleus_cut(rows.topk(k, dim=-1).values, lse[pending], top_p[pending])
        threshold[pending[covered]] = cut[covered]
        pending = pending[~covered]
        if len(pending) == 0:
            return threshold
    if len(pending) == n:  # no tier ran, or none covered a row: no indexing, hence no sync, is needed
        return _nucleus_cut(logits.sort(dim=-1, descending=True).values, lse, top_p)[0]
    values = logits[pending].sort(dim=-1, descending=True).values
    threshold[pending] = _nucleus_cut(values, lse[pending], top_p[pending])[0]
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


def _request_generator(request: Request, device: torch.device) -> torch.Generator:
    """The request's generator on `device`, re-seeded from (seed, number of tokens sampled so far).

    Deriving each step's stream from the request alone makes a seeded request reproducible wherever its steps
    run: the teacher's first token and the student's continuation in another process, or a request migrated
    to another decode replica, draw exactly what one process would have drawn (on the same kind of device).
    """
    if request.generator is None or request.generator.device != device:
        request.generator = torch.Generator(device=device)
    seed = request.params.seed
    assert seed is not None
    step = len(request.output_token_ids)
    request.generator.manual_seed((seed * 0x9E3779B1 + step * 0x85EBCA77) % (1 << 63))
    return request.generator


def _apply_bias(logits: torch.Tensor, biases: Sequence[list[tuple[int, float]]]) -> None:
    """Add each row's (token id, bias) pairs to its logits in place, all rows in one indexed add."""
    rows = [i for i, entries in enumerate(biases) for _ in entries]
    cols = [t for entries in biases for t, _ in entries]
    values = [b for entries in biases for _, b in entries]
    r, c, v = _upload(logits.device, _longs(rows), _longs(cols), _floats(values))
    logits.index_put_((r, c), v, accumulate=True)


def _apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """Repetition penalty (HF) over prompt + output, then presence / frequency (OpenAI) over output only, in
    place on the rows that ask for one (the others are not touched).

    The token counts are built on the device from one padded [R, L] tensor of ids, so the work per token is a
    copy, never a Python step, and nothing is read back.
    """
    rows = [i for i, r in enumerate(requests) if _has_penalty(r.params)]
    if not rows:
        return
    params = [requests[i].params for i in rows]
    repetition = any(p.repetition_penalty != 1.0 for p in params)
    occurrence = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
    # Only the repetition penalty looks at the prompt; its ids come first in a row and are told apart below.
    prompts = [
        requests[i].prompt_token_ids if p.repetition_penalty != 1.0 else [] for i, p in zip(rows, params)
    ]
    ids = [_longs(prompt + requests[i].output_token_ids) for i, prompt in zip(rows, prompts)]
    if max(len(t) for t in ids) == 0:
        return  # nothing generated yet and no prompt to look at
    padded = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=-1)
    factors = _floats(
        [v for p in params for v in (p.repetition_penalty, p.presence_penalty, p.frequency_penalty)]
    )
    idx, tokens, prompt_lens, factors = _upload(
        logits.device, _longs(rows), padded, _longs([len(p) for p in prompts]), factors.view(-1, 3)
    )
    counts = _token_counts(tokens, prompt_lens, logits.shape[1], halves=2 if repetition else 1)
    every_row = len(rows) == logits.shape[0]
    sub = logits if every_row else logits[idx]
    if repetition:
        seen = counts.amax(dim=1) > 0  # in the output or the prompt
        penalty = factors[:, 0:1]
        sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    if occurrence:
        out = counts[:, 0]
        sub = sub - torch.where(out > 0, factors[:, 1:2] + factors[:, 2:3] * out, 0.0)
    if every_row:
        logits.copy_(sub)
    else:
        logits.index_copy_(0, idx, sub)


def _token_counts(tokens: torch.Tensor, prompt_lens: torch.Tensor, vocab: int, halves: int) -> torch.Tensor:
    """[R, halves, V] int32 counts of the ids in `tokens` [R, L] (padded with -1) by one scatter_add: the
    first prompt_lens[r] ids of row r (its prompt) count in half 1, the others (its output) in half 0.

    Ids outside [0, V) (padding included) land in an extra column that is dropped.
    """
    width = vocab + 1
    in_prompt = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0) < prompt_lens.unsqueeze(1)
    cols = torch.where((tokens >= 0) & (tokens < vocab), tokens, vocab) + in_prompt * width
    counts = torch.zeros(tokens.shape[0], halves * width, dtype=torch.int32, device=tokens.device)
    counts.scatter_add_(1, cols, torch.ones_like(cols, dtype=torch.int32))
    return counts.view(-1, halves, width)[:, :, :vocab]


def _collect(raw: torch.Tensor, token_ids: torch.Tensor, requests: Sequence[Request]) -> list[SampledToken]:
    """The step's one device->host copy: the token ids and, for the requests that asked, log-probabilities
    under the raw logits (before penalties and temperature, as vLLM reports them), packed in one tensor."""
    wanted = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if not wanted:
        return [SampledToken(t, None) for t in token_ids.tolist()]
    ks = [requests[i].params.logprobs or 0 for i in wanted]
    if len(wanted) == len(requests):
        rows, chosen = raw, token_ids
    else:
        (index,) = _upload(raw.device, _longs(wanted))
        rows, chosen = raw[index], token_ids[index]
    b = len(requests)
    flat, logprobs = _token_logprobs(rows, chosen, ks, head=token_ids)
    ids = [int(t) for t in flat[:b]]
    out = [SampledToken(t, None) for t in ids]
    for i, lp in zip(wanted, logprobs):
        out[i] = SampledToken(ids[i], lp)
    return out


def score(logits: torch.Tensor, token_ids: Sequence[int], ks: Sequence[int]) -> list[TokenLogprob]:
    """The log-probability of each given token under its row of `logits` [len(token_ids), V], with its `ks[i]`
    most likely alternatives: prompt tokens scored by the model that computed the tokens before them."""
    if not token_ids:
        return []
    (chosen,) = _upload(logits.device, _longs(list(token_ids)))
    return _token_logprobs(logits.float(), chosen, list(ks))[1]


def _token_logprobs(
    raw: torch.Tensor, chosen: torch.Tensor, ks: list[int], head: torch.Tensor | None = None
) -> tuple[list[float], list[TokenLogprob]]:
    """Row i's log-probability of `chosen[i]` and its `ks[i]` most likely tokens, read back in one copy with
    `head` (whatever else the caller needs from the device) packed in front: returns that copy and the
    logprobs. float64 holds the float32 logprobs and the token ids (far below 2**53) exactly."""
    k_max = min(max(ks), raw.shape[1])
    logp = torch.log_softmax(raw, dim=-1)
    parts = [] if head is None else [head]
    chosen_lp = logp.gather(1, chosen.unsqueeze(1))
    parts += [chosen_lp.squeeze(1), chosen, (logp > chosen_lp).sum(dim=1) + 1]  # ... and its rank
    if k_max > 0:
        values, indices = logp.topk(k_max, dim=-1)
        parts += [values.flatten(), indices.flatten()]
    flat: list[float] = torch.cat([p.double() for p in parts]).tolist()
    w, base = len(ks), 0 if head is None else head.numel()
    lps, ids, ranks = (flat[base + i * w : base + (i + 1) * w] for i in range(3))
    top_values, top_ids = flat[base + 3 * w : base + 3 * w + w * k_max], flat[base + 3 * w + w * k_max :]
    out = []
    for n in range(w):
        k = min(ks[n], k_max)
        top = tuple((int(top_ids[n * k_max + j]), top_values[n * k_max + j]) for j in range(k))
        out.append(TokenLogprob(int(ids[n]), lps[n], top, int(ranks[n])))
    return flat, out
