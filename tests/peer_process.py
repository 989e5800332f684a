"""A prefill or decode worker in a process of its own, driven over a pipe: the other side of the KV channel
in the two-process tests. Spawned (not forked), so the child starts clean like a real peer would."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
import traceback
from typing import Any

SECRET = "test-cluster-secret-0123456789abcdef"


def _serve(
    conn: Any, kind: str, model_dir: str, worker_kwargs: dict, transfer_kwargs: dict, chunk_delay: float
) -> None:
    os.environ["OVERFILL_CLUSTER_SECRET"] = SECRET
    from overfill_serve.transfer.config import TransferConfig
    from overfill_serve.worker.decode_worker import DecodeWorker
    from overfill_serve.worker.prefill_worker import PrefillWorker

    config = TransferConfig(**transfer_kwargs)
    if kind == "prefill":
        worker: Any = PrefillWorker(model_dir, transfer=config, **worker_kwargs).start()
        if chunk_delay:

            def slow(header: bytes, payload: bytes) -> tuple[bytes, bytes]:
                time.sleep(chunk_delay)
                return header, payload

            worker.server.servicer.chunk_filter = slow
    else:
        worker = DecodeWorker(model_dir, transfer=config, **worker_kwargs).start()
    conn.send(("ready", getattr(worker, "address", None)))
    while True:
        command, args = conn.recv()
        try:
            if command == "stop":
                worker.stop()
                conn.send(("ok", None))
                return
            if command == "submit":
                conn.send(("ok", worker.submit(*args)))  # prompt, SamplingParams -> TransferTicket
            elif command == "generate":
                conn.send(("ok", [t for out in worker.generate_from(*args) for t in out.token_ids]))
            elif command == "abort":
                worker.abort_transfer(*args)
                conn.send(("ok", None))
            elif command == "stats":
                conn.send(("ok", worker.stats()))
        except Exception as e:  # report the typed error by name to the test
            conn.send(("error", (type(e).__name__, str(e), traceback.format_exc())))


class PeerProcess:
    def __init__(
        self,
        kind: str,
        model_dir: str,
        worker_kwargs: dict | None = None,
        transfer_kwargs: dict | None = None,
        chunk_delay: float = 0.0,
    ) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_serve,
            args=(child, kind, str(model_dir), worker_kwargs or {}, transfer_kwargs or {}, chunk_delay),
            daemon=True,
        )
        self.process.start()
        status, self.address = self._recv(120)
        assert status == "ready"

    def call(self, command: str, *args: Any, timeout: float = 60) -> Any:
        self.send(command, *args)
        return self.result(timeout)

    def send(self, command: str, *args: Any) -> None:
        self.conn.send((command, args))

    def result(self, timeout: float = 60) -> Any:
        status, value = self._recv(timeout)
        if status == "error":
            raise PeerError(*value)
        return value

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no clean-up of any kind
        self.process.join(10)

    def close(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(EOFError, OSError, TimeoutError):
                self.call("stop", timeout=20)
            self.process.kill()
        self.process.join(10)

    def _recv(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"peer process did not answer within {timeout}s")
        return self.conn.recv()


class PeerError(Exception):
    def __init__(self, name: str, message: str, trace: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name, self.message, self.trace = name, message, trace
