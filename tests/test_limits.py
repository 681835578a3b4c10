"""Bandwidth limits held across real worker processes.

The rate is measured on the client side (bytes delivered over the time from the first add to
the last completion): the server's own timings would show its socket buffers filling, not the
limit. Only the upper side is asserted, as a limit is a ceiling; the floor is loose.
"""

from __future__ import annotations

import os
import time

import sqlalchemy as sa

from bgtransfer import BackgroundTransferRequest
from tests.conftest import Deployment, wait_for
from tests.httpserver import FileServer

MB = 1_000_000
RUNNING = sa.text("SELECT count(*) FROM bgt_requests WHERE device = :device AND phase = 'running'")


def download_all(dep: Deployment, server: FileServer, paths: list[str], size: int) -> tuple[float, int]:
    """Add a download per path, wait for all; (bytes per second overall, most running at once)."""
    svc = dep.service("app")
    reqs = [BackgroundTransferRequest(server.url(p), download_location=f"/shared/transfers{p}") for p in paths]
    started = time.monotonic()
    for r in reqs:
        svc.add(r)
    most = 0

    def done() -> bool:
        nonlocal most
        with svc.store.tx(read=True) as conn:  # (not the server's count: its socket buffers fill at once)
            running = conn.execute(RUNNING, {"device": dep.device}).scalar_one()
        most = max(most, running)
        return all(svc.find(r.request_id).transfer_status.value == "COMPLETED" for r in reqs)

    wait_for(done, 120, 0.1, "the downloads")
    elapsed = time.monotonic() - started
    for r in reqs:
        assert svc.find(r.request_id).transfer_error is None
    return size * len(paths) / elapsed, most


def test_a_device_limit_holds_across_workers(deployment: Deployment, server: FileServer) -> None:
    """2 MB/s for the device, two workers, four downloads at once: about 2 MB/s in all, not 8."""
    data = os.urandom(3 * MB)
    paths = [f"/r{i}.bin" for i in range(4)]
    for p in paths:
        server.put(p, data)
    deployment.env.update(BGTRANSFER_MAX_RATE_PER_DEVICE=str(2 * MB), BGTRANSFER_MAX_CONCURRENT_PER_DEVICE="4")
    deployment.worker(concurrency=2)
    deployment.worker(concurrency=2)
    rate, most = download_all(deployment, server, paths, len(data))
    for p in paths:
        assert (deployment.sandbox("app") / p[1:]).read_bytes() == data
    assert most == 4  # shared by four at once, across both workers
    assert 0.5 * MB < rate < 1.3 * 2 * MB, rate  # unlimited, this server sends hundreds of MB/s


def test_a_transfer_limit_holds_for_one_download(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(2 * MB)
    server.put("/one.bin", data)
    deployment.env.update(BGTRANSFER_MAX_RATE_PER_TRANSFER=str(MB))
    deployment.worker(concurrency=1)
    rate, _ = download_all(deployment, server, ["/one.bin"], len(data))
    assert (deployment.sandbox("app") / "one.bin").read_bytes() == data
    assert 0.3 * MB < rate < 1.3 * MB, rate


def test_an_app_over_its_daily_quota_waits_and_the_metrics_show_it(deployment: Deployment, server: FileServer) -> None:
    """A quota of 1 MB a day for app q: two 600 KB downloads run (the second starts while q is
    under it), the third waits and says why; the store's metrics show the use against the quota."""
    from bgtransfer._metrics import StoreCollector

    data = os.urandom(600_000)
    for i in range(3):
        server.put(f"/q{i}.bin", data)
    deployment.env.update(BGTRANSFER_APP_DAILY_BYTES="q=1000000", BGTRANSFER_MAX_CONCURRENT_PER_DEVICE="1")
    deployment.worker(concurrency=1)
    svc = deployment.service("q")
    reqs = [BackgroundTransferRequest(server.url(f"/q{i}.bin"), download_location=f"/shared/transfers/q{i}.bin")
            for i in range(3)]
    for r in reqs:
        svc.add(r)
    for r in reqs[:2]:
        assert deployment.wait_done("q", r.request_id).transfer_error is None
    waiting = wait_for(lambda: (r := svc.find(reqs[2].request_id)) and "daily byte quota" in (r.wait_reason or "")
                       and r, 10, 0.1, "the quota's wait reason")
    assert waiting.transfer_status.value == "WAITING" and waiting.bytes_received == 0
    assert len(server.requests_for("/q2.bin")) == 0
    samples = {(m.name, s.labels["app"]): s.value for m in StoreCollector(deployment.settings).collect()
               for s in m.samples if m.name.startswith("bgtransfer_app_daily")}
    assert samples == {("bgtransfer_app_daily_bytes", "q"): 1_200_000,
                       ("bgtransfer_app_daily_quota_bytes", "q"): 1_000_000}
