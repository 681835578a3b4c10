"""The state store: the record of every request, its bytes, its validator and its slot.

Broker messages are only wake-ups; this is what survives a SIGKILL. One SQLAlchemy Core
schema runs on a SQLite file (the embedded default: WAL, ``BEGIN IMMEDIATE`` so writers queue
instead of failing) and on PostgreSQL (the device row ``SELECT ... FOR UPDATE`` serialises
admission per device across hosts).

A slot is a lease on a request row: ``phase`` in (admitted, running) with ``lease_expires``
in the future. ``lease_token`` is a fencing token: it grows at every admission, and every
write by an attempt carries it with the attempt's owner (``_HELD_BY``), so a stale attempt can
never write, even after a server crash that lost its claim (``_NO_FLUSH_WAIT``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import re
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import pq
from psycopg.adapt import Transformer
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from . import _policy as policy
from ._exceptions import LeaseLost, QuotaExceededError, TransferError
from ._models import BackgroundTransferRequest, TransferPreferences, TransferStatus
from ._settings import Settings

log = logging.getLogger("bgtransfer.store")
SCHEMA_VERSION = 4
meta = sa.MetaData()

requests = sa.Table(
    "bgt_requests", meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),  # arrival order on the device
    sa.Column("device", sa.String(64), nullable=False),
    sa.Column("app_id", sa.String(63), nullable=False),
    sa.Column("method", sa.String(8), nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("headers", sa.JSON, nullable=False),
    sa.Column("direction", sa.String(8), nullable=False),
    sa.Column("local_path", sa.Text, nullable=False),  # normalised sandbox path
    sa.Column("preferences", sa.String(32), nullable=False),
    sa.Column("tag", sa.Text),
    sa.Column("expected_sha256", sa.String(64)),
    sa.Column("form_fields", sa.JSON),
    sa.Column("refresh_task", sa.Text),  # a Celery task that gives a fresh URL (and headers)
    sa.Column("url_expires", sa.Float),  # when the URL stops working, if the app said
    # queued -> admitted -> running -> done; paused by the app; removed rows finish their stop
    sa.Column("phase", sa.String(16), nullable=False),
    sa.Column("status", sa.String(64), nullable=False),
    sa.Column("wait_reason", sa.Text),
    sa.Column("status_code", sa.Integer),
    sa.Column("error", sa.Text),
    sa.Column("bytes_received", sa.BigInteger, nullable=False, default=0),
    sa.Column("total_bytes_to_receive", sa.BigInteger),
    sa.Column("bytes_sent", sa.BigInteger, nullable=False, default=0),
    sa.Column("total_bytes_to_send", sa.BigInteger),
    sa.Column("validator", sa.Text),  # ETag or Last-Modified of the bytes held
    sa.Column("degraded", sa.Text),  # why resume is impossible with this server, if it is
    sa.Column("upload_url", sa.Text),  # a tus upload's own URL, stored before its first byte goes
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("not_before", sa.Float, nullable=False, default=0.0),
    # the device's conditions version this request was last decided under, and the verdict
    sa.Column("decided_version", sa.Integer, nullable=False, default=-1),
    sa.Column("admissible", sa.Boolean, nullable=False, default=False),
    sa.Column("control", sa.String(8)),  # 'pause' or 'cancel', read by the running attempt
    sa.Column("removed", sa.Boolean, nullable=False, default=False),
    sa.Column("lease_token", sa.Integer, nullable=False, default=0),
    sa.Column("lease_owner", sa.Text),
    sa.Column("lease_expires", sa.Float),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("completed_at", sa.Float),
    sa.Index("bgt_requests_device_phase", "device", "phase", "seq"),
    sa.Index("bgt_requests_app", "app_id", "seq"),
)
# Partial indexes for the admission pass, so that each of its reads touches only what it returns
# (slots held, requests to decide, each app's next few) and not the whole queue.
_PARTIAL = (
    ("bgt_requests_held", ("device",), "phase IN ('admitted', 'running')"),
    # (decided_version is never NULL: saying so keeps the planner from taking this index for the
    # heads query, which does not name the column, when it has no statistics to tell them apart)
    ("bgt_requests_undecided", ("device", "decided_version"), "phase = 'queued' AND decided_version IS NOT NULL"),
    ("bgt_requests_heads", ("device", "app_id", "seq"), "phase = 'queued' AND admissible"),
)
for _name, _cols, _where in _PARTIAL:
    sa.Index(_name, *(requests.c[c] for c in _cols), postgresql_where=sa.text(_where), sqlite_where=sa.text(_where))
devices = sa.Table(  # admission passes lock a device's row: one pass at a time per device
    "bgt_devices", meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("conditions", sa.JSON, nullable=False),
    sa.Column("cond_version", sa.Integer, nullable=False, default=0),  # bumped at every change
)
queues = sa.Table(  # a device's arrivals, on a row of their own: adds lock it, not the device's row
    "bgt_queues", meta,
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("next_seq", sa.BigInteger, nullable=False),
    sa.Column("live", sa.BigInteger, nullable=False),  # requests not removed (rule 6)
)
app_turns = sa.Table(  # fair-share memory: each app's virtual clock on a device (policy.fair_share);
    "bgt_app_turns", meta,  # the row of app '' (no app's id) holds the device's virtual time
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("app_id", sa.String(63), primary_key=True),
    sa.Column("clock", sa.Float, nullable=False),
)
counters = sa.Table(  # device-wide counters for the metrics: admission verdicts, lease reclaims
    "bgt_counters", meta,
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("metric", sa.String(32), primary_key=True),
    sa.Column("decision", sa.String(16), primary_key=True),
    sa.Column("reason", sa.String(128), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)
usage = sa.Table(  # bytes moved per app and hour, for the rolling-day quotas (the last 24 hours)
    "bgt_usage", meta,
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("app_id", sa.String(63), primary_key=True),
    sa.Column("hour", sa.BigInteger, primary_key=True),  # unix time // 3600
    sa.Column("bytes", sa.BigInteger, nullable=False),
)
schema = sa.Table("bgt_schema", meta, sa.Column("version", sa.Integer, nullable=False))

_CONDITION_WAITS = [st.value for st in TransferStatus if st.name.startswith("WAITING_FOR")]  # set only by verdicts

# The admission pass runs at every start and end of a transfer: its statements are plain SQL
# (portable between SQLite and PostgreSQL) built once, which costs a fraction of composing them.
_DEVICE_SQL = "SELECT name, conditions, cond_version FROM bgt_devices WHERE name = :device"
_DEVICE = sa.text(_DEVICE_SQL)
# PostgreSQL: the device's lock is its row's and an advisory lock's, taken exclusive: a hand-off
# (_HANDOFF_PICK) takes that one shared, so hand-offs run side by side but never beside a pass or
# a change of conditions (the two-key form keeps it apart from the migrations' one-key lock).
_DEVICE_KEY = "7320, hashtext(:device)"
_DEVICE_LOCKED = f"pg_advisory_xact_lock({_DEVICE_KEY}), {_DEVICE_SQL[len('SELECT '):]} FOR UPDATE"
_DEVICE_FOR_UPDATE = sa.text(f"SELECT {_DEVICE_LOCKED}")
# PostgreSQL: a pass's commit, and a hand-off's, need not wait for its WAL flush. What a server
# crash could lose of them is recomputed by the next pass (verdicts, admissions, reclaims) or
# redone: an attempt's outcome, whose lease then expires and is reclaimed (a transfer runs at
# least once, as after a worker's crash), and a claim, whose token a later pass may give out
# again but whose owner it does not (_HELD_BY fences out the first holder). So they turn that
# wait off for their own transaction, in their first statement (_NO_FLUSH_WAIT); an add's commit
# and a claim of a dispatched request still wait for it.
_NO_FLUSH_WAIT = "set_config('synchronous_commit', 'off', true)"
_DEVICE_PASS = sa.text(f"SELECT {_NO_FLUSH_WAIT}, {_DEVICE_LOCKED}")
_DEVICE_SHARED = sa.text(f"SELECT {_NO_FLUSH_WAIT}, pg_advisory_xact_lock_shared({_DEVICE_KEY})")
_HELD = "device = :device AND phase IN ('admitted', 'running')"
_TALLY = sa.text(  # read after the device lock, so no other pass can change them meanwhile
    f"SELECT (SELECT count(*) FROM bgt_requests WHERE {_HELD}) AS held,"
    f" (SELECT count(*) FROM bgt_requests WHERE {_HELD} AND (lease_expires IS NULL OR lease_expires < :now))"
    " AS expired, (SELECT decided_version FROM bgt_requests WHERE device = :device AND phase = 'queued'"
    " AND decided_version IS NOT NULL ORDER BY decided_version LIMIT 1)"  # (min() may read the whole range)
    " AS oldest_verdict,"  # one step down the undecided index: older than the conditions means stale
    " (SELECT next_seq FROM bgt_queues WHERE device = :device) AS arrivals")  # before the heads are read
_EXPIRED = sa.text(
    f"SELECT id, removed FROM bgt_requests WHERE {_HELD} AND (lease_expires IS NULL OR lease_expires < :now)")
_ADD_CHECKS = sa.text(  # rule 5 and the duplicates an add must refuse, in one read (one walk of the app's rows)
    "SELECT (SELECT count(*) FROM bgt_requests WHERE id = :id) AS exists_, a.n_app, a.target_of,"
    f" (SELECT count(*) FROM bgt_requests WHERE {_HELD}) AS held"  # whether a pass could admit anything
    " FROM (SELECT count(*) AS n_app, min(id) FILTER (WHERE direction = 'download' AND local_path = :path)"
    " AS target_of FROM bgt_requests WHERE app_id = :app AND NOT removed) a")
_UNDECIDED = sa.text(  # versions only grow, so "older than now" is an index range
    "SELECT id, app_id, direction, preferences, total_bytes_to_receive, total_bytes_to_send, bytes_received "
    "FROM bgt_requests WHERE device = :device AND phase = 'queued' AND decided_version < :version")
# The first `free` admissible requests of each of the `free` apps whose turn comes first (the
# lowest clock, not below the device's virtual time; ties: the earliest head): no other app can
# get one of `free` turns (policy.fair_share), so a pass reads at most free * free rows, whatever
# the number of apps or the queue's length. Each app's range of the heads index is walked only
# to its first rows. PostgreSQL says so with LATERAL; SQLite has none, and runs a correlated IN
# list per app the same way (PostgreSQL would instead test that list against every queued row).
_QUEUED = "phase = 'queued' AND admissible AND not_before <= :now"
_NEXT = f"SELECT {{cols}} FROM bgt_requests WHERE device = :device AND app_id = t.app_id AND {_QUEUED} ORDER BY seq"
_TURNS = (  # the apps whose turn comes first, with their clocks and the device's virtual time
    "(SELECT app_id, clock, vnow FROM (SELECT app_id, clock, ({now}) AS vnow, ({head} LIMIT 1) AS head"
    " FROM bgt_app_turns t WHERE device = :device {fence}) a WHERE head IS NOT NULL"  # (fence: each app is
    # probed once, not once for the filter and again for the order)
    " ORDER BY {greatest}(clock, coalesce(vnow, 0)), head LIMIT :apps) t").format(
    now="SELECT clock FROM bgt_app_turns WHERE device = :device AND app_id = ''",
    head=_NEXT.format(cols="seq"), greatest="{greatest}", fence="{fence}")
_HEADS = {
    "postgresql": sa.text(
        f"SELECT r.id, t.app_id, r.lease_token, r.decided_version, t.clock, t.vnow FROM "
        f"{_TURNS.format(greatest='greatest', fence='OFFSET 0')} CROSS JOIN LATERAL "
        f"({_NEXT.format(cols='id, lease_token, decided_version, seq')} LIMIT :free) r ORDER BY r.seq"),
    "sqlite": sa.text(
        f"SELECT r.id, t.app_id, r.lease_token, r.decided_version, t.clock, t.vnow FROM "
        f"{_TURNS.format(greatest='max', fence='LIMIT -1 OFFSET 0')} JOIN bgt_requests r ON r.id IN "
        f"({_NEXT.format(cols='id')} LIMIT :free) ORDER BY r.seq"),
}
# A pass with one slot to give (a chained one, usually): fair_share's first pick alone.
# Apps whose clock is not past the device's virtual time tie there, ahead of all others, so the
# pick is the earliest queued request of such an app: when the apps take turns, a step or two down
# the queue in arrival order, with no probe per app. Only the first :window queued requests are
# looked at for it; when none of them is of such an app, the apps' turns are read as _HEADS does:
# on PostgreSQL in the same statement (a round trip saved), on SQLite by the pass after it (SQLite
# would read them first, and its statements cost no round trip).
_TIED = (
    "WITH tied AS (SELECT r.id, r.app_id, r.lease_token, r.decided_version, t.clock, v.vnow FROM "
    "(SELECT (SELECT clock FROM bgt_app_turns WHERE device = :device AND app_id = '') AS vnow) v, "
    f"(SELECT id, app_id, lease_token, decided_version, seq FROM bgt_requests WHERE device = :device AND {_QUEUED} "
    "ORDER BY seq LIMIT :window) r JOIN bgt_app_turns t ON t.device = :device AND t.app_id = r.app_id "
    "WHERE t.clock <= coalesce(v.vnow, 0) ORDER BY r.seq LIMIT 1) SELECT * FROM tied")
_NEXT_UP = {"sqlite": sa.text(_TIED), "postgresql": sa.text(  # (:apps and :free 1)
    f"{_TIED} UNION ALL SELECT * FROM ({_HEADS['postgresql'].text}) h WHERE NOT EXISTS (SELECT 1 FROM tied)")}
_NEXT_UP_WINDOW = 32
# PostgreSQL: an attempt that ends hands its slot to the next request, which its worker runs
# next: the held slots stay as many, so this needs no pass and no device lock, only that none
# runs meanwhile (_DEVICE_SHARED before it) and that nothing needs a pass's care: slots over the
# cap, an expired lease, a verdict to make again, an app out of the foreground. The pick is a
# chained pass's (_NEXT_UP: a tied app's earliest request, else the first turn's head), skipping
# the requests a concurrent hand-off holds (only those: a lock on an app's clock row, kept after a
# recheck dropped it, would make one hand-off wait for another's clock while it holds its own,
# and two could wait for each other); as policy.fair_share's first pick, the app's clock moves
# on by 1/weight (:steps, by app; 1 for the others) and the device's virtual time to the pick's
# turn. The attempt's own row is taken without waiting: a concurrent hand-off whose pick read it
# while it was still queued may hold it (a lock on a row's newest version outlives the recheck
# that drops it), and waiting for that one while holding a pick of one's own could close a
# cycle of them; so a held row makes this a miss, for the pass, which waits its turn.
# When the queue has run dry, the attempt ends all the same and its slot is free: as after a
# pass that leaves one free, an add that read it held is looked for after the commit (_ARRIVED,
# with the arrivals this statement read, in a second round trip: only then). One round trip
# (Store._hand_off); nothing written if there is neither pick nor a dry queue, or the attempt's
# lease no longer holds.
_HANDOFF_PICK = (
    "vt AS (SELECT coalesce((SELECT clock FROM bgt_app_turns WHERE device = :device AND app_id = ''), 0) AS vnow), "
    "dev AS (SELECT conditions, cond_version FROM bgt_devices WHERE name = :device), "
    f"ok AS (SELECT 1 FROM dev WHERE (SELECT count(*) FROM bgt_requests WHERE {_HELD}) <= :cap"
    f" AND NOT EXISTS (SELECT 1 FROM bgt_requests WHERE {_HELD} AND (lease_expires IS NULL OR lease_expires < :now))"
    " AND NOT EXISTS (SELECT 1 FROM bgt_requests WHERE device = :device AND phase = 'queued'"
    " AND decided_version IS NOT NULL AND decided_version < (SELECT cond_version FROM dev))"
    " AND NOT EXISTS (SELECT 1 FROM json_each_text(dev.conditions -> 'foreground') f WHERE f.value::float8 <= :now)), "
    f"dry AS (SELECT 1 FROM ok WHERE NOT EXISTS (SELECT 1 FROM bgt_requests WHERE device = :device AND {_QUEUED})), "
    # (the tied pick's row as locked, which a concurrent hand-off may have claimed since the window read it)
    "tied AS (SELECT q.id, q.app_id, t.clock, q.phase, q.admissible, q.not_before FROM (SELECT id, seq FROM"
    f" bgt_requests WHERE device = :device AND {_QUEUED} ORDER BY seq LIMIT :window) w JOIN bgt_requests q"
    " ON q.id = w.id JOIN bgt_app_turns t ON t.device = :device AND t.app_id = q.app_id"
    " WHERE t.clock <= (SELECT vnow FROM vt) AND EXISTS (SELECT 1 FROM ok)"
    " ORDER BY w.seq LIMIT 1 FOR UPDATE OF q SKIP LOCKED), "
    "heads AS (SELECT r.id, t.app_id, t.clock FROM "
    + _TURNS.format(greatest="greatest", fence="OFFSET 0")
    + f" CROSS JOIN LATERAL ({_NEXT.format(cols='id, seq')} LIMIT 1 FOR UPDATE SKIP LOCKED) r"
    " WHERE NOT EXISTS (SELECT 1 FROM tied) AND EXISTS (SELECT 1 FROM ok)), "
    f"pick AS (SELECT id, app_id, clock FROM tied q WHERE {_QUEUED.replace('phase', 'q.phase')}"
    " UNION ALL SELECT * FROM heads)")
# A step of Store._batch: on PostgreSQL, what came before it commits there and what follows is a
# new transaction (which reads what the commit made visible: a pass's recheck).
_COMMIT_SO_FAR = sa.text("COMMIT")
_WAKE = sa.text(  # an add's last read: the device's row, and its workers woken (Wakeups, at the commit)
    # if a slot is free or the conditions changed since the add's verdict (then they come too)
    "SELECT name, CASE WHEN cond_version <> :version THEN conditions END AS conditions, cond_version, "
    f"CASE WHEN (SELECT count(*) FROM bgt_requests WHERE {_HELD}) < :cap "
    "OR cond_version <> :version THEN pg_notify('bgtransfer', :device) END AS woke FROM bgt_devices "
    "WHERE name = :device")
_ARRIVALS_SHARED = "SELECT next_seq FROM bgt_queues WHERE device = :device FOR SHARE"  # waits for adds under way
_ARRIVED = sa.text(  # after a pass (or hand-off) that left a slot free: wake the workers if an add came since its read
    f"WITH q AS ({_ARRIVALS_SHARED}) SELECT pg_notify('bgtransfer', :device) FROM q WHERE next_seq <> :arrivals")
_UNFLUSHED = sa.text(f"SELECT {_NO_FLUSH_WAIT}")  # (_ARRIVED's row lock needs no flush either)
_CLAIMED_AT_ONCE = (  # admitted and claimed at once, by the process that will run it
    "UPDATE bgt_requests SET phase = 'running', status = 'TRANSFERRING', wait_reason = NULL, "
    "lease_token = lease_token + 1, lease_owner = :claimer, lease_expires = :expires, attempts = attempts + 1, "
    "updated_at = :now WHERE id = {id} RETURNING *, (SELECT conditions FROM bgt_devices WHERE name = :device) "
    "AS conditions")
_ADMIT_RUNNING = sa.text(_CLAIMED_AT_ONCE.format(id=":id"))
_HANDOFF_CLAIM = (  # (after the attempt's end: _renewal's, guarded as _handoff says)
    "claim AS (" + _CLAIMED_AT_ONCE.format(id="(SELECT id FROM pick) AND EXISTS (SELECT 1 FROM ending)") + "), "
    "turn AS (UPDATE bgt_app_turns t SET clock = greatest(t.clock, vt.vnow) + coalesce("
    "(CAST(:steps AS json) ->> t.app_id)::float8, 1.0) FROM vt WHERE t.device = :device"
    " AND t.app_id = (SELECT app_id FROM claim)), "
    "vtime AS (INSERT INTO bgt_app_turns (device, app_id, clock) SELECT :device, '', p.clock FROM pick p, vt"
    " WHERE p.clock > vt.vnow AND EXISTS (SELECT 1 FROM claim) ON CONFLICT (device, app_id)"
    " DO UPDATE SET clock = greatest(bgt_app_turns.clock, excluded.clock)) "
    "SELECT c.*, CASE WHEN c.id IS NULL AND EXISTS (SELECT 1 FROM ending) THEN (SELECT next_seq FROM bgt_queues"
    " WHERE device = :device) END AS dry FROM (SELECT 1) one LEFT JOIN claim c ON true")
_ADMIT = sa.text(
    "UPDATE bgt_requests SET phase = 'admitted', lease_token = lease_token + 1, lease_expires = :expires, "
    "wait_reason = NULL, updated_at = :now WHERE id = :id")
_USED = sa.text(
    "INSERT INTO bgt_usage (device, app_id, hour, bytes) VALUES (:device, :app, :hour, :n) "
    "ON CONFLICT (device, app_id, hour) DO UPDATE SET bytes = bgt_usage.bytes + :n")
_DAY_USAGE = sa.text(
    "SELECT app_id, sum(bytes) AS bytes FROM bgt_usage WHERE device = :device AND hour > :hour - 24 GROUP BY app_id")
_QUOTA_WAIT = sa.text(  # shown on what an app over its quota has waiting (once: the status sticks)
    "UPDATE bgt_requests SET status = 'WAITING', wait_reason = :reason, updated_at = :now "
    "WHERE device = :device AND app_id = :app AND phase = 'queued' AND admissible "
    "AND (wait_reason IS NULL OR wait_reason <> :reason)")
_ARRIVE = sa.text(  # an add's turn on the device's queue row (rolled back with a refused add)
    "UPDATE bgt_queues SET next_seq = next_seq + 1, live = live + 1 WHERE device = :device "
    "RETURNING next_seq - 1 AS seq, live - 1 AS live")
_GONE = sa.text("UPDATE bgt_queues SET live = live - 1 WHERE device = :device")
_GET = sa.select(requests).where(
    requests.c.id == sa.bindparam("rid"), requests.c.removed.is_(False),
    sa.or_(sa.bindparam("app", type_=sa.String).is_(None), requests.c.app_id == sa.bindparam("app", type_=sa.String)))
_FIRST_TURN = sa.text(  # an app's first request on a device makes it one of the device's apps (an app
    # already one is not inserted again: that would wait for a pass that is moving its clock)
    "INSERT INTO bgt_app_turns (device, app_id, clock) SELECT :device, :app, 0 WHERE NOT EXISTS "
    "(SELECT 1 FROM bgt_app_turns WHERE device = CAST(:device AS VARCHAR) AND app_id = CAST(:app AS VARCHAR)) "
    "ON CONFLICT (device, app_id) DO NOTHING")  # (the casts: one type for each parameter in both places)
_COUNT = sa.text(
    "INSERT INTO bgt_counters (device, metric, decision, reason, value) VALUES (:device, :metric, :decision, "
    ":reason, :n) ON CONFLICT (device, metric, decision, reason) DO UPDATE SET value = bgt_counters.value + :n")


def _sqlite_engine(url: str) -> Engine:
    path = sa.engine.make_url(url).database
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": 60})

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        raw = conn.connection.driver_connection  # (SQLAlchemy's execution would cost more than BEGIN)
        if conn.get_execution_options().get("bgt_read"):
            raw.execute("BEGIN")  # a reader takes a snapshot and never waits (WAL)
        else:
            raw.execute("BEGIN IMMEDIATE")  # a writer takes the write lock at once

    return engine


class WriterTurns:
    """Writers to one SQLite file take turns through a POSIX lock on a file beside it, held from
    before ``BEGIN IMMEDIATE`` until after ``COMMIT``. SQLite's own busy handler waits by sleeping
    (up to 100 ms at a time, whether or not the lock is free meanwhile); a process blocked on
    this lock wakes as soon as it is released. The lock belongs to the process (a forked child
    opens its own) and ends with it, so a killed writer cannot leave it held. It only orders
    writers that would otherwise wait on SQLite: SQLite's own locking still keeps them apart.
    One per file and process (``writer_turns``), as POSIX locks do not tell a process's
    descriptors apart either: its descriptor stays open while the process lives."""

    def __init__(self, db_path: str) -> None:
        self.fd = os.open(db_path + ".writer", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.threads = threading.Lock()  # a POSIX lock does not tell a process's threads apart

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        with self.threads:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)


@functools.cache
def writer_turns(db_path: str, pid: int) -> WriterTurns:
    """The turns of this process (``pid``: a forked child gets its own) at the SQLite file ``db_path``."""
    return WriterTurns(db_path)


_BEGIN = "bgt_begin"  # in a PostgreSQL connection's info: its transaction has yet to say BEGIN
PING_AFTER_IDLE_SECONDS = 1.0  # shorter than a database server takes to restart


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    # The driver runs in autocommit and each transaction says BEGIN itself (Store.tx): the hot
    # paths send it in the same round trip as their first statements (Store._batch).
    engine = sa.create_engine(url, pool_size=2, max_overflow=4, isolation_level="AUTOCOMMIT")

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _begin(conn: Connection, cursor: Any, *_: Any) -> None:
        """A transaction's first statement through SQLAlchemy (the uncommon paths) begins it."""
        if conn.info.pop(_BEGIN, False):
            cursor.connection.execute("BEGIN")

    @sa.event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        """A connection idle for a while is pinged before use, so one that a server restart
        closed while it sat idle is replaced, not failed on; one back from use a moment ago is
        not (a ping is a round trip, as dear as a statement, and a busy worker checks out many
        times a second): a restart within that moment costs one failed transaction, which the
        leases recover like any other store error."""
        if time.monotonic() - record.info.get("checked_in", 0.0) > PING_AFTER_IDLE_SECONDS:
            try:
                dbapi_conn.execute("SELECT 1").fetchall()
                dbapi_conn.rollback()  # leave no transaction open behind the ping
            except Exception as exc:
                raise sa.exc.DisconnectionError(f"the database connection is gone: {exc}") from exc

    @sa.event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["checked_in"] = time.monotonic()

    return engine


class Wakeups:
    """A worker's wait between its admission passes for a device: the sweep interval, cut short
    on PostgreSQL when an add leaves a request that a free slot could start (``Store.insert``
    NOTIFYs; this LISTENs on its own connection). On SQLite an add runs that pass itself."""

    def __init__(self, url: str | None, device: str) -> None:
        self.url, self.device = url, device
        self.conn: Any = None
        self._connect()

    def _connect(self) -> bool:
        """Listen, if there is a server to listen to; whether a new connection listens now."""
        if self.url is None or self.conn is not None:
            return False
        try:
            self.conn = psycopg.connect(self.url, autocommit=True, keepalives_idle=30, keepalives_interval=10,
                                        keepalives_count=3)  # a connection dropped unseen is noticed
            self.conn.execute("LISTEN bgtransfer")
        except psycopg.Error:
            self.close()
            return False
        return True

    def wait(self, timeout: float, stopping: threading.Event) -> None:
        """Until ``timeout`` has passed, ``stopping`` is set, or an add woke this device. A new
        connection returns at once: what was added before it listened needs a pass too."""
        if self.conn is None:
            if not self._connect():
                stopping.wait(timeout)
            return
        try:
            for note in self.conn.notifies(timeout=timeout):
                if note.payload == self.device or stopping.is_set():
                    break
            for _ in self.conn.notifies(timeout=0):  # what else came meanwhile: the same pass serves it
                pass
        except psycopg.Error:  # the server went away: reconnect at the next wait, which returns at once
            self.close()
            stopping.wait(min(timeout, 1.0))

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
            self.conn = None


class _HotTx:
    """A PostgreSQL transaction on a pooled connection, without SQLAlchemy's Connection: its
    checkout and begin cost an add or an attempt's end more than their statements do, and
    ``Store._batch`` needs only the driver's connection. The SQLAlchemy statements of the
    rarer ways through a pass run on a Connection made over the same one when first needed."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.connection = engine, engine.raw_connection()
        self.info = self.connection.info
        self._sa: Connection | None = None

    def execute(self, statement: Any, parameters: Any = None) -> Any:
        if self._sa is None:
            self._sa = Connection(self.engine, connection=self.connection)
        return self._sa.execute(statement, parameters)

    def __enter__(self) -> _HotTx:
        self.info[_BEGIN] = True  # said by the transaction's first statement
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        raw = self.connection.driver_connection  # None: SQLAlchemy found the server gone, and let it go
        self.info.pop(_BEGIN, None)
        try:
            if raw is not None and exc_type is None:
                raw.commit()  # (nothing to send if the last batch committed)
            elif raw is not None and not raw.closed:
                raw.rollback()
        finally:
            if raw is not None and (raw.closed or raw.broken):  # a server gone: no one else gets it
                self.connection.invalidate()
            (self._sa or self.connection).close()


@dataclasses.dataclass
class Pass:
    """What an admission pass admitted: (request id, token) pairs to dispatch, and the row it
    claimed for its caller to run, if it was asked to."""

    picks: list[tuple[str, int]]
    claimed: dict[str, Any] | None


class Store:
    """Transactions over the schema; every method is one short transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._pid = -1
        self._seen: dict[str, tuple[dict[str, Any], int]] = {}  # a device's conditions as last read (adds)
        self._engine: Engine | None = None
        self._turns: WriterTurns | None = None
        self.migrate()

    @property
    def engine(self) -> Engine:
        if self._pid != os.getpid():  # a forked child must not share the parent's sockets
            if self._engine is not None:
                self._engine.dispose(close=False)
            self._engine, self._pid = make_engine(self.url), os.getpid()
            path = self._engine.url.database if self._engine.dialect.name == "sqlite" else None
            self._turns = writer_turns(os.path.realpath(path), self._pid) if path and path != ":memory:" else None
        return self._engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.contextmanager
    def tx(self, read: bool = False, hot: bool = False) -> Iterator[Connection]:
        """One transaction; a ``read`` one (that writes nothing) does not queue behind writers on SQLite.
        A ``hot`` one (adds, attempts) skips SQLAlchemy's Connection on PostgreSQL (``_HotTx``)."""
        engine = self.engine  # first: after a fork this also gives the child its own turns
        if hot and self.dialect == "postgresql":
            with _HotTx(engine) as conn:
                yield conn  # type: ignore[misc]
            return
        turn = self._turns.turn() if self._turns and not read else contextlib.nullcontext()
        with engine.connect().execution_options(bgt_read=read) as conn, turn, conn.begin():
            if self.dialect == "postgresql":
                conn.info[_BEGIN] = True  # said by the transaction's first statement
            try:
                yield conn
            finally:
                conn.info.pop(_BEGIN, None)

    def wakeups(self, device: str) -> Wakeups:
        """What a worker waits on between its passes for ``device``."""
        url = self.engine.url
        return Wakeups(url.set(drivername="postgresql").render_as_string(hide_password=False)
                       if self.dialect == "postgresql" else None, device)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine, self._pid = None, -1

    # ------------------------------------------------------------------ schema
    def migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION; steps are append-only, one per version."""
        with self.tx() as conn:
            if self.dialect == "postgresql":
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7319)")
            meta.create_all(conn, tables=[schema])
            current = conn.execute(sa.select(sa.func.max(schema.c.version))).scalar() or 0
            for version, step in MIGRATIONS:
                if version > current:
                    step(conn)
                    conn.execute(schema.insert().values(version=version))

    def _insert(self, table: sa.Table) -> Any:
        """An INSERT that knows ON CONFLICT (both dialects spell it alike)."""
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    # ------------------------------------------------------------------ devices
    def _lock(self, durable: bool = True) -> sa.TextClause:
        """The statement that reads a device's row and locks it until the transaction ends; one
        that is not ``durable`` (a pass's) does not wait for PostgreSQL's WAL flush when it commits."""
        if self.dialect != "postgresql":
            return _DEVICE  # BEGIN IMMEDIATE already holds the database's write lock
        return _DEVICE_FOR_UPDATE if durable else _DEVICE_PASS

    def _lock_device(self, conn: Connection, device: str, durable: bool = True,
                     then: list[Step] | None = None) -> tuple[Any, list[list[Any]]]:
        """The device row, locked (created on first use), and the rows of the steps ``then`` run
        after it in the same round trip."""
        rows, *more = self._batch(conn, [(self._lock(durable), {"device": device}), *(then or [])])
        if not rows:
            self._create_device(conn, device)
            return self._lock_device(conn, device, durable, then)
        return rows[0], more

    def _create_device(self, conn: Connection, device: str) -> None:
        """A device's rows, on first use (by whoever comes first)."""
        conn.execute(self._insert(devices).values(name=device, conditions={}, cond_version=0).on_conflict_do_nothing())
        conn.execute(self._insert(queues).values(device=device, next_seq=1, live=0).on_conflict_do_nothing())

    def conditions(self, device: str, now: float | None = None) -> policy.Conditions:
        with self.tx() as conn:
            return _conditions(self._lock_device(conn, device)[0].conditions, now or time.time())

    def set_conditions(self, device: str, changes: Mapping[str, Any]) -> policy.Conditions:
        """Change some conditions (network, power, flags) or ``foreground`` {app: until}."""
        now = time.time()
        with self.tx() as conn:
            dev, _ = self._lock_device(conn, device)
            stored = dict(dev.conditions)
            fg = dict(stored.get("foreground", {}))
            fg.update(changes.get("foreground", {}))
            stored.update({k: v for k, v in changes.items() if k != "foreground"})
            stored["foreground"] = {a: t for a, t in fg.items() if t > now}
            cond = _conditions(stored, now)  # validates before anything is written
            conn.execute(devices.update().where(devices.c.name == device).values(
                conditions=stored, cond_version=dev.cond_version + 1))
            if self.dialect == "postgresql":  # after adds under way, or before their wake-up reads (see _enqueue)
                conn.execute(sa.text(_ARRIVALS_SHARED), {"device": device})
            self._seen[device] = stored, dev.cond_version + 1  # (this process's next add decides under them)
            return cond

    # ------------------------------------------------------------------ requests
    def insert(self, row: dict[str, Any], s: Settings) -> list[tuple[str, int]]:
        """Store a new request after the counted rules (5, 6); raise and store nothing on breach.
        Returns what an admission pass run right after it admitted, to dispatch.

        The request is decided here under the device's conditions, so an admission pass only
        decides again what a change (of conditions, of a size learnt) has made stale. Adds take
        turns on the device's queue row, not on the row admission passes lock. When a slot is
        free for the request, SQLite runs a pass at once (in-process, a fraction of a
        millisecond); PostgreSQL instead wakes the device's workers (``Wakeups``), whose pass
        runs beside the caller, which would otherwise pay its round trips and a broker message
        for each request it admits."""
        for _ in range(3):
            try:
                return self._add(row, s)
            except TransferError:
                raise
            except psycopg.errors.DivisionByZero:  # a rule broke between the checked add's read and its write
                continue  # (an add of the app on another device): read again, to say which
            except Exception:  # the connection lost around the commit: the request may be stored all the same
                if self.get(row["id"]) is None:
                    raise
                log.warning("request %s is stored, but its add failed after the commit: the periodic pass admits it",
                            row["id"], exc_info=True)
                return []
        raise QuotaExceededError(f"request {row['id']} was refused: the app's requests changed under each try")

    def _add(self, row: dict[str, Any], s: Settings) -> list[tuple[str, int]]:
        now = time.time()
        if self.dialect == "postgresql" and self._add_at_once(row, s, now):
            return []
        device, app = row["device"], row["app_id"]
        cap = s.max_concurrent_per_device
        arrive = [(_ARRIVE, {"device": device}), (_DEVICE, {"device": device}), (_ADD_CHECKS, {
            "id": row["id"], "app": app, "device": device, "path": row["local_path"]})]
        with self.tx(hot=True) as conn:
            arrived, dev, [(exists, n_app, target_of, held)] = self._batch(conn, arrive)
            if not arrived or not dev:
                self._create_device(conn, device)
                arrived, dev, [(exists, n_app, target_of, held)] = self._batch(conn, arrive)
            (seq, live), dev = arrived[0], dev[0]
            if exists:
                raise TransferError(f"request {row['id']} was already added")
            if n_app >= s.max_outstanding_per_app:
                raise QuotaExceededError(
                    f"app {app!r} has {n_app} outstanding requests (at most "
                    f"{s.max_outstanding_per_app}); remove completed ones first"
                )
            if live >= s.max_queued_per_device:
                raise QuotaExceededError(
                    f"device {device!r} has {live} queued requests (at most {s.max_queued_per_device})")
            if target_of and row["direction"] == "download":
                raise TransferError(f"{row['local_path']} is already the target of request {target_of}")
            d = _verdict(row, _conditions(dev.conditions, now), s)
            if self.dialect != "postgresql":  # no other writer can come in between: pass now if it could start
                self._batch(conn, [(_INSERT, {**_new_row(row, d, dev.cond_version, now), "seq": seq}),
                                   (_FIRST_TURN, {"device": device, "app": app}), *_verdict_counts(device, {d: 1})])
                return self._pass(conn, device, s, now).picks if d.action == "admit" and held < cap else []
            self._seen[device] = dev.conditions, dev.cond_version
            self._batch(conn, [self._enqueue(row, d, dev.cond_version, s, now)], commit=True)
            return []

    def _add_at_once(self, row: dict[str, Any], s: Settings, now: float) -> bool:
        """PostgreSQL: an add in one round trip, decided under the device's conditions as this
        process last read them (if they changed since, the wake-up has a pass decide it again),
        with the counted rules checked by a guard that fails the transaction: False (nothing
        stored) then, or when the conditions were never read here, or the verdict would fail
        the request, so that the caller takes the checked way, which says which rule refused."""
        seen = self._seen.get(row["device"])
        if seen is None:
            return False
        d = _verdict(row, _conditions(seen[0], now), s)
        if d.action == "fail":  # final: only under conditions read now
            return False
        try:
            with self.tx(hot=True) as conn:
                _, [dev] = self._batch(conn, [(_ARRIVE, {"device": row["device"]}),
                                              self._enqueue(row, d, seen[1], s, now)], commit=True)
        except (psycopg.errors.DivisionByZero, psycopg.errors.IntegrityError):  # refused, or a racing twin
            return False
        if dev.conditions is not None:  # changed since this process last read them
            self._seen[row["device"]] = dev.conditions, dev.cond_version
        return True

    def _enqueue(self, row: dict[str, Any], d: policy.Decision, version: int, s: Settings, now: float) -> Step:
        """PostgreSQL: what an add does once its ``_ARRIVE`` holds the device's queue row, in one
        statement (``_ENQUEUE``): check the counted rules (a refusal fails the transaction),
        store the request with the verdict ``d`` made under conditions ``version``, make its
        app one of the device's, count the verdict, and read the device's row, waking its
        workers when the add commits if a slot is free for the request, or if the conditions
        changed since ``version`` (a pass decides it again).

        That last read runs while the add holds the queue row, which a pass that leaves a slot
        free (``_recheck``) and a change of conditions (``set_conditions``) take in share mode
        after their own writes: each either waits for the add's commit, and then sees the
        request, or took the row first, and this read sees what it wrote. So an add never
        waits for a pass, nor takes a second transaction for its wake-up."""
        return _ENQUEUE, {
            **_new_row(row, d, version, now), "app": row["app_id"], "path": row["local_path"],
            "max_app": s.max_outstanding_per_app, "max_queued": s.max_queued_per_device,
            **_counted(row["device"], d, 1), "cap": s.max_concurrent_per_device if d.action == "admit" else 0,
            "version": version}

    def get(self, request_id: str, app_id: str | None = None) -> dict[str, Any] | None:
        """A live request (of ``app_id`` when given): what ``find`` polls, so its query is built once."""
        with self.tx(read=True) as conn:
            row = conn.execute(_GET, {"rid": request_id, "app": app_id}).mappings().first()
        return dict(row) if row else None

    def list(self, app_id: str | None = None, device: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(requests).where(requests.c.removed.is_(False)).order_by(requests.c.seq)
        if app_id is not None:
            q = q.where(requests.c.app_id == app_id)
        if device is not None:
            q = q.where(requests.c.device == device)
        with self.tx(read=True) as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def _owned(self, conn: Connection, app_id: str, request_id: str) -> Mapping[str, Any]:
        """The app's live request, read (again) once its device is locked: what the caller does
        next acts on its state now, not on one a concurrent remove or outcome has changed."""
        query = sa.select(requests).where(
            requests.c.id == request_id, requests.c.app_id == app_id, requests.c.removed.is_(False))
        locked = None
        while True:
            row = conn.execute(query).mappings().first()
            if row is None:  # the same answer whether it is absent or another app's
                raise TransferError(f"no request {request_id!r} for app {app_id!r}")
            if locked == row["device"]:
                return row
            locked = row["device"]
            self._lock_device(conn, locked)

    def remove(self, app_id: str, request_id: str) -> tuple[dict[str, Any], bool]:
        """Forget a request; returns (row, still_running). A running one stops at its next tick."""
        with self.tx() as conn:
            row = dict(self._owned(conn, app_id, request_id))
            self._batch(conn, [(_GONE, {"device": row["device"]})])
            where = requests.c.id == request_id
            if row["phase"] == "running":
                conn.execute(requests.update().where(where).values(removed=True, control="cancel"))
                return row, True
            conn.execute(requests.delete().where(where))
            return row, False

    def pause(self, app_id: str, request_id: str) -> None:
        with self.tx() as conn:
            row = self._owned(conn, app_id, request_id)
            if row["phase"] == "done":
                raise TransferError(f"request {request_id} is already completed")
            if row["phase"] == "running":
                values: dict[str, Any] = {"control": "pause"}
            else:  # queued, admitted (its message becomes stale) or already paused
                values = {"phase": "paused", "status": TransferStatus.PAUSED.value,
                          "wait_reason": "paused by the app", "lease_token": row["lease_token"] + 1,
                          "lease_expires": None}
            conn.execute(requests.update().where(requests.c.id == request_id).values(
                updated_at=time.time(), **values))

    def resume(self, app_id: str, request_id: str) -> None:
        with self.tx() as conn:
            row = self._owned(conn, app_id, request_id)
            if row["phase"] == "done":
                raise TransferError(f"request {request_id} is already completed")
            values: dict[str, Any] = {"control": None}
            if row["phase"] == "paused":
                values.update(phase="queued", status=TransferStatus.WAITING.value, wait_reason=None,
                              not_before=0.0, decided_version=-1)
            conn.execute(requests.update().where(requests.c.id == request_id).values(
                updated_at=time.time(), **values))

    # ------------------------------------------------------------------ admission
    def promote(self, device: str, s: Settings, now: float | None = None) -> list[tuple[str, int]]:
        """One admission pass for a device; returns (request_id, token) to dispatch.

        It reclaims expired leases, decides the requests not yet decided under the current
        conditions (new ones, requeued ones, or all after a change), and gives the free slots
        round-robin across apps. Its cost grows with what changed and with the number of apps,
        not with the length of the queue: decisions are stored, and only the first few
        admissible requests of each app are read."""
        with self.tx(hot=True) as conn:
            return self._pass(conn, device, s, time.time() if now is None else now).picks  # type: ignore[union-attr]

    def _survey(self, device: str, s: Settings, now: float, next_up: bool) -> list[Step]:
        """What an admission pass reads once its device is locked: the slots held, the apps whose
        turn comes first and their next requests (or, ``next_up``, the first pick alone), and
        the bytes each app moved today (quotas)."""
        p = {"device": device, "now": now}
        return [(_TALLY, p), (_NEXT_UP[self.dialect], {**p, "window": _NEXT_UP_WINDOW, "apps": 1, "free": 1})
                if next_up else self._heads(device, s, now),
                *([(_DAY_USAGE, {**p, "hour": int(now // 3600)})] if s.quotas else [])]

    def _heads(self, device: str, s: Settings, now: float, more_apps: int = 0) -> Step:
        """Read the first requests of the apps whose turn comes first (``_HEADS``)."""
        cap = s.max_concurrent_per_device
        return _HEADS[self.dialect], {"device": device, "now": now, "free": cap, "apps": cap + more_apps}

    def _pass(self, conn: Connection, device: str, s: Settings, now: float, claim_as: str | None = None,
              ending: Step | None = None) -> Pass | None:
        """An admission pass in ``conn``'s transaction, which it commits: two round trips that
        hold the device's lock from the first to the commit at the end of the second: read what
        the pass needs, then admit. ``ending`` (an attempt's outcome) is written first, in the
        same transaction, if it still holds (None if not): the slot it frees is seen free by no
        one but this pass, which gives it to the next request (an add's wake-up check sees it
        held, and wakes no worker for it).

        No admission is missed: an add reads whether a slot is free before its commit (see
        ``_enqueue``), and a pass that leaves a slot free reads whether a request arrived after
        its commit (``_recheck``), waiting for adds under way: one of the two sees the other.

        A pass commits without waiting for the WAL flush (PostgreSQL): see ``_NO_FLUSH_WAIT``."""
        first = [ending] if ending else []  # after the lock: the device's row, then a request's
        next_up = claim_as is not None
        survey = self._survey(device, s, now, next_up)
        dev, *rows = self._batch(conn, [(self._lock(False), {"device": device}), *first, *survey])
        if ending and not rows[0]:
            return None
        tally, heads, *day = rows[len(first):]
        if dev:
            dev = dev[0]
        else:  # a device's first pass
            self._create_device(conn, device)
            dev, [tally, heads, *day] = self._lock_device(conn, device, False, then=survey)
        version = dev.cond_version
        if tally[0].expired or (tally[0].oldest_verdict is not None and tally[0].oldest_verdict < version) \
                or _left_foreground(dev.conditions, now):
            version = self._refresh(conn, device, s, now, dev)
            tally, heads, *day = self._batch(conn, survey)
        free = s.max_concurrent_per_device - tally[0].held
        candidates = self._candidates(conn, device, s, now, heads, day, version)
        if next_up and free > 0 and (free > 1 or not candidates and (heads or self.dialect == "sqlite")):
            # the first pick alone does not do (or, on SQLite, none was found among the tied apps)
            [heads] = self._batch(conn, [self._heads(device, s, now)])
            candidates = self._candidates(conn, device, s, now, heads, day, version)
        if free <= 0 or not candidates:
            self._batch(conn, self._recheck(device, tally[0], free), commit=True)
            return Pass([], None)
        return self._admit(conn, device, s, now, candidates, free, claim_as, tally[0])

    def _candidates(self, conn: Connection, device: str, s: Settings, now: float, heads: list[Any],
                    day: list[list[Any]], version: int) -> list[Any]:
        """The heads a pass may pick from: only those decided under the conditions now (``version``:
        an add may have stored a verdict made under older ones, which its wake-up has the next
        pass decide again), and not of the apps over their daily quota, whose requests wait,
        saying why, until their older bytes leave the window (the others' heads are read again,
        as far down the turns as the over apps could take)."""
        over = policy.over_quota(dict(day[0]) if day else {}, s) if heads else {}
        if over:
            *_, heads = self._batch(conn, [
                *((_QUOTA_WAIT, {"device": device, "app": app, "reason": reason, "now": now})
                  for app, reason in over.items()),
                self._heads(device, s, now, len(over))])
        return [h for h in heads if h.app_id not in over and h.decided_version >= version]

    def _admit(self, conn: Connection, device: str, s: Settings, now: float, heads: list[Any], free: int,
               claim_as: str | None, tally: Any) -> Pass:
        """Admit the fair share of ``free`` slots among ``heads`` and commit. With ``claim_as`` (an
        attempt's owner) the first pick is claimed for that owner at once, not dispatched."""
        share = policy.fair_share([(h.app_id, h.id) for h in heads], {h.app_id: h.clock for h in heads}, free,
                                  s.weights, heads[0].vnow or 0.0)
        token = {h.id: h.lease_token + 1 for h in heads}
        expires = now + s.dispatch_seconds
        admits = [(_ADMIT, {"id": rid, "expires": expires, "now": now}) for rid in share.picked]
        if claim_as is not None and admits:  # the first pick runs here: admitted and claimed at once
            admits[0] = (_ADMIT_RUNNING, {"id": share.picked[0], "claimer": claim_as, "expires": now + s.lease_seconds,
                                          "now": now, "device": device})
        clocks = {**share.clocks, "": share.now}
        turns = {"device": device, **{f"app{i}": app for i, app in enumerate(clocks)},
                 **{f"clock{i}": c for i, c in enumerate(clocks.values())}}
        results = self._batch(conn, [*self._together([*admits, (_turns(len(clocks)), turns)]),
                                     *self._recheck(device, tally, free - len(admits))], commit=True)
        picks = [(rid, token[rid]) for rid in share.picked]
        if claim_as is None or not picks:
            return Pass(picks, None)
        first = results[0][0]._asdict()
        return Pass(picks[1:], {**first, "conditions": _conditions(first["conditions"], now)})

    def _together(self, steps: list[Step]) -> list[Step]:
        """Data-modifying statements as one on PostgreSQL, each a WITH query (which runs once and
        to its end whether or not anything reads it), returning the first one's RETURNING rows,
        if it has any: each statement fewer saves the server its set-up and the client a result.
        On SQLite, where a statement costs no round trip and writes cannot be WITH queries, as
        they are."""
        if self.dialect != "postgresql":
            return steps
        return [(_joined(tuple(stmt for stmt, _ in steps)), {
            f"{name}_{i}": value for i, (_, params) in enumerate(steps) for name, value in params.items()})]

    def _recheck(self, device: str, tally: Any, free: int) -> list[Step]:
        """What a pass that leaves ``free`` slots free runs after its commit (PostgreSQL): an add
        that its read of the queue missed may have read the slots as held, before this commit
        freed them (see ``_enqueue``), so if the device's arrivals moved on since ``tally`` read
        them, the workers are woken for a pass that sees the add."""
        if free <= 0 or self.dialect != "postgresql":
            return []  # (SQLite: an add runs its own pass, in turn with every other writer)
        return [(_COMMIT_SO_FAR, {}), *_arrived(device, tally.arrivals)]  # (see _enqueue)

    def _refresh(self, conn: Connection, device: str, s: Settings, now: float, dev: Any) -> int:
        """What an admission pass does before it can admit, when there is something to do: note
        apps that left the foreground, reclaim expired leases, decide. ``dev`` is the device's
        row, locked. Returns the version of the conditions it decided under."""
        stored, version = dict(dev.conditions), dev.cond_version
        if _left_foreground(stored, now):  # a change of conditions too
            stored["foreground"] = {a: t for a, t in stored["foreground"].items() if t > now}
            version += 1
            conn.execute(devices.update().where(devices.c.name == device).values(
                conditions=stored, cond_version=version))
        expired = conn.execute(_EXPIRED, {"device": device, "now": now}).all()
        if expired:  # a dead worker's slots come back; removed requests it held are forgotten
            conn.execute(requests.delete().where(requests.c.id.in_([r.id for r in expired if r.removed])))
            conn.execute(requests.update().where(requests.c.id.in_([r.id for r in expired if not r.removed]))
                         .values(phase="queued", status=TransferStatus.WAITING.value, decided_version=-1,
                                 wait_reason="lease expired; resuming", lease_expires=None, control=None,
                                 updated_at=now))
            conn.execute(_COUNT, {"device": device, "metric": "reclaim", "decision": "", "reason": "",
                                  "n": len(expired)})
        self._decide(conn, device, _conditions(stored, now), version, s, now)
        return version

    def _batch(self, conn: Connection, steps: list[Step], commit: bool = False) -> list[list[Any]]:
        """Run statements in order on the driver's own connection (in ``conn``'s transaction) and
        return the rows of each, as named tuples with JSON columns decoded. The hot paths (add,
        admission, attempts) run here: SQLAlchemy's execution costs several times what SQLite
        takes to run these statements. On PostgreSQL they travel in one round trip, with the
        transaction's BEGIN if it has not begun and the COMMIT when ``commit``, as one string of
        EXECUTEs of prepared statements, their parameters as literals (``_literal``; a pipeline
        of server-bound statements, tried instead, cost the client more CPU). SQLite is in-process, where a
        round trip costs nothing (its COMMIT comes when the transaction ends)."""
        raw = conn.connection.driver_connection
        if self.dialect != "postgresql":  # (one transaction: SQLite's commits do not wait for a flush)
            return [_rows(raw.execute(_sql(stmt), _bind(params))) if stmt is not _COMMIT_SO_FAR else []
                    for stmt, params in steps]
        if not steps:
            if commit:
                raw.commit()  # (nothing to do if the transaction has not begun)
            return []
        begin = conn.info.pop(_BEGIN, False)
        known = _PREPARED.get(raw)
        if known is None:  # a new connection, or one whose last batch failed: start afresh (a failed
            # statement may have been prepared, or its plan made stale by a migration)
            names = [r[0] for r in raw.execute("SELECT name FROM pg_prepared_statements WHERE name LIKE 'bgt\\_%'")]
            if names:
                raw.execute(";".join(f"DEALLOCATE {n}" for n in names))
            known = _PREPARED[raw] = set()
        new = []
        sent: list[tuple[str, int | None]] = [("BEGIN", None)] if begin else []  # (text, step whose rows)
        for i, (stmt, params) in enumerate(steps):
            if stmt is _COMMIT_SO_FAR:
                sent += [("COMMIT", None), ("BEGIN", None)]
                continue
            name, prepare, names = _prepared(stmt)
            if name not in known and name not in new:
                sent.append((prepare, None))
                new.append(name)
            sent.append((f"EXECUTE {name}({', '.join(_literal(params[n]) for n in names)})" if names
                         else f"EXECUTE {name}", i))
        encoding = raw.info.encoding
        try:
            results = _exchange(raw.pgconn, ";".join([*(text for text, _ in sent), *(["COMMIT"] if commit else [])]),
                                encoding)
        except Exception:
            del _PREPARED[raw]  # which of its PREPAREs ran is unknown now
            raise
        known.update(new)
        loader = Transformer(raw)  # (one kept per connection would hold it: it refers to it)
        out: list[list[Any]] = [[] for _ in steps]
        for (_, step), res in zip(sent, results, strict=False):
            if step is not None and res.status == pq.ExecStatus.TUPLES_OK:
                out[step] = _pg_rows(res, loader, encoding)
        return out

    def _decide(self, conn: Connection, device: str, cond: policy.Conditions, version: int, s: Settings,
                now: float) -> None:
        """Decide the queued requests not yet decided under ``version``; store each verdict."""
        groups: dict[policy.Decision, list[str]] = {}
        for row in conn.execute(_UNDECIDED, {"device": device, "version": version}).mappings():
            groups.setdefault(_verdict(row, cond, s), []).append(row["id"])
        self._batch(conn, _verdict_counts(device, {d: len(ids) for d, ids in groups.items()}))
        for d, ids in groups.items():
            values = _verdict_values(d, version, now)
            if d.action == "admit":  # a wait for conditions that now hold is over; a retry's reason stays
                waiting_for = requests.c.status.in_(_CONDITION_WAITS)
                values["status"] = sa.case((waiting_for, TransferStatus.WAITING.value), else_=requests.c.status)
                values["wait_reason"] = sa.case((waiting_for, None), else_=requests.c.wait_reason)
            conn.execute(requests.update().where(requests.c.id.in_(ids)).values(**values))

    # ------------------------------------------------------------------ attempts (fenced)
    def claim(self, request_id: str, token: int, owner: str, s: Settings) -> dict[str, Any] | None:
        """Start an admitted request; None if this wake-up is stale or a duplicate. The row comes
        with its device's current ``conditions``, read in the same transaction."""
        now = time.time()
        with self.tx(hot=True) as conn:
            [claimed] = self._batch(conn, [(_CLAIM, {"rid": request_id, "token": token, "claimer": owner,
                                                     "expires": now + s.lease_seconds, "now": now})], commit=True)
            if not claimed:
                return None
            return {**claimed[0]._asdict(), "conditions": _conditions(claimed[0].conditions, now)}

    def day_usage(self, device: str, now: float | None = None) -> dict[str, int]:
        """Bytes each app moved on ``device`` in the last 24 hours (by the hour)."""
        hour = int((time.time() if now is None else now) // 3600)
        with self.tx(read=True) as conn:
            return {app: int(n) for app, n in conn.execute(_DAY_USAGE, {"device": device, "hour": hour})}

    def sharing(self, device: str, app_id: str, recent: float, now: float | None = None) -> tuple[int, int]:
        """How many transfers share ``device``'s bandwidth limits now, and how many of them are
        ``app_id``'s: those running (on every host, their lease alive) and those admitted in the
        last ``recent`` seconds, which start within moments: the first of several admitted
        together does not take the whole limit until its next renewal. One admitted longer ago
        waits for a worker (a cap above the workers' processes, a host down) and takes no share."""
        now = time.time() if now is None else now
        params = {"device": device, "app": app_id, "now": now, "since": now - recent}
        with self.tx(read=True) as conn:
            return tuple(conn.execute(_SHARING, params).one())  # type: ignore[return-value]

    def heartbeat(self, request_id: str, token: int, lease_seconds: float, used: int = 0,
                  owner: str | None = None, **fields: Any) -> str | None:
        """Renew the lease that ``token`` (and ``owner``, when given: see ``_HELD_BY``) hold and
        record progress (and ``used``: bytes moved since the last record, for the quotas);
        returns the app's control ('pause'/'cancel')."""
        now = time.time()
        with self.tx(hot=True) as conn:
            [rows] = self._batch(conn, [_renew(request_id, token, owner, {
                "lease_expires": now + lease_seconds, "updated_at": now, **fields})])
            if rows and used:
                self._batch(conn, [_used(rows[0].device, rows[0].app_id, now, used)])
        if not rows:
            raise LeaseLost(request_id)
        return rows[0].control

    def finish(self, request_id: str, token: int, used: int = 0, owner: str | None = None,
               **fields: Any) -> dict[str, Any]:
        """End an attempt: give the slot back and set its outcome (phase etc. in ``fields``)."""
        with self.tx(hot=True) as conn:
            [rows] = self._batch(conn, [_running(request_id, token, owner)])
            row, steps = _finish(rows, request_id, token, owner, used, fields)
            self._batch(conn, steps, commit=True)
            return row

    def _hand_off(self, request_id: str, token: int, owner: str | None, device: str, s: Settings, claimer: str,
                  ending: Mapping[str, Any], now: float) -> Pass | None:
        """PostgreSQL: end the attempt with ``ending`` and claim the next request for ``claimer``
        in one round trip, beside other hand-offs (``_HANDOFF_PICK``): the claimed row, or none if
        the queue ran dry; None with nothing written (no such pick, the lease lost, the request
        removed or paused, or its row held by another hand-off), for a pass to decide."""
        _, params = _renew(request_id, token, owner, ending)
        steps = json.dumps({app: 1.0 / w for app, w in sorted(s.weights.items())})
        with self.tx(hot=True) as conn:
            _, [row] = self._batch(conn, [(_DEVICE_SHARED, {"device": device}), (_handoff(tuple(ending)), {
                **params, "device": device, "now": now, "claimer": claimer, "expires": now + s.lease_seconds,
                "cap": s.max_concurrent_per_device, "window": _NEXT_UP_WINDOW, "apps": 1, "steps": steps})],
                commit=True)
            if row.dry is not None:  # the attempt has ended (committed): a failure here is the sweep's to make up
                conn.info[_BEGIN] = True
                try:
                    self._batch(conn, _arrived(device, row.dry), commit=True)
                except psycopg.Error:
                    log.warning("device %s: the recheck after a hand-off failed; the periodic pass admits what it"
                                " missed", device, exc_info=True)
        if row.id is None:
            return Pass([], None) if row.dry is not None else None
        claimed = row._asdict()
        del claimed["dry"]
        return Pass([], {**claimed, "conditions": _conditions(claimed["conditions"], now)})

    def finish_and_pass(self, request_id: str, token: int, device: str, s: Settings, claim_as: str | None,
                        used: int = 0, owner: str | None = None, **fields: Any) -> Pass:
        """``finish``, then the admission pass for the slot it frees on ``device`` (the request's);
        with ``claim_as`` the first request admitted is claimed for that owner, who runs it next.

        Usually the outcome is written in the pass's first transaction: unless the app removed
        or paused the request meanwhile, or bytes are to count against a quota (``used``). On
        PostgreSQL, an attempt that is done and claims the next request for ``claim_as`` hands
        its slot on without a pass when nothing needs one (``_hand_off``); one that puts its
        request back in the queue (a retry, a refreshed URL) leaves it to the pass to decide it."""
        now = time.time()
        if not used:
            ending = _ending(fields, now)
            if claim_as is not None and fields.get("phase") == "done" and self.dialect == "postgresql" \
                    and not s.quotas:
                try:
                    handed = self._hand_off(request_id, token, owner, device, s, claim_as, ending, now)
                except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                    handed = None  # (rolled back before its commit: nothing written) the pass decides
                if handed is not None:
                    return handed
            with self.tx(hot=True) as conn:
                done = self._pass(conn, device, s, now, claim_as,
                                  ending=_renew(request_id, token, owner, ending, plain=True))
            if done is not None:
                return done
        self.finish(request_id, token, used, owner, **fields)
        with self.tx(hot=True) as conn:
            return self._pass(conn, device, s, now, claim_as)  # type: ignore[return-value]


# An attempt's statements, fenced by its token (a claim) or by its token and owner (all it writes after).
_FENCE = "id = :rid AND lease_token = :token"  # a claim's: the token its admission gave
# A claimed attempt's: its token, and its owner when given (the worker's always is). A claim lost
# with a server crash leaves its token to be given out again by a later pass (_NO_FLUSH_WAIT), but
# not its owner: a worker runs one attempt at a time in each process (and thread), so the owner
# tells the first holder from the next.
_HELD_BY = f"{_FENCE} AND (lease_owner = :owner OR :owner IS NULL)"
_CLAIM = sa.text(
    "UPDATE bgt_requests SET phase = 'running', status = 'TRANSFERRING', wait_reason = NULL, lease_owner = :claimer, "
    f"lease_expires = :expires, attempts = attempts + 1, updated_at = :now WHERE {_FENCE} AND phase = 'admitted' "
    "RETURNING *, (SELECT conditions FROM bgt_devices WHERE name = bgt_requests.device) AS conditions")
_RUNNING = sa.text(f"SELECT * FROM bgt_requests WHERE {_HELD_BY} AND phase = 'running'")
_DELETE = sa.text("DELETE FROM bgt_requests WHERE id = :rid")
_SHARERS = f"{_HELD} AND (lease_expires >= :now AND phase = 'running' OR updated_at >= :since AND phase = 'admitted')"
_SHARING = sa.text(f"SELECT (SELECT count(*) FROM bgt_requests WHERE {_SHARERS}), (SELECT count(*) FROM bgt_requests "
                   f"WHERE {_SHARERS} AND app_id = :app)")
_INSERT = sa.text(f"INSERT INTO bgt_requests ({', '.join(c.name for c in requests.c)}) "
                  f"VALUES ({', '.join(':' + c.name for c in requests.c)})")
_ENQUEUE = sa.text(  # PostgreSQL: all of an add after its _ARRIVE, in one statement (Store._enqueue)
    "WITH guard AS (SELECT 1 / (CASE WHEN c.exists_ = 0 AND c.n_app < :max_app AND (SELECT live - 1 FROM bgt_queues"
    " WHERE device = :device) < :max_queued AND (c.target_of IS NULL OR :direction <> 'download') THEN 1 ELSE 0 END)"
    f" AS ok FROM ({_ADD_CHECKS.text}) c), "  # (one row, always: a refusal, or no queue row yet, fails it)
    f"request AS (INSERT INTO bgt_requests ({', '.join(c.name for c in requests.c)}) SELECT "
    + ", ".join("(SELECT next_seq - 1 FROM bgt_queues WHERE device = :device)" if c.name == "seq"  # _ARRIVE's
                else f":{c.name}" for c in requests.c)
    + f" FROM guard WHERE ok = 1), turn AS ({_FIRST_TURN.text}), counted AS ({_COUNT.text}) {_WAKE.text}")
_NEW_REQUEST = {c.name: c.default.arg if c.default is not None else None for c in requests.c}  # what an add omits
Step = tuple[sa.TextClause, Mapping[str, Any]]  # a statement and its parameters, for Store._batch


@functools.cache
def _renewal(names: tuple[str, ...], plain: bool, guard: str = "") -> sa.TextClause:
    """The fenced UPDATE of a running attempt's row that sets the columns ``names``; only if the
    app has neither removed nor paused it, when ``plain``, and if the condition ``guard`` holds."""
    return sa.text(f"UPDATE bgt_requests SET {', '.join(f'{n} = :set_{n}' for n in names)} "
                   f"WHERE {_HELD_BY} AND phase = 'running'{' AND NOT removed AND control IS NULL' if plain else ''}"
                   f"{f' AND {guard}' if guard else ''} RETURNING control, device, app_id")


@functools.cache
def _handoff(names: tuple[str, ...]) -> sa.TextClause:
    """The hand-off (_HANDOFF_PICK) of an attempt that ends setting the columns ``names``."""
    ending = _renewal(names, True, "(EXISTS (SELECT 1 FROM pick) OR EXISTS (SELECT 1 FROM dry)) AND EXISTS "
                      "(SELECT 1 FROM bgt_requests mine WHERE mine.id = :rid FOR UPDATE SKIP LOCKED)").text
    return sa.text(f"WITH {_HANDOFF_PICK}, ending AS ({ending}), {_HANDOFF_CLAIM}")


@functools.cache
def _joined(stmts: tuple[sa.TextClause, ...]) -> sa.TextClause:
    """The statement of ``Store._together``: each one's parameters :name renamed :name_i."""
    parts = [f"w{i} AS ({_BIND.sub(lambda m, i=i: f':{m.group(1)}_{i}', stmt.text)})" for i, stmt in enumerate(stmts)]
    rows = "SELECT * FROM w0" if " RETURNING " in stmts[0].text else "SELECT 1 WHERE false"
    return sa.text(f"WITH {', '.join(parts)} {rows}")


@functools.cache
def _turns(n: int) -> sa.TextClause:
    """Set the clocks of ``n`` apps on a device (:app0, :clock0, ...) in one statement."""
    rows = ", ".join(f"(:device, :app{i}, :clock{i})" for i in range(n))
    return sa.text(f"INSERT INTO bgt_app_turns (device, app_id, clock) VALUES {rows} "
                   "ON CONFLICT (device, app_id) DO UPDATE SET clock = excluded.clock")


def _new_row(row: Mapping[str, Any], d: policy.Decision, version: int, now: float) -> dict[str, Any]:
    """A new request's columns (but its seq), queued with the verdict ``d`` made under ``version``."""
    return {**_NEW_REQUEST, **row, "phase": "queued", "status": TransferStatus.WAITING.value,
            "created_at": now, "updated_at": now, **_verdict_values(d, version, now)}


def _arrived(device: str, arrivals: int) -> list[Step]:
    """A transaction of its own that wakes the device's workers if an add came since ``arrivals``
    were read (``_ARRIVED``), waiting for adds under way; its commit does not wait for the flush."""
    return [(_UNFLUSHED, {}), (_ARRIVED, {"device": device, "arrivals": arrivals})]


def _running(request_id: str, token: int, owner: str | None) -> Step:
    """Read an attempt's row if ``token`` (and ``owner``) still hold it running."""
    return _RUNNING, {"rid": request_id, "token": token, "owner": owner}


def _finish(rows: list[Any], request_id: str, token: int, owner: str | None, used: int,
            fields: dict[str, Any]) -> tuple[dict[str, Any], list[Step]]:
    """From the attempt's row as ``_running`` read it (none: the lease is lost), the row as the
    attempt ends it, and the steps that end it: the bytes used counted, the row deleted (the app
    removed it) or given ``fields`` and its slot back."""
    if not rows:
        raise LeaseLost(request_id)
    now = time.time()
    row = rows[0]._asdict()
    steps = [_used(row["device"], row["app_id"], now, used)] if used else []
    if row["removed"]:
        return {**row, "phase": "removed"}, [*steps, (_DELETE, {"rid": request_id})]
    values = _ending(fields, now)
    if row["control"] == "pause" and fields.get("phase") != "done":
        values.update(phase="paused", status=TransferStatus.PAUSED.value,
                      wait_reason="paused by the app", control=None)
    steps.append(_renew(request_id, token, owner, values))
    return {**row, **values}, steps


def _ending(fields: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The columns that end an attempt with ``fields`` (its outcome) and give its slot back."""
    values = {"lease_expires": None, "lease_owner": None, "updated_at": now, **fields}
    if fields.get("phase") == "queued":
        values["decided_version"] = -1  # what this attempt learnt (a size) may change the verdict
    return values


def _renew(request_id: str, token: int, owner: str | None, values: Mapping[str, Any], plain: bool = False) -> Step:
    """Set ``values`` on a running attempt's row if ``token`` (and ``owner``) still hold it (and,
    when ``plain``, the app has neither removed nor paused it), returning its control, device and
    app; no row if not."""
    params = {f"set_{k}": v for k, v in values.items()}
    return _renewal(tuple(values), plain), {"rid": request_id, "token": token, "owner": owner, **params}


def _used(device: str, app_id: str, now: float, n: int) -> Step:
    """Count ``n`` bytes moved by ``app_id`` in this hour, for its daily quota."""
    return _USED, {"device": device, "app": app_id, "hour": int(now // 3600), "n": n}


def _counted(device: str, d: policy.Decision, n: int) -> dict[str, Any]:
    """``_COUNT``'s parameters for ``n`` verdicts ``d``, for the metrics."""
    return {"device": device, "metric": "decision", "decision": d.action, "reason": d.reason, "n": n}


def _verdict_counts(device: str, counts: Mapping[policy.Decision, int]) -> list[Step]:
    """Count admission verdicts, for the metrics."""
    return [(_COUNT, _counted(device, d, n)) for d, n in counts.items()]


def _left_foreground(stored: Mapping[str, Any], now: float) -> bool:
    """Whether an app's time in the foreground has ended since these conditions were stored."""
    return any(t <= now for t in stored.get("foreground", {}).values())


_PREPARED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()  # per connection: names
_BIND = re.compile(r"(?<![:\w\\]):(\w+)(?![:\w])")  # a text statement's :name parameters


@functools.cache
def _prepared(stmt: sa.TextClause) -> tuple[str, str, tuple[str, ...]]:
    """A statement as a PostgreSQL prepared statement: its name, the PREPARE that makes it, and
    its parameters' names in their order ($1, $2, ...). The server plans it once per connection."""
    names = tuple(dict.fromkeys(_BIND.findall(stmt.text)))
    body = _BIND.sub(lambda m: f"${names.index(m.group(1)) + 1}", stmt.text)
    name = f"bgt_{hashlib.sha1(stmt.text.encode()).hexdigest()[:16]}"
    return name, f"PREPARE {name} AS {body}", names


_SQLITE = sqlite.dialect(paramstyle="named")
_JSON = frozenset(c.name for t in (requests, devices) for c in t.c if isinstance(c.type, sa.JSON))


@functools.cache
def _sql(stmt: sa.TextClause) -> str:
    """A text statement in sqlite3's parameter style (PostgreSQL's are prepared: ``_prepared``)."""
    return str(stmt.compile(dialect=_SQLITE))


def _bind(params: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters for the driver: dicts and lists go to JSON columns, as JSON text."""
    return {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in params.items()}


def _literal(value: Any) -> str:
    """A parameter as a PostgreSQL literal, for an EXECUTE (``Store._batch``): a fraction of the
    driver's cost to bind it. Strings are escape strings (E'...', their quotes and backslashes
    doubled), which read the same whatever the server's standard_conforming_strings; a NUL,
    which no PostgreSQL string can hold, is refused."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else f"'{value!r}'"  # ('inf', 'nan': PostgreSQL reads them)
    if isinstance(value, dict | list):
        value = json.dumps(value)
    if not isinstance(value, str):
        raise TypeError(f"cannot send a {type(value).__name__} as a statement parameter")
    if "\0" in value:
        raise TransferError("a text value holds a NUL character, which the store cannot keep")
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _exchange(pgconn: pq.abc.PGconn, query: str, encoding: str) -> list[pq.abc.PGresult]:
    """Send ``query`` (statements joined by ;) and take its results, one per statement, at the
    libpq level, without a psycopg cursor, which builds itself and a row maker for each result.
    The waits are in ``poll``, which lets other threads run.
    A failed statement (those after it do not run) raises psycopg's error for its SQLSTATE."""
    pgconn.send_query(query.encode(encoding))
    poller = select.poll()
    poller.register(pgconn.socket, select.POLLIN)
    while pgconn.flush():  # (a nonblocking connection: what the socket did not take waits for it)
        poller.modify(pgconn.socket, select.POLLIN | select.POLLOUT)
        poller.poll()
        pgconn.consume_input()
    poller.modify(pgconn.socket, select.POLLIN)
    results = []
    while True:
        while pgconn.is_busy():
            poller.poll()
            pgconn.consume_input()
        res = pgconn.get_result()
        if res is None:
            break
        results.append(res)
    for res in results:
        if res.status in (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.BAD_RESPONSE):
            state = (res.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
            raise _error_class(state)(res.error_message.decode(encoding, errors="replace").strip())
    return results


def _error_class(state: str) -> type[psycopg.Error]:
    """psycopg's exception for an SQLSTATE (none: the connection failed), else for its class."""
    if not state:
        return psycopg.OperationalError
    for code in (state, state[:2] + "000"):
        with contextlib.suppress(KeyError):
            return psycopg.errors.lookup(code)
    return psycopg.DatabaseError


def _pg_rows(res: pq.abc.PGresult, loader: Transformer, encoding: str) -> list[Any]:
    """A result's rows as named tuples, each value in its Python type (JSON decoded) by the
    connection's psycopg ``loader``, in C, without a cursor (``_exchange``); a named tuple class is
    kept per set of columns (a statement's depend on the database: ``*``)."""
    loader.set_pgresult(res)
    return loader.load_rows(0, res.ntuples, _pg_row_maker(tuple(res.fname(i) for i in range(res.nfields)), encoding))


@functools.cache
def _pg_row_maker(names: tuple[bytes, ...], encoding: str) -> Callable[[Any], Any]:
    return _row_class(tuple(n.decode(encoding) for n in names))._make


def _rows(cur: Any) -> list[Any]:
    """A sqlite3 cursor's rows as named tuples, JSON columns decoded (PostgreSQL's: ``_pg_rows``)."""
    if cur.description is None:
        return []
    make = _row_type(tuple(d[0] for d in cur.description))
    return [make(r) for r in cur.fetchall()]


@functools.cache
def _row_class(names: tuple[str, ...]) -> Any:
    """The named tuple of a result's columns (a name that is no identifier becomes _0, _1, ...)."""
    return collections.namedtuple("Row", names, rename=True)  # type: ignore[misc]


@functools.cache
def _row_type(names: tuple[str, ...]) -> Callable[[tuple[Any, ...]], Any]:
    cls = _row_class(names)
    decode = [i for i, n in enumerate(names) if n in _JSON]
    if not decode:
        return cls._make

    def make(values: tuple[Any, ...]) -> Any:
        out = list(values)
        for i in decode:
            if isinstance(out[i], str):
                out[i] = json.loads(out[i])
        return cls._make(out)

    return make


def _verdict(row: Mapping[str, Any], cond: policy.Conditions, s: Settings) -> policy.Decision:
    """The policy's decision for a stored (or about to be stored) request."""
    received = row.get("bytes_received") or 0
    # a stream without Content-Length that outgrew a cap has a size of at least what arrived
    size = (row.get("total_bytes_to_send") if row["direction"] == "upload"
            else (max(row.get("total_bytes_to_receive") or 0, received) or None))
    candidate = policy.Candidate(row["app_id"], row["direction"], TransferPreferences(row["preferences"]), size)
    return policy.decide(candidate, cond, s)


def _verdict_values(d: policy.Decision, version: int, now: float) -> dict[str, Any]:
    """The columns that record a decision made under conditions ``version``."""
    values: dict[str, Any] = {"decided_version": version, "admissible": d.action == "admit"}
    if d.action != "admit":  # an admissible request keeps showing why it last stopped
        values.update(status=d.status.value, wait_reason=d.reason, updated_at=now)
    if d.action == "fail":
        values.update(phase="done", error=d.detail or d.reason, completed_at=now, wait_reason=None)
    if d.preferences is not None:
        values["preferences"] = d.preferences.value
    return values


def _conditions(stored: Mapping[str, Any], now: float) -> policy.Conditions:
    fg = stored.get("foreground", {})
    known = {k: v for k, v in stored.items() if k != "foreground"}
    return policy.Conditions(**known, foreground=policy.foreground_apps(fg.items(), now))


def _create_v1(conn: Connection) -> None:
    meta.create_all(conn, tables=[requests, devices, app_turns, counters])


def _admission_indexes_v2(conn: Connection) -> None:
    """Partial indexes for the admission pass; fair-share clocks; every app with requests gets its
    row; usage by the hour for the quotas."""
    meta.create_all(conn, tables=[usage])
    have = {c["name"] for c in sa.inspect(conn).get_columns("bgt_requests")}
    for column in ("refresh_task TEXT", "url_expires FLOAT", "upload_url TEXT"):  # URL refresh, tus
        if column.split()[0] not in have:
            conn.exec_driver_sql(f"ALTER TABLE bgt_requests ADD COLUMN {column}")
    conn.exec_driver_sql("DROP INDEX IF EXISTS bgt_requests_admissible")
    for index in requests.indexes:
        index.create(conn, checkfirst=True)
    if "last_admit_at" in {c["name"] for c in sa.inspect(conn).get_columns("bgt_app_turns")}:
        # version 1 kept when each app was last served; fair share keeps a virtual clock, from 0
        conn.exec_driver_sql("ALTER TABLE bgt_app_turns RENAME COLUMN last_admit_at TO clock")
        conn.exec_driver_sql("UPDATE bgt_app_turns SET clock = 0")
    conn.exec_driver_sql(
        "INSERT INTO bgt_app_turns (device, app_id, clock) SELECT DISTINCT device, app_id, 0 "
        "FROM bgt_requests WHERE true ON CONFLICT (device, app_id) DO NOTHING")
    if conn.dialect.name == "postgresql":  # fresh statistics soon after a burst of adds keep the plans right
        conn.exec_driver_sql("ALTER TABLE bgt_requests SET (autovacuum_analyze_scale_factor = 0.02, "
                             "autovacuum_analyze_threshold = 100)")


def _live_count_v3(conn: Connection) -> None:
    """Each device counts its live requests, so an add need not count them (rule 6)."""
    if "live" not in {c["name"] for c in sa.inspect(conn).get_columns("bgt_devices")}:
        conn.exec_driver_sql("ALTER TABLE bgt_devices ADD COLUMN live BIGINT NOT NULL DEFAULT 0")
    conn.exec_driver_sql("UPDATE bgt_devices SET live = (SELECT count(*) FROM bgt_requests "
                         "WHERE device = bgt_devices.name AND NOT removed)")


def _queues_v4(conn: Connection) -> None:
    """A device's arrival order and live count move to a row of their own (``queues``), so that
    adds do not take the device's row, which admission passes lock."""
    meta.create_all(conn, tables=[queues])
    conn.exec_driver_sql(
        "INSERT INTO bgt_queues (device, next_seq, live) SELECT name, (SELECT coalesce(max(seq), 0) + 1 "
        "FROM bgt_requests WHERE device = bgt_devices.name), (SELECT count(*) FROM bgt_requests "
        "WHERE device = bgt_devices.name AND NOT removed) FROM bgt_devices WHERE true ON CONFLICT (device) DO NOTHING")
    have = {c["name"] for c in sa.inspect(conn).get_columns("bgt_devices")}
    for column in ("next_seq", "live"):
        if column in have:
            conn.exec_driver_sql(f"ALTER TABLE bgt_devices DROP COLUMN {column}")


MIGRATIONS = ((1, _create_v1), (2, _admission_indexes_v2), (3, _live_count_v3), (4, _queues_v4))


def to_request(row: Mapping[str, Any]) -> BackgroundTransferRequest:
    """The public view of a stored row."""
    down = row["local_path"] if row["direction"] == "download" else None
    up = row["local_path"] if row["direction"] == "upload" else None
    req = BackgroundTransferRequest(
        row["url"], row["method"], download_location=down, upload_location=up,
        headers=row["headers"], transfer_preferences=TransferPreferences(row["preferences"]),
        tag=row["tag"], expected_sha256=row["expected_sha256"], form_fields=row["form_fields"],
        refresh_task=row["refresh_task"], url_expires_at=row["url_expires"],
    )
    req.request_id, req.app_id = row["id"], row["app_id"]
    req.transfer_status = TransferStatus(row["status"])
    req.bytes_received, req.total_bytes_to_receive = row["bytes_received"], row["total_bytes_to_receive"]
    req.bytes_sent, req.total_bytes_to_send = row["bytes_sent"], row["total_bytes_to_send"]
    req.status_code, req.transfer_error, req.wait_reason = row["status_code"], row["error"], row["wait_reason"]
    return req
