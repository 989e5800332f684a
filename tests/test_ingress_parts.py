"""The ingress's small parts, each alone: admission slots that cannot leak, request metrics for a request that
failed before its first token, client mistakes logged as one INFO line, the refusal to serve the network
without an API key, and `/health`'s readiness status."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from overfill_serve.errors import InvalidRequestError, ModelConfigError, OverloadedError, TransferError
from overfill_serve.serve.admission import Admission
from overfill_serve.serve.config import ServeConfig
from overfill_serve.serve.log_filter import SERVE_LOGGER, quiet_client_errors
from overfill_serve.serve.pool_monitor import PoolMonitor, PoolStatus


async def _numbers(n: int, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("boom")
        yield i


def test_admission_slots_come_back_however_the_stream_ends():
    admission = Admission(limit=2)

    async def run() -> None:
        done = admission.hold(admission.admit(), _numbers(3))
        assert [i async for i in done] == [0, 1, 2]
        failed = admission.hold(admission.admit(), _numbers(3, fail_at=1))
        with pytest.raises(RuntimeError):
            async for _ in failed:
                pass
        closed = admission.hold(admission.admit(), _numbers(3))
        await closed.__anext__()
        await closed.aclose()  # type: ignore[attr-defined]

    asyncio.run(run())
    assert admission.inflight == 0


def test_a_stream_never_iterated_releases_its_slot():
    """A client gone before the response body started: nobody runs the generator."""
    admission = Admission(limit=1)
    stream = admission.hold(admission.admit(), _numbers(3))
    with pytest.raises(OverloadedError):
        admission.admit()
    del stream
    gc.collect()
    assert admission.inflight == 0
    slot = admission.admit()
    slot.release()
    slot.release()  # idempotent
    assert admission.inflight == 0


def test_request_metrics_count_a_request_without_tokens():
    from overfill_serve.serve.metrics import RequestMetrics

    RequestMetrics("pair").observe("overfill", 5, 0, None, 0.1, "error")  # Ray refuses Counter.inc(0)


def _failing_record(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except type(error):
        import sys

        return logging.getLogger(SERVE_LOGGER).makeRecord(
            SERVE_LOGGER, logging.ERROR, __file__, 1, "Request failed.", (), sys.exc_info()
        )


def test_client_mistakes_are_logged_at_info_without_a_stack():
    quiet_client_errors()
    quiet_client_errors()  # installed once
    logger = logging.getLogger(SERVE_LOGGER)
    assert sum(type(f).__name__ == "ClientErrorFilter" for f in logger.filters) == 1
    record = _failing_record(InvalidRequestError("temperature must be >= 0", field="temperature"))
    assert logger.filter(record)
    assert record.levelno == logging.INFO and record.exc_info is None
    assert "InvalidRequestError: temperature must be >= 0" in record.getMessage()
    from ray.serve.exceptions import gRPCStatusError

    wrapped = gRPCStatusError(InvalidRequestError("bad role", field="messages[0].role"))
    record = _failing_record(wrapped)  # what Serve logs for a gRPC call that set its status, then raised
    assert logger.filter(record) and record.levelno == logging.INFO and "bad role" in record.getMessage()
    server_side = _failing_record(TransferError("peer died"))
    assert logger.filter(server_side)
    assert server_side.levelno == logging.ERROR and server_side.exc_info is not None


@pytest.mark.parametrize(
    "host,grpc,args,refused",
    [
        ("127.0.0.1", False, {}, False),
        ("localhost", False, {}, False),
        ("0.0.0.0", False, {}, True),
        ("my-host", False, {}, True),
        ("127.0.0.1", True, {}, True),  # Ray Serve's gRPC proxy listens on every interface
        ("0.0.0.0", True, {"api_key": "k" * 16}, False),
        ("0.0.0.0", True, {"allow_unauthenticated": True}, False),
    ],
)
def test_no_api_key_on_the_network_unless_said_so(host, grpc, args, refused, monkeypatch):
    monkeypatch.delenv("OVERFILL_API_KEY", raising=False)
    config = ServeConfig.from_args(args)
    if refused:
        with pytest.raises(ModelConfigError, match="allow_unauthenticated"):
            config.check_exposure(host, grpc)
    else:
        config.check_exposure(host, grpc)


def test_health_is_ready_only_with_both_pools():
    pools: dict[str, PoolStatus] = {}
    monitor = PoolMonitor("app", 60.0, read=lambda _: pools)
    assert monitor.report()["status"] == "starting"  # not read yet
    pools.update(
        prefill=PoolStatus("prefill", "PrefillServer", 1, 1),
        decode=PoolStatus("decode", "DecodeServer", 0, 1),
    )
    monitor.refresh()
    assert monitor.report()["status"] == "degraded"
    pools["decode"] = PoolStatus("decode", "DecodeServer", 1, 1)
    monitor.refresh()
    assert monitor.report()["status"] == "ok"


def test_replica_metrics_take_a_transfer_of_no_bytes():
    """A request that ended on its first token pulls no KV (0 bytes): Ray refuses Counter.inc(0)."""
    from overfill_serve.serve.metrics import ReplicaMetrics
    from overfill_serve.transfer.channel import TransferStats

    ReplicaMetrics("decode", "pair").observe_transfer(TransferStats("t", "grpc", 0, 0.01, 0.0))
