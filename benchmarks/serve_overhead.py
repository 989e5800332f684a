"""Serve load, part 2: what the Serve path adds over the offline engine, one request at a time, each through
the app (streamed HTTP) and through an in-process `overfill_serve.LLM(...).generate`, interleaved."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from bench_common import Req, print_head
from load_client import serve_single
from serve_app import MODE_SUFFIX


def offline_one(llm: Any, req: Req, mode: str) -> tuple[float, float]:
    """(TTFT, e2e) of one request run alone through `LLM.generate`. e2e is the wall time of the call; TTFT is
    the engine's own first-token stamp (from the request's creation inside the call): a client cannot see it
    sooner, because `LLM.step` returns the prefill's token only after the same step's decode pass."""
    from overfill_serve import SamplingParams

    params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    (out,) = llm.generate([req.prompt], params, mode=mode)
    e2e = time.perf_counter() - t0
    assert len(out.token_ids) == req.max_tokens, (len(out.token_ids), req.max_tokens)
    return out.metrics.ttft if out.metrics.ttft is not None else e2e, e2e


Timing = tuple[float, float]  # (TTFT, e2e) seconds


def overhead(
    url: str, pair: str, modes: list[str], reqs: list[Req], llm: Any, timeout: float
) -> list[tuple[str, list[tuple[Req, Timing, Timing]], list[str]]]:
    """Per mode: (mode, [(request, Serve timing, offline timing)] for the requests that succeeded, errors)."""
    rows = []
    for mode in modes:
        model = pair + MODE_SUFFIX[mode]
        errors: list[str] = []

        def serve_one(req: Req, model: str = model, errors: list[str] = errors) -> Timing | None:
            o = asyncio.run(serve_single(url, model, req, timeout))
            if o.ok and o.ttft is not None and o.e2e is not None:
                return o.ttft, o.e2e
            errors.append(str(o.error))
            return None

        warm = Req(reqs[0].prompt[:16], 4)
        serve_one(warm)
        offline_one(llm, warm, mode)
        pairs = []
        for i, req in enumerate(reqs):  # interleaved, order alternating, so drift in load hits both
            if i % 2 == 0:
                served = serve_one(req)
                offline = offline_one(llm, req, mode)
            else:
                offline = offline_one(llm, req, mode)
                served = serve_one(req)
            if served is not None:
                pairs.append((req, served, offline))
        rows.append((mode, pairs, errors))
    return rows


def print_overhead(rows: list[tuple[str, list[tuple[Req, Timing, Timing]], list[str]]]) -> None:
    head = (
        f"{'mode':<9} {'n':>3} {'Serve TTFT':>11} {'LLM TTFT':>9} {'+TTFT ms':>9} "
        f"{'Serve e2e':>10} {'LLM e2e':>8} {'+e2e ms':>8} {'paired +TTFT/+e2e ms':>21} {'+ms/token':>9}"
    )
    print_head(head)
    for mode, pairs, errors in rows:
        if not pairs:
            print(f"{mode:<9} no successful Serve requests: {errors[:1]}")
            continue
        s_ttft, s_e2e = (
            statistics.median(s[0] for _, s, _ in pairs),
            statistics.median(s[1] for _, s, _ in pairs),
        )
        o_ttft, o_e2e = (
            statistics.median(o[0] for _, _, o in pairs),
            statistics.median(o[1] for _, _, o in pairs),
        )
        # Median of the per-request differences too: robust to one slow outlier on a shared box.
        d_ttft = statistics.median(s[0] - o[0] for _, s, o in pairs)
        d_e2e = statistics.median(s[1] - o[1] for _, s, o in pairs)
        paired = f"{1000 * d_ttft:+.1f} / {1000 * d_e2e:+.1f}"
        # What the Serve path adds to each later token: the (e2e - TTFT) difference over the tokens after the first.
        d_tok = statistics.median(
            ((s[1] - s[0]) - (o[1] - o[0])) / max(r.max_tokens - 1, 1) for r, s, o in pairs
        )
        print(
            f"{mode:<9} {len(pairs):>3} {s_ttft:10.3f}s {o_ttft:8.3f}s {1000 * (s_ttft - o_ttft):+9.1f} "
            f"{s_e2e:9.3f}s {o_e2e:7.3f}s {1000 * (s_e2e - o_e2e):+8.1f} {paired:>21} {1000 * d_tok:+9.1f}"
        )
        if errors:
            print(f"ERRORS {mode} (part 2): {errors}")
