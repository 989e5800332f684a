"""The public gRPC API: conversions between generate.proto and the engine's types, status codes, and a real
gRPC server on 127.0.0.1 built from those helpers (only the token source is fake)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, cast
from unittest.mock import Mock

import grpc
import pytest

from overfill_serve._proto.overfill.v1 import generate_pb2 as pb
from overfill_serve._proto.overfill.v1 import generate_pb2_grpc
from overfill_serve.engine.output_processor import StepOutput
from overfill_serve.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    OutOfBlocksError,
    OverloadedError,
    PeerUnavailableError,
    PreemptedError,
    ServiceUnavailableError,
    TransferTimeoutError,
    UnauthenticatedError,
)
from overfill_serve.model.random_model import make_tokenizer
from overfill_serve.prompt import PromptEncoder
from overfill_serve.request import FinishReason, Mode, TokenLogprob
from overfill_serve.sampling_params import SamplingParams
from overfill_serve.serve import grpc_errors as errors
from overfill_serve.serve import grpc_requests as api
from overfill_serve.serve import grpc_responses as responses
from overfill_serve.serve.api_key import check_api_key
from overfill_serve.serve.model_names import resolve_model
from overfill_serve.serve.served_by import ServedBy
from overfill_serve.tools.client import make_request

PAIR, TEACHER, STUDENT = "tiny-pair", "/models/teacher", "/models/student"
WORDS = ["Hello", ",", " world", "!", " How", " are", " you", "?"]
FAIL_PROMPT = "fail after two tokens"
PROMPTS = PromptEncoder(make_tokenizer(), vocab_size=512, max_model_len=64)


def fake_outputs(request_id: str, fail: bool, params: SamplingParams) -> Iterator[StepOutput]:
    """The token source: token i is 100 + i with text WORDS[i]; LENGTH at max_tokens, else STOP at the end."""
    n = min(params.max_tokens, len(WORDS))
    for i in range(n):
        if fail and i == 2:
            raise PeerUnavailableError("decode replica 3 at 10.0.0.7 died")
        last = i == n - 1
        reason = (FinishReason.LENGTH if n == params.max_tokens else FinishReason.STOP) if last else None
        lps: tuple[TokenLogprob, ...] = ()
        if params.logprobs is not None:
            lps = (
                TokenLogprob(100 + i, -0.5 * i, tuple((200 + j, -1.0 - j) for j in range(params.logprobs))),
            )
        yield StepOutput(request_id, (100 + i,), WORDS[i], last, reason, lps)


class FakeGenerateServicer(generate_pb2_grpc.GenerateServicer):
    """The ingress's gRPC handlers in miniature, on grpc_requests' helpers."""

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.metadata: list[dict[str, str]] = []
        self.params: list[SamplingParams] = []

    def _start(self, request, context):
        metadata = list(context.invocation_metadata())
        self.metadata.append(dict(metadata))
        check_api_key(metadata, self.api_key)
        mode = api.mode_from_request(request, PAIR)
        prompt = api.prompt_from_request(request, PROMPTS)
        params = api.params_from_proto(request.sampling)
        self.params.append(params)
        rid = api.request_id_of(request)
        acc = responses.GenerationAccumulator(rid, len(prompt), ServedBy.of(mode, TEACHER, STUDENT))
        return acc, fake_outputs(rid, prompt == PROMPTS.encode(FAIL_PROMPT), params)

    def Generate(self, request, context):
        try:
            acc, outputs = self._start(request, context)
            for out in outputs:
                acc.add(out)
            return acc.response()
        except Exception as e:
            errors.apply_status(context, e)
            return pb.GenerateResponse()

    def GenerateStream(self, request, context):
        try:
            acc, outputs = self._start(request, context)
            for out in outputs:
                yield acc.add(out)
        except Exception as e:
            errors.apply_status(context, e)

    def ListModels(self, request, context):
        return responses.models_to_proto(PAIR, TEACHER, STUDENT)


@contextmanager
def serve_grpc(servicer: FakeGenerateServicer, healthz: bool = False) -> Iterator[str]:
    """A real grpc server on 127.0.0.1 (any free port); `healthz` adds Ray Serve's Healthz method."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    generate_pb2_grpc.add_GenerateServicer_to_server(servicer, server)
    if healthz:
        handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"\n\x07success")
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("ray.serve.RayServeAPIService", {"Healthz": handler})]
        )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


# -- sampling options ---------------------------------------------------------------------------------------


def test_absent_options_are_sampling_params_defaults():
    assert api.params_from_proto(pb.SamplingOptions()) == SamplingParams()
    assert api.params_from_proto(None) == SamplingParams()
    assert api.params_from_proto(pb.GenerateRequest(text="x").sampling) == SamplingParams()


def test_every_field_round_trips():
    option_fields = set(pb.SamplingOptions.DESCRIPTOR.fields_by_name)
    assert option_fields == {f.name for f in fields(SamplingParams)}, (
        "SamplingOptions and SamplingParams drifted"
    )
    params = SamplingParams(
        max_tokens=77,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=-0.5,
        frequency_penalty=1.5,
        seed=2**40 + 3,
        stop=("\n\n", "END"),
        stop_token_ids=(2, 7),
        ignore_eos=True,
        include_stop_str_in_output=True,
        logprobs=5,
        skip_special_tokens=False,
        min_tokens=4,
        logit_bias={5: -100.0, 9: 2.5},
        prompt_logprobs=3,
        continuation_start=12,
    )
    assert all(getattr(params, f.name) != f.default for f in fields(SamplingParams))
    # What the Python client sends for them is read back as the same params.
    request = make_request("x", **{f.name: getattr(params, f.name) for f in fields(SamplingParams)})
    assert (
        api.params_from_proto(pb.SamplingOptions.FromString(request.sampling.SerializeToString())) == params
    )


def test_explicit_zeros_are_not_absent():
    params = api.params_from_proto(pb.SamplingOptions(temperature=0.0, logprobs=0, seed=0))
    assert params.greedy and params.logprobs == 0 and params.seed == 0


@pytest.mark.parametrize(
    "name, value",
    [
        ("max_tokens", 0),
        ("temperature", -1.0),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 2.0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", math.inf),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -3.0),
        ("logprobs", 21),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
    ],
)
def test_bad_option_names_its_field(name, value):
    options = pb.SamplingOptions()
    if isinstance(value, list):
        getattr(options, name).extend(value)
    else:
        setattr(options, name, value)
    with pytest.raises(InvalidRequestError) as e:
        api.params_from_proto(options)
    assert e.value.field == name
    code, details = errors.status_for(e.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.endswith(f"(field: {name})")


# -- model, mode, prompt ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, mode, expected",
    [
        ("", pb.MODE_UNSPECIFIED, Mode.OVERFILL),
        (PAIR, pb.MODE_UNSPECIFIED, Mode.OVERFILL),
        (f"{PAIR}:overfill", pb.MODE_UNSPECIFIED, Mode.OVERFILL),
        (f"{PAIR}:full", pb.MODE_UNSPECIFIED, Mode.FULL),
        (f"{PAIR}:pruned", pb.MODE_UNSPECIFIED, Mode.PRUNED),
        (PAIR, pb.MODE_FULL, Mode.FULL),
        (f"{PAIR}:full", pb.MODE_PRUNED, Mode.PRUNED),  # the enum wins over the suffix
        ("", pb.MODE_OVERFILL, Mode.OVERFILL),
    ],
)
def test_mode_resolution(model, mode, expected):
    assert api.mode_from_request(pb.GenerateRequest(model=model, mode=mode), PAIR) is expected


@pytest.mark.parametrize("model", ["other", f"{PAIR}:half", f"{PAIR}-x", f"{PAIR}:"])
def test_unknown_model_is_not_found(model):
    with pytest.raises(ModelNotFoundError) as e:
        api.mode_from_request(pb.GenerateRequest(model=model, mode=pb.MODE_FULL), PAIR)
    assert e.value.field == "model" and isinstance(e.value, InvalidRequestError)
    code, details = errors.status_for(e.value)
    assert code == grpc.StatusCode.NOT_FOUND and f"{PAIR}:pruned" in details


def test_unknown_mode_value_is_invalid():
    with pytest.raises(InvalidRequestError) as e:
        api.mode_from_request(pb.GenerateRequest(model=PAIR, mode=cast(Any, 7)), PAIR)
    assert e.value.field == "mode"


def test_prompts():
    tok = PROMPTS.tokenizer
    assert api.prompt_from_request(pb.GenerateRequest(text="hi"), PROMPTS) == tok("hi")["input_ids"]
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]))
    assert api.prompt_from_request(request, PROMPTS) == [1, 2, 3]
    chat = pb.Chat(
        messages=[pb.Message(role="system", content="be brief"), pb.Message(role="user", content="hi")]
    )
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    got = api.prompt_from_request(pb.GenerateRequest(chat=chat), PROMPTS)
    assert got == tok(rendered, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    "request_, field",
    [
        (pb.GenerateRequest(), "prompt"),
        (pb.GenerateRequest(text=""), "prompt"),
        (pb.GenerateRequest(token_ids=pb.TokenIds()), "prompt"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[3, -1])), "prompt"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[3, 512])), "prompt"),  # past the vocabulary
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(64)))), "prompt"),  # no room to generate
        (pb.GenerateRequest(chat=pb.Chat()), "messages"),
        (pb.GenerateRequest(chat=pb.Chat(messages=[pb.Message(content="hi")])), "messages[0].role"),
        (
            pb.GenerateRequest(chat=pb.Chat(messages=[pb.Message(role="banana", content="hi")])),
            "messages[0].role",
        ),
    ],
)
def test_bad_prompts(request_, field):
    with pytest.raises(InvalidRequestError) as e:
        api.prompt_from_request(request_, PROMPTS)
    assert e.value.field == field


def test_request_ids():
    assert api.request_id_of(pb.GenerateRequest(request_id="abc-1")) == "abc-1"
    a, b = api.request_id_of(pb.GenerateRequest()), api.request_id_of(pb.GenerateRequest())
    assert a != b and a.startswith("gen-")
    for bad in ("", "x" * 300, "a\nb"):
        with pytest.raises(InvalidRequestError) as e:
            api.request_id_of(pb.GenerateRequest(request_id=bad))
        assert e.value.field == "request_id"


# -- responses ------------------------------------------------------------------------------------------------


def test_models_and_served_by():
    models = responses.models_to_proto(PAIR, TEACHER, STUDENT).models
    assert [(m.id, m.mode, m.prefill_model, m.decode_model) for m in models] == [
        (PAIR, pb.MODE_OVERFILL, TEACHER, STUDENT),
        (f"{PAIR}:overfill", pb.MODE_OVERFILL, TEACHER, STUDENT),
        (f"{PAIR}:full", pb.MODE_FULL, TEACHER, TEACHER),
        (f"{PAIR}:pruned", pb.MODE_PRUNED, STUDENT, STUDENT),
    ]
    assert [resolve_model(m.id, PAIR) for m in models] == [Mode.OVERFILL, *Mode]


def test_accumulator_chunks_and_response():
    ticks = iter([10.0, 10.5, 11.0, 12.0])
    served = ServedBy.of(Mode.OVERFILL, TEACHER, STUDENT)
    acc = responses.GenerationAccumulator("r1", 5, served, clock=lambda: next(ticks))
    lp = TokenLogprob(101, -0.25, ((101, -0.25), (9, -2.0)))
    c1 = acc.add(StepOutput("internal-7", (100,), "Hel", False))
    c2 = acc.add(StepOutput("internal-7", (101,), "lo", True, FinishReason.STOP, (lp,)))
    assert (c1.request_id, c1.text, list(c1.token_ids), c1.finish_reason) == ("r1", "Hel", [100], 0)
    assert not c1.HasField("usage") and not c1.HasField("served_by") and not c1.HasField("metrics")
    assert c2.finish_reason == pb.FINISH_REASON_STOP
    assert (c2.usage.prompt_tokens, c2.usage.completion_tokens) == (5, 2)
    assert (c2.served_by.mode, c2.served_by.prefill_model, c2.served_by.decode_model) == (1, TEACHER, STUDENT)
    assert (c2.metrics.ttft_s, c2.metrics.e2e_s) == (0.5, 1.0)
    assert [(t.token_id, t.logprob) for t in c2.logprobs[0].top] == [(101, -0.25), (9, -2.0)]
    r = acc.response(stop_reason=2)
    assert (r.text, list(r.token_ids), r.finish_reason, r.stop_token_id) == ("Hello", [100, 101], 1, 2)
    assert r.WhichOneof("stop_reason") == "stop_token_id" and len(r.logprobs) == 1
    r = responses.response_to_proto(
        "x", "", [], None, prompt_tokens=1, served_by=served, ttft_s=0, e2e_s=0, stop_reason="END"
    )
    assert r.stop_string == "END"


# -- status codes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc, code, needle",
    [
        (InvalidRequestError("top_p must be in (0, 1]", field="top_p"), "INVALID_ARGUMENT", "(field: top_p)"),
        (ModelNotFoundError("x", [PAIR]), "NOT_FOUND", "'x' not found"),
        (UnauthenticatedError("bad key"), "UNAUTHENTICATED", "bad key"),
        (OverloadedError("64 requests in flight", retry_after_s=2), "RESOURCE_EXHAUSTED", "retry in 2 s"),
        (OverloadedError(), "RESOURCE_EXHAUSTED", "retry with backoff"),
        (OutOfBlocksError("pool of 12 blocks on cuda:3"), "RESOURCE_EXHAUSTED", "retry later"),
        (TransferTimeoutError("peer 10.0.0.7:5555 stalled"), "UNAVAILABLE", "retry"),
        (PreemptedError("r1", [1, 2]), "UNAVAILABLE", "retry"),
        (ServiceUnavailableError("request r1: replica at 10.0.0.7 died"), "UNAVAILABLE", "no replica"),
        (TimeoutError(), "DEADLINE_EXCEEDED", "timed out"),
        (RuntimeError("CUDA error at /src/kernels.cu:12"), "INTERNAL", "internal error"),
    ],
)
def test_status_for(exc, code, needle):
    got, details = errors.status_for(exc)
    assert got == getattr(grpc.StatusCode, code) and needle in details
    assert "10.0.0.7" not in details and "cuda" not in details.lower()


def test_status_for_ray_errors():
    ray_exceptions = pytest.importorskip("ray.exceptions")
    serve_exceptions = pytest.importorskip("ray.serve.exceptions")
    cause = InvalidRequestError("temperature must be >= 0", field="temperature")
    wrapped = ray_exceptions.RayTaskError("PrefillServer.generate", "Traceback ...\n  File x.py", cause)
    code, details = errors.status_for(wrapped.as_instanceof_cause())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.endswith("(field: temperature)")
    assert "Traceback" not in details
    code, _ = errors.status_for(
        serve_exceptions.BackPressureError(num_queued_requests=9, max_queued_requests=8)
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_check_api_key():
    check_api_key([], None)
    check_api_key([("authorization", "Bearer k1")], "k1")
    for metadata in ([], [("authorization", "Bearer k2")], [("authorization", "k1")]):
        with pytest.raises(UnauthenticatedError):
            check_api_key(metadata, "k1")


# -- a real server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stub():
    servicer = FakeGenerateServicer()
    with serve_grpc(servicer) as target, grpc.insecure_channel(target) as channel:
        yield generate_pb2_grpc.GenerateStub(channel)


def test_stream_over_grpc(stub):
    request = pb.GenerateRequest(model=f"{PAIR}:pruned", text="hi", request_id="s1")
    request.sampling.max_tokens = 5
    request.sampling.logprobs = 2
    chunks = list(stub.GenerateStream(request, timeout=10))
    assert [c.text for c in chunks] == WORDS[:5] and [c.token_ids[0] for c in chunks] == list(range(100, 105))
    assert all(c.request_id == "s1" for c in chunks) and all(len(c.logprobs[0].top) == 2 for c in chunks)
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert not any(c.HasField("usage") for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == 5
    assert last.usage.prompt_tokens == len(PROMPTS.encode("hi")) and last.served_by.mode == pb.MODE_PRUNED
    assert last.served_by.prefill_model == last.served_by.decode_model == STUDENT
    assert 0 <= last.metrics.ttft_s <= last.metrics.e2e_s


def test_unary_over_grpc(stub):
    response = stub.Generate(pb.GenerateRequest(model=PAIR, token_ids=pb.TokenIds(ids=[5, 6])), timeout=10)
    assert response.text == "".join(WORDS) and response.finish_reason == pb.FINISH_REASON_STOP
    assert response.usage.completion_tokens == len(WORDS) and response.request_id.startswith("gen-")
    assert not response.logprobs


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_errors_over_grpc(stub, rpc):
    def call(request):
        result = getattr(stub, rpc)(request, timeout=10)
        return list(result) if rpc == "GenerateStream" else result

    request = pb.GenerateRequest(model=PAIR, text="hi")
    request.sampling.temperature = -0.5
    with pytest.raises(grpc.RpcError) as e:
        call(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "(field: temperature)" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        call(pb.GenerateRequest(model="nope", text="hi"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_failure_mid_stream_keeps_the_chunks_sent(stub):
    chunks = []
    with pytest.raises(grpc.RpcError) as e:
        for chunk in stub.GenerateStream(pb.GenerateRequest(model=PAIR, text=FAIL_PROMPT), timeout=10):
            chunks.append(chunk)
    assert [c.text for c in chunks] == WORDS[:2]
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "10.0.0.7" not in e.value.details()


def test_list_models_over_grpc(stub):
    models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert [m.id for m in models] == [PAIR, f"{PAIR}:overfill", f"{PAIR}:full", f"{PAIR}:pruned"]


def test_requests_arrive_as_bytes_and_malformed_ones_are_invalid():
    from overfill_serve.serve.grpc_service import add_GenerateServicer_to_server

    request = pb.GenerateRequest(model="m", text="hi")
    assert api.parse_request(pb.GenerateRequest, request.SerializeToString()) == request
    assert api.parse_request(pb.GenerateRequest, request) is request
    with pytest.raises(InvalidRequestError, match="malformed GenerateRequest"):
        api.parse_request(pb.GenerateRequest, b"\xff\xff\xff")
    added = []
    server = type("Server", (), {"add_generic_rpc_handlers": lambda self, handlers: added.extend(handlers)})()
    add_GenerateServicer_to_server(Mock(), server)  # Ray Serve's proxy passes a Mock: the ingress serves
    table, health = added[0]._method_handlers, added[1]._method_handlers
    assert {name.rsplit("/", 1)[-1] for name in table} == {"Generate", "GenerateStream", "ListModels"}
    assert set(health) == {f"/grpc.health.v1.Health/{m}" for m in ("Check", "Watch", "List")}
    assert all(h.request_deserializer is None for h in [*table.values(), *health.values()])
