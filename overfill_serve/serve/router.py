"""`Router`: the ingress deployment. Tokenizes and validates, picks replicas (through the deployments' request
routers), runs each request through the `Dispatcher`, and serves the OpenAI HTTP API and the gRPC API.

A client that disconnects cancels its stream: the cancellation reaches the decode replica (which frees its
KV) and the prefill replica's transfer is aborted through its KV server.
"""

# No `from __future__ import annotations` here: FastAPI resolves the endpoint annotations at runtime.
import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from overfill_serve.engine.output_processor import StepOutput
from overfill_serve.errors import OverloadedError, TransferError
from overfill_serve.model.pair import student_layout
from overfill_serve.model.spec import ModelSpec
from overfill_serve.request import Mode
from overfill_serve.sampling_params import SamplingParams
from overfill_serve.serve import grpc_api, grpc_responses
from overfill_serve.serve.config import ServeConfig
from overfill_serve.serve.dispatcher import Dispatcher
from overfill_serve.serve.metrics import RequestMetrics
from overfill_serve.serve.model_names import resolve_model
from overfill_serve.serve.openai_api import make_responder, merge_choices, model_list
from overfill_serve.serve.openai_errors import ApiError, from_exception
from overfill_serve.serve.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    choice_sampling_params,
    encode_prompt,
    parse_request,
)
from overfill_serve.serve.pool_monitor import PoolMonitor
from overfill_serve.serve.served_by import ServedBy
from overfill_serve.tokenizer import encode_chat, load_tokenizer
from overfill_serve.transfer.channel import KVChannel
from overfill_serve.worker.prefill_worker import TransferTicket

log = logging.getLogger(__name__)
app = FastAPI(title="overfill-serve", docs_url=None, redoc_url=None)


def _metadata(grpc_context: Any) -> list[tuple[str, str]]:
    return list(grpc_context.invocation_metadata()) if grpc_context is not None else []


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.to_json(), status_code=e.status, headers=e.headers)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1000)
@serve.ingress(app)
class Router:
    def __init__(self, config: ServeConfig, prefill: Any, decode: Any) -> None:
        self.config = config
        prefill_dir, decode_dir = config.model_dirs()
        teacher, student = ModelSpec.from_dir(prefill_dir), ModelSpec.from_dir(decode_dir)
        self.full_model, self.pruned_model = prefill_dir.name, decode_dir.name
        self.tokenizer = load_tokenizer(prefill_dir)
        self.vocab_size = teacher.vocab_size
        self.max_model_len = min(
            teacher.max_position_embeddings,
            student.max_position_embeddings,
            config.block_size * min(config.prefill_kv_blocks, config.decode_kv_blocks),
        )
        self.layout = student_layout(
            student, config.kept_layers, teacher.num_layers, config.dtype, config.block_size
        )
        self.dispatcher = Dispatcher(prefill, decode, self._abort_transfer, config.max_migrations)
        self.metrics = RequestMetrics(config.pair_name)
        self.created = int(time.time())
        self._inflight = 0
        self._control: dict[str, KVChannel] = {}  # control-only channels to prefill KV servers
        self.pools = PoolMonitor(serve.get_replica_context().app_name, config.pool_check_period_s).start()

    def __del__(self) -> None:
        pools = getattr(self, "pools", None)
        if pools is not None:
            pools.stop()

    # -- OpenAI HTTP API -----------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._openai(request, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._openai(request, ChatCompletionRequest)

    @app.get("/v1/models")
    async def models(self, request: Request) -> Any:
        try:
            self._check_http_key(request)
        except Exception as e:
            return _error_response(from_exception(e))
        return model_list(
            self.config.pair_name, self.created, full_model=self.full_model, pruned_model=self.pruned_model
        )

    @app.get("/health")
    async def health(self) -> Any:
        """200 while the router runs; "degraded" (with each pool's state) while a pool has no replica."""
        return {**self.pools.report(), "inflight": self._inflight}

    async def _openai(self, http: Request, cls: Any) -> Any:
        try:
            self._check_http_key(http)
            req = parse_request(cls, await http.body())
            mode = resolve_model(req.model, self.config.pair_name)
            self.pools.check(mode)
            prompt = encode_prompt(
                req, self.tokenizer, vocab_size=self.vocab_size, max_model_len=self.max_model_len
            )
            params = choice_sampling_params(req, default_max_tokens=self.max_model_len - len(prompt))
            responder = make_responder(
                req,
                ServedBy.of(mode, self.full_model, self.pruned_model),
                self.tokenizer,
                prompt_tokens=len(prompt),
            )
            self._admit()
        except Exception as e:
            return _error_response(from_exception(e))
        streams = [self._generate(prompt, p, mode, f"{responder.id}-{i}") for i, p in enumerate(params)]
        outputs = merge_choices(streams)
        if req.stream:
            return StreamingResponse(
                self._release_after(responder.sse_stream(outputs)), media_type="text/event-stream"
            )
        try:
            async for index, step in outputs:
                responder.add(index, step)
            return JSONResponse(responder.response())
        except Exception as e:
            return _error_response(from_exception(e))
        finally:
            self._inflight -= 1

    def _check_http_key(self, http: Request) -> None:
        """Raise `UnauthenticatedError` (HTTP 401) unless the request has `Authorization: Bearer <key>`."""
        if self.config.api_key is None:
            return
        grpc_api.check_api_key(
            [("authorization", http.headers.get("authorization", ""))], self.config.api_key
        )

    async def _release_after(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self._inflight -= 1

    # -- gRPC API (Serve's gRPC proxy calls these by RPC name) -----------------------------------------------
    async def Generate(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 (RPC name)
        acc = None
        try:
            acc, prompt, params, mode = self._grpc_request(request, grpc_context)
            self._admit()
            try:
                async for out in self._generate(prompt, params, mode, acc.request_id):
                    acc.add(out)
            finally:
                self._inflight -= 1
            return acc.response()
        except Exception as e:
            self._grpc_error(grpc_context, e, acc)
            return grpc_api.pb.GenerateResponse()

    async def GenerateStream(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:  # noqa: N802
        acc = None
        try:
            acc, prompt, params, mode = self._grpc_request(request, grpc_context)
            self._admit()
            try:
                async for out in self._generate(prompt, params, mode, acc.request_id):
                    yield acc.add(out)
            finally:
                self._inflight -= 1
        except Exception as e:
            self._grpc_error(grpc_context, e, acc)
            raise  # a stream that ends without raising reports OK to the client, whatever code was set

    async def ListModels(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        try:
            grpc_api.check_api_key(_metadata(grpc_context), self.config.api_key)
        except Exception as e:
            self._grpc_error(grpc_context, e, None)
            return grpc_api.pb.ListModelsResponse()
        return grpc_responses.models_to_proto(self.config.pair_name, self.full_model, self.pruned_model)

    def _grpc_request(self, request: Any, grpc_context: Any) -> tuple[Any, list[int], SamplingParams, Mode]:
        grpc_api.check_api_key(_metadata(grpc_context), self.config.api_key)
        mode = grpc_api.mode_from_request(request, self.config.pair_name)
        self.pools.check(mode)
        kind, value = grpc_api.prompt_from_request(request)
        prompt: list[int]
        if kind == "chat":
            prompt = encode_chat(self.tokenizer, value)  # type: ignore[arg-type]
        elif kind == "text":
            prompt = list(self.tokenizer(value)["input_ids"])
        else:
            prompt = list(value)  # type: ignore[arg-type]
        params = grpc_api.params_from_proto(request.sampling if request.HasField("sampling") else None)
        served_by = ServedBy.of(mode, self.full_model, self.pruned_model)
        acc = grpc_responses.GenerationAccumulator(grpc_api.request_id_of(request), len(prompt), served_by)
        return acc, prompt, params, mode

    def _grpc_error(self, grpc_context: Any, e: Exception, acc: Any) -> None:
        code, _ = grpc_api.apply_status(grpc_context, e, request_id=acc.request_id if acc else None)
        if code.name == "INTERNAL":
            log.exception("gRPC request failed")

    # -- the generation path shared by both APIs ---------------------------------------------------------------
    def _admit(self) -> None:
        if self._inflight >= self.config.max_inflight_requests:
            raise OverloadedError(
                f"{self._inflight} requests in flight (limit {self.config.max_inflight_requests})", 1.0
            )
        self._inflight += 1

    async def _generate(
        self, prompt: list[int], params: SamplingParams, mode: Mode, request_id: str
    ) -> AsyncIterator[StepOutput]:
        """The dispatcher's stream, timed for the request metrics."""
        start, first, n, reason = time.perf_counter(), None, 0, "error"
        try:
            async for out in self.dispatcher.generate(prompt, params, mode, request_id):
                if first is None and out.token_ids:
                    first = time.perf_counter() - start
                n += len(out.token_ids)
                if out.finished and out.finish_reason is not None:
                    reason = out.finish_reason.value
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            reason = "cancelled"
            raise
        finally:
            self.metrics.observe(mode.value, len(prompt), n, first, time.perf_counter() - start, reason)

    async def _abort_transfer(self, ticket: TransferTicket) -> None:
        """Tell the prefill replica holding a ticket's KV to free it, through that replica's KV server."""

        def abort() -> None:
            channel = self._control.get(ticket.address)
            if channel is None:
                transfer = self.config.transfer_config(host="")
                channel = KVChannel(ticket.address, self.layout, None, transfer, client_id="router").connect()
                self._control[ticket.address] = channel
            channel.abort(ticket.transfer_id, "the request ended before its KV was used")

        try:
            await asyncio.to_thread(abort)
        except TransferError as e:
            log.debug("abort of %s not delivered: %s", ticket.transfer_id, e)
