"""Admission across real workers: device caps, fair start order, condition changes, reclaim.

The same suite runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from bgtransfer import BackgroundTransferRequest, TransferStatus
from tests.conftest import STORES, Deployment, wait_for
from tests.httpserver import FileServer

pytestmark = pytest.mark.parametrize("deployment", STORES, indirect=True)


def add(dep: Deployment, srv: FileServer, app: str, name: str, **kw) -> BackgroundTransferRequest:
    req = BackgroundTransferRequest(srv.url(f"/{app}/{name}"), download_location=f"/shared/transfers/{name}", **kw)
    dep.service(app).add(req)
    return req


def status(dep: Deployment, app: str, req: BackgroundTransferRequest) -> TransferStatus:
    return dep.service(app).find(req.request_id).transfer_status


def test_cap_and_round_robin_across_two_workers(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(150_000)
    apps = {"a": 14, "b": 13, "c": 13}
    for app, n in apps.items():
        for i in range(n):
            server.put(f"/{app}/{i}.bin", data)
            server.behave(f"/{app}/{i}.bin", rate=1_000_000)
    svc = deployment.service("a")
    svc.set_conditions(network="none")  # everything waits until all 40 are queued
    reqs = {app: [add(deployment, server, app, f"{i}.bin") for i in range(n)] for app, n in apps.items()}
    assert {status(deployment, "b", r) for r in reqs["b"]} == {TransferStatus.WAITING}
    deployment.worker(concurrency=4)
    deployment.worker(concurrency=4)
    svc.set_conditions(network="wifi")
    for app, rs in reqs.items():
        for r in rs:
            assert deployment.wait_done(app, r.request_id, 120).transfer_error is None
    server.wait_idle()
    assert server.max_concurrent == 2, "the device cap of 2 holds across both workers"
    starts = sorted(server.requests, key=lambda r: r.started)
    order = [(r.path.split("/")[1], int(r.path.split("/")[2].split(".")[0])) for r in starts]
    assert len(order) == 40
    for n in range(1, 40):  # fair at every moment: no app more than 2 starts ahead of another still waiting
        counts = {app: sum(1 for a, _ in order[:n] if a == app) for app in apps}
        live = [counts[a] for a in apps if counts[a] < apps[a]]
        assert not live or max(counts.values()) - min(live) <= 2, order[:n]
    for app in apps:  # arrival order within an app, up to two starting at the same moment
        idx = [i for a, i in order if a == app]
        assert all(b > a or a - b == 1 for a, b in zip(idx, idx[1:], strict=False)), (app, idx)


def test_condition_changes_start_the_right_requests(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(50_000)
    for name in ("cell.bin", "wifi.bin", "batt.bin", "ext.bin"):
        server.put(f"/a/{name}", data)
    svc = deployment.service("a")
    svc.set_conditions(network="cellular")
    # no periodic pass: only the change itself may start a waiting request
    deployment.worker(BGTRANSFER_SWEEP_INTERVAL="600")
    cell = add(deployment, server, "a", "cell.bin", transfer_preferences="ALLOW_CELLULAR")
    wifi = add(deployment, server, "a", "wifi.bin")
    assert deployment.wait_done("a", cell.request_id).transfer_error is None
    assert status(deployment, "a", wifi) == TransferStatus.WAITING_FOR_WIFI
    changed = time.monotonic()
    svc.set_conditions(network="wifi")
    deployment.wait_done("a", wifi.request_id, 10)
    assert time.monotonic() - changed < 10

    svc.set_conditions(power="battery")
    batt = add(deployment, server, "a", "batt.bin", transfer_preferences="ALLOW_BATTERY")
    ext = add(deployment, server, "a", "ext.bin")
    assert deployment.wait_done("a", batt.request_id).transfer_error is None
    assert status(deployment, "a", ext) == TransferStatus.WAITING_FOR_EXTERNAL_POWER
    svc.set_conditions(power="external")
    assert deployment.wait_done("a", ext.request_id, 10).transfer_error is None
    assert [r.path for r in server.requests] == ["/a/cell.bin", "/a/wifi.bin", "/a/batt.bin", "/a/ext.bin"]


def test_battery_saver_and_foreground(deployment: Deployment, server: FileServer) -> None:
    server.put("/fg/x.bin", b"x" * 1000)
    server.put("/bg/y.bin", b"y" * 1000)
    svc = deployment.service("fg")
    svc.set_conditions(power="battery-saver")
    deployment.worker(BGTRANSFER_SWEEP_INTERVAL="600")
    x = add(deployment, server, "fg", "x.bin", transfer_preferences="ALLOW_BATTERY")
    y = add(deployment, server, "bg", "y.bin", transfer_preferences="ALLOW_BATTERY")
    wait_for(lambda: status(deployment, "fg", x) ==
             TransferStatus.WAITING_FOR_EXTERNAL_POWER_DUE_TO_BATTERY_SAVER_MODE, 10, 0.05, "battery saver wait")
    svc.set_foreground(ttl=60)
    assert deployment.wait_done("fg", x.request_id, 10).transfer_error is None
    assert status(deployment, "bg", y) == TransferStatus.WAITING_FOR_EXTERNAL_POWER_DUE_TO_BATTERY_SAVER_MODE
    assert deployment.service("bg").find(y.request_id).wait_reason == "battery saver mode"


def test_killed_worker_slot_is_reclaimed_without_exceeding_the_cap(deployment: Deployment,
                                                                  server: FileServer) -> None:
    data = os.urandom(1_500_000)
    for i in range(4):
        server.put(f"/a/{i}.bin", data)
        server.behave(f"/a/{i}.bin", rate=500_000)
    first = deployment.worker()
    reqs = [add(deployment, server, "a", f"{i}.bin") for i in range(4)]
    svc = deployment.service("a")
    wait_for(lambda: sum(svc.find(r.request_id).bytes_received > 200_000 for r in reqs) == 2, 30, 0.05,
             "two transfers under way")
    first.kill()
    server.wait_idle()
    held = {r.request_id: svc.find(r.request_id).bytes_received for r in reqs}
    assert sum(1 for v in held.values() if v > 0) == 2
    deployment.worker()
    for r in reqs:
        assert deployment.wait_done("a", r.request_id, 60).transfer_error is None
    server.wait_idle()
    assert server.max_concurrent == 2
    resumed = [r for r in server.requests if r.range_start]
    assert len(resumed) == 2, "both interrupted transfers resumed from their bytes"


@pytest.mark.parametrize("chain_seconds, messages", [("10", 1), ("0", 5)])
def test_a_pool_process_runs_what_it_admits_without_a_message(
        deployment: Deployment, server: FileServer, chain_seconds: str, messages: int) -> None:
    """A transfer's end admits the next request; with chaining, the same process runs it at once
    (one broker message for five transfers), without it each start is a message of its own."""
    data = os.urandom(20_000)
    for i in range(5):
        server.put(f"/a/c{i}.bin", data)
    deployment.env.update(BGTRANSFER_MAX_CONCURRENT_PER_DEVICE="1", BGTRANSFER_CHAIN_SECONDS=chain_seconds,
                          BGTRANSFER_SWEEP_INTERVAL="60")  # the client's passes use the same cap
    svc = deployment.service("a")
    svc.set_conditions(network="none")
    w = deployment.worker(concurrency=1)
    reqs = [add(deployment, server, "a", f"c{i}.bin") for i in range(5)]
    svc.set_conditions(network="wifi")  # admits one (the cap), and sends one message
    for r in reqs:
        deployment.wait_done("a", r.request_id)
    assert all((deployment.sandbox("a") / f"c{i}.bin").read_bytes() == data for i in range(5))
    assert len(re.findall(r"Task bgtransfer\.transfer\[[-0-9a-f]+\] received", w.text())) == messages


def test_weighted_fair_share_splits_starts_by_weight(deployment: Deployment, server: FileServer) -> None:
    """Weights a=3, b=1 (a setting every process of the device shares), both apps backlogged:
    of the first 20 starts about 15 are a's, and b is never starved."""
    data = os.urandom(30_000)
    for app in ("a", "b"):
        for i in range(20):
            server.put(f"/{app}/{i}.bin", data)
            server.behave(f"/{app}/{i}.bin", rate=600_000)
    deployment.env.update(BGTRANSFER_APP_WEIGHTS="a=3,b=1", BGTRANSFER_MAX_OUTSTANDING_PER_APP="30")
    svc = deployment.service("a")
    svc.set_conditions(network="none")
    reqs = {app: [add(deployment, server, app, f"{i}.bin") for i in range(20)] for app in ("b", "a")}
    deployment.worker(concurrency=2)
    svc.set_conditions(network="wifi")
    for app, rs in reqs.items():
        for r in rs:
            assert deployment.wait_done(app, r.request_id, 120).transfer_error is None
    starts = [r.path.split("/")[1] for r in sorted(server.requests, key=lambda r: r.started)]
    assert 14 <= starts[:20].count("a") <= 16, starts
    assert "b" in starts[:4], starts  # its first turn comes at once
