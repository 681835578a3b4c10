"""The transfer engine against a misbehaving real server, run by a real worker process.

Every test asserts bytes on disk (sha256), the request's final state, and what the server
saw (ranges asked, bytes sent), so a resume that re-fetched or spliced would fail.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from bgtransfer import BackgroundTransferRequest, TransferStatus
from tests.conftest import Deployment, wait_for
from tests.httpserver import FileServer

MiB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def get(dep: Deployment, srv: FileServer, path: str, name: str | None = None, **kw) -> BackgroundTransferRequest:
    req = BackgroundTransferRequest(srv.url(path), download_location=f"/shared/transfers/{name or path[1:]}", **kw)
    dep.service("app").add(req)
    return req


def landed(dep: Deployment, name: str) -> bytes | None:
    p = dep.sandbox("app") / name
    return p.read_bytes() if p.exists() else None


def leftovers(dep: Deployment) -> list[str]:
    return sorted(os.listdir(dep.sandbox("app")))


def ok(dep: Deployment, req: BackgroundTransferRequest, data: bytes, name: str | None = None, timeout: float = 60):
    done = dep.wait_done("app", req.request_id, timeout)
    assert done.transfer_error is None, done.transfer_error
    assert sha(landed(dep, name or req.download_location.rsplit("/", 1)[1])) == sha(data)
    assert done.bytes_received == len(data)
    return done


def seen_status(dep: Deployment, req: BackgroundTransferRequest, status: TransferStatus, timeout: float = 30,
                reason: str = ""):
    """Wait for ``status`` (with ``reason`` in its wait_reason); the request as seen then."""
    svc = dep.service("app")

    def seen():
        r = svc.find(req.request_id)
        return r if r and r.transfer_status == status and reason in (r.wait_reason or "") else None

    return wait_for(seen, timeout, 0.02, f"status {status.value} {reason}")


def part_file(dep: Deployment) -> Path | None:
    parts = [p for p in dep.sandbox("app").iterdir() if p.name.endswith(".part")]
    return parts[0] if parts else None


@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "sha256"])
def test_sigkill_mid_download_resumes_without_refetching(deployment: Deployment, server: FileServer,
                                                         checksum: bool) -> None:
    """With a checksum asked for, the resumed attempt hashes the bytes held (read back) and then
    the rest as it arrives: a digest of the rest alone would fail the request."""
    data = os.urandom(50 * 1000 * 1000)
    server.put("/big.bin", data)
    server.behave("/big.bin", rate=8 * 1000 * 1000)
    worker = deployment.worker()
    req = get(deployment, server, "/big.bin", expected_sha256=sha(data) if checksum else None)
    svc = deployment.service("app")
    wait_for(lambda: (r := svc.find(req.request_id)) and r.bytes_received > 15_000_000, 60, 0.05, "15 MB")
    worker.kill()
    killed_at = time.monotonic()
    server.wait_idle()
    held = part_file(deployment).stat().st_size
    assert 0 < held < len(data)
    server.behave("/big.bin")  # full speed from now on
    deployment.worker()
    ok(deployment, req, data)
    after = [r for r in server.requests_for("/big.bin") if r.started > killed_at]
    assert [r.range_start for r in after] == [held]
    assert sum(r.body_bytes_sent for r in after) <= len(data) - held + MiB
    assert leftovers(deployment) == ["big.bin"]


def test_sigkill_before_the_first_renewal_restarts_from_zero(deployment: Deployment, server: FileServer) -> None:
    """A first attempt stores its validator with its first renewal, not before its first byte:
    bytes written before then vouch for nothing, so the next attempt must not resume on them."""
    old, new = os.urandom(3_000_000), os.urandom(2_000_000)
    server.put("/u.bin", old)
    server.behave("/u.bin", rate=1_000_000)
    worker = deployment.worker(BGTRANSFER_PROGRESS_INTERVAL="60")  # no renewal during this test
    req = get(deployment, server, "/u.bin")
    wait_for(lambda: (p := part_file(deployment)) and p.stat().st_size > 500_000, 30, 0.02, "bytes on disk")
    worker.kill()
    assert deployment.service("app").store.get(req.request_id)["validator"] is None
    server.wait_idle()
    server.put("/u.bin", new)  # were the old bytes kept, the new file would be spliced onto them
    server.behave("/u.bin")
    deployment.worker()
    ok(deployment, req, new)
    assert server.requests_for("/u.bin")[-1].range_start is None


def test_file_changed_between_attempts_gives_the_new_file_whole(deployment: Deployment, server: FileServer) -> None:
    old, new = os.urandom(1_000_000), os.urandom(1_200_000)
    server.put("/f.bin", old)
    server.behave("/f.bin", drop_after=400_000)
    deployment.worker(BGTRANSFER_RETRY_BASE_SECONDS="3")
    req = get(deployment, server, "/f.bin")
    seen_status(deployment, req, TransferStatus.WAITING, reason="curl error")
    server.put("/f.bin", new)  # a new version: new ETag and Last-Modified
    ok(deployment, req, new)
    first, second = server.requests_for("/f.bin")
    assert second.range_start == 400_000 and "if-range" in second.headers
    assert second.status == 200 and second.body_bytes_sent == len(new)


def test_slow_transfer_is_paused_then_completes_when_fast(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(300_000)
    server.put("/slow.bin", data)
    server.behave("/slow.bin", rate=4_000)  # 32 kbit/s, below Wi-Fi's 100 kbit/s minimum
    deployment.worker(BGTRANSFER_RETRY_BASE_SECONDS="2")
    req = get(deployment, server, "/slow.bin")
    seen_status(deployment, req, TransferStatus.PAUSED, reason="below the minimum")
    server.behave("/slow.bin")
    ok(deployment, req, data)
    logs = server.requests_for("/slow.bin")
    assert logs[-1].range_start is not None and logs[-1].range_start > 0  # kept what it had
    assert sum(r.body_bytes_sent for r in logs) <= len(data) + 64 * 1024


def test_dropped_connection_resumes_from_the_bytes_held(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(2_000_000)
    server.put("/d.bin", data)
    server.behave("/d.bin", drop_after=700_000, drop_times=2)
    deployment.worker()
    req = get(deployment, server, "/d.bin")
    ok(deployment, req, data)
    logs = server.requests_for("/d.bin")
    assert [r.range_start for r in logs] == [None, 700_000, 1_400_000]
    assert server.bytes_sent("/d.bin") == len(data)


def test_server_ignoring_range_restarts_from_zero(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(1_000_000)
    server.put("/i.bin", data)
    server.behave("/i.bin", ignore_range=True, drop_after=300_000)
    deployment.worker()
    req = get(deployment, server, "/i.bin")
    ok(deployment, req, data)
    first, second = server.requests_for("/i.bin")
    assert second.range_start == 300_000 and second.status == 200 and second.body_bytes_sent == len(data)
    row = deployment.service("app").store.get(req.request_id)
    assert "server ignores Range" in row["degraded"]


def test_weak_etag_resumes_on_last_modified(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(800_000)
    server.put("/w.bin", data, etag="weak")
    server.behave("/w.bin", drop_after=200_000)
    deployment.worker()
    req = get(deployment, server, "/w.bin")
    ok(deployment, req, data)
    second = server.requests_for("/w.bin")[1]
    assert second.status == 206 and not second.headers["if-range"].startswith("W/")


def test_no_validator_means_no_splice(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(600_000)
    server.put("/n.bin", data, etag=None, last_modified=False)
    server.behave("/n.bin", drop_after=200_000)
    deployment.worker()
    req = get(deployment, server, "/n.bin")
    ok(deployment, req, data)
    second = server.requests_for("/n.bin")[1]
    assert second.range_start is None and second.body_bytes_sent == len(data)


@pytest.mark.parametrize("framing", ["no_content_length", "close_delimited"])
def test_no_content_length_still_completes(deployment: Deployment, server: FileServer, framing: str) -> None:
    data = os.urandom(3_000_000)
    server.put("/c.bin", data)
    server.behave("/c.bin", **{framing: True})
    deployment.worker()
    req = get(deployment, server, "/c.bin")
    done = ok(deployment, req, data)
    assert done.total_bytes_to_receive == len(data)
    assert "no Content-Length" in deployment.service("app").store.get(req.request_id)["degraded"]


def test_extra_bytes_beyond_content_length_are_not_kept(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(500_000)
    server.put("/x.bin", data)
    server.behave("/x.bin", extra_bytes=5000)
    deployment.worker()
    ok(deployment, get(deployment, server, "/x.bin"), data)


def test_lying_content_length_fails_after_the_retry_budget(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(100_000)
    server.put("/l.bin", data)
    server.behave("/l.bin", lie_length=200_000)
    deployment.worker(BGTRANSFER_MAX_ATTEMPTS="3")
    req = get(deployment, server, "/l.bin")
    done = deployment.wait_done("app", req.request_id)
    assert done.transfer_error.startswith("gave up after 3 attempts")
    assert len(server.requests_for("/l.bin")) == 3
    assert leftovers(deployment) == []  # no file at the target, no partial left


def test_stall_pauses_then_resumes(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(400_000)
    server.put("/s.bin", data)
    server.behave("/s.bin", stall_after=100_000, stall_seconds=6)
    deployment.worker()
    req = get(deployment, server, "/s.bin")
    seen_status(deployment, req, TransferStatus.PAUSED)
    server.behave("/s.bin")
    ok(deployment, req, data)
    assert server.requests_for("/s.bin")[-1].range_start == 100_000


@pytest.mark.parametrize("code", [429, 503])
def test_retry_after_is_honoured(deployment: Deployment, server: FileServer, code: int) -> None:
    data = os.urandom(10_000)
    server.put("/r.bin", data)
    server.behave("/r.bin", status_sequence=[(code, {"Retry-After": "2"})])
    deployment.worker()
    req = get(deployment, server, "/r.bin")
    ok(deployment, req, data)
    first, second = server.requests_for("/r.bin")
    assert first.status == code and second.status == 200
    assert second.started - first.started >= 1.9


def test_server_errors_are_retried(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(10_000)
    server.put("/e.bin", data)
    server.behave("/e.bin", status_sequence=[(500, {}), (502, {}), (408, {})])
    deployment.worker()
    ok(deployment, get(deployment, server, "/e.bin"), data)
    assert [r.status for r in server.requests_for("/e.bin")] == [500, 502, 408, 200]


@pytest.mark.parametrize("code", [404, 403, 410])
def test_client_errors_end_the_request(deployment: Deployment, server: FileServer, code: int) -> None:
    server.put("/gone.bin", b"x")
    server.behave("/gone.bin", status_sequence=[(code, {})])
    deployment.worker()
    req = get(deployment, server, "/gone.bin")
    done = deployment.wait_done("app", req.request_id)
    assert (done.status_code, done.transfer_error) == (code, f"HTTP {code}")
    assert len(server.requests_for("/gone.bin")) == 1 and leftovers(deployment) == []


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1/x"])
def test_redirect_to_another_scheme_is_refused(deployment: Deployment, server: FileServer, target: str) -> None:
    server.behave("/redir", redirect_to=target)
    deployment.worker()
    req = get(deployment, server, "/redir", "r.bin")
    done = deployment.wait_done("app", req.request_id)
    assert "unsupported scheme" in done.transfer_error
    assert leftovers(deployment) == []


def test_redirects_are_followed_up_to_ten(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(20_000)
    server.put("/real.bin", data)
    server.behave("/hop", redirect_to=server.url("/real.bin"), redirect_code=301)
    first = server.redirect_chain("/loop", 3)
    deployment.worker()
    ok(deployment, get(deployment, server, "/hop", "hop.bin"), data, "hop.bin")
    req = BackgroundTransferRequest(first, download_location="/shared/transfers/loop.bin")
    deployment.service("app").add(req)
    done = deployment.wait_done("app", req.request_id)
    assert "too many redirects" in done.transfer_error
    assert len(server.requests_for("/loop/0")) + len(server.requests_for("/loop/1")) + len(
        server.requests_for("/loop/2")) == 11


def test_checksum_is_verified_while_streaming(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(2_000_000)
    server.put("/h.bin", data)
    server.put("/bad.bin", data)
    server.behave("/h.bin", drop_after=900_000)  # the hash must cover bytes from two attempts
    deployment.worker()
    ok(deployment, get(deployment, server, "/h.bin", expected_sha256=sha(data)), data)
    bad = get(deployment, server, "/bad.bin", expected_sha256="0" * 64)
    done = deployment.wait_done("app", bad.request_id)
    assert done.transfer_error.startswith("sha256 mismatch")
    assert leftovers(deployment) == ["h.bin"]


def test_post_download(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(50_000)
    server.put("/report", data)
    server.behave("/report", post_download=True, expect_method="POST")
    deployment.worker()
    req = get(deployment, server, "/report", "report.bin", method="POST")
    ok(deployment, req, data, "report.bin")
    assert server.requests_for("/report")[0].method == "POST"


def test_upload_retried_after_a_drop_sends_the_whole_file(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(1_500_000)
    (deployment.sandbox("app") / "u.bin").write_bytes(data)
    server.behave("/u", drop_after=500_000, status_sequence=[(503, {"Retry-After": "0"})])
    deployment.worker()
    req = BackgroundTransferRequest(server.url("/u"), "POST", upload_location="/shared/transfers/u.bin")
    deployment.service("app").add(req)
    done = deployment.wait_done("app", req.request_id)
    assert (done.transfer_error, done.bytes_sent) == (None, len(data))
    assert [r.status for r in server.requests_for("/u")] == [503, 0, 201]  # refused, dropped, received
    assert sha(server.uploads[-1].body) == sha(data)


def under_way(dep: Deployment, srv: FileServer, path: str, data: bytes, rate: int, least: int):
    """A throttled download that has moved at least ``least`` bytes; (request, service)."""
    srv.put(path, data)
    srv.behave(path, rate=rate)
    dep.worker()
    req = get(dep, srv, path)
    svc = dep.service("app")
    wait_for(lambda: (r := svc.find(req.request_id)) and r.bytes_received > least, 30, 0.05, "bytes")
    return req, svc


def test_pause_stops_the_bytes_and_resume_continues(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(3_000_000)
    req, svc = under_way(deployment, server, "/p.bin", data, 500_000, 500_000)
    svc.pause(req)
    seen_status(deployment, req, TransferStatus.PAUSED, 5)
    assert server.wait_idle(2), "the connection must close within a second or so of pause"
    held = part_file(deployment).stat().st_size
    time.sleep(0.5)
    assert part_file(deployment).stat().st_size == held
    server.behave("/p.bin")
    svc.resume(req)
    ok(deployment, req, data)
    assert server.requests_for("/p.bin")[-1].range_start == held


def test_remove_cancels_a_running_transfer(deployment: Deployment, server: FileServer) -> None:
    req, svc = under_way(deployment, server, "/rm.bin", os.urandom(3_000_000), 300_000, 100_000)
    svc.remove(req)
    assert svc.find(req.request_id) is None
    assert server.wait_idle(3), "the connection must close soon after remove"
    wait_for(lambda: leftovers(deployment) == [], 5, 0.05, "partial file deleted")
    # the slot is free again: a new request runs
    server.put("/next.bin", b"n" * 1000)
    ok(deployment, get(deployment, server, "/next.bin"), b"n" * 1000)


@pytest.mark.parametrize("length", [False, True], ids=["streamed", "content-length"])
def test_a_download_larger_than_the_cellular_cap_waits_for_wifi(deployment: Deployment, server: FileServer,
                                                                 length: bool) -> None:
    """The size, unknown at add, is learnt from the response: its Content-Length, or the bytes
    that outgrew the cap on the stream. One request to the server, then a wait (no loop)."""
    data = os.urandom(400_000)
    server.put("/cap.bin", data)
    server.behave("/cap.bin", no_content_length=not length)
    svc = deployment.service("app")
    svc.set_conditions(network="cellular")
    deployment.worker(BGTRANSFER_MAX_DOWNLOAD_CELLULAR_BYTES="100000", BGTRANSFER_PROGRESS_INTERVAL="0.05")
    req = BackgroundTransferRequest(server.url("/cap.bin"), download_location="/shared/transfers/cap.bin",
                                    transfer_preferences="ALLOW_CELLULAR")
    svc.add(req)
    wait_for(lambda: svc.find(req.request_id).transfer_status == TransferStatus.WAITING_FOR_WIFI, 30, 0.05,
             "waiting for Wi-Fi once the stream outgrew the cellular cap")
    found = svc.find(req.request_id)
    assert found.transfer_preferences.value == "ALLOW_BATTERY"
    if length:
        assert found.total_bytes_to_receive == len(data)
    assert landed(deployment, "cap.bin") is None
    assert len(server.requests_for("/cap.bin")) == 1
    svc.set_conditions(network="wifi")
    ok(deployment, req, data)


def test_multipart_form_upload(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(700_000)
    (deployment.sandbox("app") / 'photo "1".jpg').write_bytes(data)
    deployment.worker()
    req = BackgroundTransferRequest(server.url("/form"), "POST", upload_location='/shared/transfers/photo "1".jpg',
                                    form_fields={"album": "holidays", "note": "line1\nline2"})
    deployment.service("app").add(req)
    done = deployment.wait_done("app", req.request_id)
    assert done.transfer_error is None and done.status_code == 201
    (up,) = server.uploads
    assert up.content_type.startswith("multipart/form-data; boundary=")
    assert up.fields == {"album": "holidays", "note": "line1\nline2"}
    filename, body = up.files["file"]
    assert sha(body) == sha(data) and filename == "photo%20%221%22.jpg"
    assert done.bytes_sent == done.total_bytes_to_send == len(up.body)


def test_tls_is_verified_and_a_custom_ca_bundle_is_honoured(deployment: Deployment, tmp_path: Path) -> None:
    import shutil
    import ssl
    import subprocess

    if not shutil.which("openssl"):
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    data = os.urandom(300_000)
    with FileServer(tls=ctx) as srv:
        srv.put("/t.bin", data)
        untrusted = deployment.worker()
        req = get(deployment, srv, "/t.bin", "untrusted.bin")
        done = deployment.wait_done("app", req.request_id)
        assert "TLS certificate verification failed" in done.transfer_error
        untrusted.kill()
        deployment.worker(BGTRANSFER_CA_BUNDLE=str(cert))
        ok(deployment, get(deployment, srv, "/t.bin", "trusted.bin"), data, "trusted.bin")
    assert leftovers(deployment) == ["trusted.bin"]


def test_private_destinations_can_be_refused(deployment: Deployment, server: FileServer) -> None:
    data = os.urandom(100_000)
    server.put("/p.bin", data)
    deployment.worker(BGTRANSFER_BLOCK_PRIVATE_DESTINATIONS="true")
    by_ip = get(deployment, server, "/p.bin", "ip.bin")
    by_name = BackgroundTransferRequest(f"http://localhost:{server.port}/p.bin",
                                        download_location="/shared/transfers/name.bin")
    deployment.service("app").add(by_name)
    for req in (by_ip, by_name):  # refused on the address connected to, after DNS
        done = deployment.wait_done("app", req.request_id)
        assert "is not a public address" in done.transfer_error
    assert server.requests_for("/p.bin") == [] and leftovers(deployment) == []


@pytest.mark.parametrize(("host", "forbidden"), [
    ("127.0.0.1", True), ("10.1.2.3", True), ("172.16.0.1", True), ("192.168.1.1", True),
    ("169.254.169.254", True), ("100.64.0.1", True), ("0.0.0.0", True), ("224.0.0.1", True),
    ("::1", True), ("fe80::1%eth0", True), ("fc00::1", True), ("::ffff:127.0.0.1", True),
    ("8.8.8.8", False), ("2001:4860:4860::8888", False), ("93.184.216.34", False),
])
def test_forbidden_address_table(host: str, forbidden: bool) -> None:
    from bgtransfer._engine import forbidden_address

    assert forbidden_address(host) is forbidden


def test_guarded_socket_lets_allowed_destinations_through(server: FileServer, monkeypatch) -> None:
    """No public server can be reached from here, so the address check alone is replaced: the
    opener's socket must then carry a whole transfer (pycurl hands libcurl a dup of it)."""
    import io

    import pycurl

    from bgtransfer import _engine

    monkeypatch.setattr(_engine, "forbidden_address", lambda host: False)
    data = os.urandom(2_000_000)
    server.put("/g.bin", data)
    c, buf = pycurl.Curl(), io.BytesIO()
    c.setopt(pycurl.URL, server.url("/g.bin"))
    c.setopt(pycurl.WRITEDATA, buf)
    c.setopt(pycurl.OPENSOCKETFUNCTION, _engine._guarded_socket(None))  # type: ignore[arg-type]
    c.perform()
    assert (c.getinfo(pycurl.RESPONSE_CODE), sha(buf.getvalue())) == (200, sha(data))
    c.close()


@pytest.mark.parametrize("size,free", [(3_000_000, MiB), (100_000, 40_960)], ids=["mid-stream", "at-the-end"])
def test_disk_full_keeps_the_partial_file_and_resumes(deployment: Deployment, server: FileServer, size: int,
                                                      free: int) -> None:
    """The disk fills while a block is written (mid-stream), or when the pieces still pending as
    the response ends are: a body smaller than WRITE_BLOCK is written only then."""
    import subprocess

    from bgtransfer._engine import WRITE_BLOCK

    full = deployment.sandbox("app") / "full"
    full.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and mount rights")
    try:
        assert (size < WRITE_BLOCK) == (free < MiB)
        (full / "filler").write_bytes(bytes(MiB - free))
        data = os.urandom(size)
        server.put("/big.bin", data)
        deployment.worker(BGTRANSFER_RETRY_BASE_SECONDS="2")
        req = get(deployment, server, "/big.bin", "full/big.bin")
        seen_status(deployment, req, TransferStatus.WAITING, reason="No space left on device")
        part = next(p for p in full.iterdir() if p.name.endswith(".part"))
        held = part.stat().st_size
        assert 0 < held <= free < len(data)
        subprocess.run(["mount", "-o", "remount,size=8m", str(full)], check=True)
        ok(deployment, req, data, "full/big.bin")
        assert server.requests_for("/big.bin")[-1].range_start == held
    finally:
        subprocess.run(["umount", "-l", str(full)], capture_output=True)
