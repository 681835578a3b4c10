"""Metrics from a real prefork worker: the counters equal the bytes that moved, summed over its children."""

from __future__ import annotations

import os
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bgtransfer import BackgroundTransferRequest
from bgtransfer._metrics import retry_reason
from tests.conftest import Deployment, wait_for
from tests.httpserver import FileServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == want for k, want in labels.items()))


def test_counters_equal_the_bytes_moved_across_children(deployment: Deployment, server: FileServer) -> None:
    sizes = {f"/{i}.bin": 200_000 + i * 100_000 for i in range(6)}
    for path, size in sizes.items():
        server.put(path, os.urandom(size))
        server.behave(path, rate=2_000_000)  # slow enough that both pool children work at once
    server.behave("/0.bin", rate=2_000_000, drop_after=50_000)  # a retry and a resume
    (deployment.sandbox("b") / "up.bin").write_bytes(os.urandom(123_456))
    port = free_port()
    worker = deployment.worker(concurrency=2, BGTRANSFER_METRICS_PORT=str(port),
                               BGTRANSFER_METRICS_ADDR="127.0.0.1")
    a, b = deployment.service("a"), deployment.service("b")
    reqs = [BackgroundTransferRequest(server.url(p), download_location=f"/shared/transfers{p}") for p in sizes]
    for r in reqs:
        a.add(r)
    up = BackgroundTransferRequest(server.url("/up"), "POST", upload_location="/shared/transfers/up.bin")
    b.add(up)
    for r in reqs:
        assert deployment.wait_done("a", r.request_id).transfer_error is None
    assert deployment.wait_done("b", up.request_id).transfer_error is None
    server.wait_idle()
    m = scrape(port)
    dev = deployment.device
    sent = sum(server.bytes_sent(p) for p in sizes)
    assert sent == sum(sizes.values())  # the resume fetched only what was missing
    assert total(m, "bgtransfer_transfer_bytes_total", device=dev, app="a", direction="download") == sent
    assert total(m, "bgtransfer_transfer_bytes_total", app="b", direction="upload") == 123_456
    assert total(m, "bgtransfer_completions_total", app="a", outcome="completed") == 6
    assert total(m, "bgtransfer_completions_total", app="b", direction="upload", outcome="completed") == 1
    assert total(m, "bgtransfer_resumed_bytes_total", app="a") == 50_000
    assert total(m, "bgtransfer_retries_total", app="a") == 1
    assert total(m, "bgtransfer_transfer_duration_seconds_count", direction="download") == 6
    assert total(m, "bgtransfer_transfer_rate_bytes_per_second_count", direction="download") == 7  # 7 attempts
    assert total(m, "bgtransfer_requests", device=dev, status="COMPLETED") == 7
    assert total(m, "bgtransfer_device_max_concurrent_transfers", device=dev) == 2
    assert total(m, "bgtransfer_admission_decisions_total", device=dev, decision="admit") >= 7
    # summed across children: both pool children wrote their own files, and the endpoint adds them up
    metrics_dir = next((Path(deployment.env["BGTRANSFER_DATA_ROOT"]) / "metrics").iterdir())
    writers = {f.name.split("_")[-1] for f in metrics_dir.glob("counter_*.db")}
    assert len(writers) >= 2, writers
    worker.kill()


def test_a_reclaimed_lease_is_counted(deployment: Deployment, server: FileServer) -> None:
    server.put("/slow.bin", os.urandom(2_000_000))
    server.behave("/slow.bin", rate=300_000)
    port = free_port()
    first = deployment.worker(concurrency=2)
    svc = deployment.service("a")
    req = BackgroundTransferRequest(server.url("/slow.bin"), download_location="/shared/transfers/slow.bin")
    svc.add(req)
    wait_for(lambda: svc.find(req.request_id).bytes_received > 100_000, 30, 0.05, "bytes moving")
    first.kill()
    server.behave("/slow.bin")
    deployment.worker(concurrency=2, BGTRANSFER_METRICS_PORT=str(port), BGTRANSFER_METRICS_ADDR="127.0.0.1")
    assert deployment.wait_done("a", req.request_id).transfer_error is None
    m = scrape(port)
    assert total(m, "bgtransfer_lease_reclaims_total", device=deployment.device) == 1
    assert total(m, "bgtransfer_resumed_bytes_total", app="a") > 100_000


@pytest.mark.parametrize(("error", "code", "reason"), [
    ("HTTP 503", 503, "http_5xx"), ("HTTP 429", 429, "http_429"), ("HTTP 408", 408, "http_408"),
    ("curl error 56: Recv failure", None, "network"), ("received 10 of 20 bytes", 200, "short_body"),
    ("local file error: No space left on device", None, "disk"), ("internal error: KeyError()", None, "internal"),
    ("something new", None, "other"),
])
def test_retry_reasons_are_a_fixed_set(error: str, code: int | None, reason: str) -> None:
    assert retry_reason(error, code) == reason
