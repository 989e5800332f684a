"""overfill_serve.tools.progress: bars on a terminal only, one per stage of a progress callback."""

from __future__ import annotations

import io

import pytest

from overfill_serve.tools import progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_bars_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    with progress.StageBars() as bars:
        for done in range(5):
            bars("calibrating", done, 4)
    assert err.getvalue() == ""


def test_a_bar_per_stage_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    err = FakeTerminal()
    monkeypatch.setattr("sys.stderr", err)
    bars = progress.StageBars(units={"calibrating": "tok"})
    bars("calibrating", 0, 512)
    bars("calibrating", 256, 512)
    bars("calibrating", 512, 512)
    bars("calibrating", 512, 512)  # a repeated end opens no second bar
    bars("writing student", 0, 1)
    bars.close()
    text = err.getvalue()
    assert "calibrating" in text and "512/512" in text and "tok" in text
    assert "writing student" in text and "0/1" in text
    assert text.count("calibrating: 100%") == 1
