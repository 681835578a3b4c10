"""The pycurl transfer engine: one attempt of one request, streamed between disk and network.

It knows nothing of Celery or SQL: it gets a ``Job`` (what to move), a ``Lease`` (how to
report progress and learn of pause/cancel, fenced by the store) and ``Limits`` (from the
policy), and returns an ``Outcome``. Everything it decides is plain data for the caller.

Downloads go to a hidden partial file beside the target and are renamed into place only
when complete and verified. A resume sends ``Range`` with ``If-Range`` on the validator
recorded with the bytes held, so two versions of a file are never joined. The sha256, when
asked for, is computed by a thread that reads the partial file behind the writer, off the
write path. The body is written in blocks of WRITE_BLOCK, not piece by piece.

Uploads stream from the sandbox file. A server that speaks tus 1.0 (asked with OPTIONS when
``resumable_uploads`` is on) keeps what it received: the upload's URL is stored before its first
byte is sent, and a later attempt asks the server for its offset (HEAD) and sends only the
rest (PATCH). Any other upload is one POST that starts from zero at every attempt.
"""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import fcntl
import functools
import hashlib
import ipaddress
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, Protocol

import pycurl

from ._exceptions import LeaseLost
from ._sandbox import open_file, parent_dir, partial_name
from ._settings import Settings

# requeue: back to admission at once (the size learnt does not fit the current conditions)
Kind = Literal["completed", "failed", "retry", "slow", "requeue", "paused", "cancelled", "lost", "refresh"]
CHUNK = 1024 * 1024
# libcurl hands the write callback at most 16 KiB at a time (CURL_MAX_WRITE_SIZE), whatever
# BUFFERSIZE says. A download keeps the pieces and writes them in one pwritev once this many bytes
# are pending: up to 1.7 times the throughput of a write per piece on this kind of machine
# (bench.download's "pycurl 128K writes" against "bare pycurl"). Larger writes, and writes aligned
# to their size, were slower here (ext4 then takes larger page-cache folios, which a VM that hands
# free memory back to its host must fault in again).
WRITE_BLOCK = 128 * 1024
_IOV_MOST = 64  # more pending pieces than this (a server's tiny chunks) are joined first
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
TUS = "1.0.0"
# headers each tus request sets itself: an app's own would contradict them (its Content-Type
# goes into Upload-Metadata instead)
_TUS_OWN = frozenset({"content-type", "tus-resumable", "upload-offset", "upload-length"})
# libcurl errors that say the request itself can never work (others are worth a retry)
_PERMANENT = {
    pycurl.E_UNSUPPORTED_PROTOCOL: "redirected to an unsupported scheme (only http and https are allowed)",
    pycurl.E_URL_MALFORMAT: "malformed URL",
    pycurl.E_TOO_MANY_REDIRECTS: "too many redirects",
    pycurl.E_SSL_CACERT_BADFILE: "cannot read the CA bundle",
    pycurl.E_PEER_FAILED_VERIFICATION: "TLS certificate verification failed",
    pycurl.E_SSL_CONNECT_ERROR: "TLS handshake failed",
}


@dataclasses.dataclass(frozen=True)
class Job:
    request_id: str
    app_id: str
    method: str
    url: str
    headers: dict[str, str]
    direction: Literal["download", "upload"]
    parts: tuple[str, ...]  # the local file, below the app's sandbox root
    expected_sha256: str | None = None
    validator: str | None = None  # of the bytes already held in the partial file (tus: of the local file)
    known_total: int | None = None
    form_fields: dict[str, str] | None = None  # upload as multipart/form-data
    refreshable: bool = False  # a 401/403 asks for a fresh URL instead of failing
    upload_url: str | None = None  # a tus upload on the server, of the local file version ``validator``


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the policy allows this attempt under the device's current conditions."""

    max_bytes: int | None = None  # rule 9: enforced on the stream when the length is unknown
    min_rate: float = 0.0  # rule 12: bytes/s averaged over ``window`` seconds
    window: float = 30.0


@dataclasses.dataclass
class Outcome:
    kind: Kind
    error: str | None = None
    status_code: int | None = None
    retry_after: float | None = None
    bytes_done: int = 0
    total: int | None = None
    validator: str | None = None
    degraded: str | None = None
    resumed_from: int = 0
    moved: int = 0  # body bytes that crossed the wire in this attempt


class Lease(Protocol):
    """The engine's only line to the store; every call is fenced by the attempt's token."""

    def renew(self, moved: int, **fields: Any) -> str | None:
        """Record progress (``moved``: wire bytes so far in this attempt) or facts (validator,
        total), extend the lease, and return the app's control ('pause'/'cancel') if any; raise
        LeaseLost if the attempt no longer owns it."""

    def max_rate(self) -> float:
        """The bytes per second this attempt may move now (0: no limit); it may change at every
        renewal, as other transfers start and end under a shared limit."""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


class _Responses:
    """Headers of the last response (redirects and 100-continue start a new block)."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}

    def line(self, raw: bytes) -> None:
        text = raw.decode("iso-8859-1").strip()
        if text.startswith("HTTP/"):
            self.status, self.headers = int(text.split()[1]), {}
        elif ":" in text:
            name, _, value = text.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def validator(self) -> str | None:
        etag = self.headers.get("etag")
        if etag and not etag.startswith("W/"):
            return etag
        return self.headers.get("last-modified")

    def length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value and value.isdigit() else None


class _Hasher(threading.Thread):
    """sha256 of a growing file, read back behind the writer from the page cache."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd, self.done, self.written = os.dup(fd), 0, 0
        self.finished = False
        self.wake = threading.Event()
        self.h = hashlib.sha256()

    def run(self) -> None:
        while True:
            if self.done < self.written:
                data = os.pread(self.fd, min(CHUNK, self.written - self.done), self.done)
                if not data:
                    break
                self.h.update(data)
                self.done += len(data)
            elif self.finished:
                break
            else:
                self.wake.wait(0.05)
                self.wake.clear()

    def hexdigest(self, size: int) -> str:
        self.written = size
        self._end()
        return self.h.hexdigest()

    def abandon(self) -> None:
        self.written = 0
        self._end()

    def _end(self) -> None:
        self.finished = True
        self.wake.set()
        self.join()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Attempt:
    """State shared by pycurl's callbacks during one perform()."""

    def __init__(self, job: Job, lease: Lease, limits: Limits, s: Settings) -> None:
        self.job, self.lease, self.limits, self.s = job, lease, limits, s
        self.abort: tuple[Kind, str] | None = None
        self.resp = _Responses()
        self.started = time.monotonic()
        self.next_tick = self.started + s.progress_interval
        self.lease_deadline = self.started + s.lease_seconds
        self.samples: deque[tuple[float, int]] = deque([(self.started, 0)])
        self.progress_fields: Callable[[int, int], dict[str, int]] = lambda down, up: {}
        self.rate = lease.max_rate()  # bytes/s this attempt may move (0: no limit)
        self.rate_since, self.rate_bytes = self.started, 0  # since when, and how much, at this rate
        self.base = 0  # bytes moved by earlier requests of this attempt (a tus upload makes several)

    def stop(self, kind: Kind, why: str) -> int:
        self.abort = (kind, why)
        return 1

    def progress(self, _dltotal: int, dlnow: int, _ultotal: int, ulnow: int) -> int:
        now = time.monotonic()
        if now < self.next_tick:
            return 0
        self.next_tick = now + self.s.progress_interval
        moved = self.base + dlnow + ulnow
        try:
            control = self.lease.renew(moved, **self.progress_fields(dlnow, ulnow))
            self.lease_deadline = now + self.s.lease_seconds
            if self.lease.max_rate() != self.rate:  # others started or ended under a shared limit
                self.rate, self.rate_since, self.rate_bytes = self.lease.max_rate(), now, 0
        except LeaseLost:
            return self.stop("lost", "lease lost")
        except Exception as exc:  # a store outage: go on until our own lease would run out
            if now > self.lease_deadline - 2 * self.s.progress_interval:
                return self.stop("retry", f"state store unreachable: {exc}")
            control = None
        if control == "cancel":
            return self.stop("cancelled", "removed by the app")
        if control == "pause":
            return self.stop("paused", "paused by the app")
        return self._check_rate(now, moved)

    def throttle(self, n: int) -> None:
        """Count ``n`` bytes moved and hold the transfer while it is ahead of its rate: libcurl
        waits for its callback, and TCP pushes back on the other end."""
        self.rate_bytes += n
        ahead = self.rate_bytes / self.rate - (time.monotonic() - self.rate_since)
        if ahead > 0:
            time.sleep(min(ahead, self.s.progress_interval))  # never so long that renewals lapse

    def buffer_size(self, most: int) -> int:
        """libcurl's buffer: under a rate limit about 1/8 s of bytes, so a throttle keeps up."""
        return min(most, max(16 * 1024, int(self.rate / 8))) if self.rate else most

    def _check_rate(self, now: float, moved: int) -> int:
        window, floor = self.limits.window, self.limits.min_rate
        self.samples.append((now, moved))
        while len(self.samples) > 2 and self.samples[1][0] <= now - window:
            self.samples.popleft()
        t0, b0 = self.samples[0]
        if floor > 0 and now - t0 >= window and (moved - b0) / (now - t0) < floor:
            rate = (moved - b0) / (now - t0)
            return self.stop("slow", f"rate {rate * 8 / 1000:.1f} kbit/s below the minimum {floor * 8 / 1000:.0f}")
        return 0


def forbidden_address(host: str) -> bool:
    """True for an address that is not globally routable: private, loopback, link-local,
    shared (CGNAT), reserved, multicast or unspecified, IPv4-mapped IPv6 included."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def _guarded_socket(att: _Attempt) -> Callable[..., Any]:
    """pycurl's socket opener: refuse a forbidden destination, whatever name or redirect led there."""

    def open_socket(_purpose: int, address: Any) -> Any:
        family, socktype, protocol, addr = address
        if forbidden_address(addr[0]):
            att.stop("failed", f"destination {addr[0]} is not a public address (block_private_destinations)")
            return pycurl.SOCKET_BAD
        return socket.socket(family, socktype, protocol)  # pycurl hands libcurl a dup of its descriptor

    return open_socket


@functools.cache
def system_ca_bundle() -> str | None:
    """The system's trusted CAs as this Python finds them: the pycurl wheel's bundled libcurl
    looks where its build machine kept them (/etc/pki/...), which Debian has not."""
    paths = ssl.get_default_verify_paths()
    for path in (os.environ.get(paths.openssl_cafile_env), paths.cafile, paths.openssl_cafile):
        if path and os.path.isfile(path):
            return path
    return None


_handles = threading.local()
_inherited: list[pycurl.Curl] = []  # a forked child's copy of its parent's handle: never closed here


def _handle() -> pycurl.Curl:
    """This thread's curl handle, its options reset. Its connections (and TLS sessions) outlive
    a transfer, so back-to-back transfers from a worker to one server skip the handshakes (for
    4 KB files, half the file server's CPU per transfer in bench.small). A forked child makes its own, and keeps the
    parent's unclosed (closing it would shut the connections the parent still uses)."""
    c = getattr(_handles, "curl", None)
    if c is None or _handles.pid != os.getpid():
        if c is not None:
            _inherited.append(c)
        c, _handles.pid = pycurl.Curl(), os.getpid()
        _handles.curl = c
    else:
        c.reset()
    return c


def _curl(job: Job, att: _Attempt, s: Settings, extra_headers: list[str]) -> pycurl.Curl:
    c = _handle()
    if s.block_private_destinations:
        c.setopt(pycurl.OPENSOCKETFUNCTION, _guarded_socket(att))
    c.setopt(pycurl.URL, job.url)
    c.setopt(pycurl.NOSIGNAL, 1)
    c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
    c.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
    c.setopt(pycurl.FOLLOWLOCATION, 1)
    c.setopt(pycurl.MAXREDIRS, s.max_redirects)
    c.setopt(pycurl.CONNECTTIMEOUT_MS, int(s.connect_timeout * 1000))
    c.setopt(pycurl.BUFFERSIZE, att.buffer_size(s.buffer_size))
    c.setopt(pycurl.UPLOAD_BUFFERSIZE, att.buffer_size(min(s.buffer_size, 2 * 1024 * 1024)))
    c.setopt(pycurl.NOPROGRESS, 0)
    c.setopt(pycurl.XFERINFOFUNCTION, att.progress)
    c.setopt(pycurl.HEADERFUNCTION, att.resp.line)
    ca = s.ca_bundle or system_ca_bundle()
    if ca:
        c.setopt(pycurl.CAINFO, ca)
    headers = [f"{k}: {v}" for k, v in job.headers.items()] + extra_headers
    c.setopt(pycurl.HTTPHEADER, headers)
    return c


def _perform(c: pycurl.Curl) -> tuple[int, str] | None:
    """Run the transfer; the libcurl error (code, message) or None."""
    try:
        c.perform()
    except pycurl.error as exc:
        return exc.args[0], exc.args[1]
    return None


def _classify_http(code: int, resp: _Responses, job: Job) -> Outcome | None:
    """An outcome for a final status other than success, or None for success."""
    if 200 <= code < 300:
        return None
    if code in (408, 429) or code >= 500:
        return Outcome("retry", f"HTTP {code}", code, _retry_after(resp.headers.get("retry-after")))
    if code in (401, 403) and job.refreshable:  # an expired presigned URL, most likely
        return Outcome("refresh", f"HTTP {code}", code)
    return Outcome("failed", f"HTTP {code}", code)


def _classify_curl(err: tuple[int, str], att: _Attempt) -> Outcome:
    if att.abort is not None:
        kind, why = att.abort
        return Outcome(kind, why, att.resp.status or None)
    code, msg = err
    if code in _PERMANENT:
        return Outcome("failed", f"{_PERMANENT[code]}: {msg}")
    return Outcome("retry", f"curl error {code}: {msg}", att.resp.status or None)


def download(job: Job, lease: Lease, limits: Limits, s: Settings) -> Outcome:
    """One attempt at a download: resume if possible, publish atomically when complete."""
    with parent_dir(s, job.app_id, job.parts, create=True) as dfd:
        part = partial_name(job.parts, job.request_id)
        fd = open_file(dfd, part, os.O_RDWR | os.O_CREAT)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return Outcome("retry", "a previous attempt is still writing the partial file")
            out = _Download(job, lease, limits, s, fd).run()
            if out.kind == "completed":
                os.replace(part, job.parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
            return out  # a failed or cancelled attempt's partial file is the caller's to delete
        finally:
            os.close(fd)


class _Download:
    """A download attempt into an open, locked partial file."""

    def __init__(self, job: Job, lease: Lease, limits: Limits, s: Settings, fd: int) -> None:
        self.job, self.lease, self.limits, self.s, self.fd = job, lease, limits, s, fd
        held = os.fstat(fd).st_size
        self.resumable = job.method == "GET" and held > 0 and job.validator is not None
        if not self.resumable and held:
            os.ftruncate(fd, 0)
            held = 0
        self.held = held  # bytes on disk before this attempt
        self.offset = self.pos = held  # where this response's body starts / has reached
        self.written = held  # bytes in the file: the pieces received since are pending
        self.pending: list[bytes] = []
        self.total: int | None = None
        self.validator = job.validator
        self.degraded: list[str] = []
        self.hasher: _Hasher | None = None
        self.writing: bool | None = None  # None until the first body byte
        self.moved = 0
        self.cap = limits.max_bytes if limits.max_bytes is not None else 1 << 62
        self.hash_at = 1 << 62  # the position at which to wake the hasher next (never without one)
        self.meta: dict[str, Any] = {}  # what the response said of the bytes: sent with every renewal
        self.att = _Attempt(job, lease, limits, s)
        self.att.progress_fields = lambda down, _up: {"bytes_received": self.offset + down, **self.meta}

    def _start(self) -> bool:
        """At the first body byte of the final response: decide where the bytes go."""
        r, att = self.att.resp, self.att
        if not 200 <= r.status < 300:
            return False  # an error body: discard it, the status says what happened
        if r.status == 206 and self.resumable:
            m = _CONTENT_RANGE.fullmatch(r.headers.get("content-range", ""))
            if not m or int(m.group(1)) != self.held:
                att.stop("retry", "server answered a different range")
                return False
            total = int(m.group(3)) if m.group(3) != "*" else None
        else:
            if self.held:
                if r.validator() == self.job.validator:
                    self.degraded.append("server ignores Range")
                os.ftruncate(self.fd, 0)
                self.offset = self.pos = self.written = 0
            total = r.length()
        if total is None:
            self.degraded.append("no Content-Length")
        self.validator = r.validator()
        if self.validator is None:
            self.degraded.append("no validator")
        self.total = total  # (a requeue takes it back to admission, which decides by it)
        limit = self.limits.max_bytes
        if limit is not None and total is not None and total > limit:
            att.stop("requeue", f"{total} bytes: too large for the current conditions")
            return False
        self.meta = {"validator": self.validator, "total_bytes_to_receive": total,
                     "degraded": ", ".join(self.degraded) or None}
        # A stored validator vouches for the bytes in the partial file, so one that no longer
        # matches them must be replaced before the first byte is written. With none stored
        # (a first attempt) the bytes stay unvouched until the first renewal, and an attempt
        # after a crash in between starts from zero: one store write fewer per download.
        if self.job.validator is not None and self.job.validator != self.validator:
            try:
                self.lease.renew(0, bytes_received=self.offset, **self.meta)
            except LeaseLost:
                att.stop("lost", "lease lost")
                return False
            except Exception as exc:
                att.stop("retry", f"state store unreachable: {exc}")
                return False
        self._start_hasher()
        return True

    def _start_hasher(self) -> None:
        if self.job.expected_sha256:
            self.hasher = _Hasher(self.fd)
            self.hasher.written = self.offset
            self.hasher.start()
            self.hash_at = self.offset + CHUNK

    def write(self, chunk: bytes) -> int | None:
        """pycurl's write callback: the hot path, kept to a list append and a counter (and a
        write per WRITE_BLOCK)."""
        if not self.writing:
            if self.writing is None:
                self.writing = self._start()
            if not self.writing:
                return 0 if self.att.abort else None
        self.pending.append(chunk)
        self.pos += len(chunk)
        if self.pos - self.written >= WRITE_BLOCK and not self._flush():
            return 0
        if self.att.rate:
            self.att.throttle(len(chunk))
        if self.pos > self.cap:  # rule 9 on the stream itself, for servers that sent no length
            self.att.stop("requeue", f"more than {self.cap} bytes: too large for the current conditions")
            return 0
        return None

    def _flush(self) -> bool:
        """Write the pending pieces. False, with the attempt stopped, on a local file error (a
        full disk): the bytes written stay, the rest are dropped."""
        pieces = self.pending if len(self.pending) <= _IOV_MOST else [b"".join(self.pending)]
        self.pending = []
        try:
            while self.written < self.pos:
                n = os.pwritev(self.fd, pieces, self.written)
                self.written += n
                if self.written < self.pos:  # a short write: only near a full disk
                    pieces = [b"".join(pieces)[n:]]
        except OSError as exc:  # keep what was written, try again later
            self.pos = self.written
            if self.att.abort is None:  # (a pause or a cancel that came first still says why)
                self.att.stop("retry", f"local file error: {exc.strerror}")
            return False
        if self.written >= self.hash_at:  # wake the hasher per MiB, not per block
            self.hash_at = self.written + CHUNK
            self.hasher.written = self.written  # type: ignore[union-attr]
            self.hasher.wake.set()  # type: ignore[union-attr]
        return True

    def _outcome(self, kind: Kind, error: str | None, code: int | None, **kw: Any) -> Outcome:
        if self.hasher is not None:
            self.hasher.abandon()
        return Outcome(kind, error, code, bytes_done=self.pos, total=self.total, validator=self.validator,
                       degraded=", ".join(self.degraded) or None,
                       resumed_from=self.held if self.offset else 0, moved=self.moved, **kw)

    def run(self) -> Outcome:
        job, att = self.job, self.att
        extra = ["Expect:"]
        if self.resumable:
            extra += [f"Range: bytes={self.held}-", f"If-Range: {job.validator}"]
        c = _curl(job, att, self.s, extra)
        c.setopt(pycurl.WRITEFUNCTION, self.write)
        if job.method == "POST":
            c.setopt(pycurl.POSTFIELDSIZE, 0)
            c.setopt(pycurl.POST, 1)
        try:
            err = _perform(c)
            code = c.getinfo(pycurl.RESPONSE_CODE)
            self.moved = int(c.getinfo(pycurl.SIZE_DOWNLOAD_T))
        finally:
            c.reset()  # (this attempt's callbacks let go; the connection stays for the next)
        if not self._flush() and err is None:
            err = (pycurl.E_WRITE_ERROR, "")  # the attempt's stop says why
        if code == 416 and err is None:
            if self.resumable and self.held == job.known_total:  # already whole: nothing was missing
                self.pos = self.total = self.held
                self.offset = self.held
                self._start_hasher()
            else:  # the bytes held do not fit the file any more: start over
                os.ftruncate(self.fd, 0)
                self.pos = self.written = 0
                return self._outcome("retry", "range not satisfiable; restarting from zero", code, retry_after=0.0)
        elif err is not None:
            out = _classify_curl(err, att)
            return self._outcome(out.kind, out.error, out.status_code)
        else:
            bad = _classify_http(code, att.resp, job)
            if bad is not None:
                return self._outcome(bad.kind, bad.error, code, retry_after=bad.retry_after)
        if self.total is not None and self.pos != self.total:
            return self._outcome("retry", f"received {self.pos} of {self.total} bytes", code)
        if self.hasher is not None:
            digest = self.hasher.hexdigest(self.pos)
            if digest != job.expected_sha256:
                return self._outcome("failed", f"sha256 mismatch: got {digest}, expected {job.expected_sha256}",
                                     code)
        self.total = self.pos
        return self._outcome("completed", None, code)


class _Body:
    """A request body streamed from the file: raw, or wrapped as one multipart/form-data part."""

    def __init__(self, job: Job, f: Any, size: int) -> None:
        self.f = f
        self.head = self.tail = b""
        if job.form_fields is None:
            self.content_type = "application/octet-stream"
        else:
            boundary = uuid.uuid4().hex
            self.content_type = f"multipart/form-data; boundary={boundary}"
            fields = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                             for k, v in job.form_fields.items())
            filename = urllib.parse.quote(job.parts[-1])
            self.head = (fields + f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                         f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
            self.tail = f"\r\n--{boundary}--\r\n".encode()
        self.size = len(self.head) + size + len(self.tail)

    def read(self, n: int) -> bytes:
        if self.head:
            out, self.head = self.head[:n], self.head[n:]
            return out
        data = self.f.read(n)
        if data:
            return data
        out, self.tail = self.tail[:n], self.tail[n:]
        return out


def _throttled(att: _Attempt, data: bytes) -> bytes:
    att.throttle(len(data))
    return data


def upload(job: Job, lease: Lease, limits: Limits, s: Settings) -> Outcome:
    """One attempt at an upload streamed from the sandbox file: to a tus server, from the server's
    offset; to any other, a plain POST from zero."""
    with parent_dir(s, job.app_id, job.parts, create=False) as dfd:
        fd = open_file(dfd, job.parts[-1], os.O_RDONLY)
    with os.fdopen(fd, "rb", buffering=0) as f:
        if s.resumable_uploads and job.form_fields is None:  # tus carries no form fields
            size = os.fstat(fd).st_size
            if limits.max_bytes is not None and size > limits.max_bytes:
                return Outcome("failed", f"upload of {size} bytes exceeds {limits.max_bytes} allowed")
            out = _Tus(job, lease, limits, s, f, size).run()
            if out is not None:
                return out
        return _post(job, lease, limits, s, f)


def _post(job: Job, lease: Lease, limits: Limits, s: Settings, f: Any) -> Outcome:
    """A plain POST of the whole file (raw or multipart/form-data): the server keeps nothing of
    an interrupted one, so every attempt starts from zero."""
    body = _Body(job, f, os.fstat(f.fileno()).st_size)
    size = body.size
    att = _Attempt(job, lease, limits, s)
    if limits.max_bytes is not None and size > limits.max_bytes:
        return Outcome("failed", f"upload of {size} bytes exceeds {limits.max_bytes} allowed")
    att.progress_fields = lambda _down, up: {"bytes_sent": up}
    given = any(k.lower() == "content-type" for k in job.headers) and job.form_fields is None
    c = _curl(job, att, s, ["Expect:"] + ([] if given else [f"Content-Type: {body.content_type}"]))
    c.setopt(pycurl.POST, 1)
    c.setopt(pycurl.READFUNCTION, body.read if not att.rate else lambda n: _throttled(att, body.read(n)))
    c.setopt(pycurl.POSTFIELDSIZE_LARGE, size)
    c.setopt(pycurl.FRESH_CONNECT, 1)  # a kept connection found dead would need the body read again
    c.setopt(pycurl.WRITEFUNCTION, lambda chunk: None)
    try:
        lease.renew(0, total_bytes_to_send=size, bytes_sent=0)
        err = _perform(c)
        code = c.getinfo(pycurl.RESPONSE_CODE)
        sent = int(c.getinfo(pycurl.SIZE_UPLOAD_T))
    finally:
        c.reset()
    if err is not None:
        return dataclasses.replace(_classify_curl(err, att), bytes_done=sent, total=size, moved=sent)
    bad = _classify_http(code, att.resp, job)
    if bad is not None:
        if bad.kind == "failed" and s.resumable_uploads and job.form_fields is None and (
                "tus-resumable" in att.resp.headers or "tus-version" in att.resp.headers):
            # a tus server refusing a plain POST: its OPTIONS answer was lost or wrong this time
            bad = Outcome("retry", f"HTTP {code} from a tus server to a plain POST", code)
        return dataclasses.replace(bad, bytes_done=sent, total=size, moved=sent)
    return Outcome("completed", None, code, bytes_done=sent, total=size, moved=sent)


class _Stop(Exception):
    """Ends a tus attempt early with its outcome."""

    def __init__(self, out: Outcome) -> None:
        super().__init__(out.error)
        self.out = out


def _tokens(value: str | None) -> set[str]:
    return {v.strip().lower() for v in (value or "").split(",")}


def _file_version(fd: int) -> str:
    """What vouches for the bytes a tus server holds: the local file as it was when they were
    sent. A file changed since then starts a new upload rather than being spliced onto the old."""
    st = os.fstat(fd)
    return f"file {st.st_size} {st.st_mtime_ns} {st.st_ino}"


class _Tus:
    """A tus 1.0 upload attempt (https://tus.io/protocols/resumable-upload): a new upload is made
    with POST and its URL stored before any byte goes; after an interruption, HEAD says how much
    the server holds and PATCH sends the rest from the file at that offset."""

    def __init__(self, job: Job, lease: Lease, limits: Limits, s: Settings, f: Any, size: int) -> None:
        self.job, self.lease, self.s, self.f, self.size = job, lease, s, f, size
        self.version = _file_version(f.fileno())
        self.headers = {k: v for k, v in job.headers.items() if k.lower() not in _TUS_OWN}
        self.att = _Attempt(job, lease, limits, s)
        self.offset = 0  # what the server holds, as it said last (a broken PATCH's bytes count once it says so)
        self.remaining = 0  # of the current PATCH's body
        self.effective_url = job.url  # where the last request ended up, after redirects
        self.att.progress_fields = lambda _down, up: {"bytes_sent": self.offset + up}

    def run(self) -> Outcome | None:
        """The attempt's outcome; None when the server does not speak tus (a plain POST then)."""
        try:
            url = self._resume()
            if url is None:
                if self.job.upload_url is None and not self._speaks_tus():
                    return None
                url = self._create()
            while self.offset < self.size:
                self._patch(url)
        except _Stop as stop:
            out = stop.out
        else:
            out = Outcome("completed", None, self.att.resp.status or None)
        return dataclasses.replace(out, bytes_done=self.offset, total=self.size, moved=self.att.base)

    def _request(self, method: str, url: str, extra: list[str]) -> int:
        """One request of the attempt (a PATCH sends the file from ``offset``); its status, or _Stop
        on a libcurl error."""
        att = self.att
        att.resp = _Responses()
        c = _curl(dataclasses.replace(self.job, url=url, headers=self.headers), att, self.s, ["Expect:", *extra])
        c.setopt(pycurl.WRITEFUNCTION, lambda chunk: None)
        if method == "HEAD":
            c.setopt(pycurl.NOBODY, 1)
        elif method == "POST":
            c.setopt(pycurl.POSTFIELDS, b"")
        elif method == "PATCH":
            self.f.seek(self.offset)
            self.remaining = self.size - self.offset
            c.setopt(pycurl.FOLLOWLOCATION, 0)  # a redirect would need the body again
            c.setopt(pycurl.POST, 1)
            c.setopt(pycurl.READFUNCTION, self._read)
            c.setopt(pycurl.POSTFIELDSIZE_LARGE, self.remaining)
            c.setopt(pycurl.FRESH_CONNECT, 1)  # (as an upload's POST)
        if method in ("OPTIONS", "PATCH"):
            c.setopt(pycurl.CUSTOMREQUEST, method)
        try:
            err = _perform(c)
            code = int(c.getinfo(pycurl.RESPONSE_CODE))
            sent = int(c.getinfo(pycurl.SIZE_UPLOAD_T))
            self.effective_url = c.getinfo(pycurl.EFFECTIVE_URL)
        finally:
            c.reset()
        att.base += sent
        if err is not None:
            raise _Stop(_classify_curl(err, att))
        return code

    def _check(self, code: int) -> None:
        bad = _classify_http(code, self.att.resp, self.job)
        if bad is not None:
            raise _Stop(bad)

    def _speaks_tus(self) -> bool:
        """Whether the upload URL answers OPTIONS as a tus 1.0 server that creates uploads."""
        code = self._request("OPTIONS", self.job.url, [])
        h = self.att.resp.headers
        return 200 <= code < 300 and TUS in _tokens(h.get("tus-version")) and "creation" in _tokens(
            h.get("tus-extension"))

    def _resume(self) -> str | None:
        """The stored upload's URL, with the offset the server holds; None to make a new upload."""
        url = self.job.upload_url
        if url is None or self.job.validator != self.version:
            return None  # none yet, or the local file changed since its bytes were sent
        code = self._request("HEAD", url, [f"Tus-Resumable: {TUS}"])
        if code in (403, 404, 410):
            return None  # expired or unknown: tus servers answer any of these
        self._check(code)
        offset, length = self.att.resp.headers.get("upload-offset", ""), self.att.resp.headers.get("upload-length")
        if not offset.isdigit() or int(offset) > self.size or length not in (None, str(self.size)):
            return None  # not an upload of this file
        self.offset = int(offset)
        self._hold(url)
        return url

    def _create(self) -> str:
        """A new upload of the whole file; its URL is stored before any of its bytes is sent."""
        meta = next((v for k, v in self.headers.items() if k.lower() == "upload-metadata"), None)
        extra = [f"Tus-Resumable: {TUS}", f"Upload-Length: {self.size}", "Content-Type:"]
        if meta is None:
            pairs = {"filename": self.job.parts[-1]}
            ctype = next((v for k, v in self.job.headers.items() if k.lower() == "content-type"), None)
            if ctype:
                pairs["filetype"] = ctype
            extra.append("Upload-Metadata: " + ",".join(
                f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in pairs.items()))
        code = self._request("POST", self.job.url, extra)
        self._check(code)
        location = self.att.resp.headers.get("location")
        url = urllib.parse.urljoin(self.effective_url, location) if location else ""
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise _Stop(Outcome("failed", f"tus server answered HTTP {code} without an http(s) Location", code))
        self.offset = 0
        self._hold(url)
        return url

    def _hold(self, url: str) -> None:
        """Store the upload's URL and the file version it holds, with the progress, before a PATCH."""
        try:
            control = self.lease.renew(self.att.base, upload_url=url, validator=self.version,
                                       total_bytes_to_send=self.size, bytes_sent=self.offset)
        except LeaseLost:
            raise _Stop(Outcome("lost", "lease lost")) from None
        except Exception as exc:  # nothing may be sent that the store cannot find again
            raise _Stop(Outcome("retry", f"state store unreachable: {exc}")) from None
        if control == "cancel":
            raise _Stop(Outcome("cancelled", "removed by the app"))
        if control == "pause":
            raise _Stop(Outcome("paused", "paused by the app"))

    def _read(self, n: int) -> bytes:
        data = self.f.read(min(n, self.remaining))
        self.remaining -= len(data)
        if self.att.rate:
            self.att.throttle(len(data))
        return data

    def _patch(self, url: str) -> None:
        """Send the file from the server's offset to its end; the offset moves to what the server took."""
        code = self._request("PATCH", url, [f"Tus-Resumable: {TUS}", f"Upload-Offset: {self.offset}",
                                            "Content-Type: application/offset+octet-stream"])
        if code in (404, 409, 410, 423) or (code == 403 and not self.job.refreshable):
            # gone, another offset, or busy: the next attempt asks the server again (HEAD)
            raise _Stop(Outcome("retry", f"HTTP {code} to PATCH at offset {self.offset}", code))
        self._check(code)
        offset = self.att.resp.headers.get("upload-offset", "")
        if not offset.isdigit() or not self.offset < int(offset) <= self.size:
            raise _Stop(Outcome("retry", f"tus server answered Upload-Offset {offset!r} to a PATCH at "
                                         f"{self.offset}", code))
        self.offset = int(offset)


def run(job: Job, lease: Lease, limits: Limits, s: Settings) -> Outcome:
    return (upload if job.direction == "upload" else download)(job, lease, limits, s)
