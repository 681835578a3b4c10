"""The state store: the record of every request, its bytes, its validator and its slot.

Broker messages are only wake-ups; this is what survives a SIGKILL. One SQLAlchemy Core
schema runs on a SQLite file (the embedded default: WAL, ``BEGIN IMMEDIATE`` so writers queue
instead of failing) and on PostgreSQL (the device row ``SELECT ... FOR UPDATE`` serialises
admission per device across hosts).

A slot is a lease on a request row: ``phase`` in (admitted, running) with ``lease_expires``
in the future. ``lease_token`` is a fencing token: it grows at every admission and every
write by an attempt carries it, so a stale attempt can never write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import sqlalchemy as sa
from psycopg.rows import namedtuple_row
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from . import _policy as policy
from ._exceptions import LeaseLost, QuotaExceededError, TransferError
from ._models import BackgroundTransferRequest, TransferPreferences, TransferStatus
from ._settings import Settings

SCHEMA_VERSION = 2
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
devices = sa.Table(
    "bgt_devices", meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("next_seq", sa.BigInteger, nullable=False, default=1),
    sa.Column("conditions", sa.JSON, nullable=False),
    sa.Column("cond_version", sa.Integer, nullable=False, default=0),  # bumped at every change
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
_DEVICE_SQL = "SELECT name, next_seq, conditions, cond_version FROM bgt_devices WHERE name = :device"
_DEVICE = sa.text(_DEVICE_SQL).columns(conditions=sa.JSON)
_DEVICE_FOR_UPDATE = sa.text(_DEVICE_SQL + " FOR UPDATE").columns(conditions=sa.JSON)
# PostgreSQL: the pass's commit need not wait for its WAL flush. What a crash could lose of it
# (verdicts, admissions, reclaims) is recomputed by the next pass, and a lost admission's token
# is fenced out; so the pass turns that wait off for its own transaction, in its first statement.
_DEVICE_PASS = sa.text(
    "SELECT set_config('synchronous_commit', 'off', true), " + _DEVICE_SQL[len("SELECT "):] + " FOR UPDATE"
).columns(conditions=sa.JSON)
_HELD = "device = :device AND phase IN ('admitted', 'running')"
_TALLY = sa.text(  # read after the device lock, so no other pass can change them meanwhile
    f"SELECT (SELECT count(*) FROM bgt_requests WHERE {_HELD}) AS held,"
    f" (SELECT count(*) FROM bgt_requests WHERE {_HELD} AND (lease_expires IS NULL OR lease_expires < :now))"
    " AS expired, (SELECT min(decided_version) FROM bgt_requests WHERE device = :device AND phase = 'queued'"
    " AND decided_version IS NOT NULL)"
    " AS oldest_verdict")  # one step down the undecided index: older than the conditions means stale
_EXPIRED = sa.text(
    f"SELECT id, removed FROM bgt_requests WHERE {_HELD} AND (lease_expires IS NULL OR lease_expires < :now)")
_ADD_CHECKS = sa.text(  # rules 5-6 and the duplicates an add must refuse, in one read
    "SELECT (SELECT count(*) FROM bgt_requests WHERE id = :id),"
    " (SELECT count(*) FROM bgt_requests WHERE app_id = :app AND NOT removed),"
    " (SELECT count(*) FROM bgt_requests WHERE device = :device AND NOT removed),"
    " (SELECT min(id) FROM bgt_requests WHERE app_id = :app AND NOT removed AND direction = 'download'"
    " AND local_path = :path),"
    f" (SELECT count(*) FROM bgt_requests WHERE {_HELD}),"  # whether a pass could admit anything
    " (SELECT count(*) FROM bgt_app_turns WHERE device = :device AND app_id = :app)")
_UNDECIDED = sa.text(  # versions only grow, so "older than now" is an index range
    "SELECT id, app_id, direction, preferences, total_bytes_to_receive, total_bytes_to_send, bytes_received "
    "FROM bgt_requests WHERE device = :device AND phase = 'queued' AND decided_version < :version")
# The first `free` admissible requests of each app with the app's last turn, in arrival order:
# each app's range of the heads index is walked for `free` rows, whatever the queue's length.
# PostgreSQL says so with LATERAL; SQLite has none, and runs a correlated IN list per app the
# same way (PostgreSQL would instead test that list against every queued row).
_QUEUED = "phase = 'queued' AND admissible AND not_before <= :now"
_NOW = "(SELECT clock FROM bgt_app_turns WHERE device = :device AND app_id = '') AS vnow"
_HEADS = {
    "postgresql": sa.text(
        f"SELECT r.id, t.app_id, r.lease_token, t.clock, {_NOW} FROM bgt_app_turns t CROSS JOIN LATERAL ("
        f" SELECT id, lease_token, seq FROM bgt_requests WHERE device = t.device AND app_id = t.app_id AND {_QUEUED}"
        " ORDER BY seq LIMIT :free) r WHERE t.device = :device ORDER BY r.seq"),
    "sqlite": sa.text(
        f"SELECT r.id, t.app_id, r.lease_token, t.clock, {_NOW} FROM bgt_app_turns t JOIN bgt_requests r ON r.id IN ("
        f" SELECT id FROM bgt_requests WHERE device = t.device AND app_id = t.app_id AND {_QUEUED}"
        " ORDER BY seq LIMIT :free) WHERE t.device = :device ORDER BY r.seq"),
}
_ADMIT_RUNNING = sa.text(  # admitted and claimed at once, by the process that will run it
    "UPDATE bgt_requests SET phase = 'running', status = 'TRANSFERRING', wait_reason = NULL, "
    "lease_token = lease_token + 1, lease_owner = :owner, lease_expires = :expires, attempts = attempts + 1, "
    "updated_at = :now WHERE id = :id RETURNING *").columns(headers=sa.JSON, form_fields=sa.JSON)
_ADMIT = sa.text(
    "UPDATE bgt_requests SET phase = 'admitted', lease_token = lease_token + 1, lease_expires = :expires, "
    "wait_reason = NULL, updated_at = :now WHERE id = :id")
_TURN = sa.text(
    "INSERT INTO bgt_app_turns (device, app_id, clock) VALUES (:device, :app, :clock) "
    "ON CONFLICT (device, app_id) DO UPDATE SET clock = excluded.clock")
_USED = sa.text(
    "INSERT INTO bgt_usage (device, app_id, hour, bytes) VALUES (:device, :app, :hour, :n) "
    "ON CONFLICT (device, app_id, hour) DO UPDATE SET bytes = bgt_usage.bytes + :n")
_DAY_USAGE = sa.text(
    "SELECT app_id, sum(bytes) FROM bgt_usage WHERE device = :device AND hour > :hour - 24 GROUP BY app_id")
_QUOTA_WAIT = sa.text(  # shown on what an app over its quota has waiting (once: the status sticks)
    "UPDATE bgt_requests SET status = 'WAITING', wait_reason = :reason, updated_at = :now "
    "WHERE device = :device AND app_id = :app AND phase = 'queued' AND admissible "
    "AND (wait_reason IS NULL OR wait_reason <> :reason)")
_NEXT_SEQ = sa.text("UPDATE bgt_devices SET next_seq = :seq WHERE name = :device")
_GET = sa.select(requests).where(
    requests.c.id == sa.bindparam("rid"), requests.c.removed.is_(False),
    sa.or_(sa.bindparam("app", type_=sa.String).is_(None), requests.c.app_id == sa.bindparam("app", type_=sa.String)))
_FIRST_TURN = sa.text(  # an app's first request on a device makes it one of the device's apps
    "INSERT INTO bgt_app_turns (device, app_id, clock) VALUES (:device, :app, 0) "
    "ON CONFLICT (device, app_id) DO NOTHING")
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
        if conn.get_execution_options().get("bgt_read"):
            conn.exec_driver_sql("BEGIN")  # a reader takes a snapshot and never waits (WAL)
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # a writer takes the write lock at once

    return engine


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return sa.create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=4)


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
        self._engine: Engine | None = None
        self.migrate()

    @property
    def engine(self) -> Engine:
        if self._pid != os.getpid():  # a forked child must not share the parent's sockets
            if self._engine is not None:
                self._engine.dispose(close=False)
            self._engine, self._pid = make_engine(self.url), os.getpid()
        return self._engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.contextmanager
    def tx(self, read: bool = False) -> Iterator[Connection]:
        """One transaction; a ``read`` one (that writes nothing) does not queue behind writers on SQLite."""
        with self.engine.connect().execution_options(bgt_read=read) as conn, conn.begin():
            yield conn

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

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
    def _lock_device(self, conn: Connection, device: str, durable: bool = True) -> Mapping[str, Any]:
        """The device row, locked until the transaction ends (created on first use). A transaction
        that is not ``durable`` does not wait for PostgreSQL's WAL flush when it commits."""
        q = _DEVICE_FOR_UPDATE if durable else _DEVICE_PASS
        if self.dialect != "postgresql":
            q = _DEVICE  # BEGIN IMMEDIATE already holds the database's write lock
        row = conn.execute(q, {"device": device}).mappings().first()
        if row is None:
            conn.execute(self._insert(devices).values(
                name=device, next_seq=1, conditions={}, cond_version=0).on_conflict_do_nothing())
            row = conn.execute(q, {"device": device}).mappings().one()
        return row

    def conditions(self, device: str, now: float | None = None) -> policy.Conditions:
        with self.tx() as conn:
            return _conditions(self._lock_device(conn, device)["conditions"], now or time.time())

    def set_conditions(self, device: str, changes: Mapping[str, Any]) -> policy.Conditions:
        """Change some conditions (network, power, flags) or ``foreground`` {app: until}."""
        now = time.time()
        with self.tx() as conn:
            dev = self._lock_device(conn, device)
            stored = dict(dev["conditions"])
            fg = dict(stored.get("foreground", {}))
            fg.update(changes.get("foreground", {}))
            stored.update({k: v for k, v in changes.items() if k != "foreground"})
            stored["foreground"] = {a: t for a, t in fg.items() if t > now}
            cond = _conditions(stored, now)  # validates before anything is written
            conn.execute(devices.update().where(devices.c.name == device).values(
                conditions=stored, cond_version=dev["cond_version"] + 1))
            return cond

    # ------------------------------------------------------------------ requests
    def insert(self, row: dict[str, Any], s: Settings) -> list[tuple[str, int]]:
        """Store a new request after the counted rules (5, 6); raise and store nothing on breach.
        Returns what the admission pass run in the same transaction admitted, to dispatch.

        The request is decided here under the device's conditions, so an admission pass only
        decides again what a change (of conditions, of a size learnt) has made stale."""
        now = time.time()
        with self.tx() as conn:
            dev = self._lock_device(conn, row["device"])
            exists, n_app, n_dev, target_of, held, known_app = conn.execute(_ADD_CHECKS, {
                "id": row["id"], "app": row["app_id"], "device": row["device"], "path": row["local_path"]}).one()
            if exists:
                raise TransferError(f"request {row['id']} was already added")
            if n_app >= s.max_outstanding_per_app:
                raise QuotaExceededError(
                    f"app {row['app_id']!r} has {n_app} outstanding requests (at most "
                    f"{s.max_outstanding_per_app}); remove completed ones first"
                )
            if n_dev >= s.max_queued_per_device:
                raise QuotaExceededError(
                    f"device {row['device']!r} has {n_dev} queued requests (at most {s.max_queued_per_device})"
                )
            if target_of and row["direction"] == "download":
                raise TransferError(f"{row['local_path']} is already the target of request {target_of}")
            d = _verdict(row, _conditions(dev["conditions"], now), s)
            conn.execute(_NEXT_SEQ, {"device": row["device"], "seq": dev["next_seq"] + 1})
            conn.execute(requests.insert(), {
                **row, "seq": dev["next_seq"], "phase": "queued", "status": TransferStatus.WAITING.value,
                "created_at": now, "updated_at": now, **_verdict_values(d, dev["cond_version"], now),
            })
            if not known_app:
                conn.execute(_FIRST_TURN, {"device": row["device"], "app": row["app_id"]})
            self._count_verdicts(conn, row["device"], {d: 1})
            if d.action != "admit" or held >= s.max_concurrent_per_device:
                return []  # nothing a pass could start: the periodic pass reclaims what is stale
            return self._pass(conn, row["device"], s, now, _DEVICE).picks  # the device row is locked already

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
        row = conn.execute(
            sa.select(requests).where(
                requests.c.id == request_id, requests.c.app_id == app_id, requests.c.removed.is_(False)
            )
        ).mappings().first()
        if row is None:  # the same answer whether it is absent or another app's
            raise TransferError(f"no request {request_id!r} for app {app_id!r}")
        return row

    def remove(self, app_id: str, request_id: str) -> tuple[dict[str, Any], bool]:
        """Forget a request; returns (row, still_running). A running one stops at its next tick."""
        with self.tx() as conn:
            row = dict(self._owned(conn, app_id, request_id))
            self._lock_device(conn, row["device"])
            where = requests.c.id == request_id
            if row["phase"] == "running":
                conn.execute(requests.update().where(where).values(removed=True, control="cancel"))
                return row, True
            conn.execute(requests.delete().where(where))
            return row, False

    def pause(self, app_id: str, request_id: str) -> None:
        with self.tx() as conn:
            row = self._owned(conn, app_id, request_id)
            self._lock_device(conn, row["device"])
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
            self._lock_device(conn, row["device"])
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
        """One atomic admission pass for a device; returns (request_id, token) to dispatch.

        It reclaims expired leases, decides the requests not yet decided under the current
        conditions (new ones, requeued ones, or all after a change), and gives the free slots
        round-robin across apps. Its cost grows with what changed and with the number of apps,
        not with the length of the queue: decisions are stored, and only the first few
        admissible requests of each app are read. When nothing needs deciding or reclaiming
        (the usual case), it is two round trips to the store: lock and read, then admit and commit.
        """
        now = time.time() if now is None else now
        with self.tx() as conn:
            return self._pass(conn, device, s, now, _DEVICE_PASS if self.dialect == "postgresql" else _DEVICE).picks

    def _pass(self, conn: Connection, device: str, s: Settings, now: float, lock: sa.TextClause,
              claim_as: str | None = None) -> Pass:
        """The admission pass inside ``conn``'s transaction, which it commits; ``lock`` reads the
        device row (and locks it, unless the transaction already holds it). With ``claim_as``
        (an attempt's owner) its first pick is claimed for that owner at once, not dispatched."""
        p = {"device": device, "now": now, "free": s.max_concurrent_per_device, "hour": int(now // 3600)}
        read = [(_TALLY, p), (_HEADS[self.dialect], p)]
        dev, tally, heads, *day = self._batch(conn, [(lock, p), *read, *([(_DAY_USAGE, p)] if s.quotas else [])])
        held, n_expired, oldest_verdict = tally[0]
        stale = oldest_verdict is not None and (not dev or oldest_verdict < dev[0].cond_version)
        stored = dev[0].conditions if dev else {}
        if not dev or n_expired or stale or _left_foreground(stored, now):
            stored = self._refresh(conn, device, s, now)
            tally, heads = self._batch(conn, read)
            held = tally[0][0]
        free = s.max_concurrent_per_device - held
        if free <= 0 or not heads:
            return Pass([], None)
        over = policy.over_quota(dict(day[0]) if day else {}, s)
        if over:  # such an app's requests wait, saying why, until its older bytes leave the window
            self._batch(conn, [(_QUOTA_WAIT, {"device": device, "app": app, "reason": reason, "now": now})
                               for app, reason in over.items()])
            heads = [h for h in heads if h.app_id not in over]
            if not heads:
                return Pass([], None)
        share = policy.fair_share([(h.app_id, h.id) for h in heads], {h.app_id: h.clock for h in heads}, free,
                                  s.weights, heads[0].vnow or 0.0)
        token = {h.id: h.lease_token + 1 for h in heads}
        clocks = {**share.clocks, "": share.now}
        expires = now + s.dispatch_seconds
        admits = [(_ADMIT, {"id": rid, "expires": expires, "now": now}) for rid in share.picked]
        if claim_as is not None and admits:  # the first pick runs here: admitted and claimed at once
            admits[0] = (_ADMIT_RUNNING, {"id": share.picked[0], "owner": claim_as, "expires": now + s.lease_seconds,
                                          "now": now})
        results = self._batch(conn, admits + [(_TURN, {"device": device, "app": app, "clock": c})
                                              for app, c in clocks.items()], commit=True)
        picks = [(rid, token[rid]) for rid in share.picked]
        if claim_as is None or not picks:
            return Pass(picks, None)
        return Pass(picks[1:], {**results[0][0]._asdict(), "conditions": _conditions(stored, now)})

    def _refresh(self, conn: Connection, device: str, s: Settings, now: float) -> dict[str, Any]:
        """What an admission pass does before it can admit, when there is something to do:
        create the device, note apps that left the foreground, reclaim expired leases, decide.
        Returns the device's conditions as stored."""
        dev = self._lock_device(conn, device, durable=False)
        stored, version = dict(dev["conditions"]), dev["cond_version"]
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
        return stored

    def _batch(self, conn: Connection, steps: list[tuple[sa.TextClause, Mapping[str, Any]]],
               commit: bool = False) -> list[list[Any]]:
        """Run statements in order and return the rows of each. On PostgreSQL they travel in one
        round trip (a psycopg pipeline), with the COMMIT when ``commit``; SQLite is in-process,
        where a round trip costs nothing."""
        if self.dialect != "postgresql":
            results = [conn.execute(stmt, params) for stmt, params in steps]
            return [r.all() if r.returns_rows else [] for r in results]

        raw = conn.connection.driver_connection
        with raw.pipeline():
            cursors = [raw.cursor(row_factory=namedtuple_row) for _ in steps]
            for cur, (stmt, params) in zip(cursors, steps, strict=True):
                cur.execute(_pg_sql(stmt), params)
            if commit:
                raw.commit()
        return [cur.fetchall() if cur.description is not None else [] for cur in cursors]

    def _decide(self, conn: Connection, device: str, cond: policy.Conditions, version: int, s: Settings,
                now: float) -> None:
        """Decide the queued requests not yet decided under ``version``; store each verdict."""
        groups: dict[policy.Decision, list[str]] = {}
        for row in conn.execute(_UNDECIDED, {"device": device, "version": version}).mappings():
            groups.setdefault(_verdict(row, cond, s), []).append(row["id"])
        self._count_verdicts(conn, device, {d: len(ids) for d, ids in groups.items()})
        for d, ids in groups.items():
            values = _verdict_values(d, version, now)
            if d.action == "admit":  # a wait for conditions that now hold is over; a retry's reason stays
                waiting_for = requests.c.status.in_(_CONDITION_WAITS)
                values["status"] = sa.case((waiting_for, TransferStatus.WAITING.value), else_=requests.c.status)
                values["wait_reason"] = sa.case((waiting_for, None), else_=requests.c.wait_reason)
            conn.execute(requests.update().where(requests.c.id.in_(ids)).values(**values))

    def _count_verdicts(self, conn: Connection, device: str, counts: Mapping[policy.Decision, int]) -> None:
        if counts:
            conn.execute(_COUNT, [{"device": device, "metric": "decision", "decision": d.action, "reason": d.reason,
                                   "n": n} for d, n in counts.items()])

    # ------------------------------------------------------------------ attempts (fenced)
    def claim(self, request_id: str, token: int, owner: str, s: Settings) -> dict[str, Any] | None:
        """Start an admitted request; None if this wake-up is stale or a duplicate. The row comes
        with its device's current ``conditions``, read in the same transaction."""
        now = time.time()
        with self.tx() as conn:
            res = conn.execute(_CLAIM, {"rid": request_id, "token": token, "owner": owner,
                                        "expires": now + s.lease_seconds, "now": now}).mappings().first()
            if res is None:
                return None
            dev = conn.execute(_DEVICE, {"device": res["device"]}).mappings().one()
            return {**res, "conditions": _conditions(dev["conditions"], now)}

    def day_usage(self, device: str, now: float | None = None) -> dict[str, int]:
        """Bytes each app moved on ``device`` in the last 24 hours (by the hour)."""
        hour = int((time.time() if now is None else now) // 3600)
        with self.tx(read=True) as conn:
            return {app: int(n) for app, n in conn.execute(_DAY_USAGE, {"device": device, "hour": hour})}

    def running(self, device: str, app_id: str) -> tuple[int, int]:
        """How many transfers run now on ``device``, and how many of them are ``app_id``'s."""
        with self.tx(read=True) as conn:
            return tuple(conn.execute(_RUNNING_COUNTS, {"device": device, "app": app_id}).one())  # type: ignore[return-value]

    def heartbeat(self, request_id: str, token: int, lease_seconds: float, used: int = 0,
                  **fields: Any) -> str | None:
        """Renew the lease and record progress (and ``used``: bytes moved since the last record,
        for the quotas); returns the app's control ('pause'/'cancel')."""
        now = time.time()
        with self.tx() as conn:
            row = _renew(conn, request_id, token, {"lease_expires": now + lease_seconds, "updated_at": now, **fields})
            if row is not None and used:
                conn.execute(_USED, {"device": row.device, "app": row.app_id, "hour": int(now // 3600), "n": used})
        if row is None:
            raise LeaseLost(request_id)
        return row.control

    def finish(self, request_id: str, token: int, used: int = 0, **fields: Any) -> dict[str, Any]:
        """End an attempt: give the slot back and set its outcome (phase etc. in ``fields``)."""
        with self.tx() as conn:
            return self._finish(conn, request_id, token, used, fields)

    def finish_and_pass(self, request_id: str, token: int, device: str, s: Settings, claim_as: str | None,
                        used: int = 0, **fields: Any) -> Pass:
        """``finish``, then the admission pass for the slot it frees on ``device`` (the request's),
        in one transaction; with ``claim_as`` the first request admitted is claimed for that
        owner, who runs it next."""
        with self.tx() as conn:
            self._lock_device(conn, device)  # first, as every pass does: no lock-order deadlock
            self._finish(conn, request_id, token, used, fields)
            return self._pass(conn, device, s, time.time(), _DEVICE, claim_as)

    def _finish(self, conn: Connection, request_id: str, token: int, used: int,
                fields: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        row = conn.execute(_RUNNING, {"rid": request_id, "token": token}).mappings().first()
        if row is None:
            raise LeaseLost(request_id)
        if used:
            conn.execute(_USED, {"device": row["device"], "app": row["app_id"], "hour": int(now // 3600), "n": used})
        if row["removed"]:
            conn.execute(requests.delete().where(requests.c.id == request_id))
            return {**row, "phase": "removed"}
        if fields.get("phase") == "queued":
            fields["decided_version"] = -1  # what this attempt learnt (a size) may change the verdict
        if row["control"] == "pause" and fields.get("phase") != "done":
            fields.update(phase="paused", status=TransferStatus.PAUSED.value,
                          wait_reason="paused by the app", control=None)
        _renew(conn, request_id, token, {"lease_expires": None, "lease_owner": None, "updated_at": now, **fields})
        return {**row, **fields}


# An attempt's statements are built once: composing an UPDATE costs more than running it here.
_FENCE = sa.and_(requests.c.id == sa.bindparam("rid"), requests.c.lease_token == sa.bindparam("token"))
_CLAIM = (
    requests.update().where(_FENCE, requests.c.phase == "admitted")
    .values(phase="running", status=TransferStatus.TRANSFERRING.value, wait_reason=None,
            lease_owner=sa.bindparam("owner"), lease_expires=sa.bindparam("expires"),
            attempts=requests.c.attempts + 1, updated_at=sa.bindparam("now"))
    .returning(*requests.c)
)
_RUNNING = sa.select(requests).where(_FENCE, requests.c.phase == "running")
_RUNNING_COUNTS = sa.text(
    "SELECT (SELECT count(*) FROM bgt_requests WHERE device = :device AND phase = 'running'),"
    " (SELECT count(*) FROM bgt_requests WHERE device = :device AND phase = 'running' AND app_id = :app)")


@functools.cache
def _renewal(names: tuple[str, ...]) -> sa.Update:
    """The fenced UPDATE of a running attempt's row that sets the columns ``names``."""
    return (requests.update().where(_FENCE, requests.c.phase == "running")
            .values({n: sa.bindparam(f"set_{n}") for n in names})
            .returning(requests.c.control, requests.c.device, requests.c.app_id))


def _renew(conn: Connection, request_id: str, token: int, values: Mapping[str, Any]) -> Any:
    """Set ``values`` on a running attempt's row if ``token`` still holds it; its control, or None."""
    params = {"rid": request_id, "token": token, **{f"set_{k}": v for k, v in values.items()}}
    return conn.execute(_renewal(tuple(values)), params).first()


def _left_foreground(stored: Mapping[str, Any], now: float) -> bool:
    """Whether an app's time in the foreground has ended since these conditions were stored."""
    return any(t <= now for t in stored.get("foreground", {}).values())


@functools.cache
def _pg_sql(stmt: sa.TextClause) -> str:
    """A text statement in psycopg's own parameter style, for a pipeline."""
    return str(stmt.compile(dialect=postgresql.psycopg.dialect()))


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


MIGRATIONS = ((1, _create_v1), (2, _admission_indexes_v2))


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
