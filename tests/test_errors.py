"""Bad input gets a typed error naming the problem, and loses nothing: the pool is full afterwards."""

from __future__ import annotations

import json

import pytest
from conftest import edited_checkpoint

from overfill_serve import LLM, SamplingParams
from overfill_serve.errors import InvalidRequestError, ModelConfigError, PairMismatchError, WeightLoadError
from overfill_serve.model.loader import load_model
from overfill_serve.model.random_model import make_random_model
from overfill_serve.request import RequestStatus


@pytest.fixture(scope="module")
def llm(width_pair):
    return LLM(width_pair.teacher, width_pair.student, num_kv_blocks=32, block_size=4, max_model_len=64)


@pytest.mark.parametrize(
    ("call", "field", "words"),
    [
        (lambda llm: llm.generate(list(range(3, 70)), SamplingParams()), "prompt", "context limit is 64"),
        (lambda llm: llm.generate([], SamplingParams()), "prompt", "non-empty"),
        (lambda llm: llm.generate("", SamplingParams()), "prompt", "empty"),
        (lambda llm: llm.generate([1, 10**6], SamplingParams()), "prompt", "token ids must be in"),
        (lambda llm: llm.generate("hi", SamplingParams(), mode="turbo"), "mode", "unknown mode 'turbo'"),
        (
            lambda llm: llm.generate(["a", "b"], [SamplingParams()]),
            "sampling_params",
            "1 sampling params for 2",
        ),
        (lambda llm: llm.chat([{"content": "no role"}]), "messages", "role"),
    ],
)
def test_bad_requests(llm, call, field, words):
    with pytest.raises(InvalidRequestError, match=words) as e:
        call(llm)
    assert e.value.field == field
    assert llm.core.pool.num_free == llm.core.pool.num_blocks and not llm.has_unfinished()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"logprobs": 50}, "logprobs"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field


def test_batch_with_one_bad_prompt_submits_nothing(llm):
    with pytest.raises(InvalidRequestError):
        llm.generate([[5, 6, 7], list(range(3, 100))], SamplingParams(max_tokens=3))
    assert llm.core.pool.num_free == llm.core.pool.num_blocks and not llm.has_unfinished()


def test_generation_stops_at_context_limit(llm):
    out = llm.generate(list(range(3, 60)), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.prompt_token_ids) + len(out.token_ids) == 64


def test_mismatched_pair_lists_every_field(tmp_path, width_pair):
    other = make_random_model(
        tmp_path / "other", num_layers=3, num_kv_heads=4, head_dim=8, rope_theta=5.0, vocab_size=600
    )
    with pytest.raises(PairMismatchError) as e:
        LLM(width_pair.teacher, other, num_kv_blocks=8)
    text = str(e.value)
    for field in ("num_kv_heads", "head_dim", "rope", "vocab_size", "layers"):
        assert field in text
    assert len(e.value.mismatches) == 5


def test_missing_and_unexpected_weights(tmp_path, width_pair):
    def edit(tensors):
        del tensors["model.layers.1.mlp.down_proj.weight"]
        tensors["model.layers.9.extra.weight"] = tensors["model.norm.weight"].clone()

    broken = edited_checkpoint(width_pair.student, tmp_path / "broken", edit)
    with pytest.raises(WeightLoadError) as e:
        LLM(width_pair.teacher, broken, num_kv_blocks=8)
    assert "missing tensor model.layers.1.mlp.down_proj.weight" in str(e.value)
    assert "unexpected tensor model.layers.9.extra.weight" in str(e.value)


def test_wrong_shape_and_no_weights(tmp_path, width_pair):
    name = "model.norm.weight"
    broken = edited_checkpoint(
        width_pair.student, tmp_path / "shape", lambda t: t.update({name: t[name][:-1]})
    )
    with pytest.raises(WeightLoadError, match=r"model.norm.weight has shape \(41,\), expected \(42,\)"):
        load_model(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(WeightLoadError, match="no model.safetensors"):
        load_model(broken)


def test_bad_model_directories(tmp_path, width_pair):
    with pytest.raises(ModelConfigError, match="no config.json"):
        LLM(tmp_path, width_pair.student)
    cfg_dir = tmp_path / "gpt"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelConfigError, match="model_type 'gpt2' is not supported"):
        LLM(cfg_dir, width_pair.student)
    with pytest.raises(ModelConfigError, match="dtype 'int8'"):
        LLM(width_pair.teacher, width_pair.student, dtype="int8")


def test_errors_survive_pickling():
    """Errors cross process boundaries (Ray replicas): every field must come back."""
    import pickle

    from overfill_serve.errors import LayoutMismatchError, PreemptedError

    e = pickle.loads(pickle.dumps(InvalidRequestError("bad temperature", field="temperature")))
    assert isinstance(e, InvalidRequestError) and e.field == "temperature" and str(e) == "bad temperature"
    p = pickle.loads(pickle.dumps(PreemptedError("r1", [1, 2, 3])))
    assert p.request_id == "r1" and p.output_token_ids == [1, 2, 3]
    for cls in (PairMismatchError, LayoutMismatchError):
        m = pickle.loads(pickle.dumps(cls(["dtype: a != b", "head_dim: 1 != 2"])))
        assert m.mismatches == ["dtype: a != b", "head_dim: 1 != 2"]


def test_serving_errors_survive_pickling():
    """The serving layer's errors cross Ray replicas too; the HTTP / gRPC mappings read their fields."""
    import pickle

    from overfill_serve.errors import (
        ModelNotFoundError,
        OverloadedError,
        ServiceUnavailableError,
        UnauthenticatedError,
    )

    original = ModelNotFoundError("x", ["pair", "pair:full"])
    m = pickle.loads(pickle.dumps(original))
    assert isinstance(m, ModelNotFoundError) and isinstance(m, InvalidRequestError)
    assert (m.model, m.available, m.field, str(m)) == ("x", ["pair", "pair:full"], "model", str(original))
    o = pickle.loads(pickle.dumps(OverloadedError("busy", retry_after_s=3)))
    assert isinstance(o, OverloadedError) and (str(o), o.retry_after_s) == ("busy", 3)
    d = pickle.loads(pickle.dumps(OverloadedError()))
    assert (str(d), d.retry_after_s) == ("the server is overloaded", None)
    for cls in (UnauthenticatedError, ServiceUnavailableError):
        e = pickle.loads(pickle.dumps(cls("why")))
        assert type(e) is cls and str(e) == "why"


def test_a_failing_step_fails_its_requests_and_frees_their_blocks(width_pair, monkeypatch):
    """A step that raises (a device error, a bug) marks every request in flight failed, with its error, and
    returns their blocks; the engine then serves new requests."""
    llm = LLM(width_pair.teacher, width_pair.student, num_kv_blocks=32, block_size=4)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = llm.generate([5, 6, 7], params)[0].token_ids
    for prompt in ([5, 6, 7], list(range(10, 30))):
        llm.add_request(prompt, params)
    llm.step()  # prefilled: the student decodes next
    requests = [r for engine in llm.core.engines() for queue in engine.queues() for r in queue]
    assert len(requests) == 2
    runner = llm.core.decode["student"].runner
    with monkeypatch.context() as patch:
        patch.setattr(runner, "run", lambda *_: (_ for _ in ()).throw(RuntimeError("device lost")))
        with pytest.raises(RuntimeError, match="device lost"):
            llm.step()
    assert all(r.status is RequestStatus.FAILED and r.error == "RuntimeError: device lost" for r in requests)
    assert llm.core.pool.num_free == llm.core.pool.num_blocks and not llm.has_unfinished()
    assert llm.generate([5, 6, 7], params)[0].token_ids == expected
