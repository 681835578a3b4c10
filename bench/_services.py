"""What the benchmarks share: the servers they may use on this machine (one check that a broker
answers, the set-up and clean-up of a deployment on each backend), and which code they measured."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bgtransfer._settings import Settings

AMQP_URL = os.environ.get("BGTRANSFER_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
PG_ADMIN = os.environ.get("BGTRANSFER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_BASE = "redis://127.0.0.1:6379"
REDIS_DBS = (13, 12, 11, 10, 14, 15)  # tests use 0; the first empty one of these is taken
BACKENDS = ("embedded", "rabbitmq+postgresql", "redis+postgresql")


def code_tree() -> dict[str, Any]:
    """The code measured: the commit and the files changed in the work tree (a figure in the
    README names the commit it was measured at; others may be editing while a benchmark runs)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent.parent), *a],
                              capture_output=True, text=True).stdout

    return {"commit": git("rev-parse", "HEAD").strip(), "changed": git("status", "--short").splitlines()}


def code_line(code: dict[str, Any]) -> str:
    """``code_tree()`` in one line, for a benchmark's header."""
    changed = f" + changed: {', '.join(x.split()[-1] for x in code['changed'])}" if code["changed"] else ""
    return f"code: {code['commit'][:12]}{changed}"


class Unavailable(RuntimeError):
    """A server the backend needs cannot be used now."""


def rabbitmq_unreachable(url: str = AMQP_URL) -> str | None:
    """Why RabbitMQ at ``url`` cannot be used now, or None when it answers."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        return f"RabbitMQ is not reachable at {url}: {exc}"
    return None


def backend_env(name: str, data_root: Path, stack: contextlib.ExitStack, queues: list[str],
                db_prefix: str) -> tuple[dict[str, str], str]:
    """The BGTRANSFER_* variables of a deployment on backend ``name`` (one of BACKENDS), and the
    name of the PostgreSQL database made for it ("" without one). Its clean-up goes on ``stack``:
    the RabbitMQ queues named in ``queues`` when it runs (the caller adds them as it makes
    devices), the Redis database taken (it was empty), the database, and this process's clients."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: one of {', '.join(BACKENDS)}")
    env = {"BGTRANSFER_DATA_ROOT": str(data_root)}
    if name == "rabbitmq+postgresql":
        if why := rabbitmq_unreachable():
            raise Unavailable(why)
        env["BGTRANSFER_BROKER_URL"] = AMQP_URL
        stack.callback(_delete_queues, queues)
    elif name == "redis+postgresql":
        env["BGTRANSFER_BROKER_URL"] = _take_redis_db(stack)
    database = _make_database(db_prefix, stack) if name.endswith("+postgresql") else ""
    if database:
        env["BGTRANSFER_DATABASE_URL"] = PG_ADMIN.rsplit("/", 1)[0] + "/" + database
    from bgtransfer._settings import load

    stack.callback(close_clients, load(env))  # before the database is dropped (LIFO)
    return env, database


def _delete_queues(queues: list[str]) -> None:
    from kombu import Connection

    with contextlib.suppress(Exception), Connection(AMQP_URL, connect_timeout=5) as conn:
        for q in queues:
            with contextlib.suppress(Exception):
                conn.default_channel.queue_delete(q)


def _take_redis_db(stack: contextlib.ExitStack) -> str:
    """The URL of the first empty Redis database of REDIS_DBS, flushed again at clean-up."""
    import redis

    try:
        for n in REDIS_DBS:
            with redis.Redis.from_url(f"{REDIS_BASE}/{n}", socket_connect_timeout=5) as r:
                if r.dbsize() == 0:
                    url = f"{REDIS_BASE}/{n}"
                    break
        else:
            raise Unavailable(f"no empty Redis database among {REDIS_DBS} at {REDIS_BASE}")
    except redis.RedisError as exc:
        raise Unavailable(f"Redis is not reachable at {REDIS_BASE}: {exc}") from exc

    def flush() -> None:
        with redis.Redis.from_url(url, socket_connect_timeout=5) as r:
            r.flushdb()

    stack.callback(flush)
    return url


def _make_database(prefix: str, stack: contextlib.ExitStack) -> str:
    """A new PostgreSQL database, dropped at clean-up."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"CREATE DATABASE {name}")
    except Exception as exc:
        raise Unavailable(f"cannot create a PostgreSQL database at {PG_ADMIN}: {exc}") from exc

    def drop() -> None:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    stack.callback(drop)
    return name


def close_clients(s: Settings) -> None:
    """Close this process's Store and bgtransfer sender for settings ``s`` (connections, files)."""
    from bgtransfer._service import _stores

    store = _stores.pop(s.store_url, None)
    if store is not None:
        store.close()
    mod = sys.modules.get("bgtransfer._celery")
    if mod is not None:
        sender = mod._senders.pop((s.broker_url, s.data_root), None)
        if sender is not None and sender is not mod.app:
            with contextlib.suppress(Exception):
                sender.close()
