"""`Ingress`: the ingress deployment. Tokenizes and validates, runs each request through the `Dispatcher` (the
deployments' request routers pick the replicas), and serves the OpenAI HTTP API and the gRPC API.

A client that disconnects cancels its stream: the cancellation reaches the decode replica (which frees its
KV) and the prefill replica's transfer is aborted through its KV server. Reading a request (parsing, the
tokenizer) runs on a worker thread, so a large body never stalls the event loop that answers `/health`.
"""

# No `from __future__ import annotations` here: FastAPI resolves the endpoint annotations at runtime.
import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from overfill_serve import __version__
from overfill_serve.engine.output_processor import StepOutput
from overfill_serve.errors import ApplicationNotFoundError, RequestTooLargeError
from overfill_serve.prompt import PromptEncoder
from overfill_serve.request import Mode
from overfill_serve.sampling_params import SamplingParams
from overfill_serve.serve import grpc_errors, grpc_health, grpc_requests, grpc_responses
from overfill_serve.serve.admission import Admission
from overfill_serve.serve.api_key import check_api_key
from overfill_serve.serve.app_metrics import AppMetrics
from overfill_serve.serve.config import ServeConfig
from overfill_serve.serve.dispatcher import Dispatcher
from overfill_serve.serve.log_filter import quiet_client_errors
from overfill_serve.serve.metrics import RequestMetrics
from overfill_serve.serve.model_names import model_entry, model_list, resolve_model
from overfill_serve.serve.openai_errors import ApiError, from_exception
from overfill_serve.serve.openai_requests import (
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
    prepare_choices,
)
from overfill_serve.serve.openai_responses import (
    ChatResponder,
    CompletionResponder,
    make_responder,
    merge_choices,
)
from overfill_serve.serve.openai_tokenize import detokenize, tokenize, tokenizer_info
from overfill_serve.serve.pool_monitor import PoolMonitor
from overfill_serve.serve.served_by import ServedBy
from overfill_serve.transfer.control import TransferControl

log = logging.getLogger(__name__)
app = FastAPI(title="overfill-serve", docs_url=None, redoc_url=None)
T = TypeVar("T")


def _metadata(grpc_context: Any) -> list[tuple[str, str]]:
    return list(grpc_context.invocation_metadata()) if grpc_context is not None else []


def _error_response(e: ApiError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(e.to_json(), status_code=e.status, headers={**e.headers, **(headers or {})})


@app.exception_handler(HTTPException)
async def _unknown_route(request: Request, e: HTTPException) -> JSONResponse:
    """Unknown paths and methods answer in the OpenAI error shape, as every other error does."""
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    error = ApiError(e.status_code, kind, f"{request.method} {request.url.path}: {e.detail}")
    return _error_response(error, e.headers)


async def _read_body(http: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to be over `limit` bytes."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(int(declared), limit)
    body = bytearray()
    async for chunk in http.stream():
        body += chunk
        if len(body) > limit:
            raise RequestTooLargeError(len(body), limit)
    return bytes(body)


def _serve_exposure() -> tuple[str, bool]:
    """(the HTTP proxy's host, whether the gRPC proxy is on), from the Serve controller."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None  # inside a replica of a running app there is always one
    http = ray.get(client._controller.get_http_config.remote(), timeout=30)
    grpc = ray.get(client._controller.get_grpc_config.remote(), timeout=30)
    return http.host, bool(grpc.grpc_servicer_functions)


@dataclass(frozen=True)
class Job:
    """A checked request, ready to generate: one per HTTP or gRPC call."""

    prompts: list[list[int]]  # one per choice: a batch's prompt i has choices i * n .. i * n + n - 1
    params: list[SamplingParams]  # one per choice
    mode: Mode
    request_id: str  # the engine's key, unique (a gRPC client's own id is only a label in its responses)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1000)
@serve.ingress(app)
class Ingress:
    def __init__(self, config: ServeConfig, prefill: Any, decode: Any) -> None:
        config.check_exposure(*_serve_exposure())
        quiet_client_errors()
        self.config = config
        self.app_name = serve.get_replica_context().app_name
        teacher_dir, student_dir = config.model_dirs()
        self.teacher_name, self.student_name = teacher_dir.name, student_dir.name
        self.prompts = PromptEncoder.for_pair(teacher_dir, student_dir, config.prefill, config.decode)
        self.transfers = TransferControl(config.transfer_config(host=""))
        self.dispatcher = Dispatcher(prefill, decode, self.transfers, config.max_migrations)
        self.metrics = RequestMetrics(config.pair_name)
        self.created = int(time.time())
        self.admission = Admission(config.max_inflight_requests)
        self.pools = PoolMonitor(self.app_name, config.pool_check_period_s).start()
        self.app_metrics = AppMetrics(self.metrics, self.pools)
        # One thread reads requests: off the event loop, and one tokenizer call at a time (HF tokenizers
        # must not be configured concurrently).
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="ingress-read")

    def __del__(self) -> None:
        for part in (getattr(self, "pools", None), getattr(self, "transfers", None)):
            if part is not None:
                part.stop()
        if hasattr(self, "_reader"):
            self._reader.shutdown(wait=False, cancel_futures=True)

    # -- OpenAI HTTP API -----------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._openai(request, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._openai(request, ChatCompletionRequest)

    @app.get("/v1/models")
    async def models(self, request: Request) -> Any:
        return self._keyed(request, lambda: model_list(self.config.pair_name, *self._model_facts()))

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> Any:
        return self._keyed(
            request, lambda: model_entry(model_id, self.config.pair_name, *self._model_facts())
        )

    def _model_facts(self) -> tuple[int, str, str]:
        return self.created, self.teacher_name, self.student_name

    # -- vLLM's extras: the served tokenizer, the version --------------------------------------------------
    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> Any:
        return await self._tokenizer_call(request, tokenize)

    @app.post("/detokenize")
    async def detokenize(self, request: Request) -> Any:
        return await self._tokenizer_call(request, detokenize)

    @app.get("/tokenizer_info")
    async def tokenizer_info(self, request: Request) -> Any:
        return self._keyed(request, lambda: tokenizer_info(self.prompts))

    def _keyed(self, http: Request, answer: Callable[[], Any]) -> Any:
        """`answer()` for a request with the API key (when the app has one); an error body if it lacks it or
        `answer` raises."""
        try:
            self._check_http_key(http)
            return answer()
        except Exception as e:
            return _error_response(from_exception(e))

    @app.get("/version")
    async def version(self) -> Any:
        return {"version": __version__}

    async def _tokenizer_call(self, http: Request, call: Callable[..., dict[str, Any]]) -> Any:
        """`call(body, prompts, pair_name)` on the reader thread (where the tokenizer runs)."""
        try:
            self._check_http_key(http)
            body = await _read_body(http, self.config.max_request_bytes)
            return await self._read(call, body, self.prompts, self.config.pair_name)
        except Exception as e:
            return _error_response(from_exception(e))

    @app.get("/health")
    async def health(self) -> Any:
        """200 while both pools have a replica; 503 (with each pool's state) until then, or while one has
        none: a readiness probe acts on the code."""
        report = self.pools.report()
        status = 200 if report["status"] == "ok" else 503
        return JSONResponse({**report, "inflight": self.admission.inflight}, status_code=status)

    @app.get("/metrics")
    async def prometheus_metrics(self) -> Any:
        """The whole app's series in Prometheus text format (metrics.py, app_metrics.py); no API key, like
        /health."""
        return Response(await self.app_metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def record_routing_stats(self) -> dict[str, Any]:
        """This replica's request series, read by the other ingress replicas' /metrics (app_metrics.py)."""
        return {"request_samples": self.metrics.samples()}

    async def _openai(self, http: Request, cls: Any) -> Any:
        try:
            self._check_http_key(http)
            body = await _read_body(http, self.config.max_request_bytes)
            job, responder, stream = await self._read(self._openai_job, cls, body)
            slot = self.admission.admit()
        except Exception as e:
            return _error_response(from_exception(e))
        streams = [self._generate(job, i, f"{job.request_id}-{i}") for i in range(len(job.params))]
        outputs = merge_choices(streams)
        if stream:
            sse = self.admission.hold(slot, responder.sse_stream(outputs))
            return StreamingResponse(sse, media_type="text/event-stream")
        try:
            async for index, step in outputs:
                responder.add(index, step)
            return JSONResponse(responder.response())
        except Exception as e:
            return _error_response(from_exception(e))
        finally:
            slot.release()

    def _openai_job(self, cls: Any, body: bytes) -> tuple[Job, CompletionResponder | ChatResponder, bool]:
        req = parse_request(cls, body)
        mode = resolve_model(req.model, self.config.pair_name)
        self.pools.check(mode)
        prompts, params = prepare_choices(req, self.prompts)
        prompt_tokens = sum(len(p) for p in prompts[:: req.num_choices])  # each prompt once
        extra = (
            {"prompt_token_ids": prompts[:: req.num_choices]} if isinstance(req, CompletionRequest) else {}
        )
        responder = make_responder(
            req, self._served_by(mode), self.prompts.tokenizer, prompt_tokens=prompt_tokens, **extra
        )
        return Job(prompts, params, mode, responder.id), responder, bool(req.stream)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, *args)

    def _check_http_key(self, http: Request) -> None:
        """Raise `UnauthenticatedError` (HTTP 401) unless the request has `Authorization: Bearer <key>`."""
        if self.config.api_key is None:
            return
        check_api_key([("authorization", http.headers.get("authorization", ""))], self.config.api_key)

    # -- gRPC API (Serve's gRPC proxy calls these by RPC name) -----------------------------------------------
    async def Generate(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 (RPC name)
        async with aclosing(self._grpc_outputs(request, grpc_context)) as outputs:
            accumulators = [acc async for acc, _ in outputs]  # one accumulator, once per chunk
        return accumulators[-1].response()

    async def GenerateStream(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:  # noqa: N802
        async with aclosing(self._grpc_outputs(request, grpc_context)) as outputs:
            async for _, chunk in outputs:
                yield chunk

    async def _grpc_outputs(self, request: Any, grpc_context: Any) -> AsyncGenerator[tuple[Any, Any], None]:
        """One call's accumulator with each response chunk. An error sets the call's status and is raised
        (Serve then answers the code set; a call that ends without raising would report OK)."""
        acc = None
        try:
            job, acc = await self._read(self._grpc_job, request, _metadata(grpc_context))
            slot = self.admission.admit()
            try:
                async for out in self._generate(job, 0, job.request_id):
                    yield acc, acc.add(out)
            finally:
                slot.release()
        except Exception as e:
            self._grpc_error(grpc_context, e, acc)
            raise

    async def ListModels(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        try:
            self._check_grpc_call(_metadata(grpc_context))
        except Exception as e:
            self._grpc_error(grpc_context, e, None)
            raise
        return grpc_responses.models_to_proto(self.config.pair_name, self.teacher_name, self.student_name)

    # -- grpc.health.v1.Health (grpc_health.py): no API key, like /health ---------------------------------
    async def Check(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        try:
            return grpc_health.check(request, self.pools.report()["status"])
        except Exception as e:
            self._grpc_error(grpc_context, e, None)
            raise

    async def Watch(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:  # noqa: N802
        try:
            service = grpc_health.parse_watch(request)
        except Exception as e:
            self._grpc_error(grpc_context, e, None)
            raise
        async for response in grpc_health.watch(service, lambda: self.pools.report()["status"]):
            yield response

    async def List(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return grpc_health.list_all(self.pools.report()["status"])

    def _grpc_job(self, request: Any, metadata: list[tuple[str, str]]) -> tuple[Job, Any]:
        self._check_grpc_call(metadata)
        size = len(request) if isinstance(request, bytes) else request.ByteSize()
        if size > self.config.max_request_bytes:
            raise RequestTooLargeError(size, self.config.max_request_bytes)
        request = grpc_requests.parse_request(grpc_requests.pb.GenerateRequest, request)
        mode = grpc_requests.mode_from_request(request, self.config.pair_name)
        self.pools.check(mode)
        prompt = grpc_requests.prompt_from_request(request, self.prompts)
        options = request.sampling if request.HasField("sampling") else None
        params = self.prompts.check_params(grpc_requests.params_from_proto(options))
        params.check_prompt(len(prompt))
        label = grpc_requests.request_id_of(request)
        acc = grpc_responses.GenerationAccumulator(label, len(prompt), self._served_by(mode))
        return Job([prompt], [params], mode, f"grpc-{uuid.uuid4().hex}"), acc

    def _check_grpc_call(self, metadata: list[tuple[str, str]]) -> None:
        check_api_key(metadata, self.config.api_key)
        application = dict(metadata).get("application")
        if application is not None and application != self.app_name:
            raise ApplicationNotFoundError(
                f"application {application!r} not found; this is {self.app_name!r}", field="application"
            )

    def _grpc_error(self, grpc_context: Any, e: Exception, acc: Any) -> None:
        code, _ = grpc_errors.apply_status(grpc_context, e, request_id=acc.request_id if acc else None)
        if code.name == "INTERNAL":
            log.exception("gRPC request failed")

    # -- the generation path shared by both APIs ---------------------------------------------------------------
    def _served_by(self, mode: Mode) -> ServedBy:
        return ServedBy.of(mode, self.teacher_name, self.student_name)

    async def _generate(self, job: Job, choice: int, request_id: str) -> AsyncIterator[StepOutput]:
        """One choice's stream from the dispatcher, timed for the request metrics."""
        prompt, params, mode = job.prompts[choice], job.params[choice], job.mode
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
