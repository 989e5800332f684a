"""A prefill worker in a process of its own, driven over a pipe (the pattern of tests/peer_process.py), that also
stamps when each transfer's prefill completed, so a benchmark can time the KV transfer apart from the prefill."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import operator
import os
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the two-process harness the KV-channel tests use

from peer_process import SECRET  # noqa: E402  (the cluster secret the test peers use)

from overfill_serve.sampling_params import SamplingParams  # noqa: E402

GREEDY_1 = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
TIMEOUT = 300.0  # TransferConfig.timeout_seconds: the box is shared, and a stalled run should fail, not hang


def _prefill_serve(conn, model_dir: str, worker_kwargs: dict, transfer_kwargs: dict) -> None:
    """Child: a PrefillWorker driven over a pipe, as in tests/peer_process.py, that also records when each
    transfer's prefill completed (time.perf_counter(): CLOCK_MONOTONIC, comparable across processes)."""
    import threading

    os.environ["OVERFILL_CLUSTER_SECRET"] = SECRET
    from overfill_serve.transfer.config import TransferConfig
    from overfill_serve.worker.prefill_worker import PrefillWorker

    worker = PrefillWorker(model_dir, transfer=TransferConfig(**transfer_kwargs), **worker_kwargs).start()
    done: dict[str, float] = {}
    cond = threading.Condition()
    complete = worker.registry.complete

    def timed_complete(transfer_id, request, completion):  # the engine thread, when a prefill is done
        at = time.perf_counter()
        complete(transfer_id, request, completion)
        with cond:
            done[transfer_id] = at
            cond.notify_all()

    worker.registry.complete = timed_complete  # type: ignore[method-assign]
    conn.send(("ready", worker.address))
    while True:
        command, args = conn.recv()
        try:
            if command == "stop":
                worker.stop()
                conn.send(("ok", None))
                return
            if command == "submit":
                conn.send(("ok", worker.submit(*args)))  # prompt, SamplingParams -> TransferTicket
            elif command == "done_at":  # block until the transfer's prefill has completed
                transfer_id, timeout = args
                with cond:
                    ok = cond.wait_for(partial(operator.contains, done, transfer_id), timeout)
                conn.send(
                    ("ok", done.pop(transfer_id)) if ok else ("error", f"prefill of {transfer_id} not done")
                )
        except Exception as e:  # noqa: BLE001 - reported to the parent
            conn.send(("error", f"{type(e).__name__}: {e}"))


class PrefillPeer:
    def __init__(self, model_dir: Path, worker_kwargs: dict, transfer_kwargs: dict) -> None:
        ctx = mp.get_context("spawn")  # a clean child, like a real peer
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_prefill_serve, args=(child, str(model_dir), worker_kwargs, transfer_kwargs), daemon=True
        )
        self.process.start()
        self.address = self.call("ready?", timeout=300, send=False)

    def call(self, command: str, *args, timeout: float = 300, send: bool = True):
        if send:
            self.conn.send((command, args))
        if not self.conn.poll(timeout):
            raise TimeoutError(f"prefill process did not answer {command!r} within {timeout}s")
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"prefill process: {value}")
        return value

    def close(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(EOFError, OSError, TimeoutError, RuntimeError):
                self.call("stop", timeout=20)
            self.process.kill()
        self.process.join(10)
