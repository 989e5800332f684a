"""Placement feasibility and the router's pool view: what an operator is told when a pool cannot be placed,
and which modes keep serving."""

from __future__ import annotations

import pytest

from overfill_serve.errors import PoolStartingError, PoolUnavailableError
from overfill_serve.request import Mode
from overfill_serve.serve.placement import NodeInfo, label_matches, placement_problem
from overfill_serve.serve.pool_monitor import PoolMonitor, PoolStatus

HEAD = NodeInfo("head", {"CPU": 4.0})
H100 = NodeInfo("p", {"CPU": 8.0, "GPU": 8.0, "accelerator_type:H100": 1.0}, {"overfill.io/pool": "prefill"})
L4 = NodeInfo("d", {"CPU": 4.0, "GPU": 1.0, "accelerator_type:L4": 1.0}, {"overfill.io/pool": "decode"})
NODES = [HEAD, H100, L4]


def test_label_selector_semantics():
    labels = {"overfill.io/pool": "decode", "zone": "a"}
    assert label_matches({}, labels)
    assert label_matches({"overfill.io/pool": "decode"}, labels)
    assert not label_matches({"overfill.io/pool": "prefill"}, labels)
    assert label_matches({"overfill.io/pool": "!prefill"}, labels)
    assert label_matches({"zone": "in(a, b)"}, labels)
    assert not label_matches({"zone": "!in(a,b)"}, labels)
    assert not label_matches({"rack": "r1"}, labels)  # a missing label matches no value
    assert label_matches({"rack": "!r1"}, labels)


def test_feasible_requirements_have_no_problem():
    assert placement_problem({"CPU": 1, "accelerator_type:L4": 0.001}, {}, NODES) is None
    assert placement_problem({"GPU": 8}, {"overfill.io/pool": "prefill"}, NODES) is None


def test_missing_resource_is_named():
    problem = placement_problem({"CPU": 0.5, "accelerator_type:B200": 0.001}, {}, NODES)
    assert problem is not None and problem.startswith("no alive node has accelerator_type:B200 >= 0.001 (")
    # the label narrows the candidates: an L4 exists, but not in the prefill pool
    problem = placement_problem({"accelerator_type:L4": 0.001}, {"overfill.io/pool": "prefill"}, NODES)
    assert problem is not None and "labels {'overfill.io/pool': 'prefill'}" in problem
    assert "accelerator_type:L4" in problem


def test_unmatched_label_lists_the_labels_there_are():
    problem = placement_problem({"CPU": 1}, {"overfill.io/pool": "decode-a10"}, NODES)
    assert problem is not None and "label_selector {'overfill.io/pool': 'decode-a10'}" in problem
    assert "overfill.io/pool=decode" in problem and "overfill.io/pool=prefill" in problem


def test_resources_spread_over_nodes_do_not_fit_one():
    problem = placement_problem({"GPU": 8, "accelerator_type:L4": 0.001}, {}, NODES)
    assert problem is not None and "no single alive node" in problem
    assert placement_problem({"CPU": 1}, {}, []) == "no alive node in the cluster"


def _monitor(pools: dict[str, PoolStatus]) -> PoolMonitor:
    monitor = PoolMonitor("app", period_s=60, read=lambda app: pools)
    monitor.refresh()
    return monitor


def test_monitor_refuses_only_the_modes_that_need_an_unplaceable_pool(caplog):
    why = "no alive node has accelerator_type:B200 >= 0.001"
    with caplog.at_level("WARNING"):
        monitor = _monitor(
            {
                "prefill": PoolStatus("prefill", "PrefillServer", 1, 1),
                "decode": PoolStatus("decode", "DecodeServer", 0, 1, why),
            }
        )
    assert any(why in r.getMessage() and "decode pool" in r.getMessage() for r in caplog.records)
    monitor.check(Mode.FULL)
    for mode in (Mode.OVERFILL, Mode.PRUNED):
        with pytest.raises(PoolUnavailableError, match="decode pool .*accelerator_type:B200"):
            monitor.check(mode)
    report = monitor.report()
    assert report["status"] == "degraded" and report["pools"]["decode"]["problem"] == why


def test_monitor_refuses_a_starting_pool_at_once_and_keeps_old_state_on_read_errors():
    # no replica running yet, but one can be placed (start-up, or the autoscaler adding a node): 503 at once
    # with a short Retry-After, never a wait in Serve's router; the other pool's mode keeps working
    monitor = _monitor(
        {
            "prefill": PoolStatus("prefill", "PrefillServer", 0, 1),
            "decode": PoolStatus("decode", "DecodeServer", 2, 2),
        }
    )
    for mode in (Mode.OVERFILL, Mode.FULL):
        with pytest.raises(PoolStartingError, match=r"prefill pool .*no running replica yet \(0 of 1"):
            monitor.check(mode)
    monitor.check(Mode.PRUNED)
    assert monitor.report()["status"] == "degraded"

    def broken(app: str) -> dict[str, PoolStatus]:
        raise ConnectionError("controller restarting")

    monitor._read = broken
    monitor.refresh()
    assert monitor.pools["decode"].running == 2


def test_monitor_serves_a_pool_scaling_up_or_scaled_to_zero_and_refuses_before_the_first_read():
    # 1 of 2 running: scaling up, not starting; 0 of 0: scaled to zero, where a waiting request makes Serve
    # start a replica, so it must reach the router
    monitor = _monitor(
        {
            "prefill": PoolStatus("prefill", "PrefillServer", 1, 2),
            "decode": PoolStatus("decode", "DecodeServer", 0, 0),
        }
    )
    for mode in Mode:
        monitor.check(mode)
    unread = PoolMonitor("app", period_s=60, read=lambda app: {})
    with pytest.raises(PoolStartingError, match="not known yet"):
        unread.check(Mode.FULL)
    assert unread.report()["status"] == "starting"


def test_starting_and_unplaceable_pools_answer_503_with_retry_after_and_grpc_unavailable():
    from overfill_serve.serve import grpc_errors
    from overfill_serve.serve.openai_errors import from_exception

    starting = PoolStartingError("the decode pool (DecodeServer) has no running replica yet (0 of 1 started)")
    unplaceable = PoolUnavailableError("the decode pool (DecodeServer) has no replica and cannot get one: x")
    for error, code, retry in ((starting, "pool_starting", "1"), (unplaceable, "pool_unavailable", "30")):
        api = from_exception(error)
        assert (api.status, api.code, api.headers["Retry-After"]) == (503, code, retry)
        status, details = grpc_errors.status_for(error)
        assert status.name == "UNAVAILABLE" and details.endswith(f"retry in {retry} s")


def test_pool_report_for_health_leaves_out_actor_names():
    monitor = _monitor({"decode": PoolStatus("decode", "DecodeServer", 1, 1, None, ("SERVE_REPLICA::x",))})
    assert monitor.report()["pools"]["decode"] == {
        "role": "decode", "deployment": "DecodeServer", "running": 1, "target": 1, "problem": None,
    }  # fmt: skip


def test_a_request_finding_no_replica_rereads_the_pools_at_most_once_per_interval():
    reads = []
    states = iter([0, 0, 1])  # decode replicas running at each read

    def read(app: str) -> dict[str, PoolStatus]:
        reads.append(app)
        return {"decode": PoolStatus("decode", "DecodeServer", next(states), 1)}

    monitor = PoolMonitor("app", period_s=60, read=read)
    monitor.refresh()
    with pytest.raises(PoolStartingError):
        monitor.check(Mode.PRUNED)  # re-read: still none
    with pytest.raises(PoolStartingError):
        monitor.check(Mode.PRUNED)  # within the interval: no re-read
    assert len(reads) == 2
    monitor._rechecked_at -= 1.0  # the interval has passed
    monitor.check(Mode.PRUNED)  # re-read: the replica is up, the request goes through
    assert len(reads) == 3 and monitor.pools["decode"].running == 1
