"""URL refresh: a request names a Celery task that signs a fresh URL; on 401/403, or when the URL
is about to expire, a real worker calls it and goes on with the new URL, keeping the bytes held."""

from __future__ import annotations

import os
import time

import pytest

from bgtransfer import BackgroundTransferRequest, TransferError
from tests.conftest import Deployment
from tests.httpserver import FileServer

IMPORTS = {"BGTRANSFER_IMPORTS": "tests.refresh_tasks"}


def get(dep: Deployment, srv: FileServer, path: str, **kw) -> BackgroundTransferRequest:
    req = BackgroundTransferRequest(srv.url(path), download_location=f"/shared/transfers{path.split('?')[0]}", **kw)
    dep.service("app").add(req)
    return req


def test_a_url_that_expires_mid_download_is_refreshed_and_resumed(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(1_000_000)
    server.put("/p.bin", data)
    server.behave("/p.bin", signed="sig=1", drop_after=400_000)
    deployment.worker(**IMPORTS, BGTRANSFER_RETRY_BASE_SECONDS="3")  # the resume waits 3 s
    req = get(deployment, server, "/p.bin?sig=1", refresh_task="tests.next_signature")
    # the first response drops at 400 kB; the signature expires before the resume
    deadline = time.monotonic() + 20
    while not server.requests_for("/p.bin") and time.monotonic() < deadline:
        time.sleep(0.01)
    server.wait_idle()
    server.behave("/p.bin", signed="sig=2")
    done = deployment.wait_done("app", req.request_id)
    assert done.transfer_error is None and (deployment.sandbox("app") / "p.bin").read_bytes() == data
    assert done.request_uri.endswith("?sig=2")
    logs = server.requests_for("/p.bin")
    assert [(r.query, r.status) for r in logs][-1] == ("sig=2", 206)  # resumed, not restarted
    assert logs[-1].range_start == 400_000 and logs[-1].headers["x-signed"] == "2"
    assert sum(r.body_bytes_sent for r in logs) == len(data)


def test_a_url_past_its_expiry_is_refreshed_before_it_is_used(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(100_000)
    server.put("/e.bin", data)
    server.behave("/e.bin", signed="sig=8")
    deployment.worker(**IMPORTS)
    req = get(deployment, server, "/e.bin?sig=7", refresh_task="tests.next_signature", url_expires_at=time.time())
    assert deployment.wait_done("app", req.request_id).transfer_error is None
    assert [r.query for r in server.requests_for("/e.bin")] == ["sig=8"]  # the old URL was never sent


def test_a_refresh_that_cannot_work_fails_the_request_saying_why(deployment: Deployment, server: FileServer) -> None:
    server.put("/b.bin", b"x" * 1000)
    server.behave("/b.bin", signed="sig=never")
    deployment.worker(**IMPORTS)
    for task, why in (("tests.bad_answer", "scheme 'ftp' is not supported"), ("tests.not_there", "is not registered")):
        req = get(deployment, server, "/b.bin?sig=1", refresh_task=task)
        done = deployment.wait_done("app", req.request_id)
        assert why in done.transfer_error and f"URL refresh by {task}" in done.transfer_error
        deployment.service("app").remove(req)


@pytest.mark.parametrize("fields, message", [
    ({"refresh_task": "not a task name"}, "refresh_task"),
    ({"refresh_task": 3}, "refresh_task"),
    ({"url_expires_at": "tomorrow"}, "url_expires_at"),
    ({"url_expires_at": float("nan")}, "url_expires_at"),
])
def test_bad_refresh_fields_are_refused_at_add(deployment: Deployment, fields: dict, message: str) -> None:
    svc = deployment.service("app")
    with pytest.raises(TransferError, match=message):
        svc.add(BackgroundTransferRequest("http://127.0.0.1:9/x", download_location="/shared/transfers/x", **fields))
    assert svc.requests == []
