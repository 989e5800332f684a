"""`overfill-serve client`: one request (or the model list) to a running overfill-serve app, over the OpenAI
HTTP API or the gRPC API, with the clients of `overfill_serve.tools.client`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TextIO

from overfill_serve._proto.overfill.v1 import generate_pb2 as pb
from overfill_serve.tools.client import MODES, ClientError, GRPCClient, HTTPClient

API_KEY_ENV = "OVERFILL_API_KEY"


def add_client_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `overfill-serve client` on the CLI's subparsers."""
    p = subparsers.add_parser("client", help="query a running overfill-serve app over HTTP (OpenAI) or gRPC")
    p.add_argument("--api", choices=["http", "grpc"], default="http")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="HTTP base URL")
    p.add_argument("--target", default="127.0.0.1:9000", help="gRPC host:port")
    p.add_argument("--application", default="overfill", help="Ray Serve application name (gRPC)")
    p.add_argument("--api-key", help=f"Bearer API key; default: ${API_KEY_ENV}")
    p.add_argument("--model", help="model id (<pair>, <pair>:full, <pair>:pruned); default: the first listed")
    p.add_argument("--mode", choices=list(MODES), help="override the model id's mode")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="text to complete")
    what.add_argument("--chat", metavar="MESSAGE", help="a user message, sent through the chat template")
    what.add_argument("--list-models", action="store_true")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("-v", "--verbose", action="store_true", help="print finish reason and usage to stderr")
    p.set_defaults(func=run_client)
    return p


def _http_model(client: HTTPClient, model: str | None, mode: str | None) -> str | None:
    if mode is None:
        return model
    base = model or client.default_model()
    pair, _, suffix = base.rpartition(":")
    pair = pair if pair and suffix in MODES else base
    return pair if mode == "overfill" else f"{pair}:{mode}"


def _run_http(args: argparse.Namespace, api_key: str | None, messages: Any, out: TextIO, err: TextIO) -> None:
    hc = HTTPClient(args.url, api_key, args.timeout)
    if args.list_models:
        print("\n".join(m["id"] for m in hc.models()), file=out)
        return
    kw: dict[str, Any] = dict(
        model=_http_model(hc, args.model, args.mode), max_tokens=args.max_tokens, temperature=args.temperature
    )
    if args.stream:
        texts = (
            hc.chat(messages, stream=True, **kw) if messages else hc.complete(args.prompt, stream=True, **kw)
        )
        for text in texts:
            print(text, end="", file=out, flush=True)
        print(file=out)
        return
    result = hc.chat(messages, **kw) if messages else hc.complete(args.prompt, **kw)
    print(result.text, file=out)
    if args.verbose:
        print(f"[{result.model}] finish={result.finish_reason} usage={result.usage}", file=err)


def _run_grpc(args: argparse.Namespace, api_key: str | None, messages: Any, out: TextIO, err: TextIO) -> None:
    with GRPCClient(args.target, args.application, api_key, timeout=args.timeout) as gc:
        if args.list_models:
            for m in gc.list_models():
                mode = pb.Mode.Name(m.mode).removeprefix("MODE_").lower()
                print(f"{m.id}\t{mode}\tprefill={m.prefill_model}\tdecode={m.decode_model}", file=out)
            return
        prompt = None if messages else args.prompt
        kw: dict[str, Any] = dict(messages=messages, model=args.model or "", mode=args.mode)
        kw.update(max_tokens=args.max_tokens, temperature=args.temperature)
        last: pb.GenerateChunk | pb.GenerateResponse | None = None
        if args.stream:
            for last in gc.generate_stream(prompt, **kw):
                print(last.text, end="", file=out, flush=True)
            print(file=out)
        else:
            last = gc.generate(prompt, **kw)
            print(last.text, file=out)
    if args.verbose and last is not None:
        reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
        sb, usage = last.served_by, last.usage
        print(
            f"[{pb.Mode.Name(sb.mode)} {sb.prefill_model} -> {sb.decode_model}] finish={reason} "
            f"usage={usage.prompt_tokens}+{usage.completion_tokens} tokens",
            file=err,
        )


def run_client(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
    """`overfill-serve client`: one request (or the model list) over HTTP or gRPC, printed to `out`."""
    if args.prompt is None and args.chat is None and not args.list_models:
        raise ClientError("give --prompt, --chat or --list-models")
    api_key = args.api_key or os.environ.get(API_KEY_ENV)
    messages = [{"role": "user", "content": args.chat}] if args.chat is not None else None
    (_run_http if args.api == "http" else _run_grpc)(args, api_key, messages, out, err)
