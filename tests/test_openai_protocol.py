"""The OpenAI protocol layer's requests and errors: validation that names the bad parameter, sampling parameters,
prompt encoding, model names, and the mapping of every exception to an OpenAI error body."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest

from overfill_serve.errors import (
    AuthenticationError,
    InvalidRequestError,
    ModelConfigError,
    ModelNotFoundError,
    OutOfBlocksError,
    OverloadedError,
    PeerUnavailableError,
    ServiceUnavailableError,
    UnauthenticatedError,
)
from overfill_serve.model.random_model import make_tokenizer
from overfill_serve.prompt import PromptEncoder
from overfill_serve.request import Mode
from overfill_serve.serve.model_names import resolve_model
from overfill_serve.serve.openai_errors import ApiError, from_exception
from overfill_serve.serve.openai_requests import (
    ChatCompletionRequest,
    CompletionRequest,
    choice_sampling_params,
    encode_prompts,
    parse_request,
    prepare_choices,
    to_sampling_params,
)

PAIR = "smol-overfill"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def completion_body(**kw: Any) -> dict[str, Any]:
    return {"model": PAIR, "prompt": "Hello", **kw}


def chat_body(**kw: Any) -> dict[str, Any]:
    return {"model": PAIR, "messages": [{"role": "user", "content": "Hi"}], **kw}


def expect_400(call, param: str | None) -> ApiError:
    """`call` fails with what the ingress answers as a 400 naming `param` (an ApiError, or an
    InvalidRequestError that maps to one)."""
    with pytest.raises((ApiError, InvalidRequestError)) as info:
        call()
    error = from_exception(info.value)
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", param)
    assert error.to_json()["error"]["param"] == param
    return error


# ---------------------------------------------------------------------------------------------- validation


BAD_COMPLETION: list[tuple[dict[str, Any], str | None]] = [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 9}, "n"),
    ({"logprobs": 50}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"best_of": 3}, "best_of"),
    ({"echo": True, "max_tokens": 0}, "max_tokens"),  # nothing to return without logprobs
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"continuation_start": 0, "prompt_logprobs": 1}, "continuation_start"),
    ({"continuation_start": 99, "prompt_logprobs": 1}, "continuation_start"),  # past the prompt
    ({"continuation_start": [1, 1]}, "continuation_start"),  # two for one prompt
    ({"suffix": "x"}, "suffix"),
    ({"logit_bias": {"x": 10}}, "logit_bias"),
    ({"logit_bias": {"-5": 10}}, "logit_bias"),
    ({"logit_bias": {"5": 100.5}}, "logit_bias"),
    ({"logit_bias": {"5": "high"}}, "logit_bias.5"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 17}, "min_tokens"),
    ({"min_tokens": 1.5}, "min_tokens"),
    ({"stop_token_ids": [99999]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
    ({"skip_special_tokens": 0}, "skip_special_tokens"),
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"stream_options": {"continuous_usage_stats": True}}, "stream_options"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": ["a"]}, "stop_token_ids[0]"),
    ({"seed": "1"}, "seed"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": ["a", ""]}, "prompt[1]"),
    ({"prompt": [[1, 2], [99999]]}, "prompt[1]"),
    ({"prompt": ["a"] * 40, "n": 7}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"model": 5}, "model"),
]
BAD_CHAT: list[tuple[dict[str, Any], str | None]] = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, None),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": "hi"}, "messages"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"temperature": -1}, "temperature"),
    ({"n": 0}, "n"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"echo": True}, "echo"),
    ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ({"continuation_start": 3}, "continuation_start"),
    ({"add_generation_prompt": False}, "add_generation_prompt"),
    ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs"),
    ({"logit_bias": {"1": -101}}, "logit_bias"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
]


@pytest.mark.parametrize("as_json", [True, False], ids=["bytes", "dict"])
@pytest.mark.parametrize(
    ("cls", "body", "param"),
    [(CompletionRequest, completion_body(**kw), p) for kw, p in BAD_COMPLETION]
    + [(ChatCompletionRequest, chat_body(**kw), p) for kw, p in BAD_CHAT],
)
def test_bad_parameter_is_a_400_naming_it(cls, body, param, as_json, tok):
    if param is None:  # an unsupported content part: the deepest path names its type
        param = "messages[0].content[0].type"
    raw = json.dumps(body).encode() if as_json else body

    def prepare() -> None:  # what the ingress does with a body
        prepare_choices(parse_request(cls, raw), PromptEncoder(tok, len(tok), 4096))

    err = expect_400(prepare, param)
    assert param.split("[")[0].split(".")[0] in err.message


def test_missing_fields_and_bad_bodies():
    expect_400(lambda: parse_request(ChatCompletionRequest, b'{"model": "m"}'), "messages")
    expect_400(lambda: parse_request(CompletionRequest, {"prompt": "x"}), "model")
    bad_json = expect_400(lambda: parse_request(CompletionRequest, b'{"model": '), None)
    assert "JSON" in bad_json.message
    expect_400(lambda: parse_request(CompletionRequest, b"[1, 2]"), None)


def test_valid_requests_and_defaults():
    req = parse_request(CompletionRequest, completion_body(prompt=["only one"], user="u", unknown_field=1))
    assert req.prompts == ["only one"]  # a batch of one
    assert parse_request(CompletionRequest, completion_body(prompt=[[5, 6]])).prompts == [[5, 6]]
    assert parse_request(CompletionRequest, completion_body(prompt=[5, 6])).prompts == [[5, 6]]
    p = to_sampling_params(req)
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.logprobs) == (16, 1.0, 1.0, None, None)
    chat = parse_request(
        ChatCompletionRequest,
        chat_body(
            messages=[
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            temperature=0,
            top_k=-1,
            stop="\n",
            stop_token_ids=[2],
            ignore_eos=True,
            max_tokens=7,
            max_completion_tokens=9,  # the newer name wins
            logprobs=True,
            top_logprobs=3,
        ),
    )
    assert chat.template_messages() == [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
    ]
    p = to_sampling_params(chat)
    assert (p.max_tokens, p.greedy, p.top_k, p.stop, p.stop_token_ids) == (9, True, -1, ("\n",), (2,))
    assert (p.ignore_eos, p.logprobs) == (True, 3)
    no_limit = parse_request(ChatCompletionRequest, chat_body(logprobs=True))
    assert to_sampling_params(no_limit).logprobs == 0  # chosen token only
    assert to_sampling_params(no_limit, default_max_tokens=100).max_tokens == 100
    assert to_sampling_params(no_limit).max_tokens >= 2**30  # chat runs to the context limit


def test_each_choice_gets_its_own_seed():
    req = parse_request(CompletionRequest, completion_body(n=3, seed=7, temperature=0.8))
    params = choice_sampling_params(req)
    assert [p.seed for p in params] == [7, 8, 9]
    assert all(p.temperature == 0.8 for p in params)
    assert to_sampling_params(req, 2) == params[2]  # reproducible
    unseeded = parse_request(ChatCompletionRequest, chat_body(n=2))
    assert [p.seed for p in choice_sampling_params(unseeded)] == [None, None]


def test_encode_prompts(tok):
    prompts = PromptEncoder(tok, len(tok), 4096)
    chat = parse_request(ChatCompletionRequest, chat_body())
    (ids,) = encode_prompts(chat, prompts)
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    developer = parse_request(
        ChatCompletionRequest, chat_body(messages=[{"role": "developer", "content": "x"}])
    )
    assert tok.decode(encode_prompts(developer, prompts)[0]).startswith("<|im_start|>system\nx")
    text = parse_request(CompletionRequest, completion_body(prompt="Hello world"))
    assert encode_prompts(text, prompts) == [tok("Hello world")["input_ids"]]
    ids_req = parse_request(CompletionRequest, completion_body(prompt=[3, 4, len(tok)]))
    expect_400(lambda: encode_prompts(ids_req, prompts), "prompt")
    negative = parse_request(CompletionRequest, completion_body(prompt=[3, -1]))
    expect_400(lambda: encode_prompts(negative, prompts), "prompt")
    expect_400(lambda: encode_prompts(text, PromptEncoder(tok, len(tok), 2)), "prompt")
    expect_400(lambda: encode_prompts(chat, PromptEncoder(tok, len(tok), 3)), "messages")
    expect_400(
        lambda: encode_prompts(parse_request(CompletionRequest, completion_body(prompt="")), prompts),
        "prompt",
    )


# -------------------------------------------------------------------------------------------- model names


def test_model_names_select_the_mode():
    assert resolve_model(PAIR, PAIR) is Mode.OVERFILL
    for mode in Mode:
        assert resolve_model(f"{PAIR}:{mode.value}", PAIR) is mode
    for bad in ["", "gpt-4o", f"{PAIR}:", f"{PAIR}:teacher", "other:full", PAIR.upper()]:
        with pytest.raises(ModelNotFoundError) as info:
            resolve_model(bad, PAIR)  # HTTP: an empty model name is not found either
        assert info.value.model == bad and info.value.field == "model"
        api_error = from_exception(info.value)
        err = api_error.to_json()["error"]
        assert (api_error.status, err["type"]) == (404, "not_found_error")
        assert (err["param"], err["code"]) == ("model", "model_not_found")
        assert err["message"] == f"The model '{bad}' does not exist"
    assert resolve_model("", PAIR, allow_empty=True) is Mode.OVERFILL  # what the gRPC API passes


# ------------------------------------------------------------------------------------------------- errors


def test_exceptions_map_to_openai_errors(caplog):
    e = from_exception(InvalidRequestError("top_p must be in (0, 1]", field="top_p"))
    assert (e.status, e.param) == (400, "top_p")
    cfg = from_exception(ModelConfigError("/secret/models/config.json is unreadable"))
    assert cfg.status == 500 and "secret" not in json.dumps(cfg.to_json())
    for exc in (OutOfBlocksError("no room"), PeerUnavailableError("gone"), AuthenticationError("bad mac")):
        err = from_exception(exc)
        assert (err.status, err.type, err.headers) == (503, "service_unavailable", {"Retry-After": "1"})
    assert from_exception(OutOfBlocksError("x")).code == "overloaded"
    unknown = from_exception(RuntimeError("token=hunter2"))
    assert unknown.status == 500 and "hunter2" not in json.dumps(unknown.to_json())
    assert any(r.exc_info and "hunter2" in str(r.exc_info[1]) for r in caplog.records)  # logged, not lost
    with pytest.raises(pydantic.ValidationError) as info:
        ChatCompletionRequest.model_validate(chat_body(temperature="x"))
    assert (from_exception(info.value).status, from_exception(info.value).param) == (400, "temperature")
    assert from_exception(json.JSONDecodeError("x", "{", 0)).status == 400
    api = ApiError.unauthorized()
    assert from_exception(api) is api and api.status == 401 and api.type == "authentication_error"


def test_serving_errors_map_explicitly():
    auth = from_exception(UnauthenticatedError("missing or invalid API key (metadata authorization: ...)"))
    assert (auth.status, auth.type, auth.code) == (401, "authentication_error", "invalid_api_key")
    busy = from_exception(OverloadedError("64 requests in flight (limit 64)", retry_after_s=2.5))
    assert (busy.status, busy.type, busy.code) == (503, "service_unavailable", "overloaded")
    assert busy.headers == {"Retry-After": "3"} and "64 requests in flight" in busy.message
    assert from_exception(OverloadedError()).headers == {"Retry-After": "1"}
    gone = from_exception(ServiceUnavailableError("request r1: replica at 10.0.0.7 died"))
    assert (gone.status, gone.type, gone.code) == (503, "service_unavailable", "service_unavailable")
    assert "10.0.0.7" not in json.dumps(gone.to_json())


def test_ray_errors_are_unwrapped_or_mapped():
    ray_exceptions = pytest.importorskip("ray.exceptions")
    serve_exceptions = pytest.importorskip("ray.serve.exceptions")
    wrapped = ray_exceptions.RayTaskError("generate", "traceback", InvalidRequestError("bad", field="min_p"))
    assert (from_exception(wrapped).status, from_exception(wrapped).param) == (400, "min_p")
    assert (
        from_exception(
            serve_exceptions.BackPressureError(num_queued_requests=9, max_queued_requests=8)
        ).status
        == 503
    )
    assert from_exception(ray_exceptions.ActorDiedError()).status == 503


def test_a_batch_of_prompts_gives_each_prompt_its_n_choices(tok):
    """Prompt i's choice j is choice i * n + j, with the seed + j a request of that prompt alone would use."""
    encoder = PromptEncoder(tok, len(tok), 4096)
    req = parse_request(CompletionRequest, completion_body(prompt=["a b", "c"], n=2, seed=3, temperature=1))
    prompts, params = prepare_choices(req, encoder)
    a, c = tok("a b")["input_ids"], tok("c")["input_ids"]
    assert prompts == [a, a, c, c] and [p.seed for p in params] == [3, 4, 3, 4]
    alone = parse_request(CompletionRequest, completion_body(prompt="c", n=2, seed=3, temperature=1))
    assert prepare_choices(alone, encoder) == ([c, c], params[2:])
    ids = parse_request(CompletionRequest, completion_body(prompt=[[5, 6], [7]]))
    assert prepare_choices(ids, encoder)[0] == [[5, 6], [7]] and ids.num_outputs == 2


def test_vllm_sampling_extras_reach_the_sampling_params(tok):
    body = completion_body(
        min_tokens=3,
        logit_bias={"7": 5, "2": -100.0},
        stop_token_ids=[9],
        include_stop_str_in_output=True,
        skip_special_tokens=False,
    )
    (params,) = prepare_choices(parse_request(CompletionRequest, body), PromptEncoder(tok, len(tok), 4096))[1]
    assert (params.min_tokens, params.logit_bias, params.stop_token_ids) == (3, ((2, -100.0), (7, 5.0)), (9,))
    assert params.include_stop_str_in_output and not params.skip_special_tokens
    default = to_sampling_params(parse_request(CompletionRequest, completion_body()))
    assert (default.min_tokens, default.logit_bias, default.skip_special_tokens) == (0, (), True)


def test_unsupported_parameters_at_their_defaults_are_accepted():
    parse_request(
        CompletionRequest,
        completion_body(prompt_logprobs=None, use_beam_search=False, tools=[], tool_choice="none"),
    )
    chat = chat_body(tool_choice="none", modalities=["text"], add_generation_prompt=True, echo=False)
    parse_request(ChatCompletionRequest, {**chat, "response_format": {"type": "text"}})
