"""Many small downloads: bgtransfer end to end against a plain Celery task and aria2c, per backend.

A 4 KB file moves in well under a millisecond over loopback, so what these figures measure is
the fixed cost per transfer: bgtransfer's store transactions, admission passes and broker
wake-ups against what a bare Celery task (one message, one pycurl GET) or a download manager
pays for the same work.

Run from the repository root, in its venv::

    python -m bench.small                         # 1,000 downloads, every backend: ~3 min per backend
    python -m bench.small --quick                 # 200 downloads, embedded only: about a minute
    python -m bench.small --quick --backends embedded,rabbitmq+postgresql,redis+postgresql
    python -m bench.small --backends embedded --repeat 3 --json small.json

From Python (a runner that prints a table of ratios)::

    from bench import small
    result = small.run(small.parse_args(["--quick"]))   # result["ratios"]: {name: {value, target, op}}

All traffic stays on 127.0.0.1. Everything the run creates lives in one temporary directory
under /tmp (files, data roots, logs), deleted at the end, also after an error, Ctrl-C or SIGTERM,
together with the PostgreSQL database, the RabbitMQ queues and the Redis database it used.
Worker, server and aria2c processes are the run's own and are ended by pid; nothing else is.

Setup (once per run)
    ``--n`` (default 1,000) distinct files of 4,096 random bytes, their sha256 kept, served from a
    directory by ``tests.httpserver.FileServer`` in its own process (``python -m tests.httpserver
    --root DIR``), so that the server does not share a GIL with the clients in this process.
    Every variant downloads the same URLs from the same server.

Backends (``--backends``, comma-separated; default all three, ``--quick``: embedded)
    embedded             the default deployment: filesystem broker and SQLite under a data root
                         in the temporary directory
    rabbitmq+postgresql  amqp://guest:guest@127.0.0.1:5672// and a PostgreSQL database created on
                         postgresql://postgres@127.0.0.1:5432 for the run and dropped after (queues:
                         ``bgtransfer.<device>`` per measurement and ``benchplain.<tag>``, deleted)
    redis+postgresql     redis://127.0.0.1:6379/N with N the first empty database among 13, 12,
                         11, 10, 14, 15 (flushed at the end: it was empty at the start), and the
                         same kind of PostgreSQL database
    The plain Celery baseline always uses the broker of the bgtransfer run it is compared with,
    with bgtransfer's own transport settings for it (the embedded one included).

1. Small downloads, concurrency C (``--concurrency``, default 4); variants interleaved,
   ``--repeat`` times, best sample reported:
    bgtransfer        one ``python -m bgtransfer worker --concurrency C`` (tests.workerproc) with
                      the device cap raised to C (``BGTRANSFER_MAX_CONCURRENT_PER_DEVICE``). The
                      requests are added through the public API, one thread, round-robin over
                      ceil(n / 25) apps (25 outstanding per app is the default quota, kept), the
                      device's queued limit raised to fit (``BGTRANSFER_MAX_QUEUED_PER_DEVICE``);
                      their sandbox folders are made before the timing, as the plain task's
                      output folder is.
                      Timed from the first ``add`` until the store says all n are COMPLETED (one
                      ``count(*)`` on ``bgt_requests`` every 10 ms, a read-only connection; that
                      query is the only use of bgtransfer internals in the timing). Other settings
                      are the defaults (production clocks). Then, untimed: every request is read
                      back with ``svc.find`` (COMPLETED, no ``transfer_error``) and every file's size
                      and sha256 checked on disk.
    plain celery      ``celery -A bench.plaintask worker --concurrency C``: one task, a pycurl GET
                      into ``<file>.part`` renamed to ``<file>`` when complete, Celery's defaults
                      otherwise (prefetch 4, early ack, no events, results ignored). n tasks sent
                      with ``send_task`` from this process, timed until all n files exist under
                      their final names (a directory scan every 10 ms), then sizes and sha256.
    plain celery, bgtransfer's conf
                      the same task with bgtransfer's Celery settings (prefetch 1, acks_late, task
                      events on, ...): tells bgtransfer's Celery choices apart from its own machinery.
    bgtransfer, no flush wait
                      (PostgreSQL backends) bgtransfer as above, with the run's database set to
                      ``synchronous_commit = off`` for this measurement (``ALTER DATABASE``, reset
                      after): no commit waits for PostgreSQL's log to reach the disk, so an add
                      returns before it is durable. Not a way to run bgtransfer (a server crash
                      could lose an accepted request): it tells what the flushes cost (one per
                      transfer, the add's, when its attempt's end is a hand-off, which does not
                      wait), which the plain task does not pay: Celery publishes without waiting
                      for the broker's confirm, so a send returns before the broker has written
                      anything.
    aria2c            ``aria2c -i LIST -j C`` over the same n URLs (keep-alive, its default), the
                      whole command timed; then sizes and sha256. ``--auto-save-interval=0``: by
                      default aria2c writes and syncs a control file per download, which made
                      its time depend on the disk's write-back (2-10 s for 400 files here).
    Every worker gets a fresh device and queue, and first runs 2*C downloads untimed (so its
    pool children are past their first task); the sending side is warmed up the same way.
    Reported: transfers/s per variant, bgtransfer / plain celery (target >= 0.8),
    bgtransfer / aria2c and, on PostgreSQL, bgtransfer with no flush wait / plain celery;
    also each bgtransfer sample against the plain sample run right after it, and the plain
    task's range (the machine's speed moves between rounds).

2. Scale-out: the same n downloads with 1 worker and with 2 workers (concurrency C each), the
   device cap 2*C in both; the speed-up 2 workers / 1 worker.

3. Queue depth: 10, 100 and 500 requests (``--depths``) queued at once on one worker
   (concurrency C, cap C): the device's network is set to ``none``, all requests are added (so
   they wait), and the clock starts when the network is set back to ``wifi``, until all are
   COMPLETED. Reported: ms per completed transfer (elapsed / n) at each depth, and the deepest
   against 100 (the cost should not grow with the queue; the shallowest pays more ramp-up and
   ramp-down per transfer, so it is not the reference).

Diagnostics
    CPU ms per transfer (user + system, from /proc and ``time.process_time``) of this process
    (the client: adds or sends, and its polling), the workers' main processes, their pool
    children, the file server and the machine's services (PostgreSQL, RabbitMQ and Redis
    processes, idle ones included), from just before the first add or send until all are done
    (for part 3 the adds are included although they are not timed). For bgtransfer also: add
    p50 / p99 (ms per ``svc.add``) and the time to add all; broker deliveries per transfer (the
    worker logs' "Task ...[...] received" lines); on PostgreSQL the committed transactions
    (read-only ones included) and rows written per transfer (``pg_stat_database`` of the run's
    database, read after the workers stopped; the benchmark's own polling queries subtracted;
    approximate to a few percent, as PostgreSQL flushes these counters lazily).

``--json FILE`` writes every sample and figure (and the commit and changed files measured);
``--keep`` keeps the temporary directory (worker logs). The exit status is 1 if a check failed (a
missing or corrupt file, a transfer error, a timeout, a worker that would not start); not
reaching a target is reported, not an error. Figures on a small VM vary by tens of percent
between runs: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import plaintask  # noqa: E402
from bench._services import BACKENDS, PG_ADMIN, Unavailable, backend_env, close_clients, code_line, code_tree  # noqa: E402
from bgtransfer import BackgroundTransferRequest, BackgroundTransferService  # noqa: E402
from bgtransfer._settings import Settings, load  # noqa: E402
from tests.workerproc import WorkerProcess  # noqa: E402

FILE_BYTES = 4096
POLL_SECONDS = 0.01
STALL_SECONDS = 60.0  # no completion for this long: something is stuck, stop with the logs
APP_QUOTA = Settings().max_outstanding_per_app  # kept at its default: requests spread over apps
DEFAULT_QUEUED = Settings().max_queued_per_device

BGT, PLAIN, PLAIN_BGT, ARIA2 = "bgtransfer", "plain celery", "plain celery, bgtransfer's conf", "aria2c"
VARIANTS = (BGT, PLAIN, PLAIN_BGT, ARIA2)
BGT_UNFLUSHED = "bgtransfer, no flush wait"  # PostgreSQL only: what the WAL flushes cost
TARGET_VS_PLAIN = 0.8


class BenchError(RuntimeError):
    """A check failed, so the figures would mean nothing."""


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- files


@dataclass
class Files:
    """The served files: name -> sha256, and their URLs on the server."""

    names: list[str]
    sha256: dict[str, str]
    base_url: str = ""

    def url(self, i: int) -> str:
        return f"{self.base_url}/{self.names[i]}"


def make_files(folder: Path, n: int) -> Files:
    folder.mkdir(parents=True)
    names = [f"f{i:05d}.bin" for i in range(n)]
    shas = {}
    for name in names:
        data = os.urandom(FILE_BYTES)
        (folder / name).write_bytes(data)
        shas[name] = hashlib.sha256(data).hexdigest()
    return Files(names, shas)


def verify(files: Files, expected: dict[Path, str], what: str) -> None:
    """Every path exists with FILE_BYTES bytes and the sha256 of the served file it came from."""
    bad = []
    for path, name in expected.items():
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            bad.append(f"{path}: missing")
            continue
        if len(data) != FILE_BYTES or hashlib.sha256(data).hexdigest() != files.sha256[name]:
            bad.append(f"{path}: {len(data)} bytes, sha256 differs from {name}")
    if bad:
        raise BenchError(f"{what}: {len(bad)} of {len(expected)} files wrong, e.g. " + "; ".join(bad[:3]))


class ServerProcess:
    """``python -m tests.httpserver --root DIR`` in its own process, ended by its pid."""

    def __init__(self, root: Path, log_path: Path) -> None:
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.httpserver", "--root", str(root)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline().strip() if self.proc.stdout else ""
        if not line.startswith("http://127.0.0.1:"):
            self.stop()
            raise BenchError(f"the file server did not start (said {line!r}); see {log_path}")
        self.base_url = line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()


# ----------------------------------------------------------------------------- workers


class WorkerChecks:
    """Start-up and liveness checks shared by the bgtransfer and the plain worker."""

    proc: subprocess.Popen[bytes]
    pid: int
    concurrency: int
    text: Callable[[], str]
    wait_ready: Callable[..., bool]

    def tail(self, n: int = 3000) -> str:
        return self.text()[-n:]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"worker {self.pid} exited with {self.proc.returncode}:\n{self.tail()}")

    def ready(self, timeout: float = 60.0) -> None:
        if not self.wait_ready(timeout):
            self.check_alive()
            raise BenchError(f"worker {self.pid} not ready after {timeout:g} s:\n{self.tail()}")

    def deliveries(self, task: str) -> int:
        """How many messages of ``task`` the worker received (its INFO log says so per message)."""
        return sum(1 for line in self.text().splitlines() if f"Task {task}[" in line and line.endswith("received"))


class BgtWorker(WorkerChecks, WorkerProcess):
    """``python -m bgtransfer worker`` (tests.workerproc.WorkerProcess)."""


class PlainWorker(WorkerChecks, WorkerProcess):
    """``celery -A bench.plaintask worker``: WorkerProcess's checks and stop, another command."""

    def __init__(self, env: dict[str, str], log_path: Path, concurrency: int, queue: str, node: str) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("BGTRANSFER_", "BENCH_PLAIN_"))}
        self.log, self.concurrency = log_path, concurrency
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "bench.plaintask", "worker", "-Q", queue, "-n", f"{node}@%h",
                 "--concurrency", str(concurrency), "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
                cwd=ROOT, env={**base, **env, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT)


# ----------------------------------------------------------------------------- backends


class Reader:
    """A plain read-only connection to the state store, for the completion count (a WAL reader
    on SQLite does not queue behind writers as the Store's BEGIN IMMEDIATE would)."""

    def __init__(self, store_url: str) -> None:
        self.queries = 0
        if store_url.startswith("sqlite"):
            self.conn: Any = sqlite3.connect(store_url.split("///", 1)[1], timeout=30, isolation_level=None)
            self.p = "?"
        else:
            import psycopg

            self.conn = psycopg.connect(store_url, autocommit=True)
            self.p = "%s"

    def completed(self, device: str) -> tuple[int, int]:
        """(COMPLETED requests of the device, how many of them have an error)."""
        self.queries += 1
        sql = f"SELECT count(*), count(error) FROM bgt_requests WHERE device = {self.p} AND status = 'COMPLETED'"
        done, errors = self.conn.execute(sql, (device,)).fetchone()
        return int(done), int(errors)

    def errors(self, device: str, limit: int = 3) -> list[tuple[Any, ...]]:
        sql = f"SELECT id, app_id, error FROM bgt_requests WHERE device = {self.p} AND error IS NOT NULL LIMIT {limit}"
        return list(self.conn.execute(sql, (device,)).fetchall())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


@dataclass
class Backend:
    """One deployment: the BGTRANSFER_* variables every measurement on it starts from."""

    name: str
    tmp: Path
    env: dict[str, str]
    database: str = ""  # PostgreSQL database name, when there is one
    amqp_queues: list[str] = field(default_factory=list)
    runs: int = 0
    server_pid: int = 0
    stopping: list[threading.Thread] = field(default_factory=list)

    def stop_later(self, workers: list[Any]) -> None:
        """Stop workers (WorkerProcess.stop: SIGTERM by pid) in threads: Celery's warm shutdown
        takes ~7 s here, which the untimed checks and the next set-up can overlap."""
        for w in workers:
            t = threading.Thread(target=w.stop, name=f"stop-{w.pid}", daemon=True)
            t.start()
            self.stopping.append(t)

    def settle(self) -> None:
        """Wait until every worker being stopped has exited (before any timing starts)."""
        while self.stopping:
            self.stopping.pop().join()

    @property
    def broker_url(self) -> str:
        return self.env.get("BGTRANSFER_BROKER_URL", "")

    @property
    def data_root(self) -> Path:
        return Path(self.env["BGTRANSFER_DATA_ROOT"])

    def sandbox(self, app: str) -> Path:
        """An app's download folder (SPEC's sandbox: ``<data_root>/apps/<app>/shared/transfers``)."""
        return self.data_root / "apps" / app / "shared" / "transfers"

    def next_dir(self, kind: str) -> Path:
        self.runs += 1
        path = self.tmp / f"{self.runs:02d}-{kind}"
        path.mkdir(parents=True)
        return path

    def pg_stats(self) -> dict[str, int] | None:
        """Committed transactions and rows written in this backend's database so far."""
        if not self.database:
            return None
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            row = conn.execute("SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database "
                               "WHERE datname = %s", (self.database,)).fetchone()
        return dict(zip(("xact_commit", "tup_inserted", "tup_updated", "tup_deleted"), map(int, row), strict=True))


def open_backend(name: str, tmp: Path, stack: contextlib.ExitStack) -> Backend:
    """Set up one backend; its clean-up (queues, database, Redis DB, clients) goes on ``stack``."""
    tmp.mkdir(parents=True)
    b = Backend(name, tmp, {})
    try:
        b.env, b.database = backend_env(name, tmp / "data", stack, b.amqp_queues, "bgt_small")
    except Unavailable as exc:
        raise BenchError(str(exc)) from exc
    return b


@contextlib.contextmanager
def commits_unflushed(b: Backend) -> Iterator[None]:
    """The run's database with ``synchronous_commit = off`` for the connections opened meanwhile
    (this process's are closed first, so that its adds open new ones; the workers are new), reset
    after (and this process's connections closed again)."""
    import psycopg

    def setting(value: str) -> None:
        close_clients(load(b.env))
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {b.database} {value}")

    setting("SET synchronous_commit = off")
    try:
        yield
    finally:
        setting("RESET synchronous_commit")


# ----------------------------------------------------------------------------- measurements


def wait_until(count: Callable[[], int], n: int, timeout: float, workers: list[Any], what: str) -> float:
    """Poll ``count`` every POLL_SECONDS until it reaches ``n``; perf_counter when it did."""
    start = last_change = time.perf_counter()
    last = -1
    while True:
        got = count()
        now = time.perf_counter()
        if got >= n:
            return now
        if got != last:
            last, last_change = got, now
        for w in workers:
            w.check_alive()
        if now - start > timeout or now - last_change > STALL_SECONDS:
            tails = "\n".join(f"-- worker {w.pid}:\n{w.tail(2000)}" for w in workers)
            raise BenchError(f"{what}: {got} of {n} done after {now - start:.0f} s "
                             f"({now - last_change:.0f} s without progress)\n{tails}")
        time.sleep(POLL_SECONDS)


def timeout_for(n: int) -> float:
    return 120.0 + n * 0.5  # 2 transfers/s would already be a failure worth seeing


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a live process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15 of stat)


SERVICES = ("postgres", "beam.smp", "redis-server")  # the store's and the brokers' processes, by name


def service_pids() -> list[int]:
    """The machine's PostgreSQL, RabbitMQ and Redis processes (whoever started them)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() in SERVICES:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


class CpuMeter:
    """CPU seconds spent during a timed window by: this process (the client: adds or sends, and
    the polling), each worker's main process, its pool children, the file server, and the
    services (PostgreSQL, RabbitMQ, Redis: all of them, idle ones included, so compare this
    column between variants of one run; a PostgreSQL backend that ends within the window is
    not counted, which the variants' long-lived connections make rare)."""

    def __init__(self, workers: list[Any], server_pid: int) -> None:
        self.workers, self.server_pid = workers, server_pid
        self.start = self.read()

    def read(self) -> dict[str, Any]:
        return {"client": time.process_time(), "server": cpu_seconds(self.server_pid),
                "main": {w.pid: cpu_seconds(w.pid) for w in self.workers},
                "pool": {c: cpu_seconds(c) for w in self.workers for c in w.children()},
                "services": {p: cpu_seconds(p) for p in service_pids()}}

    def per_transfer_ms(self, n: int) -> dict[str, float]:
        end, start = self.read(), self.start
        out = {k: end[k] - start[k] for k in ("client", "server")}
        for k in ("main", "pool", "services"):
            out[k] = sum(v - start[k].get(pid, 0.0) for pid, v in end[k].items())
        out["total"] = sum(out.values())
        return {k: 1000 * v / n for k, v in out.items()}


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def bgt_measure(b: Backend, files: Files, n: int, *, workers: int, concurrency: int, cap: int,
                gated: bool, stack: contextlib.ExitStack, diagnose: bool = False) -> dict[str, Any]:
    """One bgtransfer measurement on a fresh device (see the module docstring, parts 1-3);
    ``diagnose``: also the store's transaction counts (PostgreSQL), which waits for the stop."""
    folder = b.next_dir("bgtransfer")
    tag = uuid.uuid4().hex[:8]
    device = f"small{tag}"
    warm_n = 2 * concurrency * workers
    env = {**b.env, "BGTRANSFER_DEVICE": device, "BGTRANSFER_MAX_CONCURRENT_PER_DEVICE": str(cap),
           "BGTRANSFER_MAX_QUEUED_PER_DEVICE": str(max(DEFAULT_QUEUED, n + warm_n))}
    s = load(env)
    b.amqp_queues.append(s.queue)
    apps = [f"m{tag}a{k:03d}" for k in range(math.ceil(n / APP_QUOTA))]
    services = [BackgroundTransferService(a, settings=s) for a in apps]  # the first migrates the store
    for a in apps:  # installed apps have their sandbox, as the plain task has its output folder: the
        # run times the transfers, not a first add's folder creation (a few mkdirs per app)
        b.sandbox(a).mkdir(parents=True)
    control = BackgroundTransferService(f"m{tag}warm", settings=s)
    control.set_conditions(network="wifi", power="external")

    procs = [BgtWorker(env, folder / f"worker-{k}.log", concurrency) for k in range(workers)]
    for w in procs:
        stack.callback(w.stop)
    for w in procs:
        w.ready()
    reader = Reader(s.store_url)
    stack.callback(reader.close)

    # warm-up: every pool child past its first task, this process's store and sender connected
    warm = [BackgroundTransferRequest(files.url(i % len(files.names)), download_location=f"/shared/transfers/w{i}.bin")
            for i in range(warm_n)]
    for r in warm:
        control.add(r)
    wait_until(lambda: reader.completed(device)[0], warm_n, timeout_for(warm_n), procs, "warm-up")
    for r in warm:
        found = control.find(r.request_id)
        if found is None or found.transfer_error:
            raise BenchError(f"warm-up request {r.request_id} failed: {found and found.transfer_error}")
        control.remove(r.request_id)
    if gated:
        control.set_conditions(network="none")
    b.settle()  # the previous measurement's workers are gone
    time.sleep(0.2)  # the workers' own passes after the warm-up settle
    pg_before = b.pg_stats() if diagnose else None
    polls_before = reader.queries
    deliveries_before = sum(w.deliveries("bgtransfer.transfer") for w in procs)
    cpu = CpuMeter(procs, b.server_pid)

    # the run
    reqs: list[tuple[int, str, str]] = []
    add_seconds: list[float] = []
    t0 = t_adding = time.perf_counter()
    for i in range(n):
        k = i % len(apps)
        req = BackgroundTransferRequest(files.url(i), download_location=f"/shared/transfers/{files.names[i]}")
        ta = time.perf_counter()
        services[k].add(req)
        add_seconds.append(time.perf_counter() - ta)
        reqs.append((k, req.request_id, files.names[i]))
    t_added = time.perf_counter()
    if gated:
        t0 = time.perf_counter()
        control.set_conditions(network="wifi")

    def done() -> int:
        got, errors = reader.completed(device)
        if errors:
            raise BenchError(f"{errors} request(s) completed with an error: {reader.errors(device)}")
        return got

    t_end = wait_until(done, n, timeout_for(n), procs, f"bgtransfer ({workers} worker(s), n={n})")
    elapsed = t_end - t0
    cpu_ms = cpu.per_transfer_ms(n)
    polls = reader.queries - polls_before
    deliveries = sum(w.deliveries("bgtransfer.transfer") for w in procs) - deliveries_before
    b.stop_later(procs)

    # checks, untimed: the public API says COMPLETED without error, the bytes are right
    expected: dict[Path, str] = {}
    for k, rid, name in reqs:
        found = services[k].find(rid)
        if found is None or found.transfer_status.value != "COMPLETED" or found.transfer_error:
            raise BenchError(f"request {rid}: {found and found.transfer_status.value}, "
                             f"error {found and found.transfer_error}")
        expected[b.sandbox(apps[k]) / name] = name
    verify(files, expected, f"bgtransfer on {b.name}")
    for path in expected:
        path.unlink()

    out: dict[str, Any] = {
        "n": n, "workers": workers, "concurrency": concurrency, "cap": cap, "apps": len(apps), "gated": gated,
        "seconds": elapsed, "per_s": n / elapsed, "ms_per_transfer": 1000 * elapsed / n,
        "add_all_s": t_added - t_adding,
        "add_ms": {"p50": 1000 * statistics.median(add_seconds), "p99": 1000 * percentile(add_seconds, 0.99),
                   "max": 1000 * max(add_seconds)},
        "deliveries_per_transfer": deliveries / n, "cpu_ms_per_transfer": cpu_ms,
    }
    if pg_before is not None:
        close_clients(s)  # its connections end, so PostgreSQL flushes their counters
        b.settle()  # as the workers' connections do when they exit
        time.sleep(1.2)
        after = b.pg_stats()
        assert after is not None
        delta = {k: after[k] - pg_before[k] for k in after}
        delta["xact_commit"] -= polls
        out["pg_per_transfer"] = {k: v / n for k, v in delta.items()}
    return out


def plain_measure(b: Backend, files: Files, n: int, *, concurrency: int, like_bgt: bool,
                  stack: contextlib.ExitStack) -> dict[str, Any]:
    """One plain Celery measurement on a fresh queue (module docstring, part 1)."""
    folder = b.next_dir("plain")
    out_dir = folder / "out"
    out_dir.mkdir()
    tag = uuid.uuid4().hex[:8]
    queue = f"benchplain.{tag}"
    b.amqp_queues.append(queue)
    env = {"BENCH_PLAIN_BROKER_URL": b.broker_url, "BENCH_PLAIN_DATA_ROOT": str(folder / "root"),
           "BENCH_PLAIN_QUEUE": queue, "BENCH_PLAIN_LIKE_BGT": "1" if like_bgt else ""}
    sender = plaintask.make_app(plaintask.config_from_env(env))
    stack.callback(sender.close)
    w = PlainWorker(env, folder / "worker.log", concurrency, queue, f"benchplain-{tag}")
    stack.callback(w.stop)
    w.ready()

    def finished() -> int:
        with os.scandir(out_dir) as it:
            return sum(1 for e in it if not e.name.endswith(".part"))

    warm_n = 2 * concurrency
    for i in range(warm_n):
        sender.send_task(plaintask.TASK, args=(files.url(i % len(files.names)), str(out_dir / f"w{i}.bin")),
                         queue=queue)
    wait_until(finished, warm_n, timeout_for(warm_n), [w], "plain warm-up")
    for i in range(warm_n):
        (out_dir / f"w{i}.bin").unlink()
    b.settle()
    deliveries_before = w.deliveries(plaintask.TASK)
    cpu = CpuMeter([w], b.server_pid)

    t0 = time.perf_counter()
    for i in range(n):
        sender.send_task(plaintask.TASK, args=(files.url(i), str(out_dir / files.names[i])), queue=queue)
    t_sent = time.perf_counter()
    t_end = wait_until(finished, n, timeout_for(n), [w], f"plain celery (n={n})")
    elapsed = t_end - t0
    cpu_ms = cpu.per_transfer_ms(n)
    deliveries = w.deliveries(plaintask.TASK) - deliveries_before
    b.stop_later([w])
    verify(files, {out_dir / name: name for name in files.names[:n]}, f"plain celery on {b.name}")
    shutil.rmtree(out_dir)
    return {"n": n, "concurrency": concurrency, "seconds": elapsed, "per_s": n / elapsed,
            "ms_per_transfer": 1000 * elapsed / n, "send_all_s": t_sent - t0, "deliveries_per_transfer": deliveries / n,
            "cpu_ms_per_transfer": cpu_ms}


def aria2_measure(tmp: Path, files: Files, n: int, concurrency: int) -> dict[str, Any]:
    """``aria2c -i LIST -j C`` over the same URLs, the whole command timed."""
    folder = tmp / f"aria2-{uuid.uuid4().hex[:8]}"
    out_dir = folder / "out"
    out_dir.mkdir(parents=True)
    listing = folder / "list.txt"
    listing.write_text("".join(f"{files.url(i)}\n  out={files.names[i]}\n" for i in range(n)))
    cmd = ["aria2c", "--no-conf", "-i", str(listing), "-j", str(concurrency), "-d", str(out_dir), "--quiet=true",
           "--file-allocation=none", "--allow-overwrite=true", "--auto-file-renaming=false", "--split=1",
           "--max-connection-per-server=1", "--auto-save-interval=0"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_for(n))
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"aria2c exited with {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")
    verify(files, {out_dir / name: name for name in files.names[:n]}, "aria2c")
    shutil.rmtree(folder)
    return {"n": n, "concurrency": concurrency, "seconds": elapsed, "per_s": n / elapsed,
            "ms_per_transfer": 1000 * elapsed / n}


# ----------------------------------------------------------------------------- one backend


def best(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return max(samples, key=lambda x: x["per_s"])


def run_backend(name: str, args: argparse.Namespace, tmp: Path, files: Files, server_pid: int) -> dict[str, Any]:
    """Parts 1-3 on one backend; every process and resource it made is gone when it returns."""
    n, c = args.n, args.concurrency
    with contextlib.ExitStack() as stack:
        b = open_backend(name, tmp, stack)
        b.server_pid = server_pid
        stack.callback(b.settle)
        log(f"{name}: ready ({b.env.get('BGTRANSFER_BROKER_URL') or 'filesystem broker'}, "
            f"{b.env.get('BGTRANSFER_DATABASE_URL') or 'SQLite'})")
        variants = [*VARIANTS, *([BGT_UNFLUSHED] if b.database else [])]
        small: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for r in range(args.repeat):
            for v in variants:
                if v in (BGT, BGT_UNFLUSHED):
                    with commits_unflushed(b) if v == BGT_UNFLUSHED else contextlib.nullcontext():
                        x = bgt_measure(b, files, n, workers=1, concurrency=c, cap=c, gated=False, stack=stack,
                                        diagnose=True)
                elif v in (PLAIN, PLAIN_BGT):
                    x = plain_measure(b, files, n, concurrency=c, like_bgt=v == PLAIN_BGT, stack=stack)
                else:
                    b.settle()
                    x = aria2_measure(tmp, files, n, c)
                small[v].append(x)
                log(f"{name}: #{r + 1} {v:<32} {x['per_s']:7.1f} transfers/s ({x['seconds']:.2f} s)")
        scale: dict[str, list[dict[str, Any]]] = {"1": [], "2": []}
        if not args.no_scale_out:
            for r in range(args.repeat):
                for k in (1, 2):
                    x = bgt_measure(b, files, n, workers=k, concurrency=c, cap=2 * c, gated=False, stack=stack)
                    scale[str(k)].append(x)
                    log(f"{name}: #{r + 1} scale-out, {k} worker(s) x {c}, cap {2 * c}: {x['per_s']:7.1f} transfers/s")
        depth: dict[str, list[dict[str, Any]]] = {str(d): [] for d in args.depths}
        for r in range(args.repeat):
            for d in args.depths:
                x = bgt_measure(b, files, d, workers=1, concurrency=c, cap=c, gated=True, stack=stack,
                                diagnose=True)
                depth[str(d)].append(x)
                log(f"{name}: #{r + 1} queue of {d:>4}: {x['ms_per_transfer']:6.2f} ms per transfer "
                    f"(add p50 {x['add_ms']['p50']:.2f} ms)")
    rates = {v: best(small[v])["per_s"] for v in variants}
    out: dict[str, Any] = {
        "backend": name,
        "small": {v: {"best_per_s": rates[v], "samples": small[v]} for v in variants},
        "bgt_vs_plain": rates[BGT] / rates[PLAIN],
        # each bgtransfer sample against the plain one run right after it: the machine's speed moves
        # between rounds, and a pair shares more of it than the two best samples do
        "bgt_vs_plain_pairs": [x["per_s"] / y["per_s"] for x, y in zip(small[BGT], small[PLAIN], strict=True)],
        "bgt_vs_plain_bgt_conf": rates[BGT] / rates[PLAIN_BGT],
        "bgt_vs_aria2c": rates[BGT] / rates[ARIA2],
        "plain_bgt_conf_vs_plain": rates[PLAIN_BGT] / rates[PLAIN],
        "queue_depth": {d: {"best_ms_per_transfer": min(x["ms_per_transfer"] for x in xs), "samples": xs}
                        for d, xs in depth.items()},
    }
    if scale["1"]:
        one, two = best(scale["1"])["per_s"], best(scale["2"])["per_s"]
        out["scale_out"] = {"1_worker_per_s": one, "2_workers_per_s": two, "speedup": two / one,
                            "samples": scale}
    return out


# ----------------------------------------------------------------------------- report


def ratios(results: list[dict[str, Any]], depths: list[int]) -> dict[str, dict[str, Any]]:
    """The figures a runner prints as a table: value, target (None: none) and its direction."""
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        if "error" in r:
            continue
        b = r["backend"]
        out[f"{b}: bgtransfer / plain celery"] = {"value": r["bgt_vs_plain"], "target": TARGET_VS_PLAIN, "op": ">="}
        out[f"{b}: bgtransfer / aria2c"] = {"value": r["bgt_vs_aria2c"], "target": None, "op": ">="}
        if BGT_UNFLUSHED in r["small"]:
            out[f"{b}: bgtransfer, no flush wait / plain celery"] = {
                "value": r["small"][BGT_UNFLUSHED]["best_per_s"] / r["small"][PLAIN]["best_per_s"], "target": None,
                "op": ">="}
        if "scale_out" in r:
            out[f"{b}: 2 workers / 1 worker"] = {"value": r["scale_out"]["speedup"], "target": None, "op": ">="}
        if len(depths) >= 2:
            ref = 100 if 100 in depths and max(depths) != 100 else min(depths)
            qd = r["queue_depth"]
            out[f"{b}: ms per transfer, queue {max(depths)} / queue {ref}"] = {
                "value": qd[str(max(depths))]["best_ms_per_transfer"] / qd[str(ref)]["best_ms_per_transfer"],
                "target": None, "op": "<="}
    return out


def report(result: dict[str, Any]) -> str:
    n, c = result["n"], result["concurrency"]
    lines = []
    for r in result["backends"]:
        lines.append(f"== {r['backend']} ==")
        if "error" in r:
            lines.append(f"FAILED: {r['error'].splitlines()[0]}")
            continue
        lines.append(f"{n:,} downloads of {FILE_BYTES} bytes, concurrency {c} (best of {result['repeat']}):")
        lines.append(f"  {'variant':<34} {'transfers/s':>11} {'ms each':>8} {'vs plain':>9} {'vs aria2c':>10}")
        plain, aria = r["small"][PLAIN]["best_per_s"], r["small"][ARIA2]["best_per_s"]
        for v in r["small"]:
            rate = r["small"][v]["best_per_s"]
            lines.append(f"  {v:<34} {rate:>11.1f} {1000 / rate:>8.2f} {rate / plain:>9.2f} {rate / aria:>10.2f}")
        lines.append(f"  bgtransfer / plain celery = {r['bgt_vs_plain']:.2f} (target >= {TARGET_VS_PLAIN}); "
                     f"bgtransfer / aria2c = {r['bgt_vs_aria2c']:.2f}")
        plain_rates = [x["per_s"] for x in r["small"][PLAIN]["samples"]]
        lines.append(f"  by sample pair (bgtransfer, then the plain task): "
                     f"{', '.join(f'{x:.2f}' for x in r['bgt_vs_plain_pairs'])}; the plain task's samples "
                     f"{min(plain_rates):.1f}-{max(plain_rates):.1f}/s")
        if "scale_out" in r:
            so = r["scale_out"]
            lines.append(f"  scale-out (cap {2 * c}): 1 worker x {c}: {so['1_worker_per_s']:.1f}/s, 2 workers x {c}: "
                         f"{so['2_workers_per_s']:.1f}/s, speed-up {so['speedup']:.2f}")
        qd = r["queue_depth"]
        if qd:
            lines.append("  queue depth: " + ", ".join(
                f"{d}: {x['best_ms_per_transfer']:.2f} ms/transfer" for d, x in qd.items()))
        diag = best(r["small"][BGT]["samples"])
        pg = diag.get("pg_per_transfer")
        plain_d = best(r["small"][PLAIN]["samples"])
        lines.append(f"  bgtransfer per transfer: add p50 {diag['add_ms']['p50']:.2f} ms / p99 "
                     f"{diag['add_ms']['p99']:.2f} ms (adding all {n}: {diag['add_all_s']:.2f} s "
                     f"of {diag['seconds']:.2f} s), "
                     f"{diag['deliveries_per_transfer']:.2f} broker deliveries"
                     + (f", {pg['xact_commit']:.1f} store transactions, {pg['tup_inserted']:.1f} rows inserted, "
                        f"{pg['tup_updated']:.1f} updated" if pg else ""))
        lines.append(f"  plain celery: sending all {n}: {plain_d['send_all_s']:.2f} s of {plain_d['seconds']:.2f} s, "
                     f"{plain_d['deliveries_per_transfer']:.2f} broker deliveries per transfer")
        lines.append(f"  CPU ms per transfer {'client':>8} {'w. main':>8} {'w. pool':>8} {'server':>8} {'services':>8} "
                     f"{'total':>8}")
        for v in (v for v in r["small"] if v != ARIA2):
            x = best(r["small"][v]["samples"])["cpu_ms_per_transfer"]
            lines.append(f"    {v[:32]:<32} " + " ".join(f"{x.get(k, 0.0):>8.2f}" for k in (
                "client", "main", "pool", "server", "services", "total")))
        for d, xs in qd.items():
            x = min(xs["samples"], key=lambda y: y["ms_per_transfer"])
            if "pg_per_transfer" in x:
                lines.append(f"  queue {d}: {x['pg_per_transfer']['xact_commit']:.1f} store transactions per transfer,"
                             f" add p50 {x['add_ms']['p50']:.2f} ms")
    lines.append("")
    lines.append(f"{'ratio':<62} {'value':>6} {'target':>8}")
    for name, x in result["ratios"].items():
        target = f"{x['op']} {x['target']:g}" if x["target"] is not None else "-"
        lines.append(f"{name:<62} {x['value']:>6.2f} {target:>8}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.small", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="small downloads per measurement (default 1000; --quick 200)")
    p.add_argument("--concurrency", "-c", type=int, default=4, help="worker processes per worker, and aria2c -j "
                   "(default 4)")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated, of {', '.join(BACKENDS)} (default all; --quick: embedded)")
    p.add_argument("--depths", default=None, help="queue depths of part 3 (default 10,100,500; --quick 10,100)")
    p.add_argument("--repeat", type=int, default=1, help="samples per variant, interleaved; best reported (default 1)")
    p.add_argument("--no-scale-out", action="store_true", help="skip part 2 (1 vs 2 workers)")
    p.add_argument("--quick", action="store_true", help="200 downloads, depths 10 and 100, embedded unless "
                   "--backends says otherwise: about a minute per backend")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write all figures to FILE")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (worker logs, data roots)")
    args = p.parse_args(argv)
    if args.n is None:
        args.n = 200 if args.quick else 1000
    backends = args.backends or ("embedded" if args.quick else ",".join(BACKENDS))
    args.backends = [x.strip() for x in backends.split(",") if x.strip()]
    depths = args.depths or ("10,100" if args.quick else "10,100,500")
    try:
        args.depths = sorted({int(x) for x in depths.split(",") if x.strip()})
    except ValueError:
        p.error(f"--depths must be integers, got {depths!r}")
    if unknown := [x for x in args.backends if x not in BACKENDS]:
        p.error(f"unknown backend(s) {unknown}: choose from {', '.join(BACKENDS)}")
    if args.n < 1 or args.concurrency < 1 or args.repeat < 1 or any(d < 1 for d in args.depths):
        p.error("--n, --concurrency, --repeat and --depths must be at least 1")
    return args


def versions() -> str:
    import celery
    import pycurl

    aria = subprocess.run(["aria2c", "--version"], capture_output=True, text=True).stdout.split("\n", 1)[0]
    return f"{aria} | {' '.join(pycurl.version.split()[:2])} | celery {celery.__version__} | python " \
           f"{sys.version.split()[0]}"


@contextlib.contextmanager
def client_environment(tmp: Path) -> Iterator[None]:
    """This process talks to each deployment through explicit settings only: keep BGTRANSFER_*
    out of its environment and point the defaults (read by celeryconfig on import) into ``tmp``;
    restored afterwards, so a runner calling ``run`` finds its environment as it was."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("BGTRANSFER_")}
    for k in saved:
        del os.environ[k]
    os.environ["BGTRANSFER_DATA_ROOT"] = str(tmp / "client-defaults")
    try:
        yield
    finally:
        os.environ.pop("BGTRANSFER_DATA_ROOT", None)
        os.environ.update(saved)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every part on every backend asked for; all figures, ``ratios`` among them.

    A backend that fails (a check, or an error such as its database going away) is reported
    with its error under ``backends`` and the others still run."""
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bgtransfer-small-", dir="/tmp"))
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if getattr(args, "keep", False):
            stack.callback(print, f"kept {tmp}")
        else:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        stack.enter_context(client_environment(tmp))
        env_versions, code = versions(), code_tree()
        print(f"bench.small: {args.n} downloads of {FILE_BYTES} bytes, concurrency {args.concurrency}, backends "
              f"{', '.join(args.backends)}, depths {args.depths}, repeat {args.repeat}, {os.cpu_count()} CPUs, "
              f"temp dir {tmp}\n  {env_versions}\n  {code_line(code)}", flush=True)
        files = make_files(tmp / "www", max(args.n, *args.depths))
        server = ServerProcess(tmp / "www", tmp / "server.log")
        stack.callback(server.stop)
        files.base_url = server.base_url
        for name in args.backends:
            try:
                results.append(run_backend(name, args, tmp / name.replace("+", "-"), files, server.proc.pid))
            except Exception as exc:  # a failed check, or a server restarted under the run: this backend only
                msg = str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"
                print(f"\n{name}: FAILED: {msg}", file=sys.stderr, flush=True)
                results.append({"backend": name, "error": msg})
    result: dict[str, Any] = {
        "n": args.n, "concurrency": args.concurrency, "repeat": args.repeat, "depths": args.depths,
        "file_bytes": FILE_BYTES, "cpus": os.cpu_count(), "versions": env_versions, "tree": code,
        "backends": results, "ratios": ratios(results, args.depths),
        "wall_seconds": time.perf_counter() - started,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: workers and the server stopped, temporary files deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = run(args)
    except BenchError as exc:
        print(f"\nbench.small FAILED: {exc}", file=sys.stderr)
        return 1
    print()
    print(report(result))
    print(f"\ntotal {result['wall_seconds']:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in result["backends"]) else 0


if __name__ == "__main__":
    sys.exit(main())
