"""Faults of the servers bgtransfer stands on: RabbitMQ, Redis and PostgreSQL restarted while
transfers run. Nothing may be lost: every request completes with the right bytes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

import pytest

from bgtransfer import BackgroundTransferRequest
from tests.conftest import ROOT, Deployment
from tests.httpserver import FileServer

SERVICES = ROOT.parent / "shared" / "bin" / "services"


def restart(name: str) -> None:
    if not SERVICES.exists():
        pytest.skip(f"{SERVICES} is not here to restart {name}")
    run = subprocess.run([str(SERVICES), "restart", name], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize(("deployment", "service"), [
    (("rabbitmq", "postgresql"), "rabbitmq"),
    (("redis", "postgresql"), "redis"),
    (("rabbitmq", "postgresql"), "postgres"),
], indirect=["deployment"], ids=["rabbitmq", "redis", "postgres"])
def test_server_restarted_mid_run_loses_nothing(deployment: Deployment, server: FileServer, service: str) -> None:
    files = {f"/{i}.bin": os.urandom(600_000) for i in range(6)}
    for path, data in files.items():
        server.put(path, data)
        server.behave(path, rate=400_000)
    deployment.worker(concurrency=4)
    svc = deployment.service("a")
    reqs = [BackgroundTransferRequest(server.url(p), download_location=f"/shared/transfers{p}") for p in files]
    for r in reqs:
        svc.add(r)
    time.sleep(0.8)  # transfers under way
    restart(service)
    for r, (path, data) in zip(reqs, files.items(), strict=True):
        done = deployment.wait_done("a", r.request_id, 180)
        assert done.transfer_error is None, done.transfer_error
        landed = (deployment.sandbox("a") / path[1:]).read_bytes()
        assert hashlib.sha256(landed).digest() == hashlib.sha256(data).digest()
