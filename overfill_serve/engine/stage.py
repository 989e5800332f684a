"""`StageEngine`: what the prefill and decode engines share — their queues, the block pool they draw from,
and how a request leaves them (finished or aborted) with every block returned."""

from __future__ import annotations

from collections import deque

from overfill_serve.engine.output_processor import OutputProcessor
from overfill_serve.engine.runner import ModelRunner
from overfill_serve.engine.sampler import Sampler
from overfill_serve.kv.block_pool import BlockPool
from overfill_serve.request import FinishReason, Request, RequestStatus


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class StageEngine:
    def __init__(
        self, runner: ModelRunner, pool: BlockPool, sampler: Sampler, output: OutputProcessor | None
    ) -> None:
        self.runner, self.pool, self.sampler, self.output = runner, pool, sampler, output
        self.block_size = runner.cache.block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def queues(self) -> tuple[deque[Request] | list[Request], ...]:
        """Every place a request of this engine can be."""
        return (self.waiting, self.running)

    def has_work(self) -> bool:
        return any(self.queues())

    def abort(self, request_id: str) -> Request | None:
        """Drop a request wherever it is in this engine and free its blocks; None if it is not here."""
        for queue in self.queues():
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    self._finish(request, RequestStatus.ABORTED, FinishReason.ABORT)
                    return request
        return None

    def _finish(self, request: Request, status: RequestStatus, reason: FinishReason) -> None:
        self.pool.free(request.block_table)
        request.block_table = []
        request.finish_reason = request.finish_reason or reason
        request.mark(status)
        if self.output is not None:
            self.output.release(request.request_id)
