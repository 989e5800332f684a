"""The command line on tiny models: prune, check-pair, generate."""

from __future__ import annotations

import pytest

from overfill_serve import LLM, SamplingParams
from overfill_serve.model.random_model import make_random_model
from overfill_serve.model.spec import ModelSpec
from overfill_serve.tools.cli import main


def test_prune_check_pair_generate(tmp_path, capsys, pairs):
    teacher = pairs["identity"].teacher
    student = tmp_path / "student"
    main(
        [
            "prune",
            str(teacher),
            str(student),
            "--num-layers",
            "2",
            "--kept-layers",
            "firstlast",
            "--calibration-tokens",
            "128",
        ]
    )
    assert "layers 4->2 (kept [0, 3])" in capsys.readouterr().out
    assert ModelSpec.from_dir(student).kept_layers == (0, 3)

    main(["check-pair", "--prefill-model", str(teacher), "--decode-model", str(student)])
    table = capsys.readouterr().out
    assert "num_kv_heads" in table and "NO" not in table

    main(
        [
            "generate",
            "--prefill-model",
            str(teacher),
            "--decode-model",
            str(student),
            "--prompt",
            "hello world",
            "--max-tokens",
            "8",
        ]
    )
    want = LLM(teacher, student).generate("hello world", SamplingParams(max_tokens=8, temperature=0))[0].text
    assert capsys.readouterr().out == want + "\n"


def test_check_pair_mismatch_exits_nonzero(tmp_path, capsys, pairs):
    other = make_random_model(tmp_path / "other", num_layers=4, num_kv_heads=4, head_dim=8)
    with pytest.raises(SystemExit) as e:
        main(["check-pair", "--prefill-model", str(pairs["identity"].teacher), "--decode-model", str(other)])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "NO" in out and "num_kv_heads" in out


def test_typed_errors_exit_2_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prefill-model", str(tmp_path), "--prompt", "hi"])
    assert e.value.code == 2
    assert "no config.json" in capsys.readouterr().err
