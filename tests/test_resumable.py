"""Resumable uploads (tus 1.0) through a real worker, against the test server's tus endpoint.

Each test asserts what the server holds (sha256), which bytes each PATCH delivered (so a byte
sent twice would show), the requests in order, and the request's final state.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from bgtransfer import BackgroundTransferRequest, TransferStatus, _engine
from bgtransfer._engine import Outcome
from bgtransfer._settings import load
from tests.conftest import Deployment, wait_for
from tests.httpserver import FileServer

ON = {"BGTRANSFER_RESUMABLE_UPLOADS": "true"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def send(dep: Deployment, srv: FileServer, path: str, data: bytes, name: str = "u.bin",
         **kw) -> BackgroundTransferRequest:
    (dep.sandbox("app") / name).write_bytes(data)
    req = BackgroundTransferRequest(srv.url(path), "POST", upload_location=f"/shared/transfers/{name}", **kw)
    dep.service("app").add(req)
    return req


def done_ok(dep: Deployment, req: BackgroundTransferRequest, size: int, timeout: float = 60):
    done = dep.wait_done("app", req.request_id, timeout)
    assert done.transfer_error is None, done.transfer_error
    assert done.bytes_sent == done.total_bytes_to_send == size
    return done


def calls(srv: FileServer, *paths: str) -> list[tuple[str, int]]:
    """(method, status) of every request to ``paths``, in order."""
    srv.wait_idle()
    return [(r.method, r.status) for r in srv.requests if r.path in paths]


def waiting(dep: Deployment, req: BackgroundTransferRequest, status: TransferStatus, reason: str = "") -> None:
    svc = dep.service("app")
    wait_for(lambda: (r := svc.find(req.request_id)) and r.transfer_status == status
             and reason in (r.wait_reason or ""), 30, 0.02, f"{status.value} {reason}")


def test_interrupted_upload_resumes_at_the_servers_offset(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(3_000_000)
    server.behave("/files", tus=True, drop_after=1_000_000)
    deployment.worker(**ON)
    req = send(deployment, server, "/files", data)
    done_ok(deployment, req, len(data))
    (up,) = server.tus_uploads("/files")
    assert up.patches == [(0, 1_000_000), (1_000_000, 2_000_000)]  # the rest only, once
    assert up.received == len(data) and server.uploads == []  # 3 MB of body in all, no plain POST
    assert sha(bytes(up.data)) == sha(data) and up.metadata == {"filename": "u.bin"}
    assert calls(server, "/files", up.path) == [("OPTIONS", 204), ("POST", 201), ("PATCH", 0), ("HEAD", 200),
                                                 ("PATCH", 204)]
    assert deployment.service("app").store.get(req.request_id)["upload_url"] == server.url(up.path)


def test_sigkill_mid_patch_resumes_from_the_stored_upload_url(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(3_000_000)
    server.behave("/files", tus=True)
    # throttled by the worker itself, so that little is in flight in socket buffers when it dies
    worker = deployment.worker(**ON, BGTRANSFER_MAX_RATE_PER_TRANSFER="600000")
    req = send(deployment, server, "/files", data)
    svc = deployment.service("app")
    wait_for(lambda: svc.find(req.request_id).bytes_sent > 1_000_000, 30, 0.05, "1 MB sent")
    worker.kill()
    assert server.wait_idle()
    held = len(server.tus_uploads()[0].data)
    assert 1_000_000 < held < len(data)
    deployment.worker(**ON)
    done_ok(deployment, req, len(data))
    (up,) = server.tus_uploads()
    assert up.patches == [(0, held), (held, len(data) - held)] and up.received == len(data)
    assert sha(bytes(up.data)) == sha(data)
    assert [m for m, _ in calls(server, "/files", up.path)] == ["OPTIONS", "POST", "PATCH", "HEAD", "PATCH"]


@pytest.mark.parametrize("gone", [404, 410])
def test_expired_upload_starts_over_from_zero(deployment: Deployment, server: FileServer, gone: int) -> None:
    data = os.urandom(3_000_000)
    server.behave("/files", tus=True, drop_after=1_000_000)
    deployment.worker(**ON, BGTRANSFER_RETRY_BASE_SECONDS="3")
    req = send(deployment, server, "/files", data)
    waiting(deployment, req, TransferStatus.WAITING, "curl error")
    first = server.tus_uploads()[0]
    server.tus_expire(first.path, gone)
    done_ok(deployment, req, len(data))
    old, new = server.tus_uploads()
    assert old.patches == [(0, 1_000_000)] and not old.complete
    assert new.patches == [(0, len(data))] and sha(bytes(new.data)) == sha(data)
    assert calls(server, "/files", old.path, new.path) == [
        ("OPTIONS", 204), ("POST", 201), ("PATCH", 0), ("HEAD", gone), ("POST", 201), ("PATCH", 204)]


def test_local_file_changed_between_attempts_is_not_spliced(deployment: Deployment, server: FileServer) -> None:
    old, new = os.urandom(2_000_000), os.urandom(2_000_000)
    server.behave("/files", tus=True, drop_after=700_000)
    deployment.worker(**ON, BGTRANSFER_RETRY_BASE_SECONDS="3")
    req = send(deployment, server, "/files", old)
    waiting(deployment, req, TransferStatus.WAITING, "curl error")
    (deployment.sandbox("app") / "u.bin").write_bytes(new)  # same size, new bytes
    done_ok(deployment, req, len(new))
    first, second = server.tus_uploads()
    assert first.patches == [(0, 700_000)] and sha(bytes(second.data)) == sha(new)
    assert [m for m, _ in calls(server, "/files", first.path, second.path)] == [
        "OPTIONS", "POST", "PATCH", "POST", "PATCH"]  # no HEAD: the old upload holds another file


def test_whole_body_received_but_answer_lost(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(500_000)
    server.behave("/files", tus=True, drop_after=len(data))  # drops after the last byte, before answering
    deployment.worker(**ON)
    req = send(deployment, server, "/files", data)
    done_ok(deployment, req, len(data))
    (up,) = server.tus_uploads()
    assert up.received == len(data) and up.complete
    assert [m for m, _ in calls(server, "/files", up.path)] == ["OPTIONS", "POST", "PATCH", "HEAD"]


def test_pause_keeps_the_servers_bytes_and_resume_sends_the_rest(deployment: Deployment,
                                                                 server: FileServer) -> None:
    """Paused mid-PATCH under the worker's own rate limit: the server keeps what it got, and the
    PATCH after resume starts at the server's offset, still throttled."""
    data = os.urandom(2_000_000)
    server.behave("/files", tus=True)
    deployment.worker(**ON, BGTRANSFER_MAX_RATE_PER_TRANSFER="800000")
    req = send(deployment, server, "/files", data)
    svc = deployment.service("app")
    wait_for(lambda: svc.find(req.request_id).bytes_sent > 400_000, 30, 0.05, "400 KB sent")
    svc.pause(req)
    waiting(deployment, req, TransferStatus.PAUSED)
    assert server.wait_idle(3)
    held = len(server.tus_uploads()[0].data)
    assert 0 < held < len(data)
    started = time.monotonic()
    svc.resume(req)
    done_ok(deployment, req, len(data))
    assert time.monotonic() - started >= (len(data) - held) / 800_000 * 0.8  # the throttle held
    (up,) = server.tus_uploads()
    assert up.patches == [(0, held), (held, len(data) - held)] and sha(bytes(up.data)) == sha(data)


def test_plain_server_gets_a_plain_post_that_restarts_from_zero(deployment: Deployment,
                                                                server: FileServer) -> None:
    data = os.urandom(1_500_000)
    server.behave("/u", drop_after=500_000)
    deployment.worker(**ON)
    req = send(deployment, server, "/u", data)
    done_ok(deployment, req, len(data))
    assert calls(server, "/u") == [("OPTIONS", 405), ("POST", 0), ("OPTIONS", 405), ("POST", 201)]
    assert sha(server.uploads[-1].body) == sha(data) and len(server.uploads) == 1
    assert deployment.service("app").store.get(req.request_id)["upload_url"] is None
    form = send(deployment, server, "/form", b"x" * 1000, "f.bin", form_fields={"a": "b"})
    deployment.wait_done("app", form.request_id)
    assert calls(server, "/form") == [("POST", 201)]  # form uploads are never tus: no probe


def test_tus_server_whose_discovery_failed_is_tried_again(deployment: Deployment, server: FileServer) -> None:
    """OPTIONS answered 503 looks like no tus: the plain POST then gets the tus server's 412,
    which is worth another attempt (not a failure), and that one finds tus."""
    data = os.urandom(100_000)
    server.behave("/files", tus=True, status_sequence=[(503, {})])
    deployment.worker(**ON)
    req = send(deployment, server, "/files", data)
    done_ok(deployment, req, len(data))
    (up,) = server.tus_uploads()
    assert sha(bytes(up.data)) == sha(data)
    assert calls(server, "/files", up.path) == [("OPTIONS", 503), ("POST", 412), ("OPTIONS", 204), ("POST", 201),
                                                 ("PATCH", 204)]


# -- the engine alone, with a lease that records what it is told ------------------------------


class Recorder:
    """The engine's Lease: records each renewal with what the server had seen by then."""

    def __init__(self, srv: FileServer, fail_on: str | None = None) -> None:
        self.srv, self.fail_on = srv, fail_on
        self.stored: dict[str, Any] = {}
        self.seen: list[tuple[dict[str, Any], list[str]]] = []

    def renew(self, moved: int, **fields: Any) -> str | None:
        self.seen.append((fields, [r.method for r in self.srv.requests]))
        if self.fail_on in fields:
            raise ConnectionError("store down")
        self.stored.update(fields)
        return None

    def max_rate(self) -> float:
        return 0.0


def attempt(tmp_path: Path, srv: FileServer, path: str, data: bytes | None, lease: Recorder,
            **job: Any) -> Outcome:
    """One engine attempt uploading the sandbox file ``u.bin`` (first written as ``data``, if given)."""
    s = load({"BGTRANSFER_DATA_ROOT": str(tmp_path), "BGTRANSFER_RESUMABLE_UPLOADS": "1"})
    root = tmp_path / "apps" / "app" / "shared" / "transfers"
    root.mkdir(parents=True, exist_ok=True)
    if data is not None:
        (root / "u.bin").write_bytes(data)
    j = _engine.Job("r", "app", "POST", srv.url(path), {}, "upload", ("u.bin",), **job)
    return _engine.upload(j, lease, _engine.Limits(), s)


def test_upload_url_is_stored_before_the_first_body_byte(tmp_path: Path, server: FileServer) -> None:
    server.behave("/files", tus=True)
    data = os.urandom(200_000)
    down = Recorder(server, fail_on="upload_url")
    out = attempt(tmp_path, server, "/files", data, down)
    assert (out.kind, out.bytes_done, out.moved) == ("retry", 0, 0) and "state store unreachable" in out.error
    assert down.seen[0][1] == ["OPTIONS", "POST"]  # asked to store it right after creation
    assert "PATCH" not in [r.method for r in server.requests]  # and nothing sent when it could not be
    up = Recorder(server)
    out = attempt(tmp_path, server, "/files", None, up)
    assert out.kind == "completed" and up.seen[0][1][-1] == "POST"
    assert up.stored["upload_url"] == server.url(server.tus_uploads()[-1].path)


def test_engine_edge_cases(tmp_path: Path, server: FileServer) -> None:
    server.behave("/files", tus=True)
    out = attempt(tmp_path, server, "/files", b"", Recorder(server))
    assert (out.kind, out.total, server.tus_uploads()[0].length) == ("completed", 0, 0)  # no PATCH needed
    assert "PATCH" not in [r.method for r in server.requests]

    data = os.urandom(50_000)
    lease = Recorder(server)
    server.behave("/files", tus=True, drop_after=10_000)
    assert attempt(tmp_path, server, "/files", data, lease).kind == "retry"
    held = {"upload_url": lease.stored["upload_url"], "validator": lease.stored["validator"]}
    server.behave("/files", tus=True, status_sequence=[(503, {"Retry-After": "7"})])
    out = attempt(tmp_path, server, "/files", None, lease, **held)
    assert (out.kind, out.status_code, out.retry_after) == ("retry", 503, 7.0)  # HEAD: the server is unwell
    server.behave("/files", tus=True, status_sequence=[(401, {})])
    out = attempt(tmp_path, server, "/files", None, lease, refreshable=True, **held)
    assert out.kind == "refresh"  # an expired credential is refreshed; the upload is kept
    out = attempt(tmp_path, server, "/files", None, lease, **held)
    assert (out.kind, out.bytes_done) == ("completed", len(data))
    assert server.tus_uploads()[1].patches == [(0, 10_000), (10_000, 40_000)]
    assert len(server.tus_uploads()) == 2  # neither the 503 nor the 401 started a new upload
