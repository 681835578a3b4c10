"""Throughput and worker memory of large downloads: curl, aria2c, bare pycurl and bgtransfer.

Run from the repository root, in its venv::

    python -m bench.download                          # 1 GiB, 3 repeats, 8 x 128 MiB: about 3 minutes on 2 cores
    python -m bench.download --quick                  # 128 MiB, 1 repeat, 8 x 32 MiB: about a minute
    python -m bench.download --size-mib 64 --repeat 2 --parallel-files 4 --parallel-mib 16 --json out.json
    python -m bench.download --backends embedded,rabbitmq+postgresql,redis+postgresql

From Python (e.g. a runner over all benchmarks)::

    from bench import download
    figures = download.run(["--quick"])               # or run(download.parse_args([...]))

``run`` prints as it goes and returns every figure (the dict ``--json`` writes); it raises
``BenchError`` when a check fails. ``main`` is the command line: it turns SIGTERM into an
exception (so cleanup runs; a caller of ``run`` wanting that installs the same handler), reports
a ``BenchError`` on stderr with exit status 1, and writes ``--json``.

All traffic stays on 127.0.0.1, and everything the run creates lives in one temporary
directory under /tmp, deleted at the end (also after an error, Ctrl-C or SIGTERM).

Setup
    Source files of incompressible pseudo-random bytes are written once: the benchmark file
    (``--size-mib`` MiB), a 10 MB and a 100 MB file, and ``--parallel-files`` files of
    ``--parallel-mib`` MiB. Each is made from 64 MiB (or less) of ``os.urandom``; every further
    64 MiB block is that block rotated by a random offset and put through a random byte
    permutation, so no two blocks are equal. Each file's sha256 is taken while writing. They are
    served by ``tests.httpserver.FileServer`` (a threaded server in this process that sends files
    with ``os.sendfile`` from the page cache and honours single ``Range`` requests).
    ``os.sync()`` runs once before any timing and again after every sample, so write-back of one
    sample does not land in the next one. Every client writes to the same filesystem (the
    temporary directory).

One large download (variants run interleaved, A B C ... A B C ..., ``--repeat`` times each)
    curl              ``curl -s -o FILE URL`` as a subprocess; the whole command is timed.
    aria2c            ``aria2c --no-conf -q -x1 -s1 --allow-overwrite=true --file-allocation=none
                      -d DIR -o NAME URL`` as a subprocess (one connection, as a user fetches
                      one file; ``--no-conf`` only keeps a user's aria2.conf out of the
                      figures); the whole command is timed.
    aria2c -x4        the same with ``-x4 -s4``: split downloading over four connections, each
                      asking for its own byte range (aria2c's default ``--min-split-size`` of
                      20 MiB applies: a file under 80 MiB gets fewer than four ranges, one
                      under 40 MiB is not split). The file's sha256 is checked after every
                      sample (untimed), since this variant reassembles it from pieces.
    bare pycurl       the best plain pycurl script, in its own Python process (so it does not
                      share this process's GIL with the server thread): ``WRITEDATA`` = an open
                      file, ``BUFFERSIZE`` = 1 MiB, ``NOSIGNAL`` = 1; ``perform()`` is timed.
                      libcurl hands its write callback (here the file's ``write``) at most 16 KiB
                      at a time, whatever ``BUFFERSIZE`` says: one write(2) per 16 KiB.
    pycurl 128K writes
                      the same script with a ``WRITEFUNCTION`` that keeps libcurl's pieces and
                      writes them with one ``os.writev`` once 128 KiB are pending (and the rest
                      after ``perform()``, inside the timing): the write pattern bgtransfer
                      uses, without the rest of bgtransfer. Informational: it shows how much of
                      bgtransfer's lead over bare pycurl is that pattern.
    bgtransfer        end to end through a real worker (``python -m bgtransfer worker
                      --concurrency 2`` on the embedded defaults: filesystem broker and SQLite
                      under its own temporary data root, default progress interval): the time
                      from ``svc.add(req)`` until ``svc.find(id)`` reports COMPLETED, polled every
                      20 ms. It therefore includes dispatch (store insert, admission pass,
                      broker message, the worker's broker poll), the claim, the transfer, the
                      atomic rename and recording the outcome.
    bgtransfer, rabbitmq+postgresql and bgtransfer, redis+postgresql
                      with ``--backends``: bgtransfer the same way through a worker of its own on
                      that backend (the machine's RabbitMQ or Redis, and a PostgreSQL database
                      made for the run and dropped at its end), warmed up the same way; held to
                      the same targets as bgtransfer on the embedded default. A backend whose
                      server cannot be used is skipped with a note (``skipped_backends``), the
                      other variants measured all the same, and the exit status is 1.
    curl+sha256sum    ``curl -s -o FILE URL``, then ``sha256sum FILE`` (as a user verifies a
                      download); the two commands are timed together, and the digest printed
                      must be the expected one.
    bare pycurl+sha256
                      bare pycurl with a ``WRITEFUNCTION`` (instead of ``WRITEDATA``) that puts
                      every chunk through ``hashlib.sha256`` and writes it to the file; the
                      digest, printed by the script, must be the expected one.
    bgtransfer+sha256 bgtransfer with ``expected_sha256`` set.

    The expected digest is the one taken while writing the source file.

    Each bgtransfer sample uses a new target name; afterwards the request is removed
    (``svc.remove``) and the file deleted, so the per-app cap of 25 is never reached. Before
    timing, two downloads of the 10 MB file run at once, untimed, so that both pool children have
    done their first-task initialisation (measurements are of a worker in steady state). These
    warm-up downloads come from a separate URL whose responses pause for 2 s after their first
    MiB, so they overlap and each lands on its own pool child; the warm-up round is repeated (at
    most three times) until the server saw them all in flight at once.

    Every downloaded file's size is checked (and aria2c must leave no ``.aria2`` control file),
    and every bgtransfer request must complete without ``transfer_error``; anything else, or a
    digest not the expected one, stops the run with an error (exit status 1). If ``aria2c`` is
    not on PATH its two variants are skipped (said so in the output; ``null`` in the JSON).

Many large downloads at once (``--parallel-files`` N, default 8, of ``--parallel-mib`` MiB)
    curl --parallel   ``curl -s --parallel --parallel-max N -o FILE1 URL1 ... -o FILEN URLN``
                      as one subprocess; the whole command is timed.
    bgtransfer        a second worker (``--concurrency N``, its own data root and device, with
                      ``BGTRANSFER_MAX_CONCURRENT_PER_DEVICE=N`` for worker and client, so all N
                      may run at once): the time from the first ``svc.add`` until
                      ``svc.requests`` (one query, polled every 20 ms) shows all N COMPLETED.
                      The N adds are made one after another inside the timing. When each
                      request was first seen COMPLETED is kept too (the first is printed).

    The two alternate, ``--repeat`` times each. Before timing, N warm-up downloads run at once
    (as above), so that every pool child is past its first task. After every sample
    each file's size is checked, and the sha256 of one of them (a different one each sample,
    untimed); the server's count of requests in flight at once is recorded, and a note is
    printed when it stayed below N (the N transfers did not all overlap). curl, as run here
    (without ``--parallel-immediate``), fetches the first file alone until it knows the
    connection cannot multiplex and then the other N-1 together, so it shows N-1.
    ``--parallel-files 0`` skips this part.

Report
    Per variant of the single download the best and median throughput in MB/s (1 MB = 1e6
    bytes) and the ratio of its best to curl's best and to bare pycurl's best, then the target
    lines and, for information (no target), bgtransfer with the checksum against without it,
    and against aria2c::

        bgtransfer / curl = X.XX (target >= 1.2)
        bgtransfer / bare pycurl = X.XX (target >= 0.9)
        bgtransfer+sha256 / curl+sha256sum = X.XX (target >= 1.2)
        bgtransfer+sha256 / bare pycurl+sha256 = X.XX (target >= 0.9)
        bgtransfer+sha256 / bgtransfer = X.XX (informational)
        bgtransfer / aria2c = X.XX (informational)
        bgtransfer / aria2c -x4 = X.XX (informational)
        bgtransfer / pycurl 128K writes = X.XX (informational)

    For the parallel downloads, the best and median aggregate throughput (N x size / seconds)
    of each side, and ``bgtransfer / curl --parallel = X.XX (informational)``; all ratios are
    of best throughputs.

Worker memory
    After the throughput runs (and with their workers stopped), a fresh worker is started for
    each of three downloads: a 10 MB file, a 100 MB file and the benchmark file (1 GiB by
    default). For every pool child (``/proc/<worker>/task/*/children``) VmRSS and VmHWM are read
    from ``/proc/<child>/status`` once the worker is ready, and VmHWM again one second after the
    request completed. The child whose VmHWM grew the most is the one that ran the transfer;
    its ``VmHWM after - VmRSS at start`` is reported. A fresh worker per size is needed because
    VmHWM never goes down. This growth includes the child's first-task initialisation (imports,
    database engine), as a freshly started worker would see it::

        worker peak RSS growth: 10 MB file: X MiB, 100 MB file: Y MiB, 1 GiB file: Z MiB (target < 30 MiB)

Every worker's log is searched, once it has stopped, for lines at WARNING level or above and
for tracebacks; any found are printed at the end (and listed in the JSON), none expected.

Workers are stopped with SIGTERM to their pid; if one has not exited after 15 s, it and the
children it had are sent SIGKILL by pid. A client subprocess (curl, sha256sum, aria2c, bare
pycurl) still running when the run is interrupted is sent SIGKILL by ``subprocess.run``.
``--json FILE`` also writes every sample and figure, and the commit and changed files measured.

Throughput on a small VM is noisy (tens of percent between samples); compare best figures
from one run, where all variants saw the same machine state, rather than across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pycurl  # noqa: E402

from bench._services import BACKENDS, Unavailable, backend_env, code_line, code_tree  # noqa: E402
from bgtransfer import BackgroundTransferRequest, BackgroundTransferService  # noqa: E402
from bgtransfer._engine import WRITE_BLOCK  # noqa: E402
from bgtransfer._settings import Settings, load, queue_name  # noqa: E402
from tests.httpserver import FileServer  # noqa: E402
from tests.workerproc import WorkerProcess  # noqa: E402

MB = 1_000_000
MiB = 1024 * 1024
APP = "bench"
POLL_SECONDS = 0.02
CONCURRENCY = 2
SMALL_BYTES = 10 * MB
MEDIUM_BYTES = 100 * MB
RSS_TARGET_MIB = 30.0
WARM_PATH = "/warm.bin"  # the 10 MB file, each response paused for a while after its first MiB
WARM_STALL_SECONDS = 2.0
LOG_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")

CURL, ARIA, ARIA4, PYCURL = "curl", "aria2c", "aria2c -x4", "bare pycurl"
PYCURL_BLOCKS = f"pycurl {WRITE_BLOCK // 1024}K writes"  # bgtransfer's write pattern (WRITE_BLOCK) in bare pycurl
BGT, BGT_SHA = "bgtransfer", "bgtransfer+sha256"
CURL_SHA, PYCURL_SHA = "curl+sha256sum", "bare pycurl+sha256"
VARIANTS = (CURL, ARIA, ARIA4, PYCURL, PYCURL_BLOCKS, BGT, CURL_SHA, PYCURL_SHA, BGT_SHA)
ARIA_VARIANTS = {ARIA: 1, ARIA4: 4}  # variant -> aria2c -x/-s (connections for the one file)
TARGETS = (  # (numerator, denominator, minimum ratio of best throughputs)
    (BGT, CURL, 1.2),
    (BGT, PYCURL, 0.9),
    (BGT_SHA, CURL_SHA, 1.2),
    (BGT_SHA, PYCURL_SHA, 0.9),
)
INFO_RATIOS = ((BGT_SHA, BGT), (BGT, ARIA), (BGT, ARIA4), (BGT, PYCURL_BLOCKS))  # printed, no target
CURL_PAR, BGT_PAR = "curl --parallel", "bgtransfer"

# The bare pycurl client, run as ``python -c PLAIN_PYCURL URL FILE MODE``, MODE "plain", "sha256"
# (hash every chunk while writing it) or "blocks" (write the chunks WRITE_BLOCK bytes at a time, as
# bgtransfer's engine does); prints "<seconds> <status> <sha256 hex digest, or ->".
PLAIN_PYCURL = f"""\
import hashlib, os, sys, time, pycurl
url, path, mode = sys.argv[1:]
digest = hashlib.sha256() if mode == "sha256" else None
pending = []
with open(path, "wb") as f:
    c = pycurl.Curl()
    c.setopt(pycurl.URL, url)
    if mode == "plain":
        c.setopt(pycurl.WRITEDATA, f)
    elif mode == "sha256":
        def write(chunk):
            digest.update(chunk)
            f.write(chunk)
        c.setopt(pycurl.WRITEFUNCTION, write)
    else:  # "blocks"
        held = [0]
        def write(chunk):
            pending.append(chunk)
            held[0] += len(chunk)
            if held[0] >= {WRITE_BLOCK}:
                os.writev(f.fileno(), pending)
                pending.clear()
                held[0] = 0
        c.setopt(pycurl.WRITEFUNCTION, write)
    c.setopt(pycurl.BUFFERSIZE, 1024 * 1024)
    c.setopt(pycurl.NOSIGNAL, 1)
    t0 = time.perf_counter()
    c.perform()
    if pending:
        os.writev(f.fileno(), pending)
    elapsed = time.perf_counter() - t0
    status = c.getinfo(pycurl.RESPONSE_CODE)
    c.close()
print(elapsed, status, "-" if digest is None else digest.hexdigest())
"""


class BenchError(RuntimeError):
    """A check failed, so the figures would mean nothing."""


# ----------------------------------------------------------------------------- helpers


def make_random_file(path: Path, size: int) -> str:
    """Write ``size`` incompressible bytes to ``path``; return their sha256 (taken while writing)."""
    block_size = max(1, min(size, 64 * MiB))
    base = os.urandom(block_size)
    rng = random.Random()  # seeded from os.urandom
    digest = hashlib.sha256()
    done = 0
    with open(path, "wb") as f:
        while done < size:
            if done == 0:
                block = base
            else:
                k = rng.randrange(block_size)
                block = (base[k:] + base[:k]).translate(bytes(rng.sample(range(256), 256)))
            block = block[: size - done]
            f.write(block)
            digest.update(block)
            done += len(block)
    return digest.hexdigest()


def check_size(path: Path, expected: int, what: str) -> None:
    try:
        got = path.stat().st_size
    except FileNotFoundError:
        raise BenchError(f"{what}: {path} does not exist") from None
    if got != expected:
        raise BenchError(f"{what}: {path} has {got} bytes, expected {expected}")


def check_sha256(path: Path, expected: str, what: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise BenchError(f"{what}: {path} has sha256 {digest.hexdigest()}, expected {expected}")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0])
    if len(out) != 2:
        raise BenchError(f"no VmRSS/VmHWM in /proc/{pid}/status")
    return out


def mbps(size: int, seconds: float) -> float:
    return size / seconds / MB


def size_label(size: int) -> str:
    if size % (1 << 30) == 0:
        return f"{size >> 30} GiB"
    if size % MiB == 0:
        return f"{size // MiB} MiB"
    if size % MB == 0:
        return f"{size // MB} MB"
    return f"{size} bytes"


# ----------------------------------------------------------------------------- the worker


class Worker(WorkerProcess):
    """A worker on the embedded defaults, with its own data root and device."""

    def __init__(self, data_root: Path, log_path: Path, concurrency: int = CONCURRENCY,
                 extra: dict[str, str] | None = None) -> None:
        """``extra``: more BGTRANSFER_* settings, seen by the worker and by ``service()`` alike."""
        self.data_root = data_root
        self.vars = {"BGTRANSFER_DATA_ROOT": str(data_root), "BGTRANSFER_DEVICE": f"bench{uuid.uuid4().hex[:8]}",
                     **(extra or {})}
        data_root.mkdir(parents=True, exist_ok=True)
        super().__init__(self.vars, log_path, concurrency)

    @property
    def transfers_dir(self) -> Path:
        return self.data_root / "apps" / APP / "shared" / "transfers"

    def service(self) -> BackgroundTransferService:
        return BackgroundTransferService(APP, settings=load(self.vars))

    def log_tail(self, n: int = 4000) -> str:
        return self.text()[-n:]

    def log_problems(self) -> list[str]:
        """Lines of its log at WARNING level or above, and tracebacks (none expected in a clean run)."""
        return [line for line in self.text().splitlines() if LOG_PROBLEM.search(line)]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"worker {self.pid} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def ready(self, timeout: float = 60.0) -> None:
        if not self.wait_ready(timeout):
            self.check_alive()
            raise BenchError(f"worker {self.pid} not ready after {timeout:g} s:\n{self.log_tail()}")


def transfer_timeout(size: int) -> float:
    return 60.0 + size / (10 * MB)  # generous: 10 MB/s would already be a failure worth seeing


def bgtransfer_download(worker: Worker, svc: BackgroundTransferService, url: str, name: str, size: int,
                        sha256: str | None = None) -> float:
    """Seconds from add() to COMPLETED (polled every 20 ms); checks the result, then removes request and file."""
    req = BackgroundTransferRequest(url, download_location=f"/shared/transfers/{name}", expected_sha256=sha256)
    timeout = transfer_timeout(size)
    t0 = time.perf_counter()
    svc.add(req)
    while True:
        found = svc.find(req.request_id)
        if found is not None and found.transfer_status.value == "COMPLETED":
            elapsed = time.perf_counter() - t0
            break
        if found is None:
            raise BenchError(f"request {req.request_id} ({name}) vanished")
        if time.perf_counter() - t0 > timeout:
            raise BenchError(f"request {req.request_id} ({name}) not completed after {timeout:g} s: "
                             f"{found.transfer_status.value}, {found.bytes_received} bytes, "
                             f"wait reason {getattr(found, 'wait_reason', None)!r}\n{worker.log_tail()}")
        worker.check_alive()
        time.sleep(POLL_SECONDS)
    if found.transfer_error:
        raise BenchError(f"request {req.request_id} ({name}) completed with an error: {found.transfer_error}")
    path = worker.transfers_dir / name
    check_size(path, size, f"bgtransfer request {req.request_id}")
    svc.remove(req.request_id)
    path.unlink()
    return elapsed


def server_backend_worker(name: str, tmp: Path, stack: contextlib.ExitStack,
                          server: FileServer) -> tuple[Worker, BackgroundTransferService]:
    """A worker (and its client) on backend ``name``, ready and warmed up; its clean-up (worker,
    queue, database) goes on ``stack``. Raises ``Unavailable`` if a server it needs is not."""
    queues: list[str] = []
    env, _ = backend_env(name, tmp / name, stack, queues, "bgt_download")
    worker = Worker(tmp / name, tmp / f"worker-{name}.log", extra=env)
    queues.append(queue_name(worker.vars["BGTRANSFER_DEVICE"]))
    stack.callback(worker.stop)
    worker.ready()
    svc = worker.service()
    warmed = warm_up(worker, svc, server, worker.concurrency)
    print(f"  worker {worker.pid} on {name} ready, warmed up ({warmed} of {worker.concurrency} at once)")
    return worker, svc


def serve_warm_up(server: FileServer, small: Path) -> str:
    """Serve the small file at WARM_PATH, pausing every response after its first MiB; return its URL."""
    server.put_file(WARM_PATH, small)
    server.behave(WARM_PATH, stall_after=MiB, stall_seconds=WARM_STALL_SECONDS)
    return server.url(WARM_PATH)


def warm_up(worker: Worker, svc: BackgroundTransferService, server: FileServer, count: int) -> int:
    """``count`` downloads at once, untimed, so every pool child is past its first task.

    They come from WARM_PATH, whose responses pause, so all of them are in flight together and
    each is run by a different pool child. The round is repeated (up to three times) until the
    server saw ``count`` requests at once; returns the most it saw.
    """
    seen = 0
    for _ in range(3):
        server.reset_stats()
        _warm_round(worker, svc, server.url(WARM_PATH), SMALL_BYTES, count)
        server.wait_idle()
        seen = server.max_concurrent
        if seen >= count:
            break
    return seen


def _warm_round(worker: Worker, svc: BackgroundTransferService, url: str, size: int, count: int) -> None:
    reqs = [BackgroundTransferRequest(url, download_location=f"/shared/transfers/warm-{i}.bin")
            for i in range(count)]
    for r in reqs:
        svc.add(r)
    deadline = time.monotonic() + transfer_timeout(size) + WARM_STALL_SECONDS
    pending = {r.request_id for r in reqs}
    while pending:
        for rid in list(pending):
            found = svc.find(rid)
            if found is not None and found.transfer_status.value == "COMPLETED":
                if found.transfer_error:
                    raise BenchError(f"warm-up request {rid} failed: {found.transfer_error}")
                pending.discard(rid)
        if time.monotonic() > deadline:
            raise BenchError(f"warm-up requests {sorted(pending)} not completed:\n{worker.log_tail()}")
        worker.check_alive()
        time.sleep(POLL_SECONDS)
    for i, r in enumerate(reqs):
        path = worker.transfers_dir / f"warm-{i}.bin"
        check_size(path, size, f"warm-up request {r.request_id}")
        svc.remove(r.request_id)
        path.unlink()


# ----------------------------------------------------------------------------- the variants


def run_curl(url: str, out: Path, size: int, sha256: str | None = None) -> float:
    """``curl -s -o FILE URL``; given ``sha256``, then ``sha256sum FILE``, which must print it. All is timed."""
    t0 = time.perf_counter()
    proc = subprocess.run(["curl", "-s", "-o", str(out), url], capture_output=True, timeout=transfer_timeout(size))
    if proc.returncode != 0:
        raise BenchError(f"curl exited with {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    digest = None
    if sha256 is not None:
        proc = subprocess.run(["sha256sum", str(out)], capture_output=True, timeout=transfer_timeout(size))
        if proc.returncode != 0:
            raise BenchError(f"sha256sum exited with {proc.returncode}: {proc.stderr.decode(errors='replace')}")
        digest = proc.stdout.decode().split(maxsplit=1)[0]
    elapsed = time.perf_counter() - t0
    check_size(out, size, "curl")
    if digest != sha256:
        raise BenchError(f"sha256sum of {out} printed {digest}, expected {sha256}")
    out.unlink()
    return elapsed


def run_aria2c(url: str, out_dir: Path, name: str, size: int, connections: int, sha256: str | None = None) -> float:
    """One file with aria2c over ``connections`` connections (-x/-s); the whole command is timed."""
    cmd = ["aria2c", "--no-conf", "-q", f"-x{connections}", f"-s{connections}", "--allow-overwrite=true",
           "--file-allocation=none", "-d", str(out_dir), "-o", name, url]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, timeout=transfer_timeout(size))
    elapsed = time.perf_counter() - t0
    what = f"aria2c -x{connections}"
    if proc.returncode != 0:
        raise BenchError(f"{what} exited with {proc.returncode}: "
                         f"{(proc.stdout + proc.stderr).decode(errors='replace')[-2000:]}")
    out = out_dir / name
    control = out_dir / f"{name}.aria2"
    if control.exists():
        raise BenchError(f"{what} left its control file {control}: the download is not complete")
    check_size(out, size, what)
    if sha256 is not None:
        check_sha256(out, sha256, what)
    out.unlink()
    return elapsed


def run_pycurl(url: str, out: Path, size: int, sha256: str | None = None, mode: str = "plain") -> float:
    """The bare pycurl client; given ``sha256``, it hashes while downloading and must report that digest."""
    mode = mode if sha256 is None else "sha256"
    proc = subprocess.run([sys.executable, "-c", PLAIN_PYCURL, url, str(out), mode], capture_output=True,
                          text=True, timeout=transfer_timeout(size))
    if proc.returncode != 0:
        raise BenchError(f"bare pycurl client exited with {proc.returncode}:\n{proc.stderr}")
    seconds, status, digest = proc.stdout.split()
    if status != "200":
        raise BenchError(f"bare pycurl client got HTTP {status}")
    check_size(out, size, "bare pycurl")
    if sha256 is not None and digest != sha256:
        raise BenchError(f"bare pycurl client computed sha256 {digest}, expected {sha256}")
    out.unlink()
    return float(seconds)


def run_curl_parallel(urls: list[str], outs: list[Path], size: int, check: int, sha256: str) -> float:
    """All files with one ``curl --parallel``; the whole command is timed.

    Every file's size is checked, and the sha256 of ``outs[check]``; then the files are deleted.
    """
    cmd = ["curl", "-s", "--parallel", "--parallel-max", str(len(urls))]
    for url, out in zip(urls, outs, strict=True):
        cmd += ["-o", str(out), url]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, timeout=transfer_timeout(size * len(urls)))
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"curl --parallel exited with {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    for out in outs:
        check_size(out, size, "curl --parallel")
    check_sha256(outs[check], sha256, "curl --parallel")
    for out in outs:
        out.unlink()
    return elapsed


def bgtransfer_parallel(worker: Worker, svc: BackgroundTransferService, urls: list[str], names: list[str],
                        size: int, check: int, sha256: str) -> tuple[float, list[float]]:
    """Seconds from the first add() until all requests are COMPLETED, and when each was seen so.

    Polls ``svc.requests`` (one query for all) every 20 ms. Checks every file's size and the
    sha256 of ``names[check]``; then removes the requests and deletes the files.
    """
    reqs = [BackgroundTransferRequest(url, download_location=f"/shared/transfers/{name}")
            for url, name in zip(urls, names, strict=True)]
    ids = {r.request_id for r in reqs}
    timeout = transfer_timeout(size * len(reqs))
    done: dict[str, float] = {}
    t0 = time.perf_counter()
    for r in reqs:
        svc.add(r)
    while True:
        now = time.perf_counter() - t0
        rows = {r.request_id: r for r in svc.requests if r.request_id in ids}
        for rid in ids - set(done):
            found = rows.get(rid)
            if found is None:
                raise BenchError(f"request {rid} vanished")
            if found.transfer_status.value == "COMPLETED":
                if found.transfer_error:
                    raise BenchError(f"request {rid} completed with an error: {found.transfer_error}")
                done[rid] = now
        if len(done) == len(ids):
            elapsed = now
            break
        if now > timeout:
            states = {rid: (rows[rid].transfer_status.value, rows[rid].bytes_received) for rid in ids - set(done)}
            raise BenchError(f"{len(ids) - len(done)} of {len(ids)} requests not completed after {timeout:g} s: "
                             f"{states}\n{worker.log_tail()}")
        worker.check_alive()
        time.sleep(POLL_SECONDS)
    for r, name in zip(reqs, names, strict=True):
        check_size(worker.transfers_dir / name, size, f"bgtransfer request {r.request_id}")
    check_sha256(worker.transfers_dir / names[check], sha256, f"bgtransfer request {reqs[check].request_id}")
    for r, name in zip(reqs, names, strict=True):
        svc.remove(r.request_id)
        (worker.transfers_dir / name).unlink()
    return elapsed, [done[r.request_id] for r in reqs]


@dataclass
class Samples:
    seconds: list[float] = field(default_factory=list)

    def rates(self, size: int) -> list[float]:
        return [mbps(size, s) for s in self.seconds]

    def best(self, size: int) -> float:
        return max(self.rates(size))

    def median(self, size: int) -> float:
        return statistics.median(self.rates(size))


# ----------------------------------------------------------------------------- memory


def measure_rss(tmp: Path, tag: str, url: str, size: int) -> dict[str, Any]:
    """Peak RSS growth of the pool child that ran one download, in a freshly started worker."""
    worker = Worker(tmp / f"mem-{tag}", tmp / f"worker-mem-{tag}.log")
    try:
        worker.ready()
        time.sleep(1.0)  # let the pool children settle after start-up
        before = {pid: proc_status(pid) for pid in worker.children()}
        if len(before) != worker.concurrency:
            raise BenchError(f"worker {worker.pid} has {len(before)} pool children, expected {worker.concurrency}")
        elapsed = bgtransfer_download(worker, worker.service(), url, f"mem-{tag}.bin", size)
        time.sleep(1.0)  # the task goes on briefly after COMPLETED (its admission pass)
        after = {pid: proc_status(pid) for pid in worker.children()}
        if set(after) != set(before):
            raise BenchError(f"pool children changed during the transfer: {sorted(before)} -> {sorted(after)}")
        pid = max(before, key=lambda p: after[p]["VmHWM"] - before[p]["VmHWM"])
        growth_kib = after[pid]["VmHWM"] - before[pid]["VmRSS"]
        result = {
            "size_bytes": size, "seconds": elapsed, "child_pid": pid,
            "rss_start_kib": before[pid]["VmRSS"], "hwm_start_kib": before[pid]["VmHWM"],
            "hwm_after_kib": after[pid]["VmHWM"], "rss_after_kib": after[pid]["VmRSS"],
            "growth_mib": growth_kib / 1024,
            "children": {str(p): {"before": before[p], "after": after[p]} for p in before},
        }
    finally:
        worker.stop()
    result["log_problems"] = worker.log_problems()
    return result


# ----------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.download", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024,
                   help="size of the single downloaded file in MiB (default 1024)")
    p.add_argument("--repeat", type=int, default=3, help="samples per variant, interleaved (default 3)")
    p.add_argument("--parallel-files", type=int, default=8,
                   help="files downloaded at once in the parallel comparison (default 8; 0 skips it)")
    p.add_argument("--parallel-mib", type=int, default=None,
                   help="size of each parallel file in MiB (default 128; 32 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a quick check: --size-mib 128 --repeat 1, parallel files of 32 MiB")
    p.add_argument("--backends", default="embedded",
                   help=f"comma-separated, of {', '.join(BACKENDS)}: the single download runs bgtransfer on "
                        "each (default, and always: embedded)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write all figures to FILE")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.quick:
        args.size_mib, args.repeat = 128, 1
        if args.parallel_mib is None:
            args.parallel_mib = 32
    if args.parallel_mib is None:
        args.parallel_mib = 128
    if args.size_mib < 1 or args.repeat < 1 or args.parallel_mib < 1:
        p.error("--size-mib, --repeat and --parallel-mib must be at least 1")
    if args.parallel_files < 0:
        p.error("--parallel-files must be at least 0")
    args.backends = ["embedded", *(b for b in args.backends.split(",") if b and b != "embedded")]
    if unknown := [b for b in args.backends if b not in BACKENDS]:
        p.error(f"unknown backend(s) {unknown}: choose from {', '.join(BACKENDS)}")
    return args


def versions(aria2c: bool) -> str:
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split("\n", 1)[0]
    parts = [curl.split(" (")[0]]
    if aria2c:
        parts.append(subprocess.run(["aria2c", "--version"], capture_output=True, text=True).stdout.split("\n", 1)[0])
    parts += [" ".join(pycurl.version.split()[:2]), f"python {sys.version.split()[0]}"]
    return " | ".join(parts)


def run(args: argparse.Namespace | Sequence[str] | None = None) -> dict[str, Any]:
    """Run the whole benchmark; return every figure. ``args``: from ``parse_args``, or command-line words.

    Raises ``BenchError`` when a check fails. Whatever ends it (also Ctrl-C, or SystemExit from
    a signal handler), its workers are stopped, the server closed and the temporary directory
    deleted before this returns or raises.
    """
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        result = _run(args, stack)
    result["wall_seconds"] = time.perf_counter() - started
    return result


def _run(args: argparse.Namespace, stack: contextlib.ExitStack) -> dict[str, Any]:
    size = args.size_mib * MiB
    n_par, par_size = args.parallel_files, args.parallel_mib * MiB
    have_aria2c = shutil.which("aria2c") is not None
    variants = [v for v in VARIANTS if have_aria2c or v not in ARIA_VARIANTS]
    tmp = Path(tempfile.mkdtemp(prefix="bgtransfer-bench-", dir="/tmp"))
    stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    out_dir = tmp / "out"
    out_dir.mkdir()
    par_label = f"{n_par} x {size_label(par_size)} at once" if n_par else "no parallel downloads"
    print(f"bench.download: {size_label(size)} ({size} bytes), {args.repeat} repeat(s), {par_label}, "
          f"{os.cpu_count()} CPUs, temp dir {tmp}")
    env_versions, code = versions(have_aria2c), code_tree()
    print(f"  {env_versions}\n  {code_line(code)}")
    if not have_aria2c:
        print("  aria2c is not on PATH: its variants are skipped")

    t0 = time.perf_counter()
    src, small, medium = tmp / "big.bin", tmp / "small.bin", tmp / "medium.bin"
    sha256 = make_random_file(src, size)
    make_random_file(small, SMALL_BYTES)
    make_random_file(medium, MEDIUM_BYTES)
    par_src = [tmp / f"par-{k}.bin" for k in range(n_par)]
    par_sha = [make_random_file(path, par_size) for path in par_src]
    os.sync()
    print(f"  made the source files in {time.perf_counter() - t0:.1f} s (sha256 {sha256[:16]}...)")

    server = stack.enter_context(FileServer())
    server.put_file("/big.bin", src)
    server.put_file("/small.bin", small)
    server.put_file("/medium.bin", medium)
    for path in par_src:
        server.put_file(f"/{path.name}", path)
    serve_warm_up(server, small)
    url, small_url, medium_url = server.url("/big.bin"), server.url("/small.bin"), server.url("/medium.bin")
    par_urls = [server.url(f"/{path.name}") for path in par_src]

    # -- one large download ------------------------------------------------------------------
    worker = Worker(tmp / "data", tmp / "worker.log")
    stack.callback(worker.stop)
    worker.ready()
    svc = worker.service()
    warmed = warm_up(worker, svc, server, worker.concurrency)
    print(f"  worker {worker.pid} ready (pool children {worker.children()}), warmed up "
          f"({warmed} of {worker.concurrency} at once)")
    on_servers: dict[str, tuple[Worker, BackgroundTransferService]] = {}
    skipped: dict[str, str] = {}  # backend: why (the other variants are measured all the same)
    for name in args.backends[1:]:  # (the first is embedded)
        try:
            on_servers[f"{BGT}, {name}"] = server_backend_worker(name, tmp, stack, server)
        except Unavailable as exc:
            skipped[name] = str(exc)
            print(f"  {name}: SKIPPED: {exc}", flush=True)
    variants[variants.index(BGT) + 1:variants.index(BGT) + 1] = list(on_servers)

    def aria(variant: str) -> Callable[[int], float]:
        connections = ARIA_VARIANTS[variant]
        return lambda i: run_aria2c(url, out_dir, f"aria2c-x{connections}-{i}.bin", size, connections,
                                    sha256 if connections > 1 else None)

    runners: dict[str, Callable[[int], float]] = {
        CURL: lambda i: run_curl(url, out_dir / f"curl-{i}.bin", size),
        ARIA: aria(ARIA),
        ARIA4: aria(ARIA4),
        PYCURL: lambda i: run_pycurl(url, out_dir / f"pycurl-{i}.bin", size),
        PYCURL_BLOCKS: lambda i: run_pycurl(url, out_dir / f"pycurl-blocks-{i}.bin", size, mode="blocks"),
        BGT: lambda i: bgtransfer_download(worker, svc, url, f"bgt-{i}.bin", size),
        CURL_SHA: lambda i: run_curl(url, out_dir / f"curl-sha-{i}.bin", size, sha256),
        PYCURL_SHA: lambda i: run_pycurl(url, out_dir / f"pycurl-sha-{i}.bin", size, sha256),
        BGT_SHA: lambda i: bgtransfer_download(worker, svc, url, f"bgt-sha-{i}.bin", size, sha256),
    }
    for k, (variant, (w, s)) in enumerate(on_servers.items()):
        runners[variant] = lambda i, w=w, s=s, k=k: bgtransfer_download(w, s, url, f"bgt-{k}-{i}.bin", size)
    width = max(18, *map(len, variants))
    samples = {v: Samples() for v in variants}
    for i in range(args.repeat):
        for v in variants:
            seconds = runners[v](i)
            samples[v].seconds.append(seconds)
            os.sync()  # outside the timing: no write-back left over for the next sample
            print(f"  #{i + 1} {v:<{width}} {seconds:7.3f} s {mbps(size, seconds):8.0f} MB/s", flush=True)
    log_problems = {}
    for tag, w in [("single", worker), *((v, w) for v, (w, _) in on_servers.items())]:
        w.stop()
        log_problems[tag] = w.log_problems()

    best = {v: samples[v].best(size) for v in variants}
    print()
    print(f"{'variant':<{width}} {'best MB/s':>10} {'median MB/s':>12} {'best/curl':>10} {'best/pycurl':>12}")
    for v in variants:
        print(f"{v:<{width}} {best[v]:>10.0f} {samples[v].median(size):>12.0f} "
              f"{best[v] / best[CURL]:>10.2f} {best[v] / best[PYCURL]:>12.2f}")
    print()
    ratios = {}
    targets = [*TARGETS, *((v, den, t) for v in on_servers for num, den, t in TARGETS if num == BGT)]
    for num, den, target in targets:
        ratios[f"{num} / {den}"] = {"value": best[num] / best[den], "target": target}
        print(f"{num} / {den} = {best[num] / best[den]:.2f} (target >= {target:g})")
    info_ratios: dict[str, float | None] = {}
    for num, den in INFO_RATIOS:
        value = best[num] / best[den] if den in best else None
        info_ratios[f"{num} / {den}"] = value
        if value is not None:
            print(f"{num} / {den} = {value:.2f} (informational)")

    # -- many large downloads at once --------------------------------------------------------
    parallel: dict[str, Any] | None = None
    if n_par:
        parallel = run_parallel(args, tmp, out_dir, server, par_urls, par_sha, par_size)
        log_problems["parallel"] = parallel["log_problems"]

    # -- worker memory -----------------------------------------------------------------------
    print("\nmeasuring worker memory (a fresh worker per size) ...", flush=True)
    rss = {
        "small": measure_rss(tmp, "small", small_url, SMALL_BYTES),
        "medium": measure_rss(tmp, "medium", medium_url, MEDIUM_BYTES),
        "large": measure_rss(tmp, "large", url, size),
    }
    for r in rss.values():
        print(f"  {size_label(r['size_bytes']):>8}: child {r['child_pid']}: "
              f"VmRSS at start {r['rss_start_kib'] / 1024:.1f} MiB, "
              f"VmHWM {r['hwm_start_kib'] / 1024:.1f} -> {r['hwm_after_kib'] / 1024:.1f} MiB, "
              f"VmRSS after {r['rss_after_kib'] / 1024:.1f} MiB")
    growth = ", ".join(f"{size_label(r['size_bytes'])} file: {r['growth_mib']:.1f} MiB" for r in rss.values())
    print(f"worker peak RSS growth: {growth} (target < {RSS_TARGET_MIB:g} MiB)")
    for tag, r in rss.items():
        log_problems[f"memory {tag}"] = r["log_problems"]

    print()
    if not any(log_problems.values()):
        print("worker logs: no warnings, errors or tracebacks")
    for tag, lines in log_problems.items():
        if lines:
            print(f"worker log ({tag}): {len(lines)} line(s) at WARNING or above, or tracebacks; the first:")
            for line in lines[:5]:
                print(f"    {line[:300]}")

    return {
        "size_bytes": size, "repeat": args.repeat, "versions": env_versions, "cpus": os.cpu_count(), "tree": code,
        "variants": {v: {"seconds": samples[v].seconds, "mb_per_s": samples[v].rates(size), "best_mb_per_s": best[v],
                         "median_mb_per_s": samples[v].median(size)} if v in samples else None
                     for v in (*VARIANTS, *on_servers)},
        "ratios": ratios,
        "info_ratios": info_ratios,
        "parallel": parallel,
        "worker_rss": {**rss, "target_mib": RSS_TARGET_MIB},
        "worker_log_problems": log_problems,
        "skipped_backends": skipped,
    }


def run_parallel(args: argparse.Namespace, tmp: Path, out_dir: Path, server: FileServer, urls: list[str],
                 sha: list[str], size: int) -> dict[str, Any]:
    """curl --parallel against bgtransfer with N transfers at once, interleaved ``--repeat`` times."""
    n = len(urls)
    total = n * size
    extra = {"BGTRANSFER_MAX_CONCURRENT_PER_DEVICE": str(n)}
    if n > Settings.max_outstanding_per_app:
        extra["BGTRANSFER_MAX_OUTSTANDING_PER_APP"] = str(n)
    print(f"\n{n} x {size_label(size)} at once ({size_label(total) if total % MiB == 0 else total}), "
          f"a worker with --concurrency {n}, device cap {n} ...", flush=True)
    worker = Worker(tmp / "data-par", tmp / "worker-par.log", concurrency=n, extra=extra)
    try:
        worker.ready()
        svc = worker.service()
        warmed = warm_up(worker, svc, server, n)
        print(f"  worker {worker.pid} ready ({n} pool children), warmed up ({warmed} of {n} at once)", flush=True)
        samples = {CURL_PAR: Samples(), BGT_PAR: Samples()}
        in_flight: dict[str, list[int]] = {CURL_PAR: [], BGT_PAR: []}
        finish_times: list[list[float]] = []
        for i in range(args.repeat):
            check = i % n  # whose sha256 is checked this time
            for v in (CURL_PAR, BGT_PAR):
                server.reset_stats()
                if v == CURL_PAR:
                    seconds = run_curl_parallel(urls, [out_dir / f"curl-par-{i}-{k}.bin" for k in range(n)], size,
                                                check, sha[check])
                    spread = ""
                else:
                    seconds, done = bgtransfer_parallel(worker, svc, urls, [f"par-{i}-{k}.bin" for k in range(n)],
                                                        size, check, sha[check])
                    finish_times.append(done)
                    spread = f", first done at {min(done):.2f} s"
                server.wait_idle()
                in_flight[v].append(server.max_concurrent)
                samples[v].seconds.append(seconds)
                os.sync()  # outside the timing
                print(f"  #{i + 1} {v:<18} {seconds:7.3f} s {mbps(total, seconds):8.0f} MB/s "
                      f"({in_flight[v][-1]} in flight at once{spread})", flush=True)
    finally:
        worker.stop()
    log_problems = worker.log_problems()

    best = {v: samples[v].best(total) for v in samples}
    print()
    print(f"{f'{n} at once':<18} {'best MB/s':>10} {'median MB/s':>12} {'max in flight':>14}")
    for v, smp in samples.items():
        print(f"{v:<18} {best[v]:>10.0f} {smp.median(total):>12.0f} {max(in_flight[v]):>14}")
    ratio = best[BGT_PAR] / best[CURL_PAR]
    print(f"\nbgtransfer / curl --parallel = {ratio:.2f} (informational)")
    for v in samples:
        if min(in_flight[v]) < n:
            why = ""
            if v == CURL_PAR:
                why = " (it fetches the first file alone until it knows the connection cannot multiplex)"
            print(f"  note: {v} had at most {min(in_flight[v])} of {n} requests in flight at once in some sample{why}")
    return {
        "files": n, "file_bytes": size, "total_bytes": total, "repeat": args.repeat,
        "variants": {v: {"seconds": smp.seconds, "mb_per_s": smp.rates(total), "best_mb_per_s": best[v],
                         "median_mb_per_s": smp.median(total), "max_in_flight": in_flight[v]}
                     for v, smp in samples.items()},
        "bgtransfer_completed_at_seconds": finish_times,
        "ratio": {f"{BGT_PAR} / {CURL_PAR}": ratio},
        "log_problems": log_problems,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the workers are stopped and the temporary files deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = run(args)
    except BenchError as exc:
        print(f"\nbench.download FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"\ntotal {result['wall_seconds']:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    for name, why in result["skipped_backends"].items():
        print(f"bench.download: {name} SKIPPED: {why}", file=sys.stderr)
    return 1 if result["skipped_backends"] else 0


if __name__ == "__main__":
    sys.exit(main())
