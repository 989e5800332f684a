"""`DecodeEngine`: continuous batching of handed-over requests on the decode model (the student in OverFill
mode). Requests join and leave between steps; each step feeds every running request the tokens whose KV is not
yet in the cache (one token normally, more after a preemption or migration) and samples the next token.

When the pool runs out of blocks the newest request is preempted. With a swap space that has room, its KV is
swapped out to host memory and back in once blocks free up (swapped requests go before new ones); otherwise
its blocks are freed and the step returns it as `preempted`, to be re-prefilled keeping every token it
generated.
"""

from __future__ import annotations

import bisect
from collections import deque

import torch

from overfill_serve.engine.batch import Batch, ScheduledSeq
from overfill_serve.engine.output_processor import StepOutput
from overfill_serve.engine.runner import ModelRunner
from overfill_serve.engine.sampler import SampledToken
from overfill_serve.engine.stage import StageContext, StageEngine, StepResult
from overfill_serve.kv.block_hash import block_hashes
from overfill_serve.kv.paged_cache import blocks_for
from overfill_serve.kv.swap_space import SwapSpace
from overfill_serve.request import Request, RequestStatus


def _arrival(request: Request) -> float:
    return request.timeline[RequestStatus.RECEIVED.value]


class DecodeEngine(StageEngine):
    def __init__(
        self, runner: ModelRunner, context: StageContext, swap: SwapSpace | None = None, model: str = ""
    ) -> None:
        super().__init__(runner, context, model)  # waiting: KV present, not yet admitted
        self.swap = swap
        self.swapped: deque[Request] = deque()  # KV in the swap space, oldest first
        self._preempted: list[Request] = []  # this step's requests to re-prefill

    def queues(self) -> tuple[deque[Request] | list[Request], ...]:
        return (self.waiting, self.running, self.swapped)

    def abort(self, request_id: str, error: BaseException | None = None) -> Request | None:
        if self.swap is not None:
            self.swap.discard(request_id)  # a no-op unless the request is swapped out
        return super().abort(request_id, error)

    def add(self, request: Request, first_token: SampledToken | None = None) -> StepOutput | None:
        """Take over a request whose prompt KV is in the pool. `first_token` (sampled by the prefill model) is
        streamed first: a request it already finishes (a stop token, max_tokens=1) ends here. Without it the
        request resumes with the tokens it has."""
        out = None
        if first_token is not None:
            out = self.output.append(request, first_token)
            if request.finish_reason is not None:
                self._finish(request, RequestStatus.FINISHED, request.finish_reason)
                return out
        assert request.block_table and request.output_token_ids, "decode needs prompt KV and a first token"
        self.waiting.append(request)
        return out

    def step(self) -> StepResult:
        batch = self._schedule()
        preempted, self._preempted = tuple(self._preempted), []
        if not batch:
            return StepResult(preempted=preempted)
        logits = self.runner.run(batch)
        return StepResult(self._postprocess(batch, logits), preempted=preempted)

    def _schedule(self) -> Batch:
        self._swap_in()
        # Swapped requests come back before new ones join, unless nothing runs that could free their room
        # (the waiting ones hold blocks of their own: running them is how the room comes back).
        while self.waiting and len(self.running) < self.max_num_seqs and not (self.swapped and self.running):
            request = self.waiting.popleft()
            request.mark(RequestStatus.DECODING)
            self.running.append(request)
        scheduled: list[Request] = []
        for request in list(self.running):
            if request not in self.running:
                continue  # preempted below to make room for an older request
            need = blocks_for(request.num_tokens, self.block_size) - len(request.block_table)
            blocks = self.pool.allocate(need)
            while blocks is None:
                victim = self._victim()
                self._preempt(victim)
                if victim is request:
                    break
                blocks = self.pool.allocate(need)
            if blocks is not None:
                request.block_table += blocks
                scheduled.append(request)
        return Batch(
            tuple(
                ScheduledSeq(
                    r.request_id,
                    tuple(r.all_token_ids[r.num_computed_tokens :]),
                    r.num_computed_tokens,
                    tuple(r.block_table),
                    needs_logits=True,
                )
                for r in scheduled
            )
        )

    def _victim(self) -> Request:
        """The newest request holding blocks: not-yet-admitted ones first, then the newest running one."""
        return self.waiting[-1] if self.waiting else self.running[-1]

    def _swap_in(self) -> None:
        """Bring swapped requests back, oldest first, while their blocks fit."""
        swap = self.swap
        if swap is None:
            return
        while self.swapped and len(self.running) < self.max_num_seqs:
            request = self.swapped[0]
            blocks = self.pool.allocate(swap.blocks_of(request.request_id))
            if blocks is None:
                return
            self.swapped.popleft()
            swap.swap_in(request.request_id, blocks)
            request.block_table = blocks
            request.mark(RequestStatus.DECODING)
            bisect.insort(self.running, request, key=_arrival)  # the newest stays the next victim

    def _preempt(self, request: Request) -> None:
        (self.waiting if request in self.waiting else self.running).remove(request)
        request.num_preemptions += 1
        if self.swap is not None and self.swap.can_hold(len(request.block_table)):
            self.swap.swap_out(request.request_id, request.block_table)
            self.pool.free(request.block_table)
            request.block_table = []
            request.mark(RequestStatus.SWAPPED)
            self.swapped.append(request)
            return
        self.pool.free(request.block_table)
        request.block_table = []
        request.num_computed_tokens = 0
        self._preempted.append(request)

    def _postprocess(self, batch: Batch, logits: torch.Tensor) -> tuple[StepOutput, ...]:
        by_id = {r.request_id: r for r in self.running}
        requests = [by_id[s.request_id] for s in batch.seqs]
        outputs = []
        for request, seq, token in zip(requests, batch.seqs, self.sampler(logits, requests)):
            request.num_computed_tokens = seq.context_len
            self._index_output(request, seq)
            outputs.append(self.output.append(request, token))
            if request.finish_reason is not None:
                self.running.remove(request)
                self._finish(request, RequestStatus.FINISHED, request.finish_reason)
        return tuple(outputs)

    def _index_output(self, request: Request, seq: ScheduledSeq) -> None:
        """Prefix caching where this model also prefilled the request (the full and pruned modes): the KV it
        writes for the generated tokens is what its prefill of them would compute, so completed blocks are
        indexed too (a next chat turn resending the answer shares them). Never after another model's prefill:
        the student's KV on the teacher's prompt is neither model's own."""
        if request.hashed_for != self.model or seq.context_len // self.block_size <= len(
            request.block_hashes
        ):
            return  # (most steps: no block completed)
        tokens = request.all_token_ids[: seq.context_len]
        request.block_hashes = block_hashes(tokens, self.block_size, self.model, request.block_hashes)
        self._index(request, seq.start, seq.context_len)
