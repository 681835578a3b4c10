"""Throughput and worker memory of one large download: curl, bare pycurl and bgtransfer.

Run from the repository root, in its venv::

    python -m bench.download                          # 1 GiB, 3 repeats: about 1-2 minutes on 2 cores
    python -m bench.download --quick                  # 128 MiB, 1 repeat
    python -m bench.download --size-mib 64 --repeat 2 --json out.json

All traffic stays on 127.0.0.1, and everything the run creates lives in one temporary
directory under /tmp, deleted at the end (also after an error, Ctrl-C or SIGTERM).

Setup
    A file of ``--size-mib`` MiB of incompressible pseudo-random bytes is written once (64 MiB
    from ``os.urandom``; every further 64 MiB block is that block rotated by a random offset and
    put through a random byte permutation, so no two blocks are equal), its sha256 is taken
    while writing, and it is served by ``tests.httpserver.FileServer`` (a threaded server in this
    process that sends files with ``os.sendfile`` from the page cache). ``os.sync()`` runs once
    before any timing and again after every sample, so write-back of one sample does not land in
    the next one. Every client writes to the same filesystem (the temporary directory).

Variants (run interleaved, A B C D A B C D ..., ``--repeat`` times each)
    curl              ``curl -s -o FILE URL`` as a subprocess; the whole command is timed.
    bare pycurl       the best plain pycurl script, in its own Python process (so it does not
                      share this process's GIL with the server thread): ``WRITEDATA`` = an open
                      file, ``BUFFERSIZE`` = 1 MiB, ``NOSIGNAL`` = 1; ``perform()`` is timed.
    bgtransfer        end to end through a real worker (``python -m bgtransfer worker
                      --concurrency 2`` on the embedded defaults: filesystem broker and SQLite
                      under its own temporary data root, default progress interval): the time
                      from ``svc.add(req)`` until ``svc.find(id)`` reports COMPLETED, polled every
                      20 ms. It therefore includes dispatch (store insert, admission pass,
                      broker message, the worker's broker poll), the claim, the transfer, the
                      atomic rename and recording the outcome.
    bgtransfer+sha256 the same with ``expected_sha256`` set (the digest computed up front).

    Each bgtransfer sample uses a new target name; afterwards the request is removed
    (``svc.remove``) and the file deleted, so the per-app cap of 25 is never reached. Before
    timing, two small downloads run at once, untimed, so that both pool children have done their
    first-task initialisation (measurements are of a worker in steady state).

    Every downloaded file's size is checked, and every bgtransfer request must complete without
    ``transfer_error``; anything else stops the run with an error (exit status 1).

Report
    Per variant the best and median throughput in MB/s (1 MB = 1e6 bytes) and the ratio of its
    best to curl's best and to bare pycurl's best, then the three target lines::

        bgtransfer / curl = X.XX (target >= 1.2)
        bgtransfer / bare pycurl = X.XX (target >= 0.9)
        bgtransfer+sha256 / bgtransfer = X.XX (target >= 0.9)

    (all ratios of best throughputs).

Worker memory
    After the throughput runs (and with their worker stopped), a fresh worker is started for each
    of two downloads: a 10 MB file and the benchmark file (1 GiB by default). For every pool
    child (``/proc/<worker>/task/<worker>/children``) VmRSS and VmHWM are read from
    ``/proc/<child>/status`` once the worker is ready, and VmHWM again one second after the
    request completed. The child whose VmHWM grew the most is the one that ran the transfer;
    its ``VmHWM after - VmRSS at start`` is reported. A fresh worker per size is needed because
    VmHWM never goes down. This growth includes the child's first-task initialisation (imports,
    database engine), as a freshly started worker would see it::

        worker peak RSS growth: 10 MB file: X MiB, 1 GiB file: Y MiB (target < 30 MiB)

Workers are stopped with SIGTERM to their pid; if one has not exited after 15 s, it and the
children it had are sent SIGKILL by pid. ``--json FILE`` also writes every sample and figure.

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
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pycurl  # noqa: E402

from bgtransfer import BackgroundTransferRequest, BackgroundTransferService  # noqa: E402
from bgtransfer._settings import load  # noqa: E402
from tests.httpserver import FileServer  # noqa: E402
from tests.workerproc import WorkerProcess  # noqa: E402

MB = 1_000_000
MiB = 1024 * 1024
APP = "bench"
POLL_SECONDS = 0.02
CONCURRENCY = 2
SMALL_BYTES = 10 * MB
RSS_TARGET_MIB = 30.0

CURL, PYCURL, BGT, BGT_SHA = "curl", "bare pycurl", "bgtransfer", "bgtransfer+sha256"
VARIANTS = (CURL, PYCURL, BGT, BGT_SHA)
TARGETS = (  # (numerator, denominator, minimum ratio of best throughputs)
    (BGT, CURL, 1.2),
    (BGT, PYCURL, 0.9),
    (BGT_SHA, BGT, 0.9),
)

# The bare pycurl client, run as ``python -c PLAIN_PYCURL URL FILE``; prints "<seconds> <status>".
PLAIN_PYCURL = """\
import sys, time, pycurl
url, path = sys.argv[1], sys.argv[2]
with open(path, "wb") as f:
    c = pycurl.Curl()
    c.setopt(pycurl.URL, url)
    c.setopt(pycurl.WRITEDATA, f)
    c.setopt(pycurl.BUFFERSIZE, 1024 * 1024)
    c.setopt(pycurl.NOSIGNAL, 1)
    t0 = time.perf_counter()
    c.perform()
    elapsed = time.perf_counter() - t0
    status = c.getinfo(pycurl.RESPONSE_CODE)
    c.close()
print(elapsed, status)
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

    def __init__(self, data_root: Path, log_path: Path, concurrency: int = CONCURRENCY) -> None:
        self.data_root = data_root
        self.vars = {"BGTRANSFER_DATA_ROOT": str(data_root), "BGTRANSFER_DEVICE": f"bench{uuid.uuid4().hex[:8]}"}
        data_root.mkdir(parents=True, exist_ok=True)
        super().__init__(self.vars, log_path, concurrency)

    @property
    def transfers_dir(self) -> Path:
        return self.data_root / "apps" / APP / "shared" / "transfers"

    def service(self) -> BackgroundTransferService:
        return BackgroundTransferService(APP, settings=load(self.vars))

    def log_tail(self, n: int = 4000) -> str:
        return self.text()[-n:]

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


def warm_up(worker: Worker, svc: BackgroundTransferService, url: str, size: int) -> None:
    """Two downloads at once, untimed, so both pool children are past their first task."""
    reqs = [BackgroundTransferRequest(url, download_location=f"/shared/transfers/warm-{i}.bin") for i in range(2)]
    for r in reqs:
        svc.add(r)
    deadline = time.monotonic() + transfer_timeout(size)
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


def run_curl(url: str, out: Path, size: int) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(["curl", "-s", "-o", str(out), url], capture_output=True, timeout=transfer_timeout(size))
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"curl exited with {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    check_size(out, size, "curl")
    out.unlink()
    return elapsed


def run_pycurl(url: str, out: Path, size: int) -> float:
    proc = subprocess.run([sys.executable, "-c", PLAIN_PYCURL, url, str(out)], capture_output=True, text=True,
                          timeout=transfer_timeout(size))
    if proc.returncode != 0:
        raise BenchError(f"bare pycurl client exited with {proc.returncode}:\n{proc.stderr}")
    seconds, status = proc.stdout.split()
    if status != "200":
        raise BenchError(f"bare pycurl client got HTTP {status}")
    check_size(out, size, "bare pycurl")
    out.unlink()
    return float(seconds)


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
        return {
            "size_bytes": size, "seconds": elapsed, "child_pid": pid,
            "rss_start_kib": before[pid]["VmRSS"], "hwm_start_kib": before[pid]["VmHWM"],
            "hwm_after_kib": after[pid]["VmHWM"], "rss_after_kib": after[pid]["VmRSS"],
            "growth_mib": growth_kib / 1024,
            "children": {str(p): {"before": before[p], "after": after[p]} for p in before},
        }
    finally:
        worker.stop()


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.download", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024, help="size of the downloaded file in MiB (default 1024)")
    p.add_argument("--repeat", type=int, default=3, help="samples per variant, interleaved (default 3)")
    p.add_argument("--quick", action="store_true", help="a quick check: --size-mib 128 --repeat 1")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write all figures to FILE")
    args = p.parse_args(argv)
    if args.quick:
        args.size_mib, args.repeat = 128, 1
    if args.size_mib < 1 or args.repeat < 1:
        p.error("--size-mib and --repeat must be at least 1")
    return args


def versions() -> str:
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split("\n", 1)[0]
    pycurl_libcurl = " ".join(pycurl.version.split()[:2])
    return f"{curl.split(' (')[0]} | {pycurl_libcurl} | python {sys.version.split()[0]}"


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> dict[str, Any]:
    size = args.size_mib * MiB
    tmp = Path(tempfile.mkdtemp(prefix="bgtransfer-bench-", dir="/tmp"))
    stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    out_dir = tmp / "out"
    out_dir.mkdir()
    print(f"bench.download: {size_label(size)} ({size} bytes), {args.repeat} repeat(s), {os.cpu_count()} CPUs, "
          f"temp dir {tmp}")
    env_versions = versions()
    print(f"  {env_versions}")

    t0 = time.perf_counter()
    src, small = tmp / "big.bin", tmp / "small.bin"
    sha256 = make_random_file(src, size)
    make_random_file(small, SMALL_BYTES)
    os.sync()
    print(f"  made the source files in {time.perf_counter() - t0:.1f} s (sha256 {sha256[:16]}...)")

    server = stack.enter_context(FileServer())
    server.put_file("/big.bin", src)
    server.put_file("/small.bin", small)
    url, small_url = server.url("/big.bin"), server.url("/small.bin")

    worker = Worker(tmp / "data", tmp / "worker.log")
    stack.callback(worker.stop)
    worker.ready()
    svc = worker.service()
    warm_up(worker, svc, small_url, SMALL_BYTES)
    print(f"  worker {worker.pid} ready (pool children {worker.children()}), warmed up")

    runners: dict[str, Callable[[int], float]] = {
        CURL: lambda i: run_curl(url, out_dir / f"curl-{i}.bin", size),
        PYCURL: lambda i: run_pycurl(url, out_dir / f"pycurl-{i}.bin", size),
        BGT: lambda i: bgtransfer_download(worker, svc, url, f"bgt-{i}.bin", size),
        BGT_SHA: lambda i: bgtransfer_download(worker, svc, url, f"bgt-sha-{i}.bin", size, sha256),
    }
    samples = {v: Samples() for v in VARIANTS}
    for i in range(args.repeat):
        for v in VARIANTS:
            seconds = runners[v](i)
            samples[v].seconds.append(seconds)
            os.sync()  # outside the timing: no write-back left over for the next sample
            print(f"  #{i + 1} {v:<18} {seconds:7.3f} s {mbps(size, seconds):8.0f} MB/s", flush=True)
    worker.stop()

    best = {v: samples[v].best(size) for v in VARIANTS}
    print()
    print(f"{'variant':<18} {'best MB/s':>10} {'median MB/s':>12} {'best/curl':>10} {'best/pycurl':>12}")
    for v in VARIANTS:
        print(f"{v:<18} {best[v]:>10.0f} {samples[v].median(size):>12.0f} "
              f"{best[v] / best[CURL]:>10.2f} {best[v] / best[PYCURL]:>12.2f}")
    print()
    ratios = {}
    for num, den, target in TARGETS:
        ratios[f"{num} / {den}"] = {"value": best[num] / best[den], "target": target}
        print(f"{num} / {den} = {best[num] / best[den]:.2f} (target >= {target:g})")

    print("\nmeasuring worker memory (a fresh worker per size) ...", flush=True)
    rss = {
        "small": measure_rss(tmp, "small", small_url, SMALL_BYTES),
        "large": measure_rss(tmp, "large", url, size),
    }
    for r in rss.values():
        print(f"  {size_label(r['size_bytes']):>8}: child {r['child_pid']}: "
              f"VmRSS at start {r['rss_start_kib'] / 1024:.1f} MiB, "
              f"VmHWM {r['hwm_start_kib'] / 1024:.1f} -> {r['hwm_after_kib'] / 1024:.1f} MiB, "
              f"VmRSS after {r['rss_after_kib'] / 1024:.1f} MiB")
    print(f"worker peak RSS growth: {size_label(SMALL_BYTES)} file: {rss['small']['growth_mib']:.1f} MiB, "
          f"{size_label(size)} file: {rss['large']['growth_mib']:.1f} MiB (target < {RSS_TARGET_MIB:g} MiB)")

    return {
        "size_bytes": size, "repeat": args.repeat, "versions": env_versions, "cpus": os.cpu_count(),
        "variants": {v: {"seconds": samples[v].seconds, "mb_per_s": samples[v].rates(size), "best_mb_per_s": best[v],
                         "median_mb_per_s": samples[v].median(size)} for v in VARIANTS},
        "ratios": ratios,
        "worker_rss": {**rss, "target_mib": RSS_TARGET_MIB},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the worker is stopped and the temporary files deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            result = run(args, stack)
    except BenchError as exc:
        print(f"\nbench.download FAILED: {exc}", file=sys.stderr)
        return 1
    result["wall_seconds"] = time.perf_counter() - started
    print(f"\ntotal {result['wall_seconds']:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
