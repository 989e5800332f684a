"""Chaos (issue 11): SIGKILL a decode replica and a prefill replica while 16 streams (HTTP SSE and gRPC) are
mid-generation. Every stream must either complete with the unfaulted offline output (the killed decode
replica's requests migrate; the prefill replica dies while taking their re-prefills, and what it held, queued
prefills and KV not yet pulled, goes elsewhere) or end with an explicit error within 30 s of the kill: never a
silent cut or a hang. After Serve has replaced both replicas,
every KV pool is whole and a fresh request is exact."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
from serve_harness import (
    GRPC_PORT,
    HTTP_PORT,
    completion,
    load_app_config,
    pair_args,
    replica_stats,
    run_app,
    start_ray,
    wait_until,
)

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

APP = "chaos"
HTTP_STREAMS, GRPC_STREAMS = 12, 2
LATE_STREAMS = 2  # HTTP streams sent as the replicas die: their prefills race the prefill kill
MAX_TOKENS = 240
ERROR_DEADLINE_S = 30.0  # issue 11's goal: a stream that cannot complete says so within 30 s of the kill
# Distinct prompts, so a stream that continued someone else's request (or lost tokens) cannot match.
EARLY = HTTP_STREAMS + GRPC_STREAMS
PROMPTS = [[(7 * i + j) % 250 + 3 for j in range(24 + i)] for i in range(EARLY)] + [
    [(11 * i + j) % 250 + 3 for j in range(400)] for i in range(LATE_STREAMS)
]
# One decode replica may end up with every stream, each re-prefilled with up to MAX_TOKENS generated tokens.
KV_BLOCKS = 2048


@dataclass
class Stream:
    """What a client saw. `finished`: the stream said it was done ([DONE] after a finish_reason, or a gRPC
    chunk with a finish reason); `error`: an explicit error (an SSE error event, a gRPC status)."""

    prompt: list[int]
    text: str = ""
    chunks: int = 0
    finish_reason: str | None = None
    finished: bool = False
    error: str | None = None
    ended_at: float | None = None

    def outcome(self, want: str, killed_at: float) -> str:
        if self.ended_at is None:
            return "hung"
        if self.error is not None:
            late = self.ended_at - killed_at > ERROR_DEADLINE_S
            return f"error after {self.ended_at - killed_at:.1f}s" + (" (late)" if late else "")
        if not self.finished or self.finish_reason != "length":
            return f"silently cut after {len(self.text)} chars (finish_reason {self.finish_reason})"
        return "complete" if self.text == want else f"mismatch: {self.text[:60]!r} != {want[:60]!r}"


@pytest.fixture(scope="module")
def served(pairs):
    import ray
    from ray import serve

    pair = pairs["width"]
    config, _ = load_app_config()
    args = pair_args(pair, "tiny", prefill_kv_blocks=KV_BLOCKS, decode_kv_blocks=KV_BLOCKS)
    start_ray({})
    replicas = {"DecodeServer": {"num_replicas": 2}, "PrefillServer": {"num_replicas": 2}}
    run_app(args, APP, config["grpc_options"]["grpc_servicer_functions"], options=replicas)
    yield pair
    serve.shutdown()
    ray.shutdown()


def _reference(pair) -> list[str]:
    from overfill_serve import LLM, SamplingParams

    llm = LLM(pair.teacher, pair.student, num_kv_blocks=KV_BLOCKS, block_size=4)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [out.text for out in llm.generate(PROMPTS, params)]


def _http_stream(s: Stream) -> None:
    body = {
        "model": "tiny",
        "prompt": s.prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    try:
        conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=120)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            s.error = f"HTTP {response.status}: {response.read()[:200]!r}"
            return
        for line in response:
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                s.finished = s.finish_reason is not None
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                s.error = json.dumps(chunk["error"])[:300]
                continue
            for choice in chunk.get("choices", []):
                s.text += choice["text"]
                s.finish_reason = choice.get("finish_reason") or s.finish_reason
            s.chunks += 1
    except (OSError, http.client.HTTPException) as e:  # a dropped connection is a cut, not an error event
        s.finish_reason = f"connection lost: {e!r}"
    finally:
        s.ended_at = time.monotonic()


def _grpc_stream(s: Stream) -> None:
    from overfill_serve._proto.overfill.v1 import generate_pb2 as pb
    from overfill_serve.tools.client import ClientError, GRPCClient

    try:
        with GRPCClient(f"127.0.0.1:{GRPC_PORT}", application=APP) as client:
            for chunk in client.generate_stream(
                s.prompt, model="tiny", max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True
            ):
                s.text += chunk.text
                s.chunks += 1
                if chunk.finish_reason:
                    s.finish_reason = pb.FinishReason.Name(chunk.finish_reason).removeprefix("FINISH_REASON_")
                    s.finish_reason = s.finish_reason.lower()
                    s.finished = True
    except ClientError as e:  # a gRPC status: explicit
        s.error = str(e)
    finally:
        s.ended_at = time.monotonic()


def _replaced(deployment: str, killed: str) -> bool:
    """Both replicas of `deployment` running again, the killed one not among them."""
    ids = {s["replica_id"] for s in replica_stats(APP, deployment)}
    return len(ids) == 2 and killed not in ids


def _pools_whole() -> bool:
    stats = replica_stats(APP, "PrefillServer") + replica_stats(APP, "DecodeServer")
    return len(stats) == 4 and all(
        s["free_blocks"] == s["total_blocks"] and s["open_transfers"] == s["running"] == s["waiting"] == 0
        for s in stats
    )


def _start(streams: list[Stream], grpc: bool = False) -> list[threading.Thread]:
    threads = [
        threading.Thread(target=_grpc_stream if grpc else _http_stream, args=(s,), daemon=True)
        for s in streams
    ]
    for t in threads:
        t.start()
    return threads


def _replica_actors(deployment: str) -> dict[str, tuple[Any, int]]:
    """replica id -> (its actor, the pid of its process: what a real fault, e.g. the OOM killer, hits)."""
    import ray

    out: dict[str, tuple[Any, int]] = {}
    for stats in replica_stats(APP, deployment):
        actor = ray.get_actor(f"SERVE_REPLICA::{APP}#{deployment}#{stats['replica_id']}", namespace="serve")
        getpid: Any = actor.__ray_call__.remote(lambda _: os.getpid())  # runs inside the replica process
        pid: int = ray.get(getpid, timeout=30)
        out[stats["replica_id"]] = actor, pid
    return out


@dataclass
class Kills:
    at: float  # when the decode replica died (the prefill replica follows within moments)
    decode: str  # the victims' replica ids
    prefill: str
    moved: int  # requests the decode victim was running: each must migrate
    caught: int  # prefills queued and KV transfers open on the prefill victim as it died
    late: list[threading.Thread]  # the late streams' threads


def _busy_prefill(prefill: dict[str, tuple[Any, int]], before: dict[str, int]) -> tuple[str, int] | None:
    """(id, work in flight) of a prefill replica with a prefill queued or KV not yet pulled, else of one that
    has prefilled since `before` (the moment was missed: kill it anyway)."""
    import ray

    now = {rid: ray.get(a.record_routing_stats.remote()) for rid, (a, _) in prefill.items()}
    work = {rid: s["waiting"] + s["open_transfers"] for rid, s in now.items()}
    busy = [rid for rid in now if work[rid]] or [rid for rid in now if now[rid]["prefilled"] > before[rid]]
    return (busy[0], work[busy[0]]) if busy else None


def _kill_mid_stream(early: list[Stream], late: list[Stream]) -> Kills:
    """Once every early stream is generating, SIGKILL the busiest decode replica, send the late streams, and
    SIGKILL the first prefill replica seen taking the migrations' re-prefills (what is in flight there, KV
    pulls included, must go elsewhere)."""
    import ray

    decode, prefill = _replica_actors("DecodeServer"), _replica_actors("PrefillServer")
    wait_until(lambda: all(s.chunks >= 8 for s in early), timeout=120, what="every stream generating")
    before = {rid: ray.get(a.record_routing_stats.remote())["prefilled"] for rid, (a, _) in prefill.items()}
    busiest = max(replica_stats(APP, "DecodeServer"), key=lambda s: s["running"])
    killed_at = time.monotonic()
    os.kill(decode[busiest["replica_id"]][1], signal.SIGKILL)
    threads = _start(late)
    seen: list[tuple[str, int]] = []

    def found() -> bool:
        seen[:] = filter(None, [_busy_prefill(prefill, before)])
        return bool(seen)

    wait_until(found, timeout=30, what="a prefill replica taking the migrations")
    os.kill(prefill[seen[0][0]][1], signal.SIGKILL)
    return Kills(killed_at, busiest["replica_id"], seen[0][0], busiest["running"], seen[0][1], threads)


def _check_outcomes(streams: list[Stream], want: list[str], killed_at: float) -> None:
    outcomes = [s.outcome(w, killed_at) for s, w in zip(streams, want)]
    # Issue 11's bar: complete and exact, or an explicit error in time; never cut, hung or wrong.
    failed = [o for o in outcomes if o != "complete" and not (o.startswith("error") and "late" not in o)]
    assert not failed, outcomes
    # And what the app promises with a replica of each pool left: migration and retries complete them all.
    assert outcomes == ["complete"] * len(streams), outcomes


def test_replica_kills_under_streams(served):
    want = _reference(served)
    streams = [Stream(p) for p in PROMPTS]
    early, late = streams[:EARLY], streams[EARLY:]
    threads = _start(early[:HTTP_STREAMS]) + _start(early[HTTP_STREAMS:], grpc=True)
    kills = _kill_mid_stream(early, late)
    # The kill must land mid-stream, or the test measures nothing.
    assert kills.moved > 0 and all(s.ended_at is None or s.ended_at > kills.at for s in early)
    for t in threads + kills.late:
        t.join(timeout=max(0.0, kills.at + 150 - time.monotonic()))
    _check_outcomes(streams, want, kills.at)
    print(
        f"\nchaos: {len(streams)} streams complete and exact; {kills.moved} ran on the killed decode replica, "
        f"{kills.caught} prefills / KV transfers were in flight on the killed prefill replica"
    )

    # Serve replaces both; then nothing may be left allocated anywhere, and the app is exact.
    wait_until(lambda: _replaced("DecodeServer", kills.decode), timeout=120, what="a new decode replica")
    wait_until(lambda: _replaced("PrefillServer", kills.prefill), timeout=120, what="a new prefill replica")
    wait_until(_pools_whole, timeout=60, what="every KV pool whole")
    body = {
        "model": "tiny",
        "prompt": PROMPTS[-1],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    assert completion(body) == (200, want[-1])
