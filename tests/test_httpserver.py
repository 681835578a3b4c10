"""Tests for the misbehaving test server, driven by real clients over loopback.

The transfer engine's tests trust this server to misbehave exactly as told, so
each behaviour is checked here with pycurl (what the engine uses) or raw
sockets/http.client where the exact bytes on the wire matter.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pycurl
import pytest

from tests.httpserver import FileServer

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Resp:
    status: int
    headers: dict[str, str]  # lower-case names, of the last response seen
    body: bytes
    error: int | None  # pycurl error code, None on success
    elapsed: float


def curl(
    url: str,
    *,
    headers: list[str] | None = None,
    range_: str | None = None,
    post: bytes | None = None,
    follow: bool = False,
    max_redirs: int = 5,
    timeout: float = 10,
    nobody: bool = False,
    setup: Callable[[pycurl.Curl], None] | None = None,
) -> Resp:
    """One libcurl transfer with a hard timeout; errors are returned, not raised."""
    buf = io.BytesIO()
    hdrs: dict[str, str] = {}

    def on_header(line: bytes) -> None:
        text = line.decode("latin-1").strip()
        if text.startswith("HTTP/"):
            hdrs.clear()
        elif ":" in text:
            name, value = text.split(":", 1)
            hdrs[name.strip().lower()] = value.strip()

    c = pycurl.Curl()
    c.setopt(pycurl.URL, url)
    c.setopt(pycurl.PROXY, "")
    c.setopt(pycurl.WRITEDATA, buf)
    c.setopt(pycurl.HEADERFUNCTION, on_header)
    c.setopt(pycurl.TIMEOUT_MS, int(timeout * 1000))
    c.setopt(pycurl.CONNECTTIMEOUT, 5)
    if headers:
        c.setopt(pycurl.HTTPHEADER, headers)
    if range_ is not None:
        c.setopt(pycurl.RANGE, range_)
    if post is not None:
        c.setopt(pycurl.POSTFIELDS, post)
    if nobody:
        c.setopt(pycurl.NOBODY, True)
    if follow:
        c.setopt(pycurl.FOLLOWLOCATION, True)
        c.setopt(pycurl.MAXREDIRS, max_redirs)
    if setup is not None:
        setup(c)
    error = None
    t0 = time.monotonic()
    try:
        c.perform()
    except pycurl.error as exc:
        error = exc.args[0]
    elapsed = time.monotonic() - t0
    status = c.getinfo(pycurl.RESPONSE_CODE)
    c.close()
    return Resp(status, hdrs, buf.getvalue(), error, elapsed)


def raw_get(port: int, path: str, extra: str = "") -> tuple[bytes, bytes]:
    """Send a GET with Connection: close and return (head, everything after it) until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{extra}\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def payload(n: int, seed: int = 0) -> bytes:
    """Deterministic non-repeating bytes, so misplaced offsets show up as mismatches."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


@pytest.fixture
def srv() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


# -- normal service ------------------------------------------------------------


def test_get_head_and_404(srv: FileServer) -> None:
    data = payload(5000)
    srv.put("/a.bin", data)
    r = curl(srv.url("/a.bin"))
    assert (r.error, r.status, r.body) == (None, 200, data)
    assert r.headers["content-length"] == "5000"
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["etag"].startswith('"') and r.headers["etag"].endswith('"')
    assert email.utils.parsedate_to_datetime(r.headers["last-modified"])

    h = curl(srv.url("/a.bin"), nobody=True)
    assert (h.error, h.status, h.body, h.headers["content-length"]) == (None, 200, b"", "5000")

    missing = curl(srv.url("/nope"))
    assert missing.status == 404 and missing.body

    assert srv.wait_idle()
    logs = srv.requests_for("/a.bin")
    assert [(r.method, r.status, r.completed) for r in logs] == [("GET", 200, True), ("HEAD", 200, True)]
    assert logs[0].body_bytes_sent == 5000 and logs[1].body_bytes_sent == 0
    assert logs[0].headers["host"].startswith("127.0.0.1")
    assert logs[0].ended is not None and logs[0].ended >= logs[0].started
    assert srv.bytes_sent("/a.bin") == 5000
    assert srv.base_url == f"http://127.0.0.1:{srv.port}"


def test_put_file_uses_disk_and_ranges(srv: FileServer, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "big.bin").write_bytes(data)
    srv.put_file("/big.bin", tmp_path / "big.bin")
    assert curl(srv.url("/big.bin")).body == data
    r = curl(srv.url("/big.bin"), range_="1000-1999")
    assert (r.status, r.body, r.headers["content-range"]) == (206, data[1000:2000], f"bytes 1000-1999/{len(data)}")


def test_range_206_and_416(srv: FileServer) -> None:
    data = payload(10_000)
    srv.put("/a.bin", data)
    r = curl(srv.url("/a.bin"), range_="4000-")
    assert (r.status, r.body) == (206, data[4000:])
    assert r.headers["content-range"] == "bytes 4000-9999/10000"
    assert r.headers["content-length"] == "6000"
    r = curl(srv.url("/a.bin"), range_="10-19")
    assert (r.status, r.body, r.headers["content-range"]) == (206, data[10:20], "bytes 10-19/10000")
    r = curl(srv.url("/a.bin"), range_="9990-20000")  # end past the file is clamped
    assert (r.status, r.body, r.headers["content-range"]) == (206, data[9990:], "bytes 9990-9999/10000")
    r = curl(srv.url("/a.bin"), range_="10000-")
    assert r.status == 416 and r.headers["content-range"] == "bytes */10000"
    assert [x.range_start for x in srv.requests_for("/a.bin")] == [4000, 10, 9990, 10000]


def test_if_range_strong_etag_and_date(srv: FileServer) -> None:
    data = payload(8000)
    srv.put("/a.bin", data)
    first = curl(srv.url("/a.bin"))
    etag, lm = first.headers["etag"], first.headers["last-modified"]

    hit = curl(srv.url("/a.bin"), range_="100-", headers=[f"If-Range: {etag}"])
    assert (hit.status, hit.body) == (206, data[100:])
    miss = curl(srv.url("/a.bin"), range_="100-", headers=['If-Range: "something-else"'])
    assert (miss.status, miss.body) == (200, data)
    by_date = curl(srv.url("/a.bin"), range_="100-", headers=[f"If-Range: {lm}"])
    assert by_date.status == 206
    later = email.utils.formatdate(email.utils.parsedate_to_datetime(lm).timestamp() + 5, usegmt=True)
    assert curl(srv.url("/a.bin"), range_="100-", headers=[f"If-Range: {later}"]).status == 200


def test_if_range_weak_etag_never_matches(srv: FileServer) -> None:
    data = payload(4000)
    srv.put("/w.bin", data, etag="weak")
    etag = curl(srv.url("/w.bin")).headers["etag"]
    assert etag.startswith('W/"')
    r = curl(srv.url("/w.bin"), range_="100-", headers=[f"If-Range: {etag}"])
    assert (r.status, r.body) == (200, data)
    assert curl(srv.url("/w.bin"), range_="100-", headers=[f"If-Range: {etag[2:]}"]).status == 200


def test_validators_can_be_turned_off(srv: FileServer) -> None:
    srv.put("/n.bin", b"x" * 100, etag=None, last_modified=False)
    r = curl(srv.url("/n.bin"))
    assert r.status == 200 and "etag" not in r.headers and "last-modified" not in r.headers


def test_put_again_changes_etag_and_last_modified(srv: FileServer) -> None:
    srv.put("/a.bin", b"one" * 1000)
    r1 = curl(srv.url("/a.bin"))
    srv.put("/a.bin", b"two" * 1000)
    r2 = curl(srv.url("/a.bin"))
    srv.put("/a.bin", b"two" * 1000)  # same content, new version: still a change
    r3 = curl(srv.url("/a.bin"))
    assert r2.body == b"two" * 1000
    assert len({r1.headers["etag"], r2.headers["etag"], r3.headers["etag"]}) == 3
    stamps = [email.utils.parsedate_to_datetime(r.headers["last-modified"]) for r in (r1, r2, r3)]
    assert (stamps[1] - stamps[0]).total_seconds() >= 1
    assert (stamps[2] - stamps[1]).total_seconds() >= 1
    stale = curl(srv.url("/a.bin"), range_="10-", headers=[f"If-Range: {r1.headers['etag']}"])
    assert (stale.status, stale.body) == (200, b"two" * 1000)


# -- framing misbehaviour ------------------------------------------------------------


def test_chunked_without_content_length(srv: FileServer) -> None:
    data = payload(70_000)
    srv.put("/c.bin", data)
    srv.behave("/c.bin", no_content_length=True)
    r = curl(srv.url("/c.bin"))
    assert (r.error, r.status, r.body) == (None, 200, data)
    assert r.headers["transfer-encoding"] == "chunked" and "content-length" not in r.headers
    r = curl(srv.url("/c.bin"), range_="1000-")
    assert (r.status, r.body) == (206, data[1000:])
    assert r.headers["transfer-encoding"] == "chunked" and "content-length" not in r.headers
    assert r.headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"


def test_close_delimited(srv: FileServer) -> None:
    data = payload(50_000)
    srv.put("/d.bin", data)
    srv.behave("/d.bin", close_delimited=True)
    head, body = raw_get(srv.port, "/d.bin")
    assert b"content-length" not in head.lower() and b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body == data
    r = curl(srv.url("/d.bin"))
    assert (r.error, r.status, r.body) == (None, 200, data)


def test_ignore_range(srv: FileServer) -> None:
    data = payload(9000)
    srv.put("/i.bin", data)
    srv.behave("/i.bin", ignore_range=True)
    r = curl(srv.url("/i.bin"), range_="100-")
    assert (r.status, r.body) == (200, data)
    assert "accept-ranges" not in r.headers and "content-range" not in r.headers
    assert srv.requests_for("/i.bin")[0].range_start == 100


def test_lie_length_shorter_and_longer(srv: FileServer) -> None:
    data = payload(10_000)
    srv.put("/l.bin", data)
    srv.behave("/l.bin", lie_length=4000)
    head, body = raw_get(srv.port, "/l.bin")
    assert b"Content-Length: 4000" in head and body == data  # the real body is sent anyway
    r = curl(srv.url("/l.bin"))
    assert r.headers["content-length"] == "4000" and r.body == data[:4000]  # the client sees too few bytes

    srv.behave("/l.bin", lie_length=20_000)
    r = curl(srv.url("/l.bin"))
    assert r.error == pycurl.E_PARTIAL_FILE and r.body == data
    assert srv.wait_idle()  # the client may finish reading before the server has logged
    assert srv.requests_for("/l.bin")[-1].body_bytes_sent == len(data)


def test_extra_bytes_after_body(srv: FileServer) -> None:
    data = payload(6000)
    srv.put("/x.bin", data)
    srv.behave("/x.bin", extra_bytes=123)
    head, body = raw_get(srv.port, "/x.bin")
    assert b"Content-Length: 6000" in head
    assert len(body) == 6000 + 123 and body[:6000] == data
    r = curl(srv.url("/x.bin"))
    assert r.body == data
    assert srv.wait_idle()  # the client may finish reading before the server has logged
    assert srv.bytes_sent("/x.bin") == 2 * 6000  # junk is not counted as file content


# -- speed and interruptions -------------------------------------------------------


def test_rate_is_a_lower_bound_on_duration(srv: FileServer) -> None:
    data = payload(200_000)
    srv.put("/slow.bin", data)
    srv.behave("/slow.bin", rate=100_000)
    r = curl(srv.url("/slow.bin"), timeout=20)
    assert (r.error, r.body) == (None, data)
    assert r.elapsed >= 1.5


def test_rate_change_applies_to_inflight_response(srv: FileServer) -> None:
    data = payload(2_000_000)  # 40 s at the initial rate; the 15 s client timeout proves the speed-up
    srv.put("/s.bin", data)
    srv.behave("/s.bin", rate=50_000)
    result: list[Resp] = []
    t = threading.Thread(target=lambda: result.append(curl(srv.url("/s.bin"), timeout=15)))
    t.start()
    time.sleep(0.8)
    sent_while_slow = srv.bytes_sent("/s.bin")
    assert 0 < sent_while_slow < 200_000
    srv.behave("/s.bin", rate=200_000_000)
    t.join(20)
    assert result and (result[0].error, result[0].body) == (None, data)
    assert result[0].elapsed < 15


def test_drop_after_then_normal(srv: FileServer) -> None:
    data = payload(100_000)
    srv.put("/drop.bin", data)
    srv.behave("/drop.bin", drop_after=30_000, drop_times=2)
    for _ in range(2):
        r = curl(srv.url("/drop.bin"))
        assert r.error == pycurl.E_PARTIAL_FILE and r.body == data[:30_000]
    r = curl(srv.url("/drop.bin"))
    assert (r.error, r.body) == (None, data)
    assert srv.wait_idle()
    logs = srv.requests_for("/drop.bin")
    assert [x.completed for x in logs] == [False, False, True]
    assert [x.body_bytes_sent for x in logs] == [30_000, 30_000, 100_000]


def test_bytes_sent_across_resume(srv: FileServer) -> None:
    data = payload(250_000)
    srv.put("/r.bin", data)
    srv.behave("/r.bin", drop_after=90_000)
    first = curl(srv.url("/r.bin"))
    assert first.error == pycurl.E_PARTIAL_FILE
    got = len(first.body)
    second = curl(srv.url("/r.bin"), range_=f"{got}-", headers=[f"If-Range: {first.headers['etag']}"])
    assert second.status == 206
    assert first.body + second.body == data
    assert srv.wait_idle()  # the client may finish reading before the server has logged
    assert srv.bytes_sent("/r.bin") == len(data)  # nothing was fetched twice
    assert [x.range_start for x in srv.requests_for("/r.bin")] == [None, 90_000]


def test_stall_pauses_the_body(srv: FileServer) -> None:
    data = payload(30_000)
    srv.put("/st.bin", data)
    srv.behave("/st.bin", stall_after=10_000, stall_seconds=1.2)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("GET", "/st.bin")
    resp = conn.getresponse()
    head = resp.read(10_000)
    t0 = time.monotonic()
    rest = resp.read()
    assert time.monotonic() - t0 >= 1.0
    assert head + rest == data
    conn.close()

    # libcurl's low-speed check gives up on the stall
    srv.behave("/st.bin", stall_after=10_000, stall_seconds=3)

    def low_speed(c: pycurl.Curl) -> None:
        c.setopt(pycurl.LOW_SPEED_LIMIT, 100_000)
        c.setopt(pycurl.LOW_SPEED_TIME, 1)

    r = curl(srv.url("/st.bin"), setup=low_speed)
    assert r.error == pycurl.E_OPERATION_TIMEDOUT and r.body == data[:10_000]


def test_client_abort_is_logged_quietly(srv: FileServer, capfd: pytest.CaptureFixture[str]) -> None:
    srv.put("/ab.bin", payload(3_000_000))
    srv.behave("/ab.bin", rate=1_000_000)

    def abort_soon(c: pycurl.Curl) -> None:
        c.setopt(pycurl.WRITEFUNCTION, lambda chunk: 0)  # 0 = abort the transfer

    r = curl(srv.url("/ab.bin"), setup=abort_soon)
    assert r.error == pycurl.E_WRITE_ERROR
    assert srv.wait_idle()
    log = srv.requests_for("/ab.bin")[0]
    assert log.ended is not None and not log.completed and log.status == 200
    assert 0 < log.body_bytes_sent < 3_000_000
    assert capfd.readouterr().err == ""


# -- statuses, redirects, methods --------------------------------------------------------


def test_status_sequence_with_retry_after(srv: FileServer) -> None:
    data = payload(5000)
    srv.put("/busy.bin", data)
    srv.behave("/busy.bin", status_sequence=[(503, {"Retry-After": "1"}), (429, {"Retry-After": "2"}), (500, {})])
    answers = [curl(srv.url("/busy.bin")) for _ in range(5)]
    assert [a.status for a in answers] == [503, 429, 500, 200, 200]
    assert answers[0].headers["retry-after"] == "1" and answers[1].headers["retry-after"] == "2"
    assert answers[3].body == data
    assert srv.wait_idle()  # the client may finish reading before the server has logged
    assert srv.bytes_sent("/busy.bin") == 2 * len(data)  # tiny error bodies are not file content
    srv.behave("/gone.bin", status_sequence=[(404, {})])
    assert curl(srv.url("/gone.bin")).status == 404


def test_redirect_to_file_url_is_refused_by_client(srv: FileServer) -> None:
    srv.behave("/evil", redirect_to="file:///etc/passwd")
    r = curl(srv.url("/evil"))
    assert (r.status, r.headers["location"]) == (302, "file:///etc/passwd")

    def http_only(c: pycurl.Curl) -> None:
        c.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)

    r = curl(srv.url("/evil"), follow=True, setup=http_only)
    assert r.error is not None and b"root:" not in r.body
    srv.behave("/ftp", redirect_to="ftp://127.0.0.1/x", redirect_code=301)
    r = curl(srv.url("/ftp"))
    assert (r.status, r.headers["location"]) == (301, "ftp://127.0.0.1/x")


def test_redirect_to_same_server_and_loops(srv: FileServer) -> None:
    data = payload(1000)
    srv.put("/target.bin", data)
    srv.behave("/moved", redirect_to=srv.url("/target.bin"), redirect_code=307)
    r = curl(srv.url("/moved"), follow=True)
    assert (r.error, r.status, r.body) == (None, 200, data)

    srv.behave("/self", redirect_to=srv.url("/self"))
    r = curl(srv.url("/self"), follow=True, max_redirs=4)
    assert r.error == pycurl.E_TOO_MANY_REDIRECTS
    assert len(srv.requests_for("/self")) == 5

    first = srv.redirect_chain("/loop", 3)
    assert first == srv.url("/loop/0")
    r = curl(first, follow=True, max_redirs=6)
    assert r.error == pycurl.E_TOO_MANY_REDIRECTS
    assert [x.path for x in srv.requests if x.path.startswith("/loop")][:5] == [
        "/loop/0",
        "/loop/1",
        "/loop/2",
        "/loop/0",
        "/loop/1",
    ]


def test_expect_method_and_reset(srv: FileServer) -> None:
    srv.put("/m.bin", b"abc")
    srv.behave("/m.bin", expect_method="POST")
    r = curl(srv.url("/m.bin"))
    assert r.status == 405 and r.headers["allow"] == "POST"
    assert curl(srv.url("/m.bin"), post=b"x").status == 201
    srv.behave("/m.bin")
    assert curl(srv.url("/m.bin")).body == b"abc"


# -- uploads --------------------------------------------------------------------------


def test_raw_upload(srv: FileServer) -> None:
    data = os.urandom(2_500_000)  # big enough for libcurl to send "Expect: 100-continue"
    r = curl(srv.url("/up"), post=data, headers=["Content-Type: application/octet-stream"])
    assert r.status == 201
    assert json.loads(r.body) == {"received": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (up,) = srv.uploads
    assert (up.path, up.method, up.body, up.content_type) == ("/up", "POST", data, "application/octet-stream")
    assert up.headers["content-length"] == str(len(data))
    assert up.headers["expect"] == "100-continue"


def test_put_upload_via_http_client(srv: FileServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("PUT", "/put.bin", body=b"hello put")
    resp = conn.getresponse()
    assert resp.status == 201 and json.loads(resp.read())["received"] == 9
    conn.close()
    assert srv.uploads[0].method == "PUT" and srv.uploads[0].body == b"hello put"


@pytest.mark.filterwarnings("ignore:HTTPPOST is deprecated:DeprecationWarning")
def test_multipart_upload(srv: FileServer) -> None:
    blob = os.urandom(200_000) + b"\r\n--\r\n\r" + os.urandom(1000)

    def form(c: pycurl.Curl) -> None:
        c.setopt(
            pycurl.HTTPPOST,
            [
                ("title", "hello wörld".encode()),
                ("file", (pycurl.FORM_BUFFER, "pic.jpg", pycurl.FORM_BUFFERPTR, blob)),
            ],
        )

    r = curl(srv.url("/form"), setup=form)
    assert r.status == 201
    (up,) = srv.uploads
    assert up.content_type.startswith("multipart/form-data; boundary=")
    assert up.fields == {"title": "hello wörld"}
    assert up.files == {"file": ("pic.jpg", blob)}
    assert json.loads(r.body)["received"] == len(up.body)


def test_chunked_request_body(srv: FileServer) -> None:
    pieces = [os.urandom(n) for n in (1, 5000, 70_000, 3)]
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("POST", "/chunky", body=iter(pieces), headers={"Content-Type": "x/y"}, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 201
    assert json.loads(resp.read())["received"] == sum(map(len, pieces))
    # the connection stays usable after a chunked body
    conn.request("GET", "/missing")
    assert conn.getresponse().status == 404
    conn.close()
    assert srv.uploads[0].body == b"".join(pieces)
    assert srv.uploads[0].headers["transfer-encoding"] == "chunked"


def test_upload_status_sequence_drop_and_rate(srv: FileServer) -> None:
    data = os.urandom(100_000)
    srv.behave("/u", status_sequence=[(503, {"Retry-After": "1"})])
    assert curl(srv.url("/u"), post=data).status == 503
    assert curl(srv.url("/u"), post=data).status == 201
    assert len(srv.uploads) == 1  # refused bodies are drained but not recorded

    srv.behave("/u", drop_after=1000)
    r = curl(srv.url("/u"), post=data)
    assert r.error is not None and r.status in (0, 100)
    assert srv.wait_idle()
    assert len(srv.uploads) == 1 and srv.requests_for("/u")[-1].status == 0

    srv.behave("/u", rate=100_000)
    r = curl(srv.url("/u"), post=data)
    assert r.status == 201 and r.elapsed >= 0.6
    assert srv.uploads[-1].body == data


def test_post_download(srv: FileServer) -> None:
    data = payload(40_000)
    srv.put("/report.bin", data)
    srv.behave("/report.bin", post_download=True)
    r = curl(srv.url("/report.bin"), post=b"q=1")
    assert (r.status, r.body) == (200, data)
    assert srv.uploads[0].body == b"q=1"
    r = curl(srv.url("/report.bin"), post=b"q=2", headers=["Range: bytes=100-"])
    assert (r.status, r.body) == (206, data[100:])


# -- tus resumable uploads -----------------------------------------------------------

TUS = {"Tus-Resumable": "1.0.0"}


def tus_call(srv: FileServer, method: str, path: str, headers: dict[str, str] | None = None,
             body: bytes | None = None) -> http.client.HTTPResponse:
    """One request on a fresh connection; the response, read."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def tus_patch(srv: FileServer, path: str, offset: int, data: bytes) -> http.client.HTTPResponse:
    return tus_call(srv, "PATCH", path, {**TUS, "Upload-Offset": str(offset),
                                         "Content-Type": "application/offset+octet-stream"}, data)


def tus_create(srv: FileServer, endpoint: str, length: int, metadata: str = "") -> str:
    resp = tus_call(srv, "POST", endpoint, {**TUS, "Upload-Length": str(length), "Upload-Metadata": metadata})
    assert resp.status == 201 and resp.getheader("Tus-Resumable") == "1.0.0"
    return resp.getheader("Location")


def test_tus_discovery_creation_head_and_patch(srv: FileServer) -> None:
    srv.behave("/files", tus=True)
    opts = tus_call(srv, "OPTIONS", "/files")
    assert opts.status == 204 and opts.getheader("Tus-Version") == "1.0.0"
    assert "creation" in opts.getheader("Tus-Extension")
    refused = tus_call(srv, "POST", "/files", {"Upload-Length": "10"}, b"not tus")  # no Tus-Resumable
    assert refused.status == 412 and refused.getheader("Tus-Version") == "1.0.0"
    assert tus_call(srv, "POST", "/files", TUS).status == 400  # no Upload-Length
    assert srv.uploads == [] and srv.tus_uploads() == []

    data = payload(10_000)
    location = tus_create(srv, "/files", len(data), "filename cGljLmpwZw==,empty ")
    assert location.startswith("/files/")  # a relative reference, resolved by the client
    head = tus_call(srv, "HEAD", location, TUS)
    assert head.status == 200 and head.getheader("Upload-Offset") == "0"
    assert (head.getheader("Upload-Length"), head.getheader("Cache-Control")) == ("10000", "no-store")
    bad_type = tus_call(srv, "PATCH", location, {**TUS, "Upload-Offset": "0", "Content-Type": "x/y"}, data)
    assert bad_type.status == 415
    assert tus_patch(srv, location, 5, data[5:]).status == 409  # not the server's offset
    first = tus_patch(srv, location, 0, data[:4000])
    assert first.status == 204 and first.getheader("Upload-Offset") == "4000"
    assert tus_patch(srv, location, 4000, data[4000:] + b"x").status == 413  # past Upload-Length
    assert tus_patch(srv, location, 4000, data[4000:]).getheader("Upload-Offset") == "10000"
    (up,) = srv.tus_uploads("/files")
    assert (up.path, up.length, up.metadata) == (location, len(data), {"filename": "pic.jpg", "empty": ""})
    assert up.data == data and up.complete and up.patches == [(0, 4000), (4000, 6000)] and up.received == len(data)
    assert tus_call(srv, "GET", location, TUS).status == 405
    assert tus_call(srv, "HEAD", "/files/nonesuch", TUS).status == 404


def test_tus_drop_after_keeps_what_arrived(srv: FileServer) -> None:
    data = payload(500_000)
    srv.behave("/t", tus=True, drop_after=123_456)
    location = tus_create(srv, "/t", len(data))
    with pytest.raises((http.client.HTTPException, OSError)):
        tus_patch(srv, location, 0, data)
    assert srv.wait_idle()
    assert tus_call(srv, "HEAD", location, TUS).getheader("Upload-Offset") == "123456"
    assert tus_patch(srv, location, 123_456, data[123_456:]).status == 204  # one drop only
    (up,) = srv.tus_uploads()
    assert up.data == data and up.patches == [(0, 123_456), (123_456, len(data) - 123_456)]
    assert [r.method for r in srv.requests_for(location)] == ["PATCH", "HEAD", "PATCH"]


def test_tus_client_abort_keeps_what_arrived(srv: FileServer) -> None:
    """A PATCH whose client goes away keeps the bytes that arrived, as tus servers do."""
    data = payload(400_000)
    srv.behave("/t", tus=True)
    location = tus_create(srv, "/t", len(data))
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(f"PATCH {location} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
                  f"Content-Type: application/offset+octet-stream\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                  + data[:150_000])
    deadline = time.monotonic() + 5  # the server may not have begun when the client is gone already
    while not any(r.ended for r in srv.requests_for(location)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tus_call(srv, "HEAD", location, TUS).getheader("Upload-Offset") == "150000"
    assert tus_patch(srv, location, 150_000, data[150_000:]).status == 204
    (up,) = srv.tus_uploads()
    assert up.data == data and up.patches == [(0, 150_000), (150_000, 250_000)]


def test_tus_expiry_termination_and_status_sequence(srv: FileServer) -> None:
    srv.behave("/t", tus=True, status_sequence=[(503, {"Retry-After": "1"})])
    assert tus_call(srv, "OPTIONS", "/t").status == 503  # the endpoint's failures reach every tus request
    a, b = tus_create(srv, "/t", 10), tus_create(srv, "/t", 10)
    srv.tus_expire(a, status=410)
    assert tus_call(srv, "HEAD", a, TUS).status == 410
    assert tus_patch(srv, a, 0, b"0123456789").status == 410
    assert tus_call(srv, "DELETE", b, TUS).status == 204
    assert tus_call(srv, "HEAD", b, TUS).status == 404
    assert [u.gone for u in srv.tus_uploads()] == [410, 404]
    assert tus_call(srv, "OPTIONS", "/other").status == 405  # paths without tus are as before


# -- concurrency and lifecycle -------------------------------------------------------


def test_max_concurrent_and_reset(srv: FileServer) -> None:
    for i in range(3):
        srv.put(f"/p{i}.bin", payload(60_000, seed=i))
        srv.behave(f"/p{i}.bin", rate=100_000)
    results: list[Resp] = []
    threads = [threading.Thread(target=lambda i=i: results.append(curl(srv.url(f"/p{i}.bin")))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert [r.error for r in results] == [None] * 3
    assert srv.max_concurrent >= 3
    assert srv.wait_idle()
    srv.reset_stats()
    assert (srv.max_concurrent, srv.requests, srv.uploads) == (0, [], [])


def test_requests_are_snapshots(srv: FileServer) -> None:
    srv.put("/a", b"a")
    curl(srv.url("/a"))
    assert srv.wait_idle()
    snap = srv.requests
    snap[0].status = 999
    snap.clear()
    assert srv.requests[0].status == 200


def test_standalone_root_mode(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.httpserver", "--root", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "server printed no URL"
        assert proc.stdout is not None
        base = proc.stdout.readline().strip()
        assert base.startswith("http://127.0.0.1:")
        data = payload(123_456)
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "late.bin").write_bytes(data)  # added after start: read at request time
        r = curl(base + "/sub/late.bin")
        assert (r.status, r.body) == (200, data)
        assert curl(base + "/sub/late.bin", range_="100-").body == data[100:]
        assert curl(base + "/nothing.bin").status == 404
        assert curl(base + "/../../etc/passwd").status == 404
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None and proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_root_with_behaviour(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(b"z" * 5000)
    with FileServer(root=tmp_path) as server:
        server.behave("/f.bin", drop_after=100)
        assert curl(server.url("/f.bin")).body == b"z" * 100
        assert curl(server.url("/f.bin")).body == b"z" * 5000
