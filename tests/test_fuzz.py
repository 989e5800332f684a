"""Seeded, bounded fuzzing of the three edges a client or a peer can reach (issue 11): the OpenAI HTTP API and
the gRPC API of a running app, and a prefill worker's KV channel. Every case is a mutation of a valid request
(wrong types, non-finite and huge numbers, oversized bodies, invalid UTF-8, out-of-range token ids, duplicate
ids, garbage bytes; for the KV channel unauthenticated, replayed and forged handshakes and calls). A client
mistake never gets a 5xx or INTERNAL / UNKNOWN, and afterwards the app is healthy and exact, its KV whole and
its replicas' memory within 5 %."""

from __future__ import annotations

import http.client
import json
import math
import random
from typing import Any

import pytest
from kv_helpers import decode_kwargs, pool_full, wait_until
from serve_harness import (
    GRPC_PORT,
    HTTP_PORT,
    pools_full,
    serve_pair,
)

from overfill_serve.sampling_params import FLOAT_FIELDS

pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow
APP = "fuzz"
PROMPT = list(range(20, 40))
SEED = 1234
BAD_VALUES: list[Any] = [
    None, True, -1, 0, 2**31, 10**30, -(10**30), 1e308, "x", "", [], {}, [1, "a"], {"a": 1},
    "\ud800", "é" * 3000, [-5], [10**12], 0.5, -0.5,
]  # fmt: skip
NON_FINITE = ["NaN", "Infinity", "-Infinity"]
FIELDS = [
    "model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n",
    "stop", "stop_token_ids", "logprobs", "top_logprobs", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "stream", "stream_options", "ignore_eos", "echo", "logit_bias", "max_completion_tokens",
]  # fmt: skip
ALLOWED_HTTP = {200, 400, 401, 404, 405, 413}
BAD_GRPC = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}


@pytest.fixture(scope="module")
def served(pairs):
    # max_model_len bounds what a valid mutation (say max_tokens 10**9) can cost
    yield from serve_pair(pairs["width"], APP, max_model_len=96, max_request_bytes=1 << 20)


def _http(method: str, path: str, raw: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=120)
    conn.request(method, path, raw, {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def _replica_rss() -> int:
    """Resident memory of the app's replica processes (their process titles name the app)."""
    total = 0
    for proc in psutil.process_iter(["cmdline"]):
        if any(f"ServeReplica:{APP}:" in part for part in proc.info["cmdline"] or ()):
            total += proc.memory_info().rss
    assert total > 0
    return total


def _greedy_text() -> str:
    body = {"model": APP, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    status, raw = _http("POST", "/v1/completions", json.dumps(body).encode())
    assert status == 200, raw
    return json.loads(raw)["choices"][0]["text"]


# -- HTTP -------------------------------------------------------------------------------------------------


def _http_case(rng: random.Random) -> tuple[str, bytes]:
    chat = rng.random() < 0.4
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, Any] = {"model": rng.choice([APP, f"{APP}:full", f"{APP}:pruned"]), "max_tokens": 3}
    if chat:
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = PROMPT
    for _ in range(rng.randint(1, 3)):
        body[rng.choice(FIELDS)] = rng.choice(BAD_VALUES)
    raw = json.dumps(body).encode()
    kind = rng.random()
    if kind < 0.1:  # a non-finite number, as JSON extensions write it
        raw = json.dumps({**body, "temperature": 0.0}).replace("0.0", rng.choice(NON_FINITE), 1).encode()
    elif kind < 0.2:  # invalid UTF-8
        cut = rng.randrange(len(raw))
        raw = raw[:cut] + bytes([rng.choice([0x80, 0xC3, 0xFF, 0xED])]) + raw[cut:]
    elif kind < 0.25:  # truncated
        raw = raw[: rng.randrange(len(raw))]
    elif kind < 0.28:  # over max_request_bytes
        raw = json.dumps({**body, "prompt": "y" * (1 << 20)}).encode()
    elif kind < 0.33:  # a huge token id list
        raw = json.dumps(
            {**body, "prompt": [rng.randrange(-5, 10**6) for _ in range(rng.randint(1, 3000))]}
        ).encode()
    return path, raw


def test_fuzz_http(served):
    rng = random.Random(SEED)
    want = _greedy_text()
    for _ in range(100):  # warm up before the memory baseline
        _http("POST", *_http_case(rng))
    rss = _replica_rss()
    statuses: dict[int, int] = {}
    for i in range(1000):
        path, raw = _http_case(rng)
        status, body = _http("POST", path, raw)
        statuses[status] = statuses.get(status, 0) + 1
        assert status in ALLOWED_HTTP, (i, status, raw[:300], body[:300])
        if status != 200:
            assert json.loads(body)["error"]["message"], body[:300]
    assert statuses.get(200, 0) > 50 and statuses.get(400, 0) > 300, statuses
    assert _greedy_text() == want
    wait_until(lambda: pools_full(APP), timeout=30, what="KV pools full")
    assert _replica_rss() < rss * 1.05, (rss, _replica_rss())


# -- gRPC -------------------------------------------------------------------------------------------------


def _valid_grpc_request(rng: random.Random) -> Any:
    """A request that must be served (a quarter of the cases, so the fuzzing also runs generation)."""
    from overfill_serve.tools.client import make_request

    return make_request(
        PROMPT[: rng.randint(1, len(PROMPT))],
        model=rng.choice([APP, f"{APP}:full", f"{APP}:pruned"]),
        request_id=rng.choice([None, "dup"]),
        max_tokens=rng.randint(1, 4),
        temperature=rng.choice([0.0, 0.7]),
        seed=rng.randrange(2**31),
        stop=rng.choice([None, ["\n"]]),
    )


def _grpc_case(rng: random.Random) -> Any:
    from overfill_serve._proto.overfill.v1 import generate_pb2 as pb

    if rng.random() < 0.25:
        return _valid_grpc_request(rng)

    request = pb.GenerateRequest(model=rng.choice([APP, f"{APP}:full", "", "nope", "x" * 500]))
    prompt = rng.random()
    if prompt < 0.4:
        request.token_ids.ids.extend(
            rng.randrange(-(2**31), 2**31) if rng.random() < 0.2 else t for t in PROMPT
        )
    elif prompt < 0.7:
        request.text = rng.choice(["hi", "", "\x00" * 10, "é" * 2000, "z" * 20_000])
    elif prompt < 0.95:
        role = rng.choice(["user", "system", "banana", "", "assistant"])
        request.chat.messages.add(role=role, content=rng.choice(["hi", "", "ü" * 100]))
    request.mode = rng.choice([0, 1, 2, 3, 7, -1])
    if rng.random() < 0.3:
        request.request_id = rng.choice(["dup", "", "a\nb", "x" * 300, f"id-{rng.random()}"])
    s = request.sampling
    s.max_tokens = rng.choice([1, 3, 0, -1, 2**31 - 1])
    for name in FLOAT_FIELDS:
        if rng.random() < 0.2:
            setattr(s, name, rng.choice([0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e300]))
    if rng.random() < 0.2:
        s.top_k = rng.choice([-5, 0, 10**9])
    if rng.random() < 0.2:
        s.logprobs = rng.choice([-1, 0, 5, 21, 10**6])
    if rng.random() < 0.2:
        s.stop.extend(rng.choice([[""], ["a"] * 40, ["b" * 1000], ["\n"]]))
    if rng.random() < 0.1:
        s.stop_token_ids.extend([rng.randrange(-(2**31), 2**31)])
    return request


def test_fuzz_grpc(served):
    from overfill_serve._proto.overfill.v1 import generate_pb2 as pb

    rng = random.Random(SEED + 1)
    channel = grpc.insecure_channel(
        f"127.0.0.1:{GRPC_PORT}", options=[("grpc.max_send_message_length", 8 << 20)]
    )
    stream = channel.unary_stream(
        "/overfill.v1.Generate/GenerateStream", response_deserializer=pb.GenerateChunk.FromString
    )
    metadata = [("application", APP)]
    codes: dict[str, int] = {}
    try:
        for i in range(500):
            raw = _grpc_case(rng).SerializeToString()
            if rng.random() < 0.05:  # garbage bytes, or a string field holding invalid UTF-8
                raw = rng.choice([bytes(rng.randrange(256) for _ in range(40)), b"\x1a\x03\xff\xfe\xfd"])
            try:
                list(stream(raw, metadata=metadata, timeout=60))
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
                assert e.details(), (i, code)
            codes[code.name] = codes.get(code.name, 0) + 1
            assert code not in BAD_GRPC, (i, code, raw[:200])
    finally:
        channel.close()
    assert codes.get("OK", 0) > 100 and codes.get("INVALID_ARGUMENT", 0) > 150, codes
    assert _greedy_text()  # still serving
    wait_until(lambda: pools_full(APP), timeout=30, what="KV pools full")


# -- KV channel -------------------------------------------------------------------------------------------

KV_METHODS = ["Challenge", "Handshake", "Release", "RenewLease", "Abort", "Pull", "Describe"]
BAD_KV = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def _kv_call(channel: Any, method: str, raw: bytes, metadata: list[tuple[str, str]]) -> grpc.StatusCode:
    path = f"/overfill.v1.KVTransfer/{method}"
    call = channel.unary_stream(path) if method in ("Pull", "Describe") else channel.unary_unary(path)
    try:
        result = call(raw, metadata=metadata, timeout=10)
        if method in ("Pull", "Describe"):
            list(result)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def _kv_case(rng: random.Random, replay: bytes, session: str) -> tuple[str, bytes, list[tuple[str, str]]]:
    from overfill_serve._proto.overfill.v1 import kv_transfer_pb2 as pb
    from overfill_serve.transfer.config import SESSION_KEY

    method = rng.choice(KV_METHODS)
    if method == "Handshake":
        raw = rng.choice(
            [
                replay,  # a recorded, once valid handshake
                pb.HandshakeRequest(client_id="x", server_nonce=rng.randbytes(32), mac=rng.randbytes(32)),
                pb.HandshakeRequest(layout=rng.randbytes(rng.randint(0, 4000)), backend="nixl"),
            ]
        )
        raw = raw if isinstance(raw, bytes) else raw.SerializeToString()
    elif method in ("Pull", "Describe"):
        raw = pb.PullRequest(
            transfer_id=rng.choice(["", "nope", "x" * 1000]), max_chunk_bytes=rng.randrange(2**31)
        ).SerializeToString()
    elif method == "Abort":
        raw = pb.AbortRequest(
            transfer_id=rng.choice(["", "nope"]), reason="r" * rng.randint(0, 5000)
        ).SerializeToString()
    else:
        raw = pb.TransferRef(transfer_id=rng.choice(["", "nope"])).SerializeToString()
    if rng.random() < 0.15:
        raw = rng.randbytes(rng.randint(0, 200))
    token = rng.choice([None, session, "forged", "", "a" * 10_000])
    return method, raw, [(SESSION_KEY, token)] if token is not None else []


def test_fuzz_kv_channel(pairs, monkeypatch):
    from peer_process import SECRET

    from overfill_serve import SamplingParams
    from overfill_serve._proto.overfill.v1 import kv_transfer_pb2 as pb
    from overfill_serve.transfer import auth
    from overfill_serve.transfer.config import TransferConfig
    from overfill_serve.worker.decode_worker import DecodeWorker
    from overfill_serve.worker.prefill_worker import PrefillWorker

    monkeypatch.setenv("OVERFILL_CLUSTER_SECRET", SECRET)
    pair, config = pairs["depth"], TransferConfig(timeout_seconds=2.0)
    prefill = PrefillWorker(pair.teacher, transfer=config, block_size=4, num_kv_blocks=64).start()
    decode = DecodeWorker(pair.student, transfer=config, **decode_kwargs(pair)).start()
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    channel = grpc.insecure_channel(prefill.address)
    try:
        want = [t for out in decode.generate_from(prefill.submit(PROMPT, params)) for t in out.token_ids]
        session = decode.channel(prefill.address).metadata[0][1]
        nonce = pb.ChallengeResponse.FromString(
            channel.unary_unary("/overfill.v1.KVTransfer/Challenge")(b"")
        ).server_nonce
        client_nonce = auth.new_nonce()
        mac = auth.client_mac(auth.load_secret(SECRET), nonce, client_nonce, b"", b"")
        replay = pb.HandshakeRequest(client_id="r", server_nonce=nonce, client_nonce=client_nonce, mac=mac)
        channel.unary_unary("/overfill.v1.KVTransfer/Handshake")(replay.SerializeToString())  # used once
        rng, codes = random.Random(SEED + 2), {}
        for i in range(500):
            method, raw, metadata = _kv_case(rng, replay.SerializeToString(), session)
            code = _kv_call(channel, method, raw, metadata)
            codes[code.name] = codes.get(code.name, 0) + 1
            assert code not in BAD_KV, (i, method, code, raw[:100], metadata)
        assert codes.get("UNAUTHENTICATED", 0) > 100, codes
        got = [t for out in decode.generate_from(prefill.submit(PROMPT, params)) for t in out.token_ids]
        assert got == want
        wait_until(lambda: pool_full(prefill.stats()) and pool_full(decode.stats()))
    finally:
        channel.close()
        decode.stop()
        prefill.stop()
