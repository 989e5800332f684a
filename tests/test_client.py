"""overfill_serve.tools.client against real servers on 127.0.0.1: a stdlib HTTP server serving canned OpenAI
JSON / SSE (the client is under test, not the server), and the gRPC servicer of test_grpc_api."""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from test_grpc_api import PAIR, STUDENT, TEACHER, WORDS, FakeGenerateServicer, serve_grpc

from overfill_serve._proto.overfill.v1 import generate_pb2 as pb
from overfill_serve.errors import OverfillError
from overfill_serve.tools.client import (
    APIConnectionError,
    APIError,
    ClientError,
    GRPCClient,
    GRPCError,
    HTTPClient,
    iter_sse,
    make_request,
)
from overfill_serve.tools.client_cli import add_client_command, run_client

API_KEY = "sk-test"
DELTAS = ["Hel", "lo", ",", " world"]


def _error(message: str, type_: str, param: str | None, code: int | str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _completion_chunk(text: str, finish: str | None) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": PAIR, "choices": [choice]}


def _chat_chunk(delta: dict, finish: str | None) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": PAIR,
        "choices": [choice],
    }


class OpenAIHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # SSE goes out chunked, as uvicorn sends it
    requests: list[tuple[str, str, dict, dict]] = []

    def log_message(self, *args):
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, events: list[str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for event in events:
                data = event.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.write(b"0\r\n\r\n")
        except ConnectionError:
            pass  # the client hung up after an error event: expected

    def do_GET(self):
        self.requests.append(("GET", self.path, dict(self.headers), {}))
        if self.path == "/v1/models":
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "overfill-serve"}
                for m in (PAIR, PAIR + ":full")
            ]
            self._json(200, {"object": "list", "data": data})
        elif self.path == "/-/healthz":
            self._json(200, {})
        else:
            self._json(404, _error("Not Found", "NotFoundError", None, 404))

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(("POST", self.path, dict(self.headers), body))
        if self.headers.get("Authorization") != f"Bearer {API_KEY}":
            return self._json(401, _error("invalid API key", "AuthenticationError", None, 401))
        if body["model"] not in (PAIR, PAIR + ":full"):
            return self._json(
                404, _error(f"The model `{body['model']}` does not exist.", "NotFoundError", "model", 404)
            )
        if body.get("max_tokens", 16) <= 0:
            return self._json(
                400, _error("max_tokens must be positive", "BadRequestError", "max_tokens", 400)
            )
        chat = self.path == "/v1/chat/completions"
        prompt = body.get("prompt", "")
        if not body["stream"]:
            text = "".join(DELTAS)
            usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            kind = "chat.completion" if chat else "text_completion"
            return self._json(
                200,
                {
                    "id": "x-1",
                    "object": kind,
                    "created": 1,
                    "model": body["model"],
                    "choices": [choice],
                    "usage": usage,
                },
            )
        if chat:
            chunks = [_chat_chunk({"role": "assistant", "content": ""}, None)]
            chunks += [_chat_chunk({"content": d}, None) for d in DELTAS] + [_chat_chunk({}, "stop")]
        else:
            chunks = [_completion_chunk(d, None) for d in DELTAS] + [_completion_chunk("", "length")]
        events = [f"data: {json.dumps(c)}\n\n" for c in chunks]
        events.insert(1, ": keep-alive\n\n")
        events[2:4] = [
            events[2][:10],
            events[2][10:] + events[3],
        ]  # one event split over two writes, two in one
        if prompt == "midfail":
            events = events[:2] + [
                f"data: {json.dumps(_error('decode replica died', 'service_unavailable', None, 'overloaded'))}\n\n"
            ]
        elif prompt != "truncate":
            events.append("data: [DONE]\n\n")
        self._sse(events)


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), OpenAIHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- HTTP ---------------------------------------------------------------------------------------------------


def test_sse_parser():
    lines = [
        b"data: a\n",
        b"data: b\r\n",
        b"\n",
        b": comment\n",
        b"\n",
        b"data:c\n",
        b"\n",
        b"data: [DONE]\n",
        b"\n",
    ]
    assert list(iter_sse(lines)) == ["a\nb", "c"]
    with pytest.raises(APIConnectionError):
        list(iter_sse([b"data: a\n", b"\n"]))


def test_http_complete_and_chat(http_url):
    client = HTTPClient(http_url, api_key=API_KEY, timeout=5)
    result = client.complete("Say hi", max_tokens=4, temperature=0.0, stop=None)
    assert (result.text, result.finish_reason, result.model) == ("Hello, world", "length", PAIR)
    assert result.usage["completion_tokens"] == 4
    method, path, headers, body = OpenAIHandler.requests[-1]
    assert (method, path, body["prompt"], body["stream"], body["max_tokens"]) == (
        "POST",
        "/v1/completions",
        "Say hi",
        False,
        4,
    )
    assert "stop" not in body and headers["Authorization"] == f"Bearer {API_KEY}"
    chat = client.chat([{"role": "user", "content": "hi"}], model=PAIR + ":full")
    assert chat.text == "Hello, world" and OpenAIHandler.requests[-1][3]["model"] == PAIR + ":full"
    assert [m["id"] for m in client.models()] == [PAIR, PAIR + ":full"]
    assert client.health()  # /health is a 404 here; falls back to Ray Serve's /-/healthz


def test_http_streams_deltas(http_url):
    client = HTTPClient(http_url, api_key=API_KEY, timeout=5)
    assert list(client.complete("hi", model=PAIR, stream=True, max_tokens=8)) == DELTAS
    assert OpenAIHandler.requests[-1][3]["stream"] is True
    assert list(client.chat([{"role": "user", "content": "hi"}], model=PAIR, stream=True)) == DELTAS


def test_http_errors(http_url):
    client = HTTPClient(http_url, api_key=API_KEY, timeout=5)
    with pytest.raises(APIError) as e:
        client.complete("hi", model="missing")
    assert (e.value.status, e.value.param, e.value.type) == (404, "model", "NotFoundError")
    assert "does not exist" in e.value.message and isinstance(e.value, OverfillError)
    with pytest.raises(APIError) as e:
        list(client.complete("hi", model=PAIR, max_tokens=0, stream=True))
    assert e.value.status == 400 and e.value.param == "max_tokens"
    with pytest.raises(APIError) as e:
        HTTPClient(http_url, api_key="wrong").chat([{"role": "user", "content": "x"}], model=PAIR)
    assert e.value.status == 401
    stream = client.complete("midfail", model=PAIR, stream=True)
    assert next(stream) == DELTAS[0]
    with pytest.raises(APIError) as e:
        list(stream)
    assert (e.value.status, e.value.code) == (503, "overloaded") and "decode replica died" in e.value.message
    with pytest.raises(APIConnectionError):
        list(client.complete("truncate", model=PAIR, stream=True))


def test_http_unreachable():
    client = HTTPClient(f"http://127.0.0.1:{_free_port()}", timeout=2)
    with pytest.raises(APIConnectionError):
        client.models()
    assert not client.health()
    with pytest.raises(ValueError):
        HTTPClient("ftp://x")


# -- gRPC ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_server():
    servicer = FakeGenerateServicer(api_key=API_KEY)
    with serve_grpc(servicer, healthz=True) as target:
        yield target, servicer


def test_make_request():
    r = make_request(
        "hi", model=PAIR, mode="full", request_id="r", max_tokens=3, stop="\n", stop_token_ids=[2], seed=None
    )
    assert (r.text, r.mode, r.request_id, r.sampling.max_tokens, list(r.sampling.stop)) == (
        "hi",
        2,
        "r",
        3,
        ["\n"],
    )
    assert list(r.sampling.stop_token_ids) == [2] and not r.sampling.HasField("seed")
    assert list(make_request([1, 2]).token_ids.ids) == [1, 2]
    assert make_request(messages=[{"role": "user", "content": "x"}]).chat.messages[0].role == "user"
    with pytest.raises(TypeError):
        make_request("hi", top_q=0.5)
    with pytest.raises(TypeError):
        make_request("hi", messages=[])
    with pytest.raises(ValueError):
        make_request("hi", mode="half")


def test_grpc_generate_stream_and_models(grpc_server):
    target, servicer = grpc_server
    with GRPCClient(target, application="app1", api_key=API_KEY, timeout=10) as client:
        chunks = list(client.generate_stream("hi", model=PAIR, max_tokens=3, temperature=0.0))
        assert [c.text for c in chunks] == WORDS[:3] and chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert chunks[-1].usage.completion_tokens == 3 and servicer.params[-1].greedy
        assert servicer.metadata[-1]["application"] == "app1"
        assert servicer.metadata[-1]["authorization"] == f"Bearer {API_KEY}"
        response = client.generate(messages=[{"role": "user", "content": "hi"}], mode="full")
        assert response.text == "".join(WORDS) and response.served_by.decode_model == TEACHER
        models = client.list_models()
        assert [(m.id, m.decode_model) for m in models] == [
            (PAIR, STUDENT),
            (PAIR + ":overfill", STUDENT),
            (PAIR + ":full", TEACHER),
            (PAIR + ":pruned", STUDENT),
        ]
        assert client.health()
        stream = client.generate_stream("hi", max_tokens=8)
        assert next(stream).text == WORDS[0]
        stream.close()  # cancels the call


def test_grpc_errors(grpc_server):
    target, _ = grpc_server
    with GRPCClient(target, api_key=API_KEY, timeout=10) as client:
        with pytest.raises(GRPCError) as e:
            client.generate("hi", top_p=1.5)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.field == "top_p"
        with pytest.raises(GRPCError) as e:
            list(client.generate_stream("hi", model="nope"))
        assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.field is None
    with GRPCClient(target, api_key="wrong", timeout=10) as client, pytest.raises(GRPCError) as e:
        client.generate("hi")
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    with GRPCClient(f"127.0.0.1:{_free_port()}", timeout=5) as client:
        with pytest.raises(APIConnectionError):
            client.list_models()
        assert not client.health()


# -- CLI ----------------------------------------------------------------------------------------------------


def _run(*argv: str) -> tuple[str, str]:
    parser = argparse.ArgumentParser(prog="overfill-serve")
    add_client_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["client", *argv])
    out, err = io.StringIO(), io.StringIO()
    args.func(args, out, err)
    return out.getvalue(), err.getvalue()


def test_cli(http_url, grpc_server):
    target, _ = grpc_server
    out, _ = _run("--url", http_url, "--api-key", API_KEY, "--prompt", "hi", "--stream", "--max-tokens", "4")
    assert out == "Hello, world\n" and OpenAIHandler.requests[-1][3]["model"] == PAIR
    _run("--url", http_url, "--api-key", API_KEY, "--chat", "hi", "--mode", "full")
    _, path, _, body = OpenAIHandler.requests[-1]
    assert (path, body["model"], body["messages"]) == (
        "/v1/chat/completions",
        PAIR + ":full",
        [{"role": "user", "content": "hi"}],
    )
    out, _ = _run("--url", http_url, "--list-models")
    assert out.split() == [PAIR, PAIR + ":full"]
    grpc_args = ("--api", "grpc", "--target", target, "--api-key", API_KEY)
    out, err = _run(*grpc_args, "--prompt", "hi", "--stream", "--max-tokens", "2", "--mode", "pruned", "-v")
    assert out == "Hello,\n" and "finish=length" in err and STUDENT in err
    out, _ = _run(*grpc_args, "--list-models")
    assert out.splitlines()[2].split("\t")[:2] == [PAIR + ":full", "full"]
    with pytest.raises(ClientError):
        run_client(argparse.Namespace(prompt=None, chat=None, list_models=False))


def test_overfill_serve_client_command(http_url):
    """`overfill-serve client` is wired into the CLI, and neither it nor `overfill_serve.tools.client` imports torch."""
    script = (
        "import sys\n"
        "import overfill_serve.tools.client\n"
        "from overfill_serve.tools.cli import main\n"
        f"main(['client', '--url', {http_url!r}, '--list-models'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [PAIR, PAIR + ":full"]
    help_text = subprocess.run(
        [sys.executable, "-m", "overfill_serve", "client", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert help_text.returncode == 0 and "--list-models" in help_text.stdout
