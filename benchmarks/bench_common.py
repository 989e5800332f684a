"""What the benchmark scripts share: the seeded request workload over a fixed text corpus, percentiles, the
machine/date/command lines of a report's header, table heads, and a free loopback port.

The scripts run as `python benchmarks/<script>.py`, so this directory is sys.path[0] and they import this
module (and their other siblings) by plain name."""

from __future__ import annotations

import datetime
import os
import platform
import random
import shlex
import socket
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20


# ----------------------------------------------------------------------------------------------------------
# workload
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Req:
    prompt: list[int]
    max_tokens: int


def corpus_text() -> str:
    """Python's own help topics: a fixed, offline English corpus to cut prompts from."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def corpus_token_ids(tokenizer, **kwargs) -> list[int]:
    return list(tokenizer(corpus_text(), add_special_tokens=False, **kwargs)["input_ids"])


def parse_range(text: str) -> tuple[int, int]:
    """An argparse type: "LO:HI" (or "N" for N:N) token counts, 0 < LO <= HI."""
    import argparse

    lo, _, hi = text.partition(":")
    a, b = int(lo), int(hi or lo)
    if not 0 < a <= b:
        raise argparse.ArgumentTypeError(f"{text!r}: want LO:HI with 0 < LO <= HI")
    return a, b


def make_workload(
    corpus: list[int], n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int
) -> list[Req]:
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        p_len, o_len = rng.randint(*prompt_range), rng.randint(*output_range)
        start = rng.randrange(0, len(corpus) - p_len)
        reqs.append(Req(corpus[start : start + p_len], o_len))
    return reqs


# ----------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation; nan for no values."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------------------------------------
# the report's header and tables
# ----------------------------------------------------------------------------------------------------------
def utc_date() -> str:
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"


def command_line(script: str, prefix: str = "python") -> str:
    """How this run was started: `prefix script args...`, the arguments shell-quoted."""
    return f"{prefix} {shlex.join([script, *sys.argv[1:]])}"


def cpu_name(default: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo; else `default`, or platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if default is not None:
        return default
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def print_head(head: str) -> None:
    """A table's column heads and a rule as wide."""
    print(head)
    print("-" * len(head))


# ----------------------------------------------------------------------------------------------------------
# network
# ----------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
