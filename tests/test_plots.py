"""overfill_serve.tools.plots writes valid PNGs from small synthetic results (matplotlib: the `bench` extra,
which the Makefile installs; skipped where it is missing)."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest

from overfill_serve.tools import plots

needs_matplotlib = pytest.mark.skipif(not plots.available(), reason=plots.MISSING)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature, its IHDR chunk and that it ends in IEND."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert data[-12:-4] == b"\x00\x00\x00\x00IEND"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def decoded(path: Path) -> tuple[int, int]:
    from PIL import Image  # matplotlib depends on pillow

    with Image.open(path) as img:
        img.load()  # decodes every pixel: a truncated or corrupt file raises
        assert img.getextrema() != ((255, 255),) * len(img.getbands())  # not blank
        return img.size


@needs_matplotlib
def test_latency_plot_writes_a_png(tmp_path: Path) -> None:
    metrics = {
        "TTFT (s)": {"overfill": [0.1, 0.12, 0.3, 0.2], "full": [0.11, 0.13, 0.35]},
        "TPOT (ms)": {"overfill": [20.0, 22.5, 19.0], "full": [40.0, 41.0, math.nan]},
        "e2e (s)": {"overfill": [1.0, 1.2], "full": []},  # a series with no data still draws
    }
    out = plots.latency_plot(tmp_path / "sub" / "latency.png", metrics, title="synthetic")
    assert out == tmp_path / "sub" / "latency.png"
    width, height = png_size(out)
    assert width > 3 * height / 2 > 0  # three panels side by side
    assert decoded(out) == (width, height)


@needs_matplotlib
def test_throughput_plot_writes_a_png(tmp_path: Path) -> None:
    curves = {"overfill": [(4, 60.0), (1, 20.0), (2, 38.0)], "full": [(1, 15.0), (2, 25.0), (4, 31.0)]}
    out = plots.throughput_plot(tmp_path / "tput.png", curves, "concurrency", "output tok/s")
    assert png_size(out) == decoded(out)


@needs_matplotlib
def test_grouped_bars_writes_a_png(tmp_path: Path) -> None:
    scores = {"tiny_mc": {"overfill": 0.5, "full": 0.75, "pruned": 0.25}, "tiny_gen": {"overfill": 0.4}}
    out = plots.grouped_bars(tmp_path / "scores.png", scores, "accuracy")
    assert png_size(out) == decoded(out)


def test_missing_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(plots, "available", lambda: False)
    with pytest.raises(ImportError, match=r"overfill-serve\[bench\]"):
        plots.latency_plot(tmp_path / "x.png", {"TTFT (s)": {"a": [1.0]}})
    assert not (tmp_path / "x.png").exists()
