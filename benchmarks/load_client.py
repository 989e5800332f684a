"""The load generator's client side: one streamed `POST /v1/completions` over HTTP measured from its SSE
chunks (TTFT, inter-token gaps, end to end; one gRPC `GenerateStream` likewise), the arrival processes that
send a workload (Poisson or closed loop), and the round trip of `GET /health`."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench_common import Req


# ----------------------------------------------------------------------------------------------------------
# one streamed request over HTTP
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    req: Req
    start: float = 0.0  # perf_counter when the request was sent
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # arrival of every chunk with text
    text: str = ""
    error: str | None = None
    hang: bool = False  # no event for `stall` seconds, or not finished by the request's timeout

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e is not None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.tokens < 2:
            return None
        return (self.chunk_times[-1] - self.start - self.ttft) / (self.tokens - 1)

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


async def stream_completion(
    session: Any,
    url: str,
    model: str,
    req: Req,
    timeout: float,
    stall: float | None = None,
    sampling: dict[str, Any] | None = None,
) -> Outcome:
    """`timeout`: for the whole request; `stall`: for each read of the stream. `sampling`: body fields over
    the default temperature 0 (e.g. a temperature and a seed)."""
    import aiohttp

    body = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(sampling or {}),
    }
    out = Outcome(req)
    out.start = time.perf_counter()
    try:
        async with session.post(
            f"{url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout, sock_read=stall)
        ) as resp:
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return out
            done = False
            async for raw in resp.content:
                now = time.perf_counter()
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    done = True
                    out.e2e = now - out.start
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                    continue
                if chunk.get("usage"):
                    out.tokens = chunk["usage"]["completion_tokens"]
                text = "".join(c.get("text") or "" for c in chunk.get("choices", []))
                if text:
                    if out.ttft is None:
                        out.ttft = now - out.start
                    out.chunk_times.append(now)
                    out.text += text
            if out.error is None and not done:
                out.error = "stream ended without [DONE]"
            elif out.error is None and out.tokens != req.max_tokens:
                out.error = f"{out.tokens} tokens, wanted {req.max_tokens} (ignore_eos)"
    except asyncio.TimeoutError:
        out.hang = True
        waited = time.perf_counter() - out.start
        stalled = stall is not None and waited < timeout - 1
        out.error = f"no event for {stall:.0f} s" if stalled else f"timed out after {timeout:.0f} s"
    except asyncio.CancelledError:
        out.error = "cancelled at the run's deadline"
    except Exception as e:  # connection refused / reset: counted, not fatal
        out.error = f"{type(e).__name__}: {e}"
    return out


def grpc_stream(
    client: Any, model: str, req: Req, timeout: float, stall: float, sampling: dict[str, Any] | None = None
) -> Outcome:
    """One GenerateStream over gRPC (a `GRPCClient`; blocking: run it on a thread), measured as
    `stream_completion` measures an SSE stream. A gap over `stall` between chunks is seen once the next chunk
    comes; a stream that never continues ends at the call's `timeout` (DEADLINE_EXCEEDED): both are hangs."""
    import grpc

    from overfill_serve.tools.client import ClientError, GRPCError

    out = Outcome(req)
    out.start = last = time.perf_counter()
    finished = False
    params = {"temperature": 0.0, "max_tokens": req.max_tokens, "ignore_eos": True, **(sampling or {})}
    try:
        chunks = client.generate_stream(req.prompt, model=model, timeout=timeout, **params)
        for chunk in chunks:
            now = time.perf_counter()
            if now - last > stall and out.error is None:
                out.hang, out.error = True, f"no event for {stall:.0f} s"
            last = now
            if chunk.text:
                out.ttft = out.ttft if out.ttft is not None else now - out.start
                out.chunk_times.append(now)
                out.text += chunk.text
            if chunk.HasField("usage"):
                out.tokens = chunk.usage.completion_tokens
            finished = finished or chunk.finish_reason != 0
        out.e2e = last - out.start
    except GRPCError as e:
        out.hang = e.code == grpc.StatusCode.DEADLINE_EXCEEDED
        out.error = f"gRPC {e.code.name}: {e.details[:200]}"
    except ClientError as e:
        out.error = f"{type(e).__name__}: {e}"[:200]
    if out.error is None and not finished:
        out.error = "stream ended without a finish_reason"
    elif out.error is None and out.tokens != req.max_tokens:
        out.error = f"{out.tokens} tokens, wanted {req.max_tokens} (ignore_eos)"
    return out


def new_session() -> Any:
    import aiohttp

    # One connection per in-flight request; loopback only.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False))


# ----------------------------------------------------------------------------------------------------------
# arrival processes
# ----------------------------------------------------------------------------------------------------------
async def run_load(
    url: str,
    model: str,
    reqs: list[Req],
    rate: float | None,
    concurrency: int | None,
    seed: int,
    timeout: float,
    max_duration: float,
    on_done: Callable[[Outcome], None] | None = None,
) -> tuple[list[Outcome], float]:
    """Send `reqs` to `model`: Poisson arrivals at `rate` (at most `concurrency` in flight) or `concurrency`
    closed-loop clients; each outcome is handed to `on_done` as it completes (a progress bar)."""
    async with new_session() as session:
        sem = asyncio.Semaphore(concurrency) if concurrency else None
        outcomes: list[Outcome | None] = [None] * len(reqs)
        t0 = time.perf_counter()

        async def one(i: int, at: float) -> None:
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is None:
                o = await stream_completion(session, url, model, reqs[i], timeout)
            else:
                async with sem:
                    o = await stream_completion(session, url, model, reqs[i], timeout)
            outcomes[i] = o
            if on_done is not None:
                on_done(o)

        if rate:
            rng, at, times = random.Random(seed + 7), 0.0, []
            for _ in reqs:
                times.append(at)
                at += rng.expovariate(rate)
        else:
            times = [0.0] * len(reqs)  # closed loop: the semaphore paces them
        tasks = [asyncio.create_task(one(i, at)) for i, at in enumerate(times)]
        _, pending = await asyncio.wait(tasks, timeout=max_duration)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
    result = []
    for i, o in enumerate(outcomes):
        if o is None:
            o = Outcome(reqs[i], error="not sent before the run's deadline")
        result.append(o)
    return result, wall


async def http_rtt(url: str, n: int) -> float:
    async with new_session() as session:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            async with session.get(f"{url}/health") as resp:
                await resp.read()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


async def serve_single(url: str, model: str, req: Req, timeout: float) -> Outcome:
    async with new_session() as session:
        return await stream_completion(session, url, model, req, timeout)
