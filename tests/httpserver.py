"""A misbehaving HTTP/1.1 file server for testing the transfer engine.

The engine's workers talk to real servers through libcurl, so its tests need a
real server on 127.0.0.1 that can be told to fail in specific, repeatable ways
(dropped connections, wrong lengths, throttling, redirects, error statuses) and
that records what it saw, so tests can assert on the wire-level outcome.

Typical use::

    with FileServer() as srv:
        srv.put("/a.bin", b"...")
        srv.behave("/a.bin", drop_after=1000)
        ...  # run the client against srv.url("/a.bin")
        assert srv.bytes_sent("/a.bin") == len(data)

``behave(path, tus=True)`` makes ``path`` a tus 1.0 creation endpoint (resumable uploads):
uploads live in memory under ``path/<id>`` and answer HEAD, PATCH and DELETE; ``drop_after``
and ``rate`` then apply to PATCH bodies, and :meth:`FileServer.tus_uploads` says which bytes
each PATCH delivered, so a test can prove that no byte was sent twice.

Standalone: ``python -m tests.httpserver --root DIR [--port P]`` serves DIR and
prints its base URL on the first line of stdout.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import email.parser
import email.policy
import email.utils
import hashlib
import http.server
import itertools
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timezone
from pathlib import Path
from typing import Any

__all__ = ["FileServer", "RequestLog", "TusUpload", "Upload"]

HOST = "127.0.0.1"
_FULL_SPEED_PIECE = 64 * 1024 * 1024  # per loop turn when unthrottled; the kernel splits it anyway
_UPLOAD_PIECE = 256 * 1024
TUS = "1.0.0"


@dataclass
class RequestLog:
    """One request as the server saw it; updated in place while it is in flight.

    ``status`` is 0 when no response was sent (e.g. dropped while reading an
    upload). ``body_bytes_sent`` counts only bytes of a served file's content,
    not the tiny bodies of error/redirect/JSON answers, so tests can compare it
    directly with file sizes.
    """

    method: str
    path: str
    headers: dict[str, str]
    range_start: int | None
    status: int = 0
    body_bytes_sent: int = 0
    started: float = 0.0
    ended: float | None = None
    completed: bool = False
    query: str = ""
    answered: bool = False  # its last byte about to be written (or its handler ended): no longer counted as concurrent


@dataclass
class Upload:
    """A request body received by POST/PUT, with multipart parts decoded."""

    path: str
    method: str
    headers: dict[str, str]
    body: bytes
    content_type: str
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)


@dataclass
class TusUpload:
    """A tus upload held by the server: the bytes received so far, and what each PATCH gave.

    ``patches`` is one (Upload-Offset, bytes received) per PATCH that was accepted, in order,
    including the bytes of one cut short: they are kept, as a tus server keeps them.
    """

    path: str  # its URL path, "<endpoint>/<id>"
    length: int
    metadata: dict[str, str]
    data: bytearray = field(default_factory=bytearray)
    patches: list[tuple[int, int]] = field(default_factory=list)
    gone: int | None = None  # the status it answers with once expired or terminated
    busy: bool = False  # a PATCH is being received

    @property
    def received(self) -> int:
        """PATCH body bytes received in total (equal to ``length`` when no byte came twice)."""
        return sum(n for _, n in self.patches)

    @property
    def complete(self) -> bool:
        return len(self.data) == self.length


@dataclass
class _Behaviour:
    """Per-path misbehaviour; ``drop_times`` and ``status_sequence`` are consumed."""

    no_content_length: bool = False
    close_delimited: bool = False
    ignore_range: bool = False
    rate: float | None = None
    drop_after: int | None = None
    drop_times: int = 1
    lie_length: int | None = None
    extra_bytes: int = 0
    stall_after: int | None = None
    stall_seconds: float = 0.0
    status_sequence: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    redirect_to: str | None = None
    redirect_code: int = 302
    expect_method: str | None = None
    post_download: bool = False
    signed: str | None = None  # the query a request must carry, like a presigned URL's signature
    tus: bool = False  # a tus 1.0 creation endpoint; its uploads share this behaviour


@dataclass(frozen=True)
class _Entry:
    """What to serve for a path: bytes in memory or a file on disk, plus validators."""

    data: bytes | None
    file: Path | None
    etag: str | None
    last_modified: int | None  # whole seconds since the epoch

    def open(self) -> _Body:
        """Open the content for one response; raises OSError if the file vanished."""
        if self.data is not None:
            return _Body(self.data, None, len(self.data))
        assert self.file is not None
        fd = os.open(self.file, os.O_RDONLY)
        try:
            return _Body(None, fd, os.fstat(fd).st_size)
        except OSError:
            os.close(fd)
            raise


class _Body:
    """Content source that writes exact byte ranges to a socket, reporting progress per syscall."""

    def __init__(self, data: bytes | None, fd: int | None, size: int) -> None:
        self.data, self.fd, self.size = data, fd, size

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def send(self, sock: socket.socket, offset: int, count: int, progress: Callable[[int], None]) -> None:
        if self.data is not None:
            view = memoryview(self.data)[offset : offset + count]
            while view:
                n = sock.send(view[: 1 << 20])
                progress(n)
                view = view[n:]
            return
        assert self.fd is not None
        if isinstance(sock, ssl.SSLSocket):  # sendfile would bypass TLS: read and send instead
            while count > 0:
                chunk = os.pread(self.fd, min(count, 1 << 20), offset)
                if not chunk:
                    raise ConnectionAbortedError("served file shrank while sending")
                sock.sendall(chunk)
                progress(len(chunk))
                offset += len(chunk)
                count -= len(chunk)
            return
        out = sock.fileno()
        while count > 0:
            n = os.sendfile(out, self.fd, offset, count)  # zero-copy: the fast path for big files
            if n == 0:
                raise ConnectionAbortedError("served file shrank while sending")
            progress(n)
            offset += n
            count -= n


class _Drop(Exception):
    """Raised inside a handler to cut the connection abruptly."""


def _piece_size(rate: float | None) -> int:
    """Small pieces at low rates keep throttling smooth and rate changes quick to take effect."""
    if not rate:
        return _FULL_SPEED_PIECE
    return max(1, min(16384, int(rate / 16)))


class _Pacer:
    """Keeps a transfer at the path's *current* rate, re-read for every piece."""

    def __init__(self, owner: FileServer, path: str) -> None:
        self._owner, self._path = owner, path
        self._rate: float | None = None
        self._due = 0.0

    def piece(self) -> int:
        return _piece_size(self._owner._rate(self._path))

    def wait(self, n: int) -> None:
        """Sleep until ``n`` more bytes may go out; return early if the rate changes meanwhile.

        Called before each piece, so the last piece is not followed by a pointless sleep.
        """
        rate = self._owner._rate(self._path)
        if not rate:
            self._rate = None
            return
        now = time.monotonic()
        if rate != self._rate:
            self._rate, self._due = rate, now
        self._due = max(self._due, now - 0.1)  # after a stall or a slow client, allow at most a 0.1 s burst
        stopping = self._owner._stopping
        while not stopping.is_set():
            delay = self._due - time.monotonic()
            if delay <= 0 or self._owner._rate(self._path) != rate:
                break
            stopping.wait(min(delay, 0.05))
        self._due += n / rate


def _request_path(target: str) -> str:
    """Path part of a request target (origin- or absolute-form), percent-decoded, without query."""
    if not target.startswith("/"):
        target = "/" + target.split("://", 1)[-1].partition("/")[2]
    return urllib.parse.unquote(target.split("?", 1)[0].split("#", 1)[0])


def _range_start(value: str | None) -> int | None:
    """Start offset of a single ``bytes=N-[M]`` range, else None."""
    parsed = _parse_range_spec(value)
    return parsed[0] if parsed else None


def _parse_range_spec(value: str | None) -> tuple[int, int | None] | None:
    if not value:
        return None
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # multiple ranges are not supported: ignoring Range is allowed by RFC 9110
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not first.isdigit() or (last and not last.isdigit()):
        return None
    start, end = int(first), int(last) if last else None
    if end is not None and end < start:
        return None
    return start, end


def _if_range_matches(value: str, entry: _Entry) -> bool:
    """Strong comparison only: weak ETags never match (RFC 9110 13.1.5)."""
    value = value.strip()
    if value.startswith("W/"):
        return False
    if value.startswith('"'):
        return entry.etag is not None and not entry.etag.startswith("W/") and value == entry.etag
    if entry.last_modified is None:
        return False
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp() == entry.last_modified


def _parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """Split a multipart/form-data body into text fields and file parts (stdlib email parser)."""
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    raw = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    if not msg.is_multipart():
        return fields, files
    for part in msg.iter_parts():  # type: ignore[attr-defined]
        name = part.get_param("name", header="content-disposition")
        if name is None:
            continue
        name = email.utils.collapse_rfc2231_value(name)
        payload = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            files[name] = (filename, payload)
        else:
            fields[name] = payload.decode(part.get_content_charset() or "utf-8", "replace")
    return fields, files


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    owner: FileServer

    def server_bind(self) -> None:
        # Skip HTTPServer's reverse DNS lookup of the host name.
        http.server.socketserver.TCPServer.server_bind(self)  # type: ignore[attr-defined]
        self.server_name, self.server_port = self.server_address[:2]

    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.tls is not None:
            sock.settimeout(5)
            sock = self.tls.wrap_socket(sock, server_side=True)
            sock.settimeout(None)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay silent: aborted clients are an expected part of these tests."""


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "bgtransfer-testserver/1"
    server: _HTTPServer
    _log: RequestLog | None = None

    # -- plumbing -----------------------------------------------------------

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.owner._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default per-request stderr logging."""

    def handle_one_request(self) -> None:
        self._log = None
        try:
            super().handle_one_request()
        except OSError:
            self.close_connection = True

    def send_response(self, code: int, message: str | None = None) -> None:
        if self._log is not None:
            self._log.status = code
        super().send_response(code, message)

    def _dispatch(self) -> None:
        owner = self.server.owner
        path = _request_path(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        log = RequestLog(self.command, path, headers, _range_start(headers.get("range")), started=time.monotonic(),
                         query=urllib.parse.urlsplit(self.path).query)
        self._log = log
        owner._begin(log)
        try:
            self._respond(owner, path, headers, log)
        except _Drop:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            # Client went away (broken pipe, reset) or sent a malformed body: just drop the connection.
            self.close_connection = True
        finally:
            owner._end(log)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    # -- responses ----------------------------------------------------------

    def _respond(self, owner: FileServer, path: str, headers: dict[str, str], log: RequestLog) -> None:
        root = owner._tus_root(path)
        upload_path, path = path, root or path  # a tus upload behaves as its endpoint does
        b = owner._behaviour(path)
        method = self.command
        upload = method in ("POST", "PUT")
        has_body = "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower()

        refusal: tuple[int, dict[str, str]] | None = None
        if b.expect_method and method != b.expect_method.upper():
            refusal = (405, {"Allow": b.expect_method.upper()})
        elif b.signed is not None and log.query != b.signed:
            refusal = (403, {})  # an expired or forged signature
        elif (status := owner._next_status(path)) is not None:
            refusal = status
        elif b.redirect_to is not None:
            refusal = (b.redirect_code, {"Location": b.redirect_to})
        if has_body and (refusal is not None or not (upload or b.tus)):
            # Drain bodies we will not use: closing with unread input would reset the connection
            # and could destroy the answer before the client reads it.
            self._read_body(owner, path)
        if refusal is not None:
            self._simple(*refusal)
            return
        if b.tus:
            self._tus(owner, path, upload_path, headers, has_body)
            return

        if upload:
            drop_at = owner._take_drop(path)
            body = self._read_body(owner, path, limit=drop_at, paced=True)
            if drop_at is not None:
                raise _Drop
            ctype = headers.get("content-type", "")
            fields: dict[str, str] = {}
            files: dict[str, tuple[str, bytes]] = {}
            if ctype.lower().startswith("multipart/"):
                fields, files = _parse_multipart(ctype, body)
            owner._record_upload(Upload(path, method, headers, body, ctype, fields, files))
            entry = owner._entry(path)
            if b.post_download and entry is not None:
                self._serve(owner, path, headers, entry, b, log, allow_drop=False)
                return
            answer = json.dumps({"received": len(body), "sha256": hashlib.sha256(body).hexdigest()}).encode()
            self._simple(201, {"Content-Type": "application/json"}, answer)
            return

        if method not in ("GET", "HEAD"):
            self._simple(405, {"Allow": "GET, HEAD, POST, PUT"})
            return
        entry = owner._entry(path)
        if entry is None:
            self._simple(404)
            return
        self._serve(owner, path, headers, entry, b, log, allow_drop=method == "GET")

    def _tus(self, owner: FileServer, root: str, path: str, headers: dict[str, str], has_body: bool) -> None:
        """tus 1.0 core with the creation and termination extensions, uploads held in memory."""
        method = self.command
        tus = {"Tus-Resumable": TUS}
        if method == "OPTIONS":
            self._simple(204, {**tus, "Tus-Version": TUS, "Tus-Extension": "creation,termination"}, b"")
            return
        upload = owner._tus_upload(path) if path != root else None
        refusal: tuple[int, dict[str, str]] | None = None
        if headers.get("tus-resumable") != TUS:
            refusal = (412, {"Tus-Version": TUS})
        elif path == root:
            length = headers.get("upload-length", "")
            if method != "POST":
                refusal = (405, {"Allow": "POST, OPTIONS"})
            elif not length.isdigit() or has_body and headers.get("content-length", "0") != "0":
                refusal = (400, {})  # no Upload-Length, or creation-with-upload (not offered)
            else:
                upload = owner._tus_create(root, int(length), headers.get("upload-metadata", ""))
                self._simple(201, {**tus, "Location": upload.path}, b"")
                return
        elif upload is None or upload.gone is not None:
            refusal = (upload.gone if upload is not None and upload.gone else 404, {})
        elif method == "HEAD":
            self._simple(200, {**tus, "Upload-Offset": str(len(upload.data)), "Upload-Length": str(upload.length),
                               "Cache-Control": "no-store"}, b"")
            return
        elif method == "DELETE":
            owner.tus_expire(path)
            refusal = (204, {})
        elif method != "PATCH":
            refusal = (405, {"Allow": "HEAD, PATCH, DELETE, OPTIONS"})
        elif headers.get("content-type") != "application/offset+octet-stream":
            refusal = (415, {})
        else:
            refusal = self._tus_patch(owner, root, upload, headers)
        if refusal is not None:
            if has_body:
                self._read_body(owner, root)
            self._simple(refusal[0], {**tus, **refusal[1]}, b"" if refusal[0] == 204 else None)

    def _tus_patch(self, owner: FileServer, root: str, upload: TusUpload,
                   headers: dict[str, str]) -> tuple[int, dict[str, str]] | None:
        """Receive a PATCH body into ``upload`` as it arrives; a refusal, or None once answered."""
        offset, count = headers.get("upload-offset", ""), headers.get("content-length", "")
        with owner._lock:
            if not offset.isdigit() or not count.isdigit():
                return 400, {}
            if upload.busy:
                return 423, {}
            if int(offset) != len(upload.data):
                return 409, {}
            if int(offset) + int(count) > upload.length:
                return 413, {}
            upload.busy = True
            index = len(upload.patches)
            upload.patches.append((int(offset), 0))

        def sink(data: bytes) -> None:
            with owner._lock:
                upload.data += data
                upload.patches[index] = (int(offset), upload.patches[index][1] + len(data))

        try:
            drop_at = owner._take_drop(root)
            self._read_body(owner, root, limit=drop_at, paced=True, sink=sink)
            if drop_at is not None:
                raise _Drop
        finally:
            with owner._lock:
                upload.busy = False
        self._simple(204, {"Tus-Resumable": TUS, "Upload-Offset": str(len(upload.data))}, b"")
        return None

    def _simple(self, code: int, headers: Mapping[str, str] | None = None, body: bytes | None = None) -> None:
        """Answer with a tiny body (not counted in body_bytes_sent)."""
        headers = dict(headers or {})
        if body is None:
            body = f"{code} {self.responses.get(code, ('',))[0]}\n".encode()
        self.send_response(code)
        names = {k.lower() for k in headers}
        if "content-type" not in names:
            self.send_header("Content-Type", "text/plain; charset=utf-8")
        for name, value in headers.items():
            self.send_header(name, value)
        if "content-length" not in names:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        assert self._log is not None
        self._log.completed = True
        self.server.owner._answered(self._log)

    def _serve(
        self,
        owner: FileServer,
        path: str,
        headers: dict[str, str],
        entry: _Entry,
        b: _Behaviour,
        log: RequestLog,
        allow_drop: bool,
    ) -> None:
        try:
            body = entry.open()
        except OSError:
            self._simple(404)
            return
        try:
            self._serve_body(owner, path, headers, entry, body, b, log, allow_drop)
        finally:
            body.close()

    def _serve_body(
        self,
        owner: FileServer,
        path: str,
        headers: dict[str, str],
        entry: _Entry,
        body: _Body,
        b: _Behaviour,
        log: RequestLog,
        allow_drop: bool,
    ) -> None:
        size = body.size
        start, end, status = 0, size, 200
        spec = None if b.ignore_range else _parse_range_spec(headers.get("range"))
        if spec is not None and "if-range" in headers and not _if_range_matches(headers["if-range"], entry):
            spec = None
        if spec is not None:
            if spec[0] >= size:
                self._simple(416, {"Content-Range": f"bytes */{size}"})
                return
            start, end, status = spec[0], size if spec[1] is None else min(spec[1] + 1, size), 206
        length = end - start

        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if entry.etag is not None:
            self.send_header("ETag", entry.etag)
        if entry.last_modified is not None:
            self.send_header("Last-Modified", email.utils.formatdate(entry.last_modified, usegmt=True))
        if not b.ignore_range:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        chunked = False
        if b.close_delimited:
            self.send_header("Connection", "close")
        elif b.no_content_length:
            self.send_header("Transfer-Encoding", "chunked")
            chunked = True
        else:
            self.send_header("Content-Length", str(length if b.lie_length is None else b.lie_length))
        self.end_headers()
        if self.command == "HEAD":
            log.completed = True
            owner._answered(log)
            return

        drop_at = owner._take_drop(path) if allow_drop else None
        if drop_at is not None:
            drop_at = min(drop_at, length)
        self._send_body(owner, path, body, start, length, log, chunked, drop_at, b)
        log.completed = True
        owner._answered(log)
        if b.extra_bytes:
            self.connection.sendall(b"X" * b.extra_bytes)
        if b.lie_length is not None or b.extra_bytes:
            self.close_connection = True  # the byte stream no longer matches the framing

    def _send_body(
        self,
        owner: FileServer,
        path: str,
        body: _Body,
        start: int,
        length: int,
        log: RequestLog,
        chunked: bool,
        drop_at: int | None,
        b: _Behaviour,
    ) -> None:
        sock = self.connection
        pacer = _Pacer(owner, path)
        stall_at = b.stall_after
        sent = 0

        def progress(n: int) -> None:
            log.body_bytes_sent += n

        while True:
            if drop_at is not None and sent >= drop_at:
                raise _Drop
            if stall_at is not None and sent >= stall_at:
                stall_at = None
                owner._stopping.wait(b.stall_seconds)
            if sent >= length:
                break
            n = min(length - sent, pacer.piece())
            if drop_at is not None:
                n = min(n, drop_at - sent)
            if stall_at is not None:
                n = min(n, stall_at - sent)
            pacer.wait(n)
            if sent + n >= length and not (chunked or b.close_delimited) and drop_at is None \
                    and b.lie_length is None:  # (a client of those framings is done later)
                if n > 1:  # all but the last byte first: the client cannot be done before that byte
                    body.send(sock, start + sent, n - 1, progress)
                    sent, n = sent + n - 1, 1
                owner._answered(log)  # the client may be done as soon as this byte arrives
            if chunked:
                sock.sendall(b"%x\r\n" % n)
            body.send(sock, start + sent, n, progress)
            if chunked:
                sock.sendall(b"\r\n")
            sent += n
        if chunked:
            owner._answered(log)
            sock.sendall(b"0\r\n\r\n")

    # -- request bodies -------------------------------------------------------

    def _read_body(self, owner: FileServer, path: str, limit: int | None = None, paced: bool = False,
                   sink: Callable[[bytes], None] | None = None) -> bytes:
        """Read a Content-Length or chunked request body, optionally throttled, stopping at ``limit`` bytes;
        with a ``sink``, each piece goes there as it arrives (and b"" is returned)."""
        parts: list[bytes] = []
        got = 0
        pacer = _Pacer(owner, path) if paced else None

        def take(count: int) -> bool:
            nonlocal got
            while count > 0:
                if limit is not None and got >= limit:
                    return False
                n = min(count, pacer.piece() if pacer else _UPLOAD_PIECE)
                if limit is not None:
                    n = min(n, limit - got)
                if pacer:
                    pacer.wait(n)
                data = self.rfile.read(n)
                if sink is not None:
                    sink(data)  # what arrived before a client went away counts, too
                else:
                    parts.append(data)
                if len(data) < n:
                    raise ConnectionAbortedError("client closed during request body")
                got += n
                count -= n
            return True

        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise ConnectionAbortedError("client closed during chunked body")
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass  # trailer fields
                    break
                if not take(size):
                    break
                if self.rfile.read(2) != b"\r\n":
                    raise ValueError("malformed chunk")
        else:
            take(int(self.headers.get("Content-Length") or 0))
        return b"".join(parts)


class FileServer:
    """Threaded HTTP/1.1 server on 127.0.0.1 that serves files and misbehaves on request.

    Files come from :meth:`put` (memory), :meth:`put_file` (disk) or, if given,
    the ``root`` directory (looked up at request time). Per-path failures are set
    with :meth:`behave`. Use as a context manager, or call start()/close().
    """

    def __init__(self, root: str | Path | None = None, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self._root = Path(root).resolve() if root is not None else None
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._clock: dict[str, int] = {}
        self._versions = itertools.count(1)
        self._behaviours: dict[str, _Behaviour] = {}
        self._requests: list[RequestLog] = []
        self._uploads: list[Upload] = []
        self._tus: dict[str, TusUpload] = {}  # by upload path, in creation order
        self._in_flight = 0  # from arrival until the handler ends
        self._answering = 0  # from arrival until the answer's last byte is written
        self._max_concurrent = 0
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._httpd = _HTTPServer((HOST, port), _Handler)
        self._httpd.owner = self
        self._httpd.tls = tls

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> FileServer:
        """Start serving in a daemon thread (the socket is already bound by __init__)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, args=(0.05,), name="FileServer", daemon=True
            )
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and cut open connections so no handler thread outlives the test."""
        self._stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
        self._httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- addresses ------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound TCP port (chosen by the OS when 0 was asked)."""
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` without a trailing slash."""
        return f"{'https' if self._httpd.tls else 'http'}://{HOST}:{self.port}"

    def url(self, path: str) -> str:
        """Absolute URL for a server path."""
        return self.base_url + _norm(path)

    # -- content --------------------------------------------------------------

    def put(self, path: str, data: bytes, *, etag: str | None = "strong", last_modified: bool = True) -> None:
        """Serve ``data`` at ``path``; calling again models a changed file (new ETag, later Last-Modified)."""
        data = bytes(data)
        self._install(path, data, None, hashlib.sha256(data).hexdigest(), etag, last_modified)

    def put_file(self, path: str, file: str | Path, *, etag: str | None = "strong", last_modified: bool = True) -> None:
        """Serve a file from disk at ``path`` (sent with sendfile on the unthrottled path)."""
        file = Path(file).resolve()
        st = file.stat()
        identity = f"{file}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        self._install(path, None, file, identity, etag, last_modified)

    def _install(
        self, path: str, data: bytes | None, file: Path | None, identity: str, etag: str | None, last_modified: bool
    ) -> None:
        if etag not in ("strong", "weak", None):
            raise ValueError("etag must be 'strong', 'weak' or None")
        path = _norm(path)
        with self._lock:
            version = next(self._versions)
            # A fake per-path clock: every new version is at least one second newer, even within one real second.
            stamp = max(int(time.time()), self._clock.get(path, -1) + 1)
            self._clock[path] = stamp
            tag = None
            if etag is not None:
                digest = hashlib.sha256(f"{path}\0{version}\0{identity}".encode()).hexdigest()[:32]
                tag = ('W/"%s"' if etag == "weak" else '"%s"') % digest
            self._entries[path] = _Entry(data, file, tag, stamp if last_modified else None)

    def _entry(self, path: str) -> _Entry | None:
        entry = self._entries.get(path)
        if entry is not None or self._root is None:
            return entry
        rel = path.lstrip("/")
        if not rel:
            return None
        candidate = (self._root / rel).resolve()
        if not candidate.is_relative_to(self._root) or not candidate.is_file():
            return None
        st = candidate.stat()
        digest = hashlib.sha256(f"{candidate}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode()).hexdigest()[:32]
        return _Entry(None, candidate, f'"{digest}"', int(st.st_mtime))

    # -- behaviour ------------------------------------------------------------

    def behave(
        self,
        path: str,
        *,
        no_content_length: bool = False,
        close_delimited: bool = False,
        ignore_range: bool = False,
        rate: float | None = None,
        drop_after: int | None = None,
        drop_times: int = 1,
        lie_length: int | None = None,
        extra_bytes: int = 0,
        stall_after: int | None = None,
        stall_seconds: float = 0.0,
        status_sequence: Iterable[tuple[int, Mapping[str, str]]] = (),
        redirect_to: str | None = None,
        redirect_code: int = 302,
        expect_method: str | None = None,
        post_download: bool = False,
        signed: str | None = None,
        tus: bool = False,
    ) -> None:
        """Replace the behaviour of ``path``; with no options the path behaves normally again.

        A new ``rate`` takes effect on responses already in flight (within ~0.1 s). With ``tus`` the
        path is a tus creation endpoint, and the other options apply to its uploads' requests too
        (``drop_after`` and ``rate`` to PATCH bodies).
        """
        b = _Behaviour(
            no_content_length=no_content_length,
            close_delimited=close_delimited,
            ignore_range=ignore_range,
            rate=rate,
            drop_after=drop_after,
            drop_times=drop_times,
            lie_length=lie_length,
            extra_bytes=extra_bytes,
            stall_after=stall_after,
            stall_seconds=stall_seconds,
            status_sequence=[(int(code), dict(hdrs)) for code, hdrs in status_sequence],
            redirect_to=redirect_to,
            redirect_code=redirect_code,
            expect_method=expect_method,
            post_download=post_download,
            signed=signed,
            tus=tus,
        )
        path = _norm(path)
        with self._lock:
            if b == _Behaviour():
                self._behaviours.pop(path, None)
            else:
                self._behaviours[path] = b

    def redirect_chain(self, prefix: str, n: int, *, code: int = 302) -> str:
        """Make ``prefix/0 -> prefix/1 -> ... -> prefix/n-1 -> prefix/0`` (an endless loop); returns the first URL."""
        if n < 1:
            raise ValueError("n must be >= 1")
        prefix = _norm(prefix).rstrip("/")
        for i in range(n):
            self.behave(f"{prefix}/{i}", redirect_to=self.url(f"{prefix}/{(i + 1) % n}"), redirect_code=code)
        return self.url(f"{prefix}/0")

    def _behaviour(self, path: str) -> _Behaviour:
        return self._behaviours.get(path) or _Behaviour()

    def _rate(self, path: str) -> float | None:
        b = self._behaviours.get(path)
        return b.rate if b is not None else None

    def _next_status(self, path: str) -> tuple[int, dict[str, str]] | None:
        with self._lock:
            b = self._behaviours.get(path)
            if b is None or not b.status_sequence:
                return None
            return b.status_sequence.pop(0)

    def _tus_root(self, path: str) -> str | None:
        """The tus endpoint that ``path`` is, or holds an upload of; None for any other path."""
        with self._lock:
            for candidate in (path, path.rsplit("/", 1)[0]):
                b = self._behaviours.get(candidate)
                if b is not None and b.tus:
                    return candidate
        return None

    def _tus_create(self, root: str, length: int, metadata: str) -> TusUpload:
        meta: dict[str, str] = {}
        for pair in filter(None, (p.strip() for p in metadata.split(","))):
            key, _, value = pair.partition(" ")
            meta[key] = base64.b64decode(value).decode("utf-8", "replace")
        upload = TusUpload(f"{root}/{uuid.uuid4().hex[:12]}", length, meta)
        with self._lock:
            self._tus[upload.path] = upload
        return upload

    def _tus_upload(self, path: str) -> TusUpload | None:
        with self._lock:
            return self._tus.get(path)

    def tus_uploads(self, endpoint: str | None = None) -> list[TusUpload]:
        """Copies of the tus uploads made (under ``endpoint``, if given), in creation order."""
        prefix = _norm(endpoint).rstrip("/") + "/" if endpoint is not None else "/"
        with self._lock:
            return [replace(u, data=bytearray(u.data), patches=list(u.patches), metadata=dict(u.metadata))
                    for path, u in self._tus.items() if path.startswith(prefix)]

    def tus_expire(self, upload: str, status: int = 404) -> None:
        """Forget a tus upload (a path or URL): from now on its requests are answered ``status``."""
        path = _request_path(upload)
        with self._lock:
            self._tus[path].gone = status

    def _take_drop(self, path: str) -> int | None:
        with self._lock:
            b = self._behaviours.get(path)
            if b is None or b.drop_after is None or b.drop_times <= 0:
                return None
            b.drop_times -= 1
            return b.drop_after

    # -- statistics -----------------------------------------------------------

    @property
    def requests(self) -> list[RequestLog]:
        """Copies of all request logs in arrival order."""
        with self._lock:
            return [copy.copy(r) for r in self._requests]

    def requests_for(self, path: str) -> list[RequestLog]:
        """Copies of the request logs for one path."""
        path = _norm(path)
        return [r for r in self.requests if r.path == path]

    def bytes_sent(self, path: str) -> int:
        """File content bytes written for ``path`` across all requests (proves what a resume re-fetched).

        Counted right after each write, so call wait_idle() first for an exact total.
        """
        return sum(r.body_bytes_sent for r in self.requests_for(path))

    @property
    def uploads(self) -> list[Upload]:
        """Recorded upload bodies in arrival order."""
        with self._lock:
            return list(self._uploads)

    @property
    def max_concurrent(self) -> int:
        """Most requests being answered at once since start or the last reset_stats(): from
        arrival until the answer's last byte is about to be written. (A client can read that
        byte and start its next request before this server's thread goes on, so counting any
        longer would see a client's back-to-back requests as concurrent.)"""
        with self._lock:
            return self._max_concurrent

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no request is in flight; a client can finish reading before the server logs the end."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._in_flight == 0:
                    return True
            time.sleep(0.005)
        return False

    def reset_stats(self) -> None:
        """Forget logged requests and uploads; max_concurrent restarts from the current in-flight count."""
        with self._lock:
            self._requests.clear()
            self._uploads.clear()
            self._max_concurrent = self._answering

    def _begin(self, log: RequestLog) -> None:
        with self._lock:
            self._requests.append(log)
            self._in_flight += 1
            self._answering += 1
            self._max_concurrent = max(self._max_concurrent, self._answering)

    def _end(self, log: RequestLog) -> None:
        with self._lock:
            log.ended = time.monotonic()
            self._in_flight -= 1
        self._answered(log)

    def _answered(self, log: RequestLog) -> None:
        with self._lock:
            if not log.answered:
                log.answered = True
                self._answering -= 1

    def _record_upload(self, upload: Upload) -> None:
        with self._lock:
            self._uploads.append(upload)

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)


def _norm(path: str) -> str:
    return path if path.startswith("/") else "/" + path


def main(argv: list[str] | None = None) -> int:
    """Serve a directory until SIGTERM/SIGINT; the base URL is the first stdout line."""
    parser = argparse.ArgumentParser(prog="python -m tests.httpserver", description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path, help="directory to serve (read at request time)")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: any free port)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"not a directory: {args.root}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with FileServer(root=args.root, port=args.port) as srv:
        print(srv.base_url, flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
