"""`PrefillWorker`: hosts the full (teacher) model, prefills prompts, samples each first token from the
teacher's logits and offers the prompt KV to decode workers through its KV server.

A transfer is opened when the request is submitted, so a decode worker can start pulling at once: each layer
is published as soon as the final prefill chunk has computed it, and the transfer overlaps the rest of the
prefill. As a `ModelWorker` it also generates locally with the teacher alone (the `full` mode).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overfill_serve.engine.batch import Batch
from overfill_serve.engine.prefill import PrefillEngine
from overfill_serve.model.spec import KVLayout
from overfill_serve.request import RequestStatus
from overfill_serve.sampling_params import SamplingParams
from overfill_serve.transfer import auth
from overfill_serve.transfer.config import TransferConfig
from overfill_serve.transfer.registry import Completion, TransferRegistry
from overfill_serve.transfer.server import KVTransferServer, KVTransferServicer
from overfill_serve.worker.latency_window import LatencyWindow
from overfill_serve.worker.model_worker import ModelWorker


@dataclass(frozen=True)
class TransferTicket:
    """Where a decode worker pulls a request's prompt KV from."""

    transfer_id: str
    address: str  # the prefill worker's KV server, host:port
    request_id: str
    num_prompt_tokens: int


class PrefillWorker(ModelWorker):
    def __init__(self, model_dir: str | Path, *, transfer: TransferConfig, **kwargs: Any) -> None:
        super().__init__(model_dir, name="prefill", **kwargs)
        spec = self.model.spec
        self.layout = KVLayout(
            spec.num_layers,
            tuple(range(spec.num_layers)),
            spec.num_kv_heads,
            spec.head_dim,
            spec.rope,
            spec.vocab_size,
            spec.eos_token_ids,
            self.dtype,
            self.cache.block_size,
        )
        # Remote prefills: no detokenization or stop checks here, the decode side does both.
        self.remote_engine = PrefillEngine(
            self.runner,
            self.pool,
            self.sampler,
            None,
            self.prefill_engine.max_num_batched_tokens,
            self.prefill_engine.max_num_seqs,
            on_layer=self._layer_done if transfer.layerwise else None,
        )
        self.registry = TransferRegistry(
            self.pool,
            transfer.lease_seconds,
            abort_prefill=lambda rid: self.loop.call(lambda: self._abort_remote(rid)),
        )
        servicer = KVTransferServicer(
            self.cache, self.registry, self.layout, transfer, auth.load_secret(transfer.secret)
        )
        self.server = KVTransferServer(servicer, transfer)
        self._transfer_of: dict[str, tuple[str, int]] = {}  # request id -> (transfer id, prompt length)
        self.num_prefilled = 0  # remote prefills handed over
        self.ttft = LatencyWindow()  # submit -> first token and KV ready, for remote prefills

    @property
    def address(self) -> str:
        return self.server.address

    def start(self) -> PrefillWorker:
        self.server.start()
        super().start()
        return self

    def stop(self) -> None:
        super().stop()
        self.server.stop()

    def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        generated_token_ids: list[int] | None = None,
    ) -> TransferTicket:
        """Queue a prefill whose KV a decode worker will pull; the ticket is valid at once.
        `generated_token_ids` (what a decode worker already produced, for a re-prefill after preemption or
        migration) skips sampling a new first token."""
        request = self._new_request(prompt_token_ids, params, request_id, generated_token_ids)
        transfer_id = self.registry.open(request)

        def admit() -> None:
            self._transfer_of[request.request_id] = (transfer_id, request.num_prompt_tokens)
            self.remote_engine.add(request)

        self.loop.call(admit)
        return TransferTicket(transfer_id, self.address, request.request_id, request.num_prompt_tokens)

    def drain(self, timeout: float) -> bool:
        """Before shutting down: wait until every offered KV is pulled, aborted or its lease ran out, so a
        decode worker mid-pull is not cut off. True if none is left open."""
        return self.registry.wait_empty(timeout)

    def abort_transfer(self, transfer_id: str, reason: str = "aborted by the prefill side") -> None:
        self.registry.abort(transfer_id, reason)

    def stats(self) -> dict[str, float]:
        stats = super().stats()
        stats["open_transfers"] = self.registry.num_open
        stats["prefilled"] = self.num_prefilled
        stats["ttft_s"] = self.ttft.mean()
        stats["waiting"] += len(self.remote_engine.waiting)
        stats["running"] += len(self.remote_engine.running)
        stats["queued_prompt_tokens"] = sum(
            r.num_prompt_tokens - r.num_computed_tokens
            for r in (*self.remote_engine.waiting, *self.remote_engine.running)
        )
        return stats

    # -- engine thread -------------------------------------------------------------------------------------
    def _step_more(self) -> bool:
        if not self.remote_engine.has_work():
            return False
        result = self.remote_engine.step()
        for request in result.handed_over:
            self.num_prefilled += 1
            self.ttft.add(time.perf_counter() - request.timeline[RequestStatus.RECEIVED.value])
            transfer_id, _ = self._transfer_of.pop(request.request_id)
            logprob = request.output_logprobs[0] if request.output_logprobs else None
            self.registry.complete(
                transfer_id,
                request,
                Completion(request.output_token_ids[0], request.num_prompt_tokens, logprob),
            )
        return True

    def _layer_done(self, batch: Batch, layer: int) -> None:
        # Only a prompt's final chunk makes its KV final; earlier chunks are complete before it runs.
        for seq in batch.seqs:
            transfer_id, prompt_len = self._transfer_of[seq.request_id]
            if seq.context_len == prompt_len:
                self.registry.layer_done(transfer_id, layer)

    def _abort_remote(self, request_id: str) -> None:
        self._transfer_of.pop(request_id, None)
        self.remote_engine.abort(request_id)

    def _crash(self, error: BaseException) -> None:
        super()._crash(error)
        for transfer_id, _ in list(self._transfer_of.values()):
            self.registry.abort(transfer_id, f"prefill engine failed: {error}")
