"""A bounded soak: thousands of downloads through two real workers while processes are SIGKILLed.

Run from the repository root, in its venv::

    python -m bench.soak                                   # both backends, 2000 small + 20 large each
    python -m bench.soak --backend embedded --small 300 --large 4
    python -m bench.soak --minutes 8 --json soak.json

All traffic stays on 127.0.0.1. Everything a run creates (data root, worker logs, the
PostgreSQL database, the RabbitMQ queue of its device) is removed at the end, also after an
error, Ctrl-C or SIGTERM; every process it starts is ended by pid.

Backends
    embedded             the default deployment: filesystem broker and SQLite under the data root
    rabbitmq+postgresql  amqp://guest:guest@127.0.0.1:5672// and a fresh PostgreSQL database on
                         postgresql://postgres@127.0.0.1:5432 (created for the run, dropped after)
    both (default)       one after the other

Per backend
    - One ``tests.httpserver.FileServer`` in this process. Small files: 4 KB of distinct random
      content on up to 300 paths (reused round-robin); large files: 20 MB each on up to 4 paths,
      throttled to 20 MB/s per response so one takes about a second and may be cut by a kill (1-2
      of the 20 were, per run, when measured).
      The sha256 of every served content is kept.
    - Two ``python -m bgtransfer worker --concurrency 4`` processes with fast clocks (lease 3 s,
      re-dispatch 5 s, periodic pass 0.5 s, progress 0.25 s, retry 0.2-2 s) and a device cap of 4.
    - ``--apps`` apps, each with at most 25 outstanding requests (the service's quota). A feeder
      adds requests (a distinct target name each; large ones spread evenly among the small) while
      an app has room, and once a request is COMPLETED checks it through ``svc.find``: the
      target must exist with the served sha256 ("corrupt" otherwise) and ``transfer_error`` must
      be None ("failed" otherwise); then ``svc.remove`` and the file is deleted.
    - Chaos: every 1-3 s a random process among the two workers' main processes and their pool
      children is SIGKILLed. A killed main process takes its remaining pool children with it
      (they are SIGKILLed too, plus any straggler found by the per-worker tag in its environment)
      and a new worker is started in its place. Every ~10 s the device goes to cellular for ~2 s
      (default preferences NONE: everything waits for Wi-Fi meanwhile).
    - A sampler reads the held slots of the device from the store every 50 ms (admitted or
      running rows) and keeps the maximum; the server keeps the most responses in flight at once.
    - Time: ``--minutes`` is the budget for the whole command, shared by the backends (each gets
      what is left divided by the backends still to run). Adding stops 20% of a backend's budget
      (20-60 s) before its end so that what was added has time to finish. At the end: "lost" is
      what was added and not completed, "not added" what time did not allow to add.
    - Double completions: every line ``request <id>: completed`` in all the worker logs
      (bgtransfer/_worker.py logs one after the store accepted the outcome); an id may appear once.
    - Worker logs are also scanned for ERROR/CRITICAL/WARNING records and tracebacks; those the
      chaos explains (a pool child exited with SIGKILL, WorkerLostError) are counted apart.

Exit status 1 if, on any backend, something was lost, corrupt, double-completed, not added in
time, or a cap was exceeded (in the store or on the server), or a worker would not start.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._services import Unavailable, backend_env, code_line, code_tree  # noqa: E402
from tests.workerproc import FAST as WORKER_FAST  # noqa: E402
from tests.workerproc import WorkerProcess  # noqa: E402

MB = 1_000_000
SMALL_BYTES = 4096
LARGE_BYTES = 20 * MB
LARGE_RATE = 20 * MB  # bytes per second per response: about one second per large file
SMALL_PATHS = 300
LARGE_PATHS = 4
WORKERS = 2
CONCURRENCY = 4
CAP = 4  # BGTRANSFER_MAX_CONCURRENT_PER_DEVICE
APP_QUOTA = 25  # the service's default max_outstanding_per_app
READY_TIMEOUT = 60.0
SAMPLE_SECONDS = 0.05
TAG_VAR = "BGTRANSFER_SOAK_TAG"  # marks every process of one worker instance (inherited by its children)
FAST = {**WORKER_FAST, "BGTRANSFER_MAX_CONCURRENT_PER_DEVICE": str(CAP)}
BACKENDS = ("embedded", "rabbitmq+postgresql")
HELD_SQL = "SELECT count(*) FROM bgt_requests WHERE device = {p} AND phase IN ('admitted', 'running')"
COMPLETED_RE = re.compile(r"request ([0-9a-f]{32}): completed\b")
RECORD_RE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+: (\w+)/([^\]]+)\] (.*)$")


def now() -> float:
    return time.monotonic()


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class SoakError(RuntimeError):
    """The run could not be carried out (a worker would not start, a server is unreachable)."""


# ----------------------------------------------------------------------------- processes


def tagged_pids(prefix: str) -> list[int]:
    """Pids of live processes whose environment carries ``TAG_VAR`` starting with ``prefix``."""
    needle = f"{TAG_VAR}={prefix}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(var.startswith(needle) for var in env.split(b"\0")):
            found.append(int(entry))
    return found


def sigkill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


class WorkerProc(WorkerProcess):
    """One worker instance of the soak (a restart is a new one), tagged in its environment so
    that pool children orphaned by a kill of their parent can still be found and ended."""

    def __init__(self, index: int, run_tag: str, env: dict[str, str], log_dir: Path) -> None:
        self.index = index
        self.tag = f"{run_tag}-w{index}"
        self.started = now()
        self.ready_at: float | None = None
        self.killed = False
        super().__init__({**env, TAG_VAR: self.tag + "."}, log_dir / f"worker-{index}.log", CONCURRENCY)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_ready(self) -> bool:
        if self.ready_at is None and " ready." in self.text():
            self.ready_at = now()
        return self.ready_at is not None

    def kill_all(self) -> int:
        """SIGKILL the main process, its children and any straggler; the number of other pids."""
        kids = self.children()
        self.killed = True
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.kill()
        stragglers = [pid for pid in tagged_pids(self.tag + ".") if pid not in kids]  # forked after the list
        return len(kids) + sum(sigkill(pid) for pid in stragglers)

    def tail(self, n: int = 3000) -> str:
        return self.text()[-n:]


# ----------------------------------------------------------------------------- store access


class Reader:
    """A plain read-only connection to the state store (the Store's own SQLite transactions are
    BEGIN IMMEDIATE, which would queue behind writers; a WAL reader does not)."""

    def __init__(self, settings: Any) -> None:
        url = settings.store_url
        if url.startswith("sqlite"):
            self.conn: Any = sqlite3.connect(url.split("///", 1)[1], timeout=30, isolation_level=None,
                                             check_same_thread=False)
            self.p = "?"
        else:
            import psycopg

            self.conn = psycopg.connect(url, autocommit=True)
            self.p = "%s"

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(sql.format(p=self.p), params)
        return list(cur.fetchall())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


# ----------------------------------------------------------------------------- one backend


@dataclasses.dataclass
class Item:
    index: int
    kind: str  # small | large
    app: str
    name: str
    sha256: str
    added: float


@dataclasses.dataclass
class Stats:
    completed: dict[str, int] = dataclasses.field(default_factory=lambda: {"small": 0, "large": 0})
    added: dict[str, int] = dataclasses.field(default_factory=lambda: {"small": 0, "large": 0})
    corrupt: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    failed: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    vanished: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    latencies: list[float] = dataclasses.field(default_factory=list)
    kills: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stragglers: int = 0
    restarts: int = 0
    start_failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    unexpected_exits: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    flips: int = 0
    max_held: int = 0
    held_samples: int = 0
    held_over_cap: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    quota_refusals: int = 0


class Soak:
    def __init__(self, backend: str, args: argparse.Namespace, tmp: Path, budget: float, rng: random.Random) -> None:
        self.backend, self.args, self.tmp, self.budget, self.rng = backend, args, tmp, budget, rng
        self.stats = Stats()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.run_tag = f"soak{uuid.uuid4().hex[:10]}"
        self.device = self.run_tag
        self.workers: list[WorkerProc] = []  # every instance, for the logs
        self.slots: list[WorkerProc] = []  # the current worker of each slot
        self.log_dir = tmp / "logs"
        self.log_dir.mkdir(parents=True)
        self.data_root = tmp / "data"
        self.env: dict[str, str] = {"BGTRANSFER_DATA_ROOT": str(self.data_root), "BGTRANSFER_DEVICE": self.device,
                                    **FAST}
        self.errors_in_threads: list[str] = []
        self.completed_ids: set[str] = set()

    # -- set-up and tear-down ---------------------------------------------------------------

    def worker_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BGTRANSFER_")}
        return {**env, **self.env, "PYTHONUNBUFFERED": "1"}

    def start_worker(self) -> WorkerProc:
        w = WorkerProc(len(self.workers), self.run_tag, self.worker_env(), self.log_dir)
        self.workers.append(w)
        return w

    def end_all_processes(self) -> None:
        for w in self.workers:
            if w.alive():
                w.kill_all()
        for pid in tagged_pids(self.run_tag + "-"):
            sigkill(pid)
        deadline = now() + 10
        while tagged_pids(self.run_tag + "-") and now() < deadline:
            time.sleep(0.1)
        left = tagged_pids(self.run_tag + "-")
        if left:
            self.stats.problems.append(f"processes still alive after SIGKILL: {left}")

    def run(self) -> dict[str, Any]:
        t_start = now()
        deadline = t_start + self.budget
        drain_reserve = min(60.0, max(20.0, 0.2 * self.budget))
        add_deadline = deadline - drain_reserve
        from bgtransfer import BackgroundTransferRequest, BackgroundTransferService
        from bgtransfer._exceptions import QuotaExceededError
        from bgtransfer._settings import load, queue_name
        from tests.httpserver import FileServer

        with contextlib.ExitStack() as stack:
            try:  # its clean-up closes this process's clients of it, then drops the database
                self.env.update(backend_env(self.backend, self.data_root, stack, [queue_name(self.device)],
                                            "bgt_soak")[0])
            except Unavailable as exc:
                raise SoakError(str(exc)) from exc
            self.settings = load(self.env)

            # content
            server = stack.enter_context(FileServer())
            shas: dict[str, str] = {}
            n_small_paths = max(1, min(SMALL_PATHS, self.args.small))
            for i in range(n_small_paths):
                data = os.urandom(SMALL_BYTES)
                shas[f"/s/{i}.bin"] = hashlib.sha256(data).hexdigest()
                server.put(f"/s/{i}.bin", data)
            for i in range(max(1, min(LARGE_PATHS, self.args.large))):
                data = os.urandom(LARGE_BYTES)
                shas[f"/l/{i}.bin"] = hashlib.sha256(data).hexdigest()
                server.put(f"/l/{i}.bin", data)
                server.behave(f"/l/{i}.bin", rate=LARGE_RATE)
            n_large_paths = max(1, min(LARGE_PATHS, self.args.large))

            apps = [f"soak{i:02d}" for i in range(self.args.apps)]
            services = {a: BackgroundTransferService(a, settings=self.settings) for a in apps}  # migrates the store
            control = services[apps[0]]
            control.set_conditions(network="wifi", power="external")

            stack.callback(self.end_all_processes)
            for _ in range(WORKERS):
                self.slots.append(self.start_worker())
            for w in self.slots:
                self.wait_ready(w, fatal=True)
            log(f"{self.backend}: workers {[w.pid for w in self.slots]} ready "
                f"(children {[w.children() for w in self.slots]}), device {self.device}")

            # the plan: large requests spread evenly among the small ones
            total = self.args.small + self.args.large
            large_at = {round((k + 0.5) * total / self.args.large) for k in range(self.args.large)} \
                if self.args.large else set()
            plan = ["large" if i in large_at else "small" for i in range(total)]
            while plan.count("large") < self.args.large:  # rounding collisions: turn the last small ones
                plan[len(plan) - 1 - plan[::-1].index("small")] = "large"

            threads = [threading.Thread(target=self.guard, args=(f,), name=f.__name__, daemon=True)
                       for f in (self.sampler, self.chaos, self.flipper)]
            for t in threads:
                t.start()
            stack.callback(self.stop_threads, threads)

            outstanding: dict[str, Item] = {}
            per_app = dict.fromkeys(apps, 0)
            reader = Reader(self.settings)
            stack.callback(reader.close)
            next_i = 0
            app_turn = 0
            t_feed = now()
            last_vanish_check = now()
            t_last_done = t_feed
            while now() < deadline:
                busy = False
                # 1. completions
                done_ids = {r[0] for r in reader.rows(
                    "SELECT id FROM bgt_requests WHERE device = {p} AND phase = 'done'", self.device)}
                for rid in [r for r in outstanding if r in done_ids]:
                    item = outstanding[rid]
                    if self.verify(services[item.app], rid, item):
                        del outstanding[rid]
                        per_app[item.app] -= 1
                        t_last_done = now()
                        busy = True
                # 2. requests that disappeared without our remove
                if now() - last_vanish_check > 2.0:
                    last_vanish_check = now()
                    present = {r[0] for r in reader.rows(
                        "SELECT id FROM bgt_requests WHERE device = {p}", self.device)}
                    for rid in [r for r in outstanding if r not in present]:
                        item = outstanding.pop(rid)
                        per_app[item.app] -= 1
                        self.stats.vanished.append({"id": rid, "kind": item.kind, "app": item.app})
                        self.stats.problems.append(f"request {rid} ({item.kind}, {item.app}) vanished from the store")
                # 3. new requests, round-robin over the apps with room
                while next_i < len(plan) and now() < add_deadline:
                    room = [a for a in apps if per_app[a] < APP_QUOTA]
                    if not room:
                        break
                    app = room[app_turn % len(room)]
                    app_turn += 1
                    kind = plan[next_i]
                    path = f"/s/{next_i % n_small_paths}.bin" if kind == "small" else f"/l/{next_i % n_large_paths}.bin"
                    name = f"{kind}-{next_i:05d}-{uuid.uuid4().hex[:8]}.bin"
                    req = BackgroundTransferRequest(server.url(path), download_location=f"/shared/transfers/{name}")
                    try:
                        services[app].add(req)
                    except QuotaExceededError as exc:
                        self.stats.quota_refusals += 1
                        self.stats.problems.append(f"add refused with {per_app[app]} outstanding by our count: {exc}")
                        per_app[app] = APP_QUOTA  # until one of its requests completes
                        continue
                    outstanding[req.request_id] = Item(next_i, kind, app, name, shas[path], now())
                    per_app[app] += 1
                    self.stats.added[kind] += 1
                    next_i += 1
                    busy = True
                if next_i >= len(plan) and not outstanding:
                    break
                if not busy:
                    time.sleep(0.02)
            t_end_feed = now()
            # what is left at the deadline: lost (added, never completed)
            lost = []
            for rid, item in outstanding.items():
                row = reader.rows("SELECT phase, status, wait_reason, attempts, lease_owner, lease_expires, error, "
                                  "bytes_received FROM bgt_requests WHERE id = {p}", rid)
                lost.append({"id": rid, "kind": item.kind, "app": item.app, "age_s": round(now() - item.added, 1),
                             "row": [str(v) for v in row[0]] if row else None})
            self.stop_threads(threads)
            self.end_all_processes()
            server.wait_idle(5)
            server_max = server.max_concurrent
            server_overlap = self.server_overlap(server) if server_max > CAP else []
            large_reqs = [r for r in server.requests if r.path.startswith("/l/")]
            large_wire = {"requests": len(large_reqs),
                          "resumed": sum(1 for r in large_reqs if r.range_start),
                          "cut": sum(1 for r in large_reqs if not r.completed),
                          "bytes_sent": sum(r.body_bytes_sent for r in large_reqs)}
        logs = self.scan_logs()
        elapsed = now() - t_start
        feed_seconds = max(1e-9, t_last_done - t_feed)
        n_done = sum(self.stats.completed.values()) + len(self.stats.failed) + len(self.stats.corrupt)
        not_added = len(plan) - next_i
        kills_main = sum(1 for k in self.stats.kills if k["role"] == "main")
        kills_child = sum(1 for k in self.stats.kills if k["role"] == "child")
        lat = sorted(self.stats.latencies)
        result: dict[str, Any] = {
            "backend": self.backend,
            "requested": {"small": self.args.small, "large": self.args.large},
            "added": self.stats.added,
            "completed": self.stats.completed,
            "kills": {"main": kills_main, "child": kills_child, "stragglers": self.stats.stragglers},
            "kill_log": self.stats.kills,
            "restarts": self.stats.restarts,
            "worker_start_failures": self.stats.start_failures,
            "unexpected_worker_exits": self.stats.unexpected_exits,
            "condition_flips": self.stats.flips,
            "lost": lost,
            "not_added": not_added,
            "corrupt": self.stats.corrupt,
            "failed": self.stats.failed,
            "vanished": self.stats.vanished,
            "double_completed": logs["double"],
            "completed_without_log_line": 0,
            "max_held_in_store": self.stats.max_held,
            "held_samples": self.stats.held_samples,
            "held_over_cap": self.stats.held_over_cap[:20],
            "max_concurrent_on_server": server_max,
            "large_on_the_wire": large_wire,
            "server_overlap_over_cap": server_overlap,
            "cap": CAP,
            "elapsed_s": elapsed,
            "transfer_phase_s": feed_seconds,
            "drain_s": t_end_feed - t_feed,
            "budget_s": self.budget,
            "rate_per_s": n_done / feed_seconds,
            "latency_s": {"p50": statistics.median(lat) if lat else None,
                          "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
                          "max": lat[-1] if lat else None},
            "quota_refusals": self.stats.quota_refusals,
            "log": logs,
            "problems": self.stats.problems + self.errors_in_threads,
        }
        completed_ids = self.completed_ids
        result["completed_without_log_line"] = len(completed_ids - set(logs["completed_ids"]))
        logs.pop("completed_ids")
        result["ok"] = not (lost or not_added or self.stats.corrupt or logs["double"] or self.stats.vanished
                            or self.stats.max_held > CAP or server_max > CAP or self.stats.start_failures)
        return result

    def verify(self, svc: Any, rid: str, item: Item) -> bool:
        """Check one request the store says is done; remove it. False to look again later."""
        req = svc.find(rid)
        if req is None:
            return False  # the next vanish check decides
        if req.transfer_status.value != "COMPLETED":
            return False
        target = self.data_root / "apps" / item.app / "shared" / "transfers" / item.name
        if req.transfer_error is not None:
            self.stats.failed.append({"id": rid, "kind": item.kind, "error": req.transfer_error})
        else:
            try:
                digest = hashlib.sha256(target.read_bytes()).hexdigest()
            except FileNotFoundError:
                digest = "missing"
            if digest != item.sha256:
                size = target.stat().st_size if target.exists() else None
                self.stats.corrupt.append({"id": rid, "kind": item.kind, "app": item.app, "name": item.name,
                                           "expected": item.sha256, "got": digest, "size": size})
            else:
                self.stats.completed[item.kind] += 1
                self.completed_ids.add(rid)
        self.stats.latencies.append(now() - item.added)
        svc.remove(rid)
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        return True

    # -- threads ----------------------------------------------------------------------------

    def guard(self, fn: Any) -> None:
        try:
            fn()
        except Exception:
            self.errors_in_threads.append(f"{fn.__name__} thread crashed:\n{traceback.format_exc()}")
            log(f"{fn.__name__} thread crashed:\n{traceback.format_exc()}")

    def stop_threads(self, threads: list[threading.Thread]) -> None:
        self.stop.set()
        for t in threads:
            t.join(30)

    def sampler(self) -> None:
        reader = Reader(self.settings)
        try:
            while not self.stop.wait(SAMPLE_SECONDS):
                try:
                    held = reader.rows(HELD_SQL, self.device)[0][0]
                except Exception as exc:  # a locked SQLite file for 30 s, a PostgreSQL hiccup: note and go on
                    self.stats.problems.append(f"sampler query failed: {exc!r}")
                    time.sleep(0.5)
                    continue
                self.stats.held_samples += 1
                self.stats.max_held = max(self.stats.max_held, held)
                if held > CAP and len(self.stats.held_over_cap) < 50:
                    rows = reader.rows("SELECT id, phase, lease_token, lease_owner, lease_expires FROM bgt_requests "
                                       "WHERE device = {p} AND phase IN ('admitted', 'running')", self.device)
                    self.stats.held_over_cap.append({"t": time.time(), "held": held, "rows": [list(map(str, r))
                                                                                               for r in rows]})
        finally:
            reader.close()

    def wait_ready(self, w: WorkerProc, fatal: bool) -> bool:
        deadline = w.started + READY_TIMEOUT
        while not w.check_ready():
            if not w.alive() or now() > deadline or (self.stop.is_set() and not fatal):
                if self.stop.is_set() and not fatal:
                    return False
                self.stats.start_failures.append({"worker": w.index, "exit": w.proc.poll(), "log_tail": w.tail()})
                if fatal:
                    raise SoakError(f"worker {w.index} (pid {w.pid}) did not start:\n{w.tail()}")
                return False
            time.sleep(0.1)
        return True

    def chaos(self) -> None:
        while not self.stop.wait(self.rng.uniform(1.0, 3.0)):
            for slot, w in enumerate(self.slots):
                if not w.alive() and not w.killed and w.ready_at is not None:  # died on its own
                    self.stats.unexpected_exits.append({"worker": w.index, "exit": w.proc.returncode,
                                                        "log_tail": w.tail()})
                    self.stats.problems.append(f"worker {w.index} (pid {w.pid}) exited by itself "
                                               f"with {w.proc.returncode}")
                    w.kill_all()
                    self.replace(slot)
                elif w.ready_at is None and not w.check_ready() and (
                        not w.alive() or now() - w.started > READY_TIMEOUT):
                    self.stats.start_failures.append({"worker": w.index, "exit": w.proc.poll(), "log_tail": w.tail()})
                    self.stats.problems.append(
                        f"worker {w.index} (pid {w.pid}) " + (f"exited with {w.proc.returncode} before it was ready"
                                                              if not w.alive() else
                                                              f"was not ready after {READY_TIMEOUT:g} s"))
                    w.kill_all()
                    self.replace(slot)
            candidates: list[tuple[int, str, int]] = []
            for slot, w in enumerate(self.slots):
                if w.alive() and w.ready_at is not None:
                    candidates.append((slot, "main", w.pid))
                    candidates.extend((slot, "child", c) for c in w.children())
            if not candidates:
                continue
            slot, role, pid = self.rng.choice(candidates)
            w = self.slots[slot]
            entry = {"t": round(now() - w.started, 2), "wall": time.time(), "role": role, "worker": w.index,
                     "pid": pid, "candidates": len(candidates)}
            if role == "main":
                entry["with_children"] = w.children()
                self.stats.stragglers += max(0, w.kill_all() - len(entry["with_children"]))
                self.stats.kills.append(entry)
                self.replace(slot)
            elif sigkill(pid):
                self.stats.kills.append(entry)

    def replace(self, slot: int) -> None:
        self.slots[slot] = self.start_worker()
        self.stats.restarts += 1

    def flipper(self) -> None:
        from bgtransfer import BackgroundTransferService

        svc = BackgroundTransferService(f"soak{0:02d}", settings=self.settings)
        cellular = False
        try:
            while not self.stop.wait(self.rng.uniform(8.0, 12.0)):
                svc.set_conditions(network="cellular")
                cellular = True
                self.stats.flips += 1
                self.stop.wait(self.rng.uniform(1.5, 2.5))
                svc.set_conditions(network="wifi")
                cellular = False
        finally:
            if cellular:
                with contextlib.suppress(Exception):
                    svc.set_conditions(network="wifi")

    # -- evidence ---------------------------------------------------------------------------

    @staticmethod
    def server_overlap(server: Any) -> list[dict[str, Any]]:
        """The requests in flight at the moment the most were (when that exceeded the cap)."""
        reqs = server.requests
        events = sorted([(r.started, 1, i) for i, r in enumerate(reqs)] +
                        [(r.ended if r.ended is not None else float("inf"), -1, i) for i, r in enumerate(reqs)])
        live: set[int] = set()
        best: list[int] = []
        for _, kind, i in events:
            if kind == 1:
                live.add(i)
                if len(live) > len(best):
                    best = sorted(live)
            else:
                live.discard(i)
        return [{"path": reqs[i].path, "range_start": reqs[i].range_start, "status": reqs[i].status,
                 "started": reqs[i].started, "ended": reqs[i].ended, "bytes": reqs[i].body_bytes_sent,
                 "completed": reqs[i].completed} for i in best]

    def scan_logs(self) -> dict[str, Any]:
        """Completion lines (double completions), log records by level, the unexpected ones."""
        completions: collections.Counter[str] = collections.Counter()
        where: dict[str, list[str]] = collections.defaultdict(list)
        expected = collections.Counter()
        unexpected: collections.Counter[str] = collections.Counter()
        examples: dict[str, str] = {}
        outcomes: collections.Counter[str] = collections.Counter()
        retry_reasons: collections.Counter[str] = collections.Counter()
        for w in self.workers:
            try:
                text = w.log.read_text(errors="replace")
            except OSError:
                continue
            records: list[list[str]] = []
            for line in text.splitlines():
                if RECORD_RE.match(line) or not records:
                    records.append([line])
                else:
                    records[-1].append(line)
            for rec in records:
                first = rec[0]
                for m in COMPLETED_RE.finditer(first):
                    completions[m.group(1)] += 1
                    where[m.group(1)].append(f"worker-{w.index}.log: {first}")
                m = RECORD_RE.match(first)
                level, msg = (m.group(1), m.group(3)) if m else ("", first)
                om = re.match(r"request [0-9a-f]{32}: (\w+)(?: \((.*)\))?$", msg)
                if om:
                    outcomes[om.group(1)] += 1
                    if om.group(1) in ("retry", "slow", "failed", "requeue") and om.group(2):
                        retry_reasons[re.sub(r"\d+", "N", om.group(2))[:120]] += 1
                body = "\n".join(rec)
                if level in ("ERROR", "CRITICAL", "WARNING") or "Traceback" in body:
                    if ("signal 9 (SIGKILL)" in body or "WorkerLostError" in body) and level != "CRITICAL":
                        expected[level] += 1
                        continue
                    if not m:  # output outside a log record (a traceback at start-up): name it by its last line
                        msg = f"{first} ... {rec[-1]}" if len(rec) > 1 else first
                    sig = re.sub(r"[0-9a-f]{32}|[0-9a-f-]{36}|\d+", "N", msg)[:160]
                    unexpected[f"{level}: {sig}"] += 1
                    examples.setdefault(f"{level}: {sig}", f"worker-{w.index}.log:\n" + "\n".join(rec[:40]))
        double = {rid: where[rid] for rid, n in completions.items() if n > 1}
        return {
            "completed_lines": sum(completions.values()),
            "completed_ids": list(completions),
            "double": double,
            "outcomes": dict(outcomes),
            "retry_reasons": dict(retry_reasons.most_common(15)),
            "expected_errors": dict(expected),
            "unexpected": dict(unexpected.most_common()),
            "unexpected_examples": examples,
        }


# ----------------------------------------------------------------------------- report


def block(r: dict[str, Any]) -> str:
    c, a, req = r["completed"], r["added"], r["requested"]
    lat = r["latency_s"]
    lines = [
        f"== {r['backend']} ==",
        f"transfers            small {c['small']}/{req['small']} completed, large {c['large']}/{req['large']} "
        f"completed (added {a['small']} + {a['large']})",
        f"kills                main {r['kills']['main']}, child {r['kills']['child']}"
        + (f" (+{r['kills']['stragglers']} stragglers)" if r["kills"]["stragglers"] else ""),
        f"restarts             {r['restarts']}" + (f" (start failures {len(r['worker_start_failures'])})"
                                                   if r["worker_start_failures"] else ""),
        f"condition flips      {r['condition_flips']} (cellular ~2 s each)",
        f"large on the wire    {r['large_on_the_wire']['requests']} responses, {r['large_on_the_wire']['cut']} cut "
        f"short, {r['large_on_the_wire']['resumed']} resumed with Range, "
        f"{r['large_on_the_wire']['bytes_sent'] / MB:.0f} MB sent for {c['large'] * LARGE_BYTES / MB:.0f} MB",
        f"lost                 {len(r['lost'])}" + (f" (+{len(r['vanished'])} vanished)" if r["vanished"] else ""),
        f"not added in time    {r['not_added']}",
        f"corrupt              {len(r['corrupt'])}",
        f"failed               {len(r['failed'])}",
        f"double-completed     {len(r['double_completed'])}",
        f"max concurrent store {r['max_held_in_store']} (cap {r['cap']}; {r['held_samples']} samples)",
        f"max concurrent conns {r['max_concurrent_on_server']} (cap {r['cap']})",
        f"elapsed              {r['elapsed_s']:.1f} s (transfers {r['transfer_phase_s']:.1f} s, "
        f"{r['rate_per_s']:.1f} completed/s; add-to-verified p50 {_f(lat['p50'])} s, p99 {_f(lat['p99'])} s, "
        f"max {_f(lat['max'])} s; budget {r['budget_s']:.0f} s)",
        f"worker log           {r['log']['completed_lines']} completion lines, outcomes {r['log']['outcomes']}, "
        f"expected kill errors {sum(r['log']['expected_errors'].values())}, "
        f"other warnings/errors {sum(r['log']['unexpected'].values())}",
    ]
    if r["completed_without_log_line"]:
        lines.append(f"note                 {r['completed_without_log_line']} verified completions have no "
                     "'completed' log line (a kill between the store write and the log write)")
    for sig, n in list(r["log"]["unexpected"].items())[:10]:
        lines.append(f"  log x{n}: {sig}")
    for reason, n in list(r["log"]["retry_reasons"].items())[:8]:
        lines.append(f"  retry reason x{n}: {reason}")
    for p in r["problems"][:10]:
        lines.append(f"  problem: {p.splitlines()[0][:200]}")
    for x in r["lost"][:10]:
        lines.append(f"  lost: {x}")
    for x in r["corrupt"][:10]:
        lines.append(f"  corrupt: {x}")
    for x in r["failed"][:10]:
        lines.append(f"  failed: {x}")
    for rid, where in list(r["double_completed"].items())[:10]:
        lines.append(f"  double: {rid}: " + " | ".join(where))
    if r["held_over_cap"]:
        lines.append(f"  store over cap: {r['held_over_cap'][0]}")
    if r["server_overlap_over_cap"]:
        lines.append(f"  server overlap: {r['server_overlap_over_cap']}")
    if r["not_added"]:
        done = sum(r["completed"].values())
        lines.append(f"  time ran out: {r['not_added']} transfers never added; measured {r['rate_per_s']:.1f} "
                     f"completed/s, so about {int(r['rate_per_s'] * r['transfer_phase_s'])} fit this budget "
                     f"({done} completed)")
    lines.append(f"result               {'PASS' if r['ok'] else 'FAIL'}")
    return "\n".join(lines)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=[*BACKENDS, "both"], default="both")
    p.add_argument("--small", type=int, default=2000, help="4 KB downloads per backend (default 2000)")
    p.add_argument("--large", type=int, default=20, help="20 MB downloads per backend (default 20)")
    p.add_argument("--apps", type=int, default=10, help="apps, each with at most 25 outstanding (default 10)")
    p.add_argument("--minutes", type=float, default=8.0, help="time budget for the whole command (default 8)")
    p.add_argument("--seed", type=int, default=None, help="seed of the chaos and of the plan (default: random)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write every figure to FILE")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (worker logs, data root) for inspection")
    args = p.parse_args(argv)
    if args.small < 0 or args.large < 0 or args.small + args.large < 1 or args.apps < 1 or args.minutes <= 0:
        p.error("--small/--large must be >= 0 with at least one transfer, --apps >= 1, --minutes > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    backends = list(BACKENDS) if args.backend == "both" else [args.backend]
    top = Path(tempfile.mkdtemp(prefix="bgtransfer-soak-", dir="/tmp"))
    # This process only talks to the deployments through explicit settings; keep the environment's
    # BGTRANSFER_* out, and point the defaults (read by celeryconfig on import) into the temp dir.
    for k in [k for k in os.environ if k.startswith("BGTRANSFER_")]:
        del os.environ[k]
    os.environ["BGTRANSFER_DATA_ROOT"] = str(top / "client-defaults")
    code = code_tree()
    print(f"bench.soak: backends {', '.join(backends)}; {args.small} small (4 KB) + {args.large} large (20 MB) "
          f"per backend, {args.apps} apps, {WORKERS} workers x {CONCURRENCY}, cap {CAP}, budget {args.minutes:g} min, "
          f"seed {seed}, temp dir {top}\n  {code_line(code)}", flush=True)
    results: list[dict[str, Any]] = []
    started = now()
    status = 0
    try:
        for k, backend in enumerate(backends):
            left = args.minutes * 60 - (now() - started)
            budget = left / (len(backends) - k)
            print(f"\n-- {backend}: budget {budget:.0f} s", flush=True)
            try:
                r = Soak(backend, args, top / backend.replace("+", "-"), budget, rng).run()
            except SoakError as exc:
                print(f"{backend}: could not run: {exc}", file=sys.stderr)
                results.append({"backend": backend, "ok": False, "error": str(exc)})
                status = 1
                continue
            results.append(r)
            print(block(r), flush=True)
            for sig, example in list(r["log"]["unexpected_examples"].items())[:5]:
                print(f"\n  first '{sig}':\n    " + example.replace("\n", "\n    ")[:3000])
            if not r["ok"]:
                status = 1
    finally:
        if args.keep:
            print(f"kept {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)
    total = now() - started
    print(f"\ntotal {total:.0f} s; {'PASS' if status == 0 else 'FAIL'}")
    if args.json is not None:
        args.json.write_text(json.dumps({"seed": seed, "tree": code, "args": {k: str(v) for k, v in vars(args).items()},
                                         "total_s": total, "results": results}, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
