"""`PrefillWorker`: hosts the full (teacher) model, prefills prompts, samples each first token from the
teacher's logits and offers the prompt KV to decode workers through its KV server.

A transfer is opened when the request is submitted, so a decode worker can start pulling at once: each layer
is published as soon as the final prefill chunk has computed it, and the transfer overlaps the rest of the
prefill.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

from overfill_serve.engine.batch import Batch
from overfill_serve.engine.prefill import PrefillEngine
from overfill_serve.engine.runner import ModelRunner
from overfill_serve.engine.sampler import Sampler
from overfill_serve.errors import InvalidRequestError
from overfill_serve.kv.block_pool import BlockPool
from overfill_serve.kv.paged_cache import PagedKVCache
from overfill_serve.model.loader import load_model, parse_dtype
from overfill_serve.model.spec import KVLayout
from overfill_serve.request import Request
from overfill_serve.sampling_params import SamplingParams
from overfill_serve.transfer import auth
from overfill_serve.transfer.config import TransferConfig
from overfill_serve.transfer.registry import Completion, TransferRegistry
from overfill_serve.transfer.server import KVTransferServer, KVTransferServicer
from overfill_serve.worker.engine_loop import EngineLoop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferTicket:
    """Where a decode worker pulls a request's prompt KV from."""

    transfer_id: str
    address: str  # the prefill worker's KV server, host:port
    request_id: str
    num_prompt_tokens: int


class PrefillWorker:
    def __init__(
        self,
        model_dir: str | Path,
        *,
        transfer: TransferConfig,
        dtype: str = "float32",
        device: str = "cpu",
        block_size: int = 16,
        num_kv_blocks: int = 1024,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 64,
    ) -> None:
        self.model = load_model(model_dir, dtype, device)
        spec = self.model.spec
        self.max_model_len = min(spec.max_position_embeddings, num_kv_blocks * block_size)
        self.cache = PagedKVCache(
            spec.num_layers,
            num_kv_blocks,
            block_size,
            spec.num_kv_heads,
            spec.head_dim,
            parse_dtype(dtype),
            device,
        )
        self.pool = BlockPool(num_kv_blocks)
        self.layout = KVLayout(
            spec.num_layers,
            tuple(range(spec.num_layers)),
            spec.num_kv_heads,
            spec.head_dim,
            spec.rope,
            spec.vocab_size,
            spec.eos_token_ids,
            dtype,
            block_size,
        )
        runner = ModelRunner(self.model, self.cache, tuple(range(spec.num_layers)))
        self.engine = PrefillEngine(
            runner,
            self.pool,
            Sampler(),
            None,
            max_num_batched_tokens,
            max_num_seqs,
            on_layer=self._layer_done if transfer.layerwise else None,
        )
        self.loop = EngineLoop("prefill-engine", self._step, self._crash)
        self.registry = TransferRegistry(
            self.pool,
            transfer.lease_seconds,
            abort_prefill=lambda rid: self.loop.call(lambda: self._abort_now(rid)),
        )
        servicer = KVTransferServicer(
            self.cache, self.registry, self.layout, transfer, auth.load_secret(transfer.secret)
        )
        self.server = KVTransferServer(servicer, transfer)
        self._transfer_of: dict[str, tuple[str, int]] = {}  # request id -> (transfer id, prompt length)
        self._ids = itertools.count()

    @property
    def address(self) -> str:
        return self.server.address

    def start(self) -> PrefillWorker:
        self.server.start()
        self.loop.start()
        return self

    def stop(self) -> None:
        self.loop.stop()
        self.server.stop()

    def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        generated_token_ids: list[int] | None = None,
    ) -> TransferTicket:
        """Queue a prefill; the ticket is valid at once. `generated_token_ids` (what a decode worker already
        produced, for a re-prefill after preemption or migration) skips sampling a new first token."""
        if not prompt_token_ids or len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_token_ids)} tokens; it must have 1 to {self.max_model_len - 1}",
                field="prompt",
            )
        if any(not 0 <= t < self.layout.vocab_size for t in prompt_token_ids):
            raise InvalidRequestError(
                f"prompt token ids must be in [0, {self.layout.vocab_size})", field="prompt"
            )
        request = Request(
            request_id or f"prefill-{next(self._ids)}",
            list(prompt_token_ids),
            params,
            output_token_ids=list(generated_token_ids or []),
        )
        transfer_id = self.registry.open(request)

        def admit() -> None:
            self._transfer_of[request.request_id] = (transfer_id, request.num_prompt_tokens)
            self.engine.add(request)

        self.loop.call(admit)
        return TransferTicket(transfer_id, self.address, request.request_id, len(prompt_token_ids))

    def abort(self, transfer_id: str, reason: str = "aborted by the prefill side") -> None:
        self.registry.abort(transfer_id, reason)

    # -- engine thread -------------------------------------------------------------------------------------
    def _step(self) -> bool:
        if not self.engine.has_work():
            return False
        result = self.engine.step()
        for request in result.handed_over:
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

    def _abort_now(self, request_id: str) -> None:
        self._transfer_of.pop(request_id, None)
        self.engine.abort(request_id)

    def _crash(self, error: BaseException) -> None:
        for transfer_id, _ in list(self._transfer_of.values()):
            self.registry.abort(transfer_id, f"prefill engine failed: {error}")

    def stats(self) -> dict[str, int]:
        return {
            "free_blocks": self.pool.num_free,
            "total_blocks": self.pool.num_blocks,
            "open_transfers": self.registry.num_open,
            "waiting": len(self.engine.waiting),
            "running": len(self.engine.running),
        }
