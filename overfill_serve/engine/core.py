"""`EngineCore`: one KV pool, the models that share it, and each model's prefill and decode engines.

`LLM` builds one over the teacher and the student (the handover from prefill to decode passes the block
table, not the bytes); each worker builds one over its own model. A request's route names the model that
prefills it and the model that decodes it; either end can be elsewhere:
- `add(request, prefill, decode=None)`: prefill only; the finished prefill is returned in the step's
  `prefilled` for the caller to hand over (a prefill worker offers it through the KV channel);
- `start_decode(request, first_token, decode)`: the prompt KV came from elsewhere (a decode worker pulled
  it); a preemption then returns the request in the step's `preempted` for its owner to prefill again.
A request with a continuation start (the OverFill split for scoring) is prefilled by its prefill model up to
that token and by its decode model from there (`SamplingParams.prefill_stop`); the handover between the two
carries no first token.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from overfill_serve.engine.batch import Batch, ScheduledSeq
from overfill_serve.engine.config import EngineConfig
from overfill_serve.engine.decode import DecodeEngine
from overfill_serve.engine.decode_graphs import DecodeGraphs
from overfill_serve.engine.output_processor import OutputProcessor, StepOutput
from overfill_serve.engine.prefill import PrefillEngine
from overfill_serve.engine.runner import ModelRunner
from overfill_serve.engine.sampler import SampledToken, Sampler
from overfill_serve.engine.stage import Prefilled, StageContext, StageEngine, StepResult
from overfill_serve.kv.block_pool import BlockPool
from overfill_serve.kv.paged_cache import PagedKVCache, blocks_for
from overfill_serve.kv.swap_space import SwapSpace
from overfill_serve.model.llama import CausalLM
from overfill_serve.request import Request


@dataclass(frozen=True)
class Route:
    prefill: str | None  # the model that computes the prompt KV here; None: it came from elsewhere
    decode: str | None  # the model that decodes here; None: the KV goes elsewhere after the prefill


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Any,
        models: Mapping[str, tuple[CausalLM, tuple[int, ...]]],
        on_prefill_layer: Callable[[Batch, int], None] | None = None,
    ) -> None:
        """`config`: resolved (`EngineConfig.resolved`). `models`: name -> (model, the cache layer each of its
        layers uses: a depth-pruned student's kept layers). The pool holds every cache layer any model uses;
        all models share its geometry."""
        assert config.attention_backend is not None, "an engine runs on a resolved EngineConfig"
        spec = next(iter(models.values()))[0].spec
        num_layers = 1 + max(max(kept) for _, kept in models.values())
        model_limit = min(m.spec.max_position_embeddings for m, _ in models.values())
        peak = max(activation_peak(m, config, model_limit) for m, _ in models.values())
        num_blocks = config.num_blocks(num_layers, spec.num_kv_heads, spec.head_dim, peak)
        self.cache = PagedKVCache(
            num_layers, num_blocks, config.block_size, spec.num_kv_heads, spec.head_dim,
            config.torch_dtype, config.device,
        )  # fmt: skip
        self.pool = BlockPool(num_blocks)
        self.max_model_len = config.context_limit(model_limit, num_blocks)
        self.output = OutputProcessor(tokenizer, spec.eos_token_ids, self.max_model_len)
        self.swap = SwapSpace(self.cache, config.num_swap_blocks) if config.num_swap_blocks else None
        context = StageContext(self.pool, Sampler(eos_token_ids=spec.eos_token_ids), self.output, config)
        runners = {name: self._runner(model, kept, config) for name, (model, kept) in models.items()}
        self.prefill = {
            name: PrefillEngine(r, context, on_prefill_layer, self._reserve, name)
            for name, r in runners.items()
        }
        self.decode = {name: DecodeEngine(r, context, self.swap, name) for name, r in runners.items()}
        self._routes: dict[str, Route] = {}

    def _runner(self, model: CausalLM, kept: tuple[int, ...], config: EngineConfig) -> ModelRunner:
        backend = config.attention_backend or "torch"
        graphs = None
        if config.cuda_graphs:
            kv = self.cache.layers(kept)
            graphs = DecodeGraphs(
                model, kv, config.block_size, config.max_num_seqs, self.max_model_len, backend, config.on_cuda
            )
        return ModelRunner(model, self.cache, kept, backend, graphs)

    # -- requests ----------------------------------------------------------------------------------------
    def add(self, request: Request, prefill: str, decode: str | None) -> None:
        self._routes[request.request_id] = Route(prefill, decode)
        self.prefill[prefill].add(request)

    def start_decode(
        self, request: Request, first_token: SampledToken | None, decode: str
    ) -> StepOutput | None:
        """A request whose prompt KV is in the pool: see `DecodeEngine.add`. KV up to a continuation start
        only: the decode model computes the rest of the prompt first."""
        if request.prompt_continues:
            self._routes[request.request_id] = Route(None, decode)
            self.prefill[decode].add(request)
            return None
        out = self.decode[decode].add(request, first_token)
        if not request.is_finished:
            self._routes.setdefault(request.request_id, Route(None, decode))
        return out

    def abort(self, request_id: str, error: BaseException | None = None) -> bool:
        """Drop a request wherever it is and free its blocks: aborted, or failed with `error`."""
        self._routes.pop(request_id, None)
        return any(e.abort(request_id, error) is not None for e in self.engines())

    def engines(self) -> tuple[StageEngine, ...]:
        return (*self.prefill.values(), *self.decode.values())

    def has_work(self) -> bool:
        return any(e.has_work() for e in self.engines())

    # -- one step ----------------------------------------------------------------------------------------
    def step(self) -> StepResult:
        """Every prefill engine with work, then every decode engine with work. Finished prefills move to
        their decode engine (their first tokens stream now), preempted decodes back to their prefill engine;
        what belongs elsewhere is returned."""
        outputs: list[StepOutput] = []
        prefilled: list[Prefilled] = []
        preempted: list[Request] = []
        for prefill in self.prefill.values():
            if not prefill.has_work():
                continue
            result = prefill.step()
            outputs += result.outputs
            for done in result.prefilled:
                route = self._routes[done.request.request_id]
                if route.decode is None:  # the caller takes it from here
                    del self._routes[done.request.request_id]
                    prefilled.append(done)
                elif done.request.prompt_continues:
                    self.prefill[route.decode].add(done.request, front=True)  # the rest of the prompt
                elif (out := self.decode[route.decode].add(done.request, done.first_token)) is not None:
                    outputs.append(out)
        for decode in self.decode.values():
            if decode.has_work():
                result = decode.step()
                outputs += result.outputs
                preempted += [r for r in result.preempted if not self._re_prefill(r)]
        for out in outputs:
            if out.finished:
                self._routes.pop(out.request_id, None)
        return StepResult(tuple(outputs), tuple(prefilled), tuple(preempted))

    def _reserve(self, request: Request) -> int:
        """Tokens a prefill here holds blocks for: the whole prompt when the rest of it is computed here too."""
        route = self._routes.get(request.request_id)
        local = route is not None and route.decode is not None
        return request.num_prompt_tokens if local else request.prefill_stop

    def _re_prefill(self, request: Request) -> bool:
        """Send a preempted request back to the model that prefilled it here; False if its prompt KV came
        from elsewhere (it leaves this core, for its owner to prefill again)."""
        route = self._routes.get(request.request_id)
        if route is not None and route.prefill is not None:
            self.prefill[route.prefill].add(request, front=True)
            return True
        self._routes.pop(request.request_id, None)
        self.output.release(request.request_id)
        return False


def activation_peak(model: CausalLM, config: EngineConfig, model_limit: int) -> int:
    """Bytes the model's steps need beyond the weights and the KV cache (0 off CUDA, or when the pool's size
    is given): a prefill step of the full token budget, plus a decode step of max_num_seqs (a captured graph
    keeps its activations in a pool of its own), each measured over a throwaway cache."""
    if not config.on_cuda or config.num_kv_blocks is not None or config.kv_cache_bytes is not None:
        return 0
    spec, bs = model.spec, config.block_size
    tokens = min(config.max_num_batched_tokens, model_limit - 1)
    blocks = blocks_for(max(tokens, config.max_num_seqs), bs)
    scratch = PagedKVCache(
        spec.num_layers, blocks, bs, spec.num_kv_heads, spec.head_dim, config.torch_dtype, config.device
    )
    runner = ModelRunner(model, scratch, tuple(range(spec.num_layers)), config.attention_backend or "torch")
    table = tuple(range(blocks))
    prefill = Batch((ScheduledSeq("profile", (0,) * tokens, 0, table[: blocks_for(tokens, bs)], True),))
    decode = Batch(tuple(ScheduledSeq(f"d{i}", (0,), i, table, True) for i in range(config.max_num_seqs)))
    peaks = []
    for batch in (prefill, decode):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        runner.run(batch)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - before)
    del scratch, runner
    torch.cuda.empty_cache()
    return sum(peaks)
