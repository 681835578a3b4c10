"""End to end: a real worker process, a real broker, a real store and a real HTTP server."""

from __future__ import annotations

import hashlib
import os

import pytest
from celery import Celery

from bgtransfer import BackgroundTransferRequest, TransferStatus
from bgtransfer._celeryconf import celery_config
from tests.conftest import BACKENDS, Deployment, wait_for
from tests.httpserver import FileServer


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("deployment", BACKENDS, indirect=True)
def test_download_lands_whole(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(3_000_000)
    server.put("/f.bin", data)
    deployment.worker()
    svc = deployment.service("photos")
    req = BackgroundTransferRequest(
        server.url("/f.bin"), download_location="/shared/transfers/in/f.bin", headers={"X-Trace": "abc"}
    )
    svc.add(req)
    done = deployment.wait_done("photos", req.request_id)
    assert done.transfer_error is None and done.status_code == 200
    assert (done.bytes_received, done.total_bytes_to_receive) == (len(data), len(data))
    target = deployment.sandbox("photos") / "in" / "f.bin"
    assert sha(target.read_bytes()) == sha(data)
    assert os.listdir(target.parent) == ["f.bin"], "the partial file must be gone"
    (log,) = server.requests_for("/f.bin")
    assert log.headers["x-trace"] == "abc"


@pytest.mark.parametrize("deployment", BACKENDS, indirect=True)
def test_celery_tasks_for_clients_in_other_languages(deployment: Deployment, server: FileServer) -> None:
    server.put("/g.bin", b"g" * 1000)
    deployment.worker()
    s = deployment.settings
    client = Celery("client", set_as_current=False, config_source=celery_config(s))  # any Celery client

    def call(task: str, *args: object):
        return client.send_task(f"bgtransfer.{task}", args=list(args), queue=s.queue)

    def add(name: str, **extra: object):
        return call("add", {"app_id": "svc-go", "url": server.url("/g.bin"),
                            "download_location": f"/shared/transfers/{name}", **extra})

    stored = add("g.bin").get(timeout=30)
    assert stored["app_id"] == "svc-go" and len(stored["request_id"]) == 32
    rid = stored["request_id"]
    done = wait_for(lambda: (d := call("find", "svc-go", rid).get(timeout=30))["transfer_status"] == "COMPLETED"
                    and d, 60, 0.2, "completion")
    assert done["bytes_received"] == 1000 and done["transfer_error"] is None
    assert [r["request_id"] for r in call("requests", "svc-go").get(timeout=30)] == [rid]
    with pytest.raises(Exception, match="reserved") as info:
        add("g2.bin", headers={"Range": "bytes=1-"}).get(timeout=30)
    assert type(info.value).__name__ == "NotSupportedError"
    with pytest.raises(Exception, match="request_uri must be a string, got int"):
        call("add", {"app_id": "svc-go", "url": 5}).get(timeout=30)
    call("remove", "svc-go", rid).get(timeout=30)
    assert call("requests", "svc-go").get(timeout=30) == []

def test_upload_streams_the_sandbox_file(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(2_000_000)
    (deployment.sandbox("photos") / "a.jpg").write_bytes(data)
    deployment.worker()
    svc = deployment.service("photos")
    req = BackgroundTransferRequest(
        server.url("/up"), "POST", upload_location="/shared/transfers/a.jpg", headers={"Content-Type": "image/jpeg"}
    )
    svc.add(req)
    done = deployment.wait_done("photos", req.request_id)
    assert (done.transfer_error, done.status_code, done.bytes_sent, done.total_bytes_to_send) == (
        None,
        201,
        len(data),
        len(data),
    )
    (up,) = server.uploads
    assert sha(up.body) == sha(data) and up.headers["content-type"] == "image/jpeg"


def test_many_requests_never_exceed_the_device_cap(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(200_000)
    for i in range(8):
        server.put(f"/{i}.bin", data)
        server.behave(f"/{i}.bin", rate=400_000)
    deployment.worker(concurrency=4)
    svc = deployment.service("a")
    reqs = [
        BackgroundTransferRequest(server.url(f"/{i}.bin"), download_location=f"/shared/transfers/{i}.bin")
        for i in range(8)
    ]
    for r in reqs:
        svc.add(r)
    for r in reqs:
        assert deployment.wait_done("a", r.request_id).transfer_error is None
    assert server.max_concurrent == 2  # the default cap, reached and never exceeded
    assert all(sha((deployment.sandbox("a") / f"{i}.bin").read_bytes()) == sha(data) for i in range(8))
    assert {r.transfer_status for r in svc.requests} == {TransferStatus.COMPLETED}


def test_tenant_isolation_through_every_entry_point(deployment: Deployment, server: FileServer) -> None:
    server.put("/iso.bin", b"A" * 5000)
    (deployment.sandbox("b") / "iso.bin").write_bytes(b"B's own file")
    deployment.worker()
    s = deployment.settings
    a = deployment.service("a")
    req = BackgroundTransferRequest(server.url("/iso.bin"), download_location="/shared/transfers/iso.bin")
    a.add(req)
    deployment.wait_done("a", req.request_id)
    # A's download with the same sandbox path landed in A's sandbox; B's file is untouched
    assert (deployment.sandbox("a") / "iso.bin").read_bytes() == b"A" * 5000
    assert (deployment.sandbox("b") / "iso.bin").read_bytes() == b"B's own file"
    client = Celery("client", set_as_current=False, config_source=celery_config(s))
    assert client.send_task("bgtransfer.find", args=["b", req.request_id], queue=s.queue).get(timeout=30) is None
    assert client.send_task("bgtransfer.requests", args=["b"], queue=s.queue).get(timeout=30) == []
    with pytest.raises(Exception, match="no request"):
        client.send_task("bgtransfer.remove", args=["b", req.request_id], queue=s.queue).get(timeout=30)
    for verb in ("show", "remove", "pause", "resume"):
        run = deployment.cli(verb, req.request_id, "--app", "b")
        assert run.returncode == 1 and "no request" in run.stderr, (verb, run.stderr)
    assert deployment.cli("list", "--app", "b").stdout == ""
    assert a.find(req.request_id).transfer_status == TransferStatus.COMPLETED  # still A's, unharmed
