"""Celery glue: the app, the tasks, the dispatch of admitted requests and the periodic pass.

Messages are wake-ups carrying (request id, fencing token); the store is the record. A lost
message costs at most ``dispatch_seconds`` (the periodic pass re-admits), a duplicate is
dropped by ``claim``. The periodic pass runs in every worker's main process: it is one
short transaction, safe to run from many hosts at once, and needs no beat singleton.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery import Celery, bootsteps, signals

from . import _worker
from ._celeryconf import celery_config
from ._exceptions import TransferError
from ._models import BackgroundTransferRequest
from ._service import BackgroundTransferService, store_for
from ._settings import Settings, load, queue_name

log = logging.getLogger("bgtransfer.celery")

app = Celery("bgtransfer")
app.config_from_object("celeryconfig")
_senders: dict[tuple[str, str], Celery] = {}


def sender_for(s: Settings) -> Celery:
    """A Celery app to send with for these settings: the worker's own when they match the
    environment, else one made from them (a process may talk to several devices or brokers)."""
    key = (s.broker_url, s.data_root)
    if key not in _senders:
        env = load()
        _senders[key] = app if (env.broker_url, env.data_root) == key else Celery(
            "bgtransfer", set_as_current=False, config_source=celery_config(s))
    return _senders[key]


def kick(s: Settings, device: str) -> None:
    """Run an admission pass for ``device`` and wake a worker for each request it admits."""
    dispatch(s, device, store_for(s).promote(device, s))


def dispatch(s: Settings, device: str, picks: list[tuple[str, int]]) -> None:
    """Wake a worker for each admitted (request id, token)."""
    sender = sender_for(s)
    for request_id, token in picks:
        sender.send_task("bgtransfer.transfer", args=(request_id, token), queue=queue_name(device))


@app.task(name="bgtransfer.transfer", ignore_result=True, acks_late=True)
def transfer(request_id: str, token: int) -> None:
    """Run an admitted request; then, while ``chain_seconds`` last, the next one this process's
    own admission pass gives it, without a broker round trip between the two."""
    s = load()
    store = store_for(s)
    until = time.monotonic() + s.chain_seconds
    row: dict[str, Any] | None = None  # the next request, claimed by the pass that ended the last
    while True:
        att = _worker.run_attempt(store, s, request_id, token, _refresh_url, time.monotonic() < until, row)
        if att is None:  # a stale or duplicate wake-up
            return
        if att.after is None:  # the lease was lost, so no pass ran with the outcome: run one
            kick(s, s.device)
            return
        dispatch(s, s.device, att.after.picks)
        row = att.after.claimed
        if row is None:
            return
        request_id, token = row["id"], row["lease_token"]


def _refresh_url(task: str, request: dict[str, Any]) -> Any:
    """Run a URL refresh task here, in this process: it must be registered in the worker (its
    module listed in BGTRANSFER_IMPORTS); nothing waits on the broker for it."""
    if task not in app.tasks:
        raise TransferError(f"task {task!r} is not registered in the worker: list its module in BGTRANSFER_IMPORTS")
    return app.tasks[task].apply(args=(request,)).get(disable_sync_subtasks=False)  # eager: no wait


@app.task(name="bgtransfer.add")
def add(request: dict[str, Any]) -> dict[str, Any]:
    """Add a request given as a dict (``app_id`` in it, default ``default``); the stored dict."""
    app_id = request.get("app_id") if isinstance(request, dict) else None
    req = BackgroundTransferRequest.from_dict(request)
    svc = BackgroundTransferService(app_id or "default")
    svc.add(req)
    return svc.find(req.request_id).to_dict()  # type: ignore[union-attr]


@app.task(name="bgtransfer.find")
def find(app_id: str, request_id: str) -> dict[str, Any] | None:
    req = BackgroundTransferService(app_id).find(request_id)
    return req.to_dict() if req else None


@app.task(name="bgtransfer.requests")
def requests(app_id: str) -> list[dict[str, Any]]:
    return [r.to_dict() for r in BackgroundTransferService(app_id).requests]


@app.task(name="bgtransfer.remove")
def remove(app_id: str, request_id: str) -> dict[str, Any]:
    svc = BackgroundTransferService(app_id)
    req = svc.find(request_id)
    svc.remove(request_id)
    return req.to_dict() if req else {}


# The pool forks children from the main process while this pass may run in a thread of it; a
# child forked while the pass holds a lock (imports, SQLAlchemy, kombu) never gets its tasks.
# So a fork waits for a running pass to end, and a pass never starts during a fork.
pass_lock = threading.Lock()
os.register_at_fork(before=pass_lock.acquire, after_in_parent=pass_lock.release,
                    after_in_child=pass_lock.release)


class Sweeper(bootsteps.StartStopStep):
    """The periodic pass in the worker's main process: reclaim expired leases, admit, dispatch;
    every ``sweep_interval``, and at once when an add wakes the device (PostgreSQL)."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        self.thread = threading.Thread(target=self._loop, name="bgtransfer-sweeper", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        s = load()
        wakeups = None
        while not self.stopping.is_set():
            try:
                wakeups = wakeups or store_for(s).wakeups(s.device)  # listening before its first pass
                with pass_lock:
                    kick(s, s.device)
            except Exception:  # a store or broker outage: the next pass tries again
                log.exception("periodic pass failed")
            if wakeups is None:
                self.stopping.wait(s.sweep_interval)
            else:
                wakeups.wait(s.sweep_interval, self.stopping)
        if wakeups is not None:
            wakeups.close()

    def stop(self, worker: Any) -> None:
        self.stopping.set()


class MetricsServer(bootsteps.StartStopStep):
    """Serve Prometheus metrics from the worker's main process when a port is set."""

    requires = {"celery.worker.components:Pool"}

    def start(self, worker: Any) -> None:
        s = load()
        if s.metrics_port:
            from . import _metrics

            _metrics.serve(s, s.metrics_port)


@signals.worker_process_shutdown.connect
def _child_exited(pid: int | None = None, **_: Any) -> None:
    from . import _metrics

    _metrics.child_exited(pid or os.getpid())


app.steps["worker"].add(Sweeper)
app.steps["worker"].add(MetricsServer)
