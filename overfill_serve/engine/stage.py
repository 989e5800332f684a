"""`StageEngine`: what the prefill and decode engines share — their queues, the block pool they draw from, how
a request leaves them (finished, aborted or failed) with every block returned — and `StepResult`, what one
step of either stage produces."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from overfill_serve.engine.config import EngineConfig
from overfill_serve.engine.output_processor import OutputProcessor, StepOutput
from overfill_serve.engine.runner import ModelRunner
from overfill_serve.engine.sampler import SampledToken, Sampler
from overfill_serve.kv.block_pool import BlockPool
from overfill_serve.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True)
class Prefilled:
    """A request whose prompt KV is complete, with the first token the prefill model sampled (None when the
    request resumes after a preemption with the tokens it already has)."""

    request: Request
    first_token: SampledToken | None


@dataclass(frozen=True)
class StepResult:
    outputs: tuple[StepOutput, ...] = ()  # new tokens to stream, one per request that got one
    prefilled: tuple[Prefilled, ...] = ()  # prefill: ready to decode
    preempted: tuple[Request, ...] = ()  # decode: blocks freed; the prompt must be prefilled again


@dataclass(frozen=True)
class StageContext:
    """What the stage engines of one core share."""

    pool: BlockPool
    sampler: Sampler
    output: OutputProcessor
    config: EngineConfig


class StageEngine:
    def __init__(self, runner: ModelRunner, context: StageContext, model: str = "") -> None:
        self.runner, self.model = runner, model  # the model's name: what its KV blocks are hashed as
        self.pool, self.sampler, self.output = context.pool, context.sampler, context.output
        self.block_size, self.max_num_seqs = context.config.block_size, context.config.max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def queues(self) -> tuple[deque[Request] | list[Request], ...]:
        """Every place a request of this engine can be."""
        return (self.waiting, self.running)

    def has_work(self) -> bool:
        return any(self.queues())

    def abort(self, request_id: str, error: BaseException | None = None) -> Request | None:
        """Drop a request wherever it is in this engine and free its blocks, marked aborted (or failed, with
        `error`); None if it is not here."""
        for queue in self.queues():
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    self._finish(request, RequestStatus.ABORTED, FinishReason.ABORT)
                    if error is not None:
                        request.fail(error)
                    return request
        return None

    def _index(self, request: Request, start: int, end: int) -> None:
        """Index the request's blocks completed between token positions start and end (those it has hashes
        for), for later prompts to share."""
        for i in range(start // self.block_size, min(end // self.block_size, len(request.block_hashes))):
            self.pool.register(request.block_table[i], request.block_hashes[i])

    def _finish(self, request: Request, status: RequestStatus, reason: FinishReason) -> None:
        self.pool.free(request.block_table)
        request.block_table = []
        request.finish_reason = request.finish_reason or reason
        request.mark(status)
        self.output.release(request.request_id)
