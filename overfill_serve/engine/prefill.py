"""`PrefillEngine`: batches waiting prompts under a token budget, runs the prefill model (the teacher in
OverFill mode) and samples each request's first token from that model's logits.

A request is admitted only when the step's token budget reaches it and blocks for its whole prompt are free,
so a chunked prefill never stalls half way for memory and a queued prompt holds no blocks. A request coming
back from a decode-side preemption (it already has output tokens) is prefilled over its prompt only and
handed over without sampling: the decode model recomputes its own KV for the tokens it generated. The first
token is not detokenized here: whoever decodes the request streams it (`DecodeEngine.add`), on this worker
or across the KV channel.

Scoring (`SamplingParams.prompt_logprobs`): a chunk then gets logits for every token, and each prompt token
is scored by the model that computes the token before it. A prefill stops at the request's continuation
start (the OverFill split): the request is handed over without a first token and the decode model's prefill
engine computes the rest of the prompt on that KV. A request with max_tokens=0 ends here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from overfill_serve.engine.batch import Batch, ScheduledSeq
from overfill_serve.engine.runner import ModelRunner
from overfill_serve.engine.sampler import SampledToken, score
from overfill_serve.engine.stage import Prefilled, StageContext, StageEngine, StepResult
from overfill_serve.kv.block_hash import block_hashes
from overfill_serve.kv.paged_cache import blocks_for
from overfill_serve.request import FinishReason, Request, RequestStatus


class PrefillEngine(StageEngine):
    def __init__(
        self,
        runner: ModelRunner,
        context: StageContext,
        on_layer: Callable[[Batch, int], None] | None = None,
        reserve: Callable[[Request], int] | None = None,
        model: str = "",
    ) -> None:
        super().__init__(runner, context, model)  # running: blocks allocated, prompt partly computed
        self.max_num_batched_tokens = context.config.max_num_batched_tokens
        # Prefix caching: the blocks this model computes are indexed under its name (their provenance).
        self.prefix_caching = context.config.enable_prefix_caching
        self.prefix_queries = self.prefix_hits = 0  # prompt tokens looked up / found in the cache
        self.computed_tokens = 0  # prompt tokens this model computed (what the cache did not save)
        self.on_layer = on_layer  # called after each layer's forward: lets a KV channel stream layer by layer
        # Tokens a request holds blocks for once admitted: by default up to where this prefill stops; a core
        # that also computes the rest of the prompt holds it whole, so that part never waits for memory.
        self.reserve = reserve or (lambda request: request.prefill_stop)

    def add(self, request: Request, front: bool = False) -> None:
        request.mark(RequestStatus.ROUTED)
        self.waiting.appendleft(request) if front else self.waiting.append(request)

    @property
    def queued_prompt_tokens(self) -> int:
        return sum(r.num_prompt_tokens - r.num_computed_tokens for q in self.queues() for r in q)

    def step(self) -> StepResult:
        batch = self._schedule()
        if not batch:
            return StepResult()
        hook = None if self.on_layer is None else partial(self.on_layer, batch)
        logits = self.runner.run(batch, on_layer=hook)
        self.computed_tokens += batch.num_tokens
        return self._postprocess(batch, logits)

    def _schedule(self) -> Batch:
        """Prompts already started go first; then waiting prompts are admitted while the token budget has room,
        each taking blocks for its whole prompt only now (a queued prompt holds no blocks a decode could use)."""
        budget = self.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        for request in self.running:
            if budget == 0:
                break
            seqs.append(self._chunk(request, budget))
            budget -= len(seqs[-1].token_ids)
        while budget and self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if not self._allocate(request):
                break  # FIFO: later prompts wait too, so a long prompt is not starved
            self.waiting.popleft()
            request.mark(RequestStatus.PREFILLING)
            self.running.append(request)
            seqs.append(self._chunk(request, budget))
            budget -= len(seqs[-1].token_ids)
        return Batch(tuple(seqs))

    def _allocate(self, request: Request) -> bool:
        """Give an admitted request its blocks: the cached ones of its prompt's longest cached prefix, shared
        (their tokens count as computed), then new ones. False, holding nothing, if the pool is short. A prompt
        continued after its split already holds blocks for the part computed so far."""
        hashes = self._cacheable(request)
        need = blocks_for(self.reserve(request), self.block_size) - len(request.block_table)
        taken = self.pool.acquire(hashes or [], need)
        if taken is None:
            return False
        blocks, shared = taken
        request.block_table += blocks
        request.num_computed_tokens += shared * self.block_size
        request.num_cached_tokens = max(request.num_cached_tokens, shared * self.block_size)
        if hashes is not None:
            self.prefix_queries += request.num_prompt_tokens
            self.prefix_hits += shared * self.block_size
        return True

    def _cacheable(self, request: Request) -> list[bytes] | None:
        """The hashes of the blocks this model computed that a prompt prefilled from its start may share (None:
        it takes no part). Its last token is always computed here (its logits give the first token), and so
        is every token of a scored prompt. A prompt with a split takes no part (its blocks mix two models)."""
        if not self.prefix_caching or request.params.continuation_start is not None or request.block_table:
            return None
        if request.hashed_for != self.model:
            request.block_hashes = block_hashes(request.prompt_token_ids, self.block_size, self.model)
            request.hashed_for = self.model
        if request.params.prompt_logprobs is not None:
            return None
        return request.block_hashes[: (request.num_prompt_tokens - 1) // self.block_size]

    @staticmethod
    def _chunk(request: Request, budget: int) -> ScheduledSeq:
        """The next at most `budget` prompt tokens of a request whose blocks are allocated, up to where this
        prefill stops. A re-prefill (it has output tokens) neither samples nor scores again."""
        start = request.num_computed_tokens
        end = min(request.prefill_stop, start + budget)
        fresh = not request.output_token_ids
        return ScheduledSeq(
            request.request_id,
            tuple(request.prompt_token_ids[start:end]),
            start,
            tuple(request.block_table),
            needs_logits=fresh and end == request.num_prompt_tokens and request.params.max_tokens > 0,
            all_logits=fresh and request.params.prompt_logprobs is not None,
        )

    def _postprocess(self, batch: Batch, logits: torch.Tensor) -> StepResult:
        by_id = {r.request_id: r for r in self.running}
        first = self._score_and_sample(batch, logits, by_id)
        prefilled, outputs = [], []
        for seq in batch.seqs:
            request = by_id[seq.request_id]
            stop = request.prefill_stop
            request.num_computed_tokens = seq.context_len
            self._index(request, seq.start, min(seq.context_len, request.num_prompt_tokens))
            if seq.context_len < stop:
                continue
            self.running.remove(request)
            if seq.context_len == request.num_prompt_tokens and request.params.max_tokens == 0:
                outputs.append(self.output.finish_prompt(request))  # scored, nothing to generate
                self._finish(request, RequestStatus.FINISHED, FinishReason.LENGTH)
                continue
            request.mark(RequestStatus.KV_IN_FLIGHT)
            if request.request_id in first:
                request.stamp("first_token")
            prefilled.append(Prefilled(request, first.get(request.request_id)))
        return StepResult(outputs=tuple(outputs), prefilled=tuple(prefilled))

    def _score_and_sample(
        self, batch: Batch, logits: torch.Tensor, by_id: dict[str, Request]
    ) -> dict[str, SampledToken]:
        """Score the prompt tokens of the sequences that want it, then sample the first tokens: request id ->
        its first token. Row r of a scoring chunk starting at s scores prompt token s + r + 1."""
        rows, targets, scored, ks = [], [], [], []
        sampling, sample_rows = [], []
        row = 0
        for seq in batch.seqs:
            request = by_id[seq.request_id]
            if seq.all_logits:  # every position up to the prompt's last scores the token after it
                assert len(request.prompt_logprobs) == seq.start, "scores are appended in prompt order"
                for pos in range(seq.start, min(seq.context_len, request.num_prompt_tokens - 1)):
                    rows.append(row + pos - seq.start)
                    targets.append(request.prompt_token_ids[pos + 1])
                    scored.append(request)
                    ks.append(request.params.prompt_logprobs or 0)
            row += seq.num_logits
            if seq.needs_logits:
                sampling.append(request)
                sample_rows.append(row - 1)
        if rows:
            for request, lp in zip(scored, score(logits[rows], targets, ks)):
                request.prompt_logprobs.append(lp)
        if not sampling:
            return {}
        if len(sample_rows) != logits.shape[0]:
            logits = logits[sample_rows]
        return {r.request_id: t for r, t in zip(sampling, self.sampler(logits, sampling))}
