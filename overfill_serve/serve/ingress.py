"""`Ingress`: the ingress deployment. Tokenizes and validates, runs each request through the `Dispatcher` (the
deployments' request routers pick the replicas), and serves the OpenAI HTTP API and the gRPC API.

A client that disconnects cancels its stream: the cancellation reaches the decode replica (which frees its
KV) and the prefill replica's transfer is aborted through its KV server.
"""

# No `from __future__ import annotations` here: FastAPI resolves the endpoint annotations at runtime.
import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from overfill_serve.engine.output_processor import StepOutput
from overfill_serve.errors import OverloadedError
from overfill_serve.prompt import PromptEncoder
from overfill_serve.request import Mode
from overfill_serve.sampling_params import SamplingParams
from overfill_serve.serve import grpc_errors, grpc_requests, grpc_responses
from overfill_serve.serve.api_key import check_api_key
from overfill_serve.serve.config import ServeConfig
from overfill_serve.serve.dispatcher import Dispatcher
from overfill_serve.serve.metrics import RequestMetrics
from overfill_serve.serve.model_names import resolve_model
from overfill_serve.serve.openai_errors import ApiError, from_exception
from overfill_serve.serve.openai_requests import (
    ChatCompletionRequest,
    CompletionRequest,
    choice_sampling_params,
    encode_prompt,
    parse_request,
)
from overfill_serve.serve.openai_responses import make_responder, merge_choices, model_list
from overfill_serve.serve.pool_monitor import PoolMonitor
from overfill_serve.serve.served_by import ServedBy
from overfill_serve.transfer.control import TransferControl

log = logging.getLogger(__name__)
app = FastAPI(title="overfill-serve", docs_url=None, redoc_url=None)


def _metadata(grpc_context: Any) -> list[tuple[str, str]]:
    return list(grpc_context.invocation_metadata()) if grpc_context is not None else []


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.to_json(), status_code=e.status, headers=e.headers)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1000)
@serve.ingress(app)
class Ingress:
    def __init__(self, config: ServeConfig, prefill: Any, decode: Any) -> None:
        self.config = config
        teacher_dir, student_dir = config.model_dirs()
        self.teacher_name, self.student_name = teacher_dir.name, student_dir.name
        self.prompts = PromptEncoder.for_pair(teacher_dir, student_dir, config.prefill, config.decode)
        self.transfers = TransferControl(config.transfer_config(host=""))
        self.dispatcher = Dispatcher(prefill, decode, self.transfers, config.max_migrations)
        self.metrics = RequestMetrics(config.pair_name)
        self.created = int(time.time())
        self._inflight = 0
        self.pools = PoolMonitor(serve.get_replica_context().app_name, config.pool_check_period_s).start()

    def __del__(self) -> None:
        for part in (getattr(self, "pools", None), getattr(self, "transfers", None)):
            if part is not None:
                part.stop()

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
        return model_list(self.config.pair_name, self.created, self.teacher_name, self.student_name)

    @app.get("/health")
    async def health(self) -> Any:
        """200 while the ingress runs; "degraded" (with each pool's state) while a pool has no replica."""
        return {**self.pools.report(), "inflight": self._inflight}

    async def _openai(self, http: Request, cls: Any) -> Any:
        try:
            self._check_http_key(http)
            req = parse_request(cls, await http.body())
            mode = resolve_model(req.model, self.config.pair_name)
            self.pools.check(mode)
            prompt = encode_prompt(req, self.prompts)
            room = self.prompts.max_model_len - len(prompt)
            params = choice_sampling_params(req, default_max_tokens=room)
            responder = make_responder(
                req, self._served_by(mode), self.prompts.tokenizer, prompt_tokens=len(prompt)
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
        check_api_key([("authorization", http.headers.get("authorization", ""))], self.config.api_key)

    async def _release_after(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self._inflight -= 1

    # -- gRPC API (Serve's gRPC proxy calls these by RPC name) -----------------------------------------------
    async def Generate(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 (RPC name)
        try:
            async with aclosing(self._grpc_outputs(request, grpc_context)) as outputs:
                accumulators = [acc async for acc, _ in outputs]  # one accumulator, once per chunk
            return accumulators[-1].response()
        except Exception:  # the call's status says what went wrong
            return grpc_requests.pb.GenerateResponse()

    async def GenerateStream(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:  # noqa: N802
        async with aclosing(self._grpc_outputs(request, grpc_context)) as outputs:
            async for _, chunk in outputs:
                yield chunk

    async def _grpc_outputs(self, request: Any, grpc_context: Any) -> AsyncGenerator[tuple[Any, Any], None]:
        """One call's accumulator with each response chunk. An error sets the call's status and is raised: a
        stream that ends without raising reports OK to the client, whatever code was set."""
        acc = None
        try:
            acc, prompt, params, mode = self._grpc_request(request, grpc_context)
            self._admit()
            try:
                async for out in self._generate(prompt, params, mode, acc.request_id):
                    yield acc, acc.add(out)
            finally:
                self._inflight -= 1
        except Exception as e:
            self._grpc_error(grpc_context, e, acc)
            raise

    async def ListModels(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        try:
            check_api_key(_metadata(grpc_context), self.config.api_key)
        except Exception as e:
            self._grpc_error(grpc_context, e, None)
            return grpc_requests.pb.ListModelsResponse()
        return grpc_responses.models_to_proto(self.config.pair_name, self.teacher_name, self.student_name)

    def _grpc_request(self, request: Any, grpc_context: Any) -> tuple[Any, list[int], SamplingParams, Mode]:
        check_api_key(_metadata(grpc_context), self.config.api_key)
        mode = grpc_requests.mode_from_request(request, self.config.pair_name)
        self.pools.check(mode)
        prompt = grpc_requests.prompt_from_request(request, self.prompts)
        params = grpc_requests.params_from_proto(request.sampling if request.HasField("sampling") else None)
        request_id = grpc_requests.request_id_of(request)
        acc = grpc_responses.GenerationAccumulator(request_id, len(prompt), self._served_by(mode))
        return acc, prompt, params, mode

    def _grpc_error(self, grpc_context: Any, e: Exception, acc: Any) -> None:
        code, _ = grpc_errors.apply_status(grpc_context, e, request_id=acc.request_id if acc else None)
        if code.name == "INTERNAL":
            log.exception("gRPC request failed")

    # -- the generation path shared by both APIs ---------------------------------------------------------------
    def _served_by(self, mode: Mode) -> ServedBy:
        return ServedBy.of(mode, self.teacher_name, self.student_name)

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
