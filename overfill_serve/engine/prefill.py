"""`PrefillEngine`: batches waiting prompts under a token budget, runs the prefill model (the teacher in
OverFill mode) and samples each request's first token from that model's logits.

A request is admitted only when the step's token budget reaches it and blocks for its whole prompt are free,
so a chunked prefill never stalls half way for memory and a queued prompt holds no blocks. A request coming
back from a decode-side preemption (it already has output tokens) is prefilled over its prompt only and
handed over without sampling: the decode model recomputes its own KV for the tokens it generated. The first
token is not detokenized here: whoever decodes the request streams it (`DecodeEngine.add`), on this worker
or across the KV channel.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from overfill_serve.engine.batch import Batch, ScheduledSeq
from overfill_serve.engine.runner import ModelRunner
from overfill_serve.engine.stage import Prefilled, StageContext, StageEngine, StepResult
from overfill_serve.kv.paged_cache import blocks_for
from overfill_serve.request import Request, RequestStatus


class PrefillEngine(StageEngine):
    def __init__(
        self, runner: ModelRunner, context: StageContext, on_layer: Callable[[Batch, int], None] | None = None
    ) -> None:
        super().__init__(runner, context)  # running: blocks allocated, prompt partly computed
        self.max_num_batched_tokens = context.config.max_num_batched_tokens
        self.on_layer = on_layer  # called after each layer's forward: lets a KV channel stream layer by layer

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
            blocks = self.pool.allocate(blocks_for(request.num_prompt_tokens, self.block_size))
            if blocks is None:
                break  # FIFO: later prompts wait too, so a long prompt is not starved
            self.waiting.popleft()
            request.block_table = blocks
            request.num_computed_tokens = 0
            request.mark(RequestStatus.PREFILLING)
            self.running.append(request)
            seqs.append(self._chunk(request, budget))
            budget -= len(seqs[-1].token_ids)
        return Batch(tuple(seqs))

    @staticmethod
    def _chunk(request: Request, budget: int) -> ScheduledSeq:
        """The next at most `budget` prompt tokens of a request whose blocks are allocated."""
        start = request.num_computed_tokens
        end = min(request.num_prompt_tokens, start + budget)
        return ScheduledSeq(
            request.request_id,
            tuple(request.prompt_token_ids[start:end]),
            start,
            tuple(request.block_table),
            needs_logits=end == request.num_prompt_tokens and not request.output_token_ids,
        )

    def _postprocess(self, batch: Batch, logits: torch.Tensor) -> StepResult:
        by_id = {r.request_id: r for r in self.running}
        sampling = [by_id[s.request_id] for s in batch.sampled]
        tokens = self.sampler(logits, sampling) if sampling else []
        first = {r.request_id: token for r, token in zip(sampling, tokens)}
        prefilled = []
        for seq in batch.seqs:
            request = by_id[seq.request_id]
            request.num_computed_tokens = seq.context_len
            if seq.context_len == request.num_prompt_tokens:
                self.running.remove(request)
                request.mark(RequestStatus.KV_IN_FLIGHT)
                if request.request_id in first:
                    request.stamp("first_token")
                prefilled.append(Prefilled(request, first.get(request.request_id)))
        return StepResult(prefilled=tuple(prefilled))
