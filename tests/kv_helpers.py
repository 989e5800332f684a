"""Small helpers shared by the KV-channel, NIXL and worker tests."""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from peer_process import SECRET

HAS_NIXL = importlib.util.find_spec("nixl") is not None
BACKENDS = ["grpc", pytest.param("nixl", marks=pytest.mark.skipif(not HAS_NIXL, reason="no nixl"))]


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.02)


def pool_full(stats: Any) -> bool:
    """Every block of a worker's pool free (its `WorkerStats`)."""
    return stats.free_blocks == stats.total_blocks


def wait_pools_returned(prefill: Any, decode: Any) -> None:
    """Wait until a prefill and a decode worker hold no block and the prefill side no open transfer."""
    wait_until(lambda: pool_full(prefill.stats()) and prefill.stats().open_transfers == 0, what="prefill")
    wait_until(lambda: pool_full(decode.stats()), what="decode pool")


def decode_kwargs(pair: Any, dtype: str = "float32") -> dict[str, Any]:
    """A decode worker for a test pair (a depth-pruned student needs the teacher's depth: 4 layers)."""
    return dict(
        dtype=dtype, block_size=4, num_kv_blocks=96, num_teacher_layers=4 if pair.kept_layers else None
    )


def fragment(pool: Any, rng: Any) -> list[int]:
    """Leave a shuffled half of the pool free, so a transfer's blocks are scattered; returns the held half."""
    held = pool.allocate(pool.num_blocks)
    rng.shuffle(held)
    pool.free(held[: pool.num_blocks // 2])
    return held[pool.num_blocks // 2 :]


@contextlib.contextmanager
def worker_pair(pair: Any, config: Any) -> Iterator[tuple[Any, Any]]:
    """A started prefill and decode worker of a test pair (block size 4) sharing the test cluster secret, NIXL's
    UCX on loopback; stopped after."""
    from overfill_serve.worker.decode_worker import DecodeWorker
    from overfill_serve.worker.prefill_worker import PrefillWorker

    with pytest.MonkeyPatch.context() as env:
        env.setenv("OVERFILL_CLUSTER_SECRET", SECRET)
        env.setenv("UCX_NET_DEVICES", "lo")
        prefill = PrefillWorker(pair.teacher, transfer=config, block_size=4, num_kv_blocks=64).start()
        decode = DecodeWorker(pair.student, transfer=config, **decode_kwargs(pair)).start()
        try:
            yield prefill, decode
        finally:
            decode.stop()
            prefill.stop()
