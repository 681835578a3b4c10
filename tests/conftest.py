"""Shared fixtures: real deployments (broker x store), real worker processes, a real HTTP server.

Every server a test talks to runs on this machine; tests that need PostgreSQL, Redis or
RabbitMQ skip with the reason when it is not reachable. Each test gets its own data root,
its own device (so its own queue) and, on PostgreSQL, its own database.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bgtransfer import BackgroundTransferService, Settings
from bgtransfer._settings import load
from tests.httpserver import FileServer
from tests.workerproc import FAST, ROOT, WorkerProcess

PG_ADMIN = os.environ.get("BGTRANSFER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BGTRANSFER_TEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("BGTRANSFER_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")


def reachable(url: str, default_port: int) -> bool:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or default_port), timeout=1):
            return True
    except OSError:
        return False


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


@dataclasses.dataclass
class Deployment:
    """One broker + store + data root, as a set of BGTRANSFER_* variables."""

    name: str
    env: dict[str, str]
    tmp: Path
    workers: list[WorkerProcess] = dataclasses.field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return load(self.env)

    @property
    def device(self) -> str:
        return self.env["BGTRANSFER_DEVICE"]

    def service(self, app_id: str = "default") -> BackgroundTransferService:
        return BackgroundTransferService(app_id, settings=self.settings)

    def sandbox(self, app_id: str = "default") -> Path:
        path = Path(self.env["BGTRANSFER_DATA_ROOT"]) / "apps" / app_id / "shared" / "transfers"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def subprocess_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BGTRANSFER_")}
        return {**env, **self.env, **extra, "PYTHONUNBUFFERED": "1"}

    def worker(self, concurrency: int = 4, **extra_env: str) -> WorkerProcess:
        """A real worker process for this deployment, ready; SIGKILLed at teardown (a graceful
        Celery shutdown takes seconds, and the state store makes a kill harmless)."""
        w = WorkerProcess({**self.env, **extra_env}, self.tmp / f"worker-{len(self.workers)}.log", concurrency)
        self.workers.append(w)
        if not w.wait_ready():
            pytest.fail(f"worker did not start:\n{w.text()[-3000:]}")
        return w

    def cli(self, *args: str, timeout: float = 120, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bgtransfer", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.subprocess_env(**extra_env),
        )

    def wait_done(self, app_id: str, request_id: str, timeout: float = 60.0) -> Any:
        svc = self.service(app_id)

        def done() -> Any:
            r = svc.find(request_id)
            return r if r is not None and r.transfer_status.value == "COMPLETED" else None

        return wait_for(done, timeout, 0.1, f"request {request_id} to complete")


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped after it."""
    import psycopg

    name = f"bgt_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        from bgtransfer._service import _stores

        for url in [u for u in _stores if name in u]:
            _stores.pop(url).close()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


BROKERS = {"embedded": ("", 0), "redis": (REDIS_URL, 6379), "rabbitmq": (AMQP_URL, 5672)}


def make_deployment(tmp: Path, broker: str, store: str, stack: contextlib.ExitStack) -> Deployment:
    url, port = BROKERS[broker]
    if url and not reachable(url, port):
        pytest.skip(f"{broker} is not reachable at {url}")
    database = ""
    if store == "postgresql":
        if not reachable(PG_ADMIN, 5432):
            pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN}")
        database = stack.enter_context(pg_database())
    device = f"t{uuid.uuid4().hex[:8]}"
    env = {"BGTRANSFER_DATA_ROOT": str(tmp / "data"), "BGTRANSFER_DEVICE": device, **FAST}
    if url:
        env["BGTRANSFER_BROKER_URL"] = url
    if database:
        env["BGTRANSFER_DATABASE_URL"] = database
    return Deployment(f"{broker}+{store}", env, tmp)


@pytest.fixture
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    """The embedded default unless parametrized with ("broker", "store")."""
    broker, store = getattr(request, "param", ("embedded", "sqlite"))
    with contextlib.ExitStack() as stack:
        dep = make_deployment(tmp_path, broker, store, stack)
        try:
            yield dep
        finally:
            for w in dep.workers:
                if w.proc.poll() is None:
                    w.kill()


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as srv:
        yield srv


STORES = [pytest.param(("embedded", "sqlite"), id="sqlite"), pytest.param(("embedded", "postgresql"), id="postgresql")]
BACKENDS = [
    pytest.param(("embedded", "sqlite"), id="embedded"),
    pytest.param(("rabbitmq", "postgresql"), id="rabbitmq+postgresql"),
    pytest.param(("redis", "postgresql"), id="redis+postgresql"),
]
