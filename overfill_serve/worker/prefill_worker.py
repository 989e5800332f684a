"""`PrefillWorker`: hosts the full (teacher) model, prefills prompts, samples each first token from the
teacher's logits and offers the prompt KV to decode workers through its KV server.

A transfer is opened when the request is submitted, so a decode worker can start pulling at once: each layer
is published as soon as the final prefill chunk has computed it, and the transfer overlaps the rest of the
prefill. As a `ModelWorker` it also generates locally with the teacher alone (the `full` mode).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from overfill_serve.engine.batch import Batch
from overfill_serve.engine.output_processor import StepOutput
from overfill_serve.engine.stage import Prefilled
from overfill_serve.kv.block_hash import block_hashes
from overfill_serve.model.loader import checkpoint_fingerprint
from overfill_serve.model.spec import KVLayout
from overfill_serve.request import RequestStatus, Resume
from overfill_serve.sampling_params import SamplingParams
from overfill_serve.transfer import auth
from overfill_serve.transfer.config import TransferConfig
from overfill_serve.transfer.registry import Completion, TransferRegistry
from overfill_serve.transfer.server import KVTransferServer, KVTransferServicer
from overfill_serve.worker.latency_window import LatencyWindow
from overfill_serve.worker.model_worker import ModelWorker
from overfill_serve.worker.worker_stats import WorkerStats


@dataclass(frozen=True)
class TransferTicket:
    """What a decode worker needs to take a request over: where its prompt KV is, and the request itself."""

    transfer_id: str
    address: str  # the prefill worker's KV server, host:port
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    resume: Resume | None = None  # a migrated request: where its decode continues
    # A request that ended on its first token (max_tokens=1): its outputs; no KV is offered, nothing to pull.
    outputs: tuple[StepOutput, ...] = ()
    # The handover names the KV offered by block: the `block_hash` of each of its full blocks, as the teacher
    # checkpoint that computed it names them (`PrefillWorker.kv_name`). A decode replica whose prefix cache
    # holds the first ones pulls only the rest.
    block_hashes: tuple[bytes, ...] = ()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_kv_tokens(self) -> int:
        """Prompt tokens whose KV is offered: up to the continuation start, if the request has one."""
        return self.params.prefill_stop(0, self.num_prompt_tokens)


class PrefillWorker(ModelWorker):
    role, model_name = "prefill", "teacher"

    def __init__(self, model_dir: str | Path, *, transfer: TransferConfig, **engine: Any) -> None:
        self._transfer_of: dict[str, tuple[str, int]] = {}  # request id -> (transfer id, KV tokens offered)
        super().__init__(model_dir, self._layer_done if transfer.layerwise else None, **engine)
        self.layout = KVLayout.of_teacher(self.model.spec, self.config.dtype, self.config.block_size)
        # What the KV it offers is named after across the cluster: these very weights, not just "the teacher"
        # (a decode replica must never take a block another teacher checkpoint computed, e.g. mid-redeploy).
        self.kv_name = f"{self.model_name}/{checkpoint_fingerprint(model_dir)}"
        self.registry = TransferRegistry(self.core.pool, transfer.lease_seconds, abort_prefill=self.abort)
        servicer = KVTransferServicer(
            self.core.cache, self.registry, self.layout, transfer, auth.load_secret(transfer.secret)
        )
        self.server = KVTransferServer(servicer, transfer)
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
        resume: Resume | None = None,
    ) -> TransferTicket:
        """Queue a prefill whose KV a decode worker will pull; the ticket is valid at once. `resume`: a
        re-prefill after preemption or migration (its tokens so far skip sampling a new first token)."""
        request = self._new_request(prompt_token_ids, params, request_id, resume)
        transfer_id = self.registry.open(request)

        def admit() -> None:
            self._transfer_of[request.request_id] = (transfer_id, request.prefill_stop)
            self.core.add(request, self.model_name, decode=None)

        self.loop.call(admit)
        offered = request.prompt_token_ids[: request.prefill_stop]
        return TransferTicket(
            transfer_id,
            self.address,
            request.request_id,
            tuple(request.prompt_token_ids),
            params,
            resume,
            block_hashes=tuple(block_hashes(offered, self.config.block_size, self.kv_name)),
        )

    async def asubmit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        resume: Resume | None = None,
    ) -> TransferTicket:
        """`submit`, except that a request known to end on its first token, or before it (max_tokens=0), runs
        to its end here, the teacher sampling that token as it would for the decode side: no KV transfer, no
        decode replica. Not so a request whose prompt the student continues (a continuation start)."""
        continues = params.prefill_stop(0, len(prompt_token_ids)) < len(prompt_token_ids)
        if params.max_tokens > 1 or resume is not None or continues:
            return self.submit(prompt_token_ids, params, request_id, resume)
        outputs = tuple([out async for out in self.agenerate(prompt_token_ids, params, request_id)])
        rid = outputs[0].request_id
        return TransferTicket("", self.address, rid, tuple(prompt_token_ids), params, outputs=outputs)

    def drain(self, timeout: float) -> bool:
        """Before shutting down: wait until every offered KV is pulled, aborted or its lease ran out, so a
        decode worker mid-pull is not cut off. True if none is left open."""
        return self.registry.wait_empty(timeout)

    def abort_transfer(self, transfer_id: str, reason: str = "aborted by the prefill side") -> None:
        self.registry.abort(transfer_id, reason)

    def stats(self) -> WorkerStats:
        return replace(
            super().stats(),
            open_transfers=self.registry.num_open,
            prefilled=self.num_prefilled,
            ttft_s=self.ttft.mean(),
        )

    # -- engine thread -------------------------------------------------------------------------------------
    def _hand_over(self, prefilled: tuple[Prefilled, ...]) -> None:
        for done in prefilled:
            request = done.request
            self.num_prefilled += 1
            self.ttft.add(time.perf_counter() - request.timeline[RequestStatus.RECEIVED.value])
            transfer_id, _ = self._transfer_of.pop(request.request_id)
            self.registry.complete(transfer_id, request, self._completion(done))

    def _completion(self, done: Prefilled) -> Completion:
        request, first = done.request, done.first_token
        scores = tuple(request.prompt_logprobs)
        if request.prompt_continues:  # split: the student computes the rest
            return Completion(None, request.num_computed_tokens, prompt_logprobs=scores)
        if first is None:  # resumed: nothing sampled here; its decode worker continues from its tokens
            return Completion(request.output_token_ids[0], request.num_prompt_tokens)
        # The engine's own stop rule: a first token that ends the request needs no KV on the decode side.
        finished = self.core.output.stops_on(first.token_id, request.params, generated=1)
        cached = request.num_cached_tokens
        return Completion(first.token_id, request.num_prompt_tokens, first.logprob, finished, scores, cached)

    def _layer_done(self, batch: Batch, layer: int) -> None:
        # Only a prompt's final chunk makes its KV final; earlier chunks are complete before it runs. On a GPU
        # the layer's kernels are only queued: an event recorded now says when its KV is really there.
        ready = None
        for seq in batch.seqs:
            transfer = self._transfer_of.get(seq.request_id)  # None: a local (full-mode) prefill
            if transfer is not None and seq.context_len == transfer[1]:
                if ready is None and self.config.on_cuda:
                    ready = torch.cuda.Event()
                    ready.record()
                self.registry.layer_done(transfer[0], layer, ready)

    def _abort_now(self, request_id: str) -> None:
        self._transfer_of.pop(request_id, None)
        super()._abort_now(request_id)

    def _crash(self, error: BaseException) -> None:
        super()._crash(error)
        for transfer_id, _ in list(self._transfer_of.values()):
            self.registry.abort(transfer_id, f"prefill engine failed: {error}")
