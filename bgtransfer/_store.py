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
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from . import _policy as policy
from ._exceptions import LeaseLost, QuotaExceededError, TransferError
from ._models import BackgroundTransferRequest, TransferPreferences, TransferStatus
from ._settings import Settings

SCHEMA_VERSION = 1
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
    sa.Index("bgt_requests_admissible", "device", "phase", "admissible", "app_id", "seq"),
    sa.Index("bgt_requests_app", "app_id", "seq"),
)
devices = sa.Table(
    "bgt_devices", meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("next_seq", sa.BigInteger, nullable=False, default=1),
    sa.Column("conditions", sa.JSON, nullable=False),
    sa.Column("cond_version", sa.Integer, nullable=False, default=0),  # bumped at every change
)
app_turns = sa.Table(  # round-robin memory: when each app last got a slot on a device
    "bgt_app_turns", meta,
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("app_id", sa.String(63), primary_key=True),
    sa.Column("last_admit_at", sa.Float, nullable=False),
)
counters = sa.Table(  # device-wide counters for the metrics: admission verdicts, lease reclaims
    "bgt_counters", meta,
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("metric", sa.String(32), primary_key=True),
    sa.Column("decision", sa.String(16), primary_key=True),
    sa.Column("reason", sa.String(128), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)
schema = sa.Table("bgt_schema", meta, sa.Column("version", sa.Integer, nullable=False))

ACTIVE = ("admitted", "running")

# The admission pass runs at every start and end of a transfer: its statements are plain SQL
# (portable between SQLite and PostgreSQL) built once, which costs a fraction of composing them.
_DEVICE_SQL = "SELECT name, next_seq, conditions, cond_version FROM bgt_devices WHERE name = :device"
_DEVICE = sa.text(_DEVICE_SQL).columns(conditions=sa.JSON)
_DEVICE_FOR_UPDATE = sa.text(_DEVICE_SQL + " FOR UPDATE").columns(conditions=sa.JSON)
_HELD = sa.text("SELECT id, removed, lease_expires FROM bgt_requests "
                "WHERE device = :device AND phase IN ('admitted', 'running')")
_UNDECIDED = sa.text(
    "SELECT id, app_id, direction, preferences, total_bytes_to_receive, total_bytes_to_send, bytes_received "
    "FROM bgt_requests WHERE device = :device AND phase = 'queued' AND decided_version <> :version")
_HEADS = sa.text(  # the first `free` admissible requests of each app, with the app's last turn
    "SELECT r.id, r.app_id, r.lease_token, t.last_admit_at FROM ("
    " SELECT id, app_id, lease_token, seq, ROW_NUMBER() OVER (PARTITION BY app_id ORDER BY seq) AS rnk"
    " FROM bgt_requests WHERE device = :device AND phase = 'queued' AND admissible = :yes"
    " AND not_before <= :now) r "
    "LEFT JOIN bgt_app_turns t ON t.device = :device AND t.app_id = r.app_id "
    "WHERE r.rnk <= :free ORDER BY r.seq").bindparams(sa.bindparam("yes", type_=sa.Boolean))
_ADMIT = sa.text(
    "UPDATE bgt_requests SET phase = 'admitted', lease_token = lease_token + 1, lease_expires = :expires, "
    "wait_reason = NULL, updated_at = :now WHERE id IN :ids").bindparams(sa.bindparam("ids", expanding=True))
_TURN = sa.text(
    "INSERT INTO bgt_app_turns (device, app_id, last_admit_at) VALUES (:device, :app, :at) "
    "ON CONFLICT (device, app_id) DO UPDATE SET last_admit_at = excluded.last_admit_at")
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
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return sa.create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=4)


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
    def tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
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
    def _lock_device(self, conn: Connection, device: str) -> Mapping[str, Any]:
        """The device row, locked until the transaction ends (created on first use)."""
        q = _DEVICE_FOR_UPDATE if self.dialect == "postgresql" else _DEVICE
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
    def insert(self, row: dict[str, Any], s: Settings) -> None:
        """Store a new request after the counted rules (5, 6); raise and store nothing on breach."""
        now = time.time()
        with self.tx() as conn:
            dev = self._lock_device(conn, row["device"])
            if conn.execute(sa.select(requests.c.id).where(requests.c.id == row["id"])).first():
                raise TransferError(f"request {row['id']} was already added")
            live = requests.c.removed.is_(False)
            n_app = conn.execute(
                sa.select(sa.func.count()).where(requests.c.app_id == row["app_id"], live)
            ).scalar()
            if n_app >= s.max_outstanding_per_app:
                raise QuotaExceededError(
                    f"app {row['app_id']!r} has {n_app} outstanding requests (at most "
                    f"{s.max_outstanding_per_app}); remove completed ones first"
                )
            n_dev = conn.execute(
                sa.select(sa.func.count()).where(requests.c.device == row["device"], live)
            ).scalar()
            if n_dev >= s.max_queued_per_device:
                raise QuotaExceededError(
                    f"device {row['device']!r} has {n_dev} queued requests (at most {s.max_queued_per_device})"
                )
            if row["direction"] == "download":
                dup = conn.execute(
                    sa.select(requests.c.id).where(
                        requests.c.app_id == row["app_id"], live, requests.c.direction == "download",
                        requests.c.local_path == row["local_path"],
                    )
                ).first()
                if dup:
                    raise TransferError(
                        f"{row['local_path']} is already the target of request {dup.id}"
                    )
            conn.execute(devices.update().where(devices.c.name == row["device"]).values(next_seq=dev["next_seq"] + 1))
            conn.execute(requests.insert().values(
                **row, seq=dev["next_seq"], phase="queued", status=TransferStatus.WAITING.value,
                created_at=now, updated_at=now,
            ))

    def get(self, request_id: str, app_id: str | None = None) -> dict[str, Any] | None:
        q = sa.select(requests).where(requests.c.id == request_id, requests.c.removed.is_(False))
        if app_id is not None:
            q = q.where(requests.c.app_id == app_id)
        with self.tx() as conn:
            row = conn.execute(q).mappings().first()
        return dict(row) if row else None

    def list(self, app_id: str | None = None, device: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(requests).where(requests.c.removed.is_(False)).order_by(requests.c.seq)
        if app_id is not None:
            q = q.where(requests.c.app_id == app_id)
        if device is not None:
            q = q.where(requests.c.device == device)
        with self.tx() as conn:
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
        admissible requests of each app are read.
        """
        now = time.time() if now is None else now
        with self.tx() as conn:
            dev = self._lock_device(conn, device)
            stored, version = dict(dev["conditions"]), dev["cond_version"]
            fg = stored.get("foreground", {})
            if any(t <= now for t in fg.values()):  # an app left the foreground: a change too
                stored["foreground"] = {a: t for a, t in fg.items() if t > now}
                version += 1
                conn.execute(devices.update().where(devices.c.name == device).values(
                    conditions=stored, cond_version=version))
            cond = _conditions(stored, now)
            held = conn.execute(_HELD, {"device": device}).all()
            expired = [r for r in held if r.lease_expires is None or r.lease_expires < now]
            if expired:  # a dead worker's slots come back; removed requests it held are forgotten
                conn.execute(requests.delete().where(requests.c.id.in_([r.id for r in expired if r.removed])))
                conn.execute(requests.update().where(requests.c.id.in_([r.id for r in expired if not r.removed]))
                             .values(phase="queued", status=TransferStatus.WAITING.value, decided_version=-1,
                                     wait_reason="lease expired; resuming", lease_expires=None, control=None,
                                     updated_at=now))
                conn.execute(_COUNT, {"device": device, "metric": "reclaim", "decision": "", "reason": "",
                                      "n": len(expired)})
            self._decide(conn, device, cond, version, s, now)
            free = s.max_concurrent_per_device - (len(held) - len(expired))
            if free <= 0:
                return []
            heads = conn.execute(_HEADS, {"device": device, "yes": True, "now": now, "free": free}).all()
            if not heads:
                return []
            turns = {app: last for _, app, _, last in heads if last is not None}
            picked = policy.round_robin([(app, rid) for rid, app, _, _ in heads], turns, free)
            info = {rid: (app, token) for rid, app, token, _ in heads}
            conn.execute(_ADMIT, {"ids": picked, "expires": now + s.dispatch_seconds, "now": now})
            served = {info[rid][0]: now + i * 1e-6 for i, rid in enumerate(picked)}  # later picks, later turns
            conn.execute(_TURN, [{"device": device, "app": app, "at": at} for app, at in served.items()])
            return [(rid, info[rid][1] + 1) for rid in picked]

    def _decide(self, conn: Connection, device: str, cond: policy.Conditions, version: int, s: Settings,
                now: float) -> None:
        """Decide the queued requests not yet decided under ``version``; store each verdict."""
        rows = conn.execute(_UNDECIDED, {"device": device, "version": version}).all()
        groups: dict[policy.Decision, list[str]] = {}
        for rid, app, direction, prefs, down_total, up_total, received in rows:
            # a stream without Content-Length that outgrew a cap has a size of at least what arrived
            size = up_total if direction == "upload" else (max(down_total or 0, received) or None)
            d = policy.decide(policy.Candidate(app, direction, TransferPreferences(prefs), size), cond, s)
            groups.setdefault(d, []).append(rid)
        if groups:
            conn.execute(_COUNT, [{"device": device, "metric": "decision", "decision": d.action, "reason": d.reason,
                                   "n": len(ids)} for d, ids in groups.items()])
        for d, ids in groups.items():
            values: dict[str, Any] = {"decided_version": version, "admissible": d.action == "admit"}
            if d.action != "admit":  # an admissible request keeps showing why it last stopped
                values.update(status=d.status.value, wait_reason=d.reason, updated_at=now)
            if d.action == "fail":
                values.update(phase="done", error=d.detail or d.reason, completed_at=now, wait_reason=None)
            if d.preferences is not None:
                values["preferences"] = d.preferences.value
            conn.execute(requests.update().where(requests.c.id.in_(ids)).values(**values))

    # ------------------------------------------------------------------ attempts (fenced)
    def claim(self, request_id: str, token: int, owner: str, s: Settings) -> dict[str, Any] | None:
        """Start an admitted request; None if this wake-up is stale or a duplicate. The row comes
        with its device's current ``conditions``, read in the same transaction."""
        now = time.time()
        with self.tx() as conn:
            res = conn.execute(
                requests.update()
                .where(requests.c.id == request_id, requests.c.lease_token == token,
                       requests.c.phase == "admitted")
                .values(phase="running", status=TransferStatus.TRANSFERRING.value, wait_reason=None,
                        lease_owner=owner, lease_expires=now + s.lease_seconds,
                        attempts=requests.c.attempts + 1, updated_at=now)
                .returning(*requests.c)
            ).mappings().first()
            if res is None:
                return None
            dev = conn.execute(_DEVICE, {"device": res["device"]}).mappings().one()
            return {**res, "conditions": _conditions(dev["conditions"], now)}

    def heartbeat(self, request_id: str, token: int, lease_seconds: float, **fields: Any) -> str | None:
        """Renew the lease and record progress; returns the app's control ('pause'/'cancel')."""
        now = time.time()
        with self.tx() as conn:
            row = conn.execute(
                requests.update()
                .where(requests.c.id == request_id, requests.c.lease_token == token,
                       requests.c.phase == "running")
                .values(lease_expires=now + lease_seconds, updated_at=now, **fields)
                .returning(requests.c.control)
            ).first()
        if row is None:
            raise LeaseLost(request_id)
        return row.control

    def finish(self, request_id: str, token: int, **fields: Any) -> dict[str, Any]:
        """End an attempt: give the slot back and set its outcome (phase etc. in ``fields``)."""
        now = time.time()
        with self.tx() as conn:
            where = sa.and_(requests.c.id == request_id, requests.c.lease_token == token,
                            requests.c.phase == "running")
            row = conn.execute(sa.select(requests).where(where)).mappings().first()
            if row is None:
                raise LeaseLost(request_id)
            if row["removed"]:
                conn.execute(requests.delete().where(where))
                return {**row, "phase": "removed"}
            if fields.get("phase") == "queued":
                fields["decided_version"] = -1  # what this attempt learnt (a size) may change the verdict
            if row["control"] == "pause" and fields.get("phase") != "done":
                fields.update(phase="paused", status=TransferStatus.PAUSED.value,
                              wait_reason="paused by the app", control=None)
            conn.execute(requests.update().where(where).values(
                lease_expires=None, lease_owner=None, updated_at=now, **fields))
            return {**row, **fields}


def _conditions(stored: Mapping[str, Any], now: float) -> policy.Conditions:
    fg = stored.get("foreground", {})
    known = {k: v for k, v in stored.items() if k != "foreground"}
    return policy.Conditions(**known, foreground=policy.foreground_apps(fg.items(), now))


def _create_v1(conn: Connection) -> None:
    meta.create_all(conn, tables=[requests, devices, app_turns, counters])


MIGRATIONS = ((1, _create_v1),)


def to_request(row: Mapping[str, Any]) -> BackgroundTransferRequest:
    """The public view of a stored row."""
    down = row["local_path"] if row["direction"] == "download" else None
    up = row["local_path"] if row["direction"] == "upload" else None
    req = BackgroundTransferRequest(
        row["url"], row["method"], download_location=down, upload_location=up,
        headers=row["headers"], transfer_preferences=TransferPreferences(row["preferences"]),
        tag=row["tag"], expected_sha256=row["expected_sha256"], form_fields=row["form_fields"],
    )
    req.request_id, req.app_id = row["id"], row["app_id"]
    req.transfer_status = TransferStatus(row["status"])
    req.bytes_received, req.total_bytes_to_receive = row["bytes_received"], row["total_bytes_to_receive"]
    req.bytes_sent, req.total_bytes_to_send = row["bytes_sent"], row["total_bytes_to_send"]
    req.status_code, req.transfer_error, req.wait_reason = row["status_code"], row["error"], row["wait_reason"]
    return req
