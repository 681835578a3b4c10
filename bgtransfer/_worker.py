"""One attempt of one request, between the store and the engine: claim, run, record the outcome.

Celery-free so it can be called from a task, a test or a benchmark alike.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _engine as engine
from . import _metrics
from . import _policy as policy
from ._exceptions import LeaseLost, TransferError
from ._models import TransferStatus
from ._sandbox import delete_partial
from ._settings import Settings
from ._store import Pass, Store, to_request

log = logging.getLogger("bgtransfer.worker")


class StoreLease:
    """The engine's Lease, fenced by (request id, token, owner) in the store; counts bytes as they move,
    so throughput shows while a long transfer runs, not only when it ends."""

    def __init__(self, store: Store, row: dict[str, Any], token: int, owner: str, s: Settings) -> None:
        self.store, self.request_id, self.token, self.owner, self.s = store, row["id"], token, owner, s
        self.device, self.app_id = row["device"], row["app_id"]
        self.bytes = _metrics.BYTES.labels(row["device"], row["app_id"], row["direction"])
        self.counted = 0
        self.rate = self._share()

    def count(self, moved: int) -> int:
        """Count the bytes moved since the last count (in the metrics); returns them, for the
        app's quota usage when quotas are set (0 otherwise: nothing to record)."""
        delta = max(moved - self.counted, 0)
        if delta:
            self.bytes.inc(delta)
            self.counted = moved
        return delta if self.s.quotas else 0

    def renew(self, moved: int, **fields: Any) -> str | None:
        used = self.count(moved)
        control = self.store.heartbeat(self.request_id, self.token, self.s.lease_seconds, used, self.owner, **fields)
        self.rate = self._share()
        return control

    def max_rate(self) -> float:
        return self.rate

    def _share(self) -> float:
        """This transfer's share of the bandwidth limits, among the transfers on every host that
        run or are about to (``Store.sharing``: admitted since the last renewal)."""
        s = self.s
        if not (s.max_rate_per_app or s.max_rate_per_device):
            return s.max_rate_per_transfer  # no count needed
        return policy.rate_share(s, *self.store.sharing(self.device, self.app_id, s.progress_interval))


_processes: dict[int, str] = {}  # pid -> this process's part of an owner (a forked child makes its own)


def attempt_owner() -> str:
    """Who runs an attempt: this host, process and (beside the main one) thread, which runs one
    attempt at a time; what a lease is fenced by, with its token (the store's ``_HELD_BY``). A
    random part per process keeps two hosts that share a name (containers) apart."""
    pid = os.getpid()
    if pid not in _processes:
        _processes[pid] = f"{socket.gethostname()}:{pid}:{secrets.token_hex(4)}"
    thread = "" if threading.current_thread() is threading.main_thread() else f":{threading.get_ident()}"
    return _processes[pid] + thread


def job_from_row(row: dict[str, Any]) -> engine.Job:
    parts = policy.check_sandbox_path(row["local_path"], "local_path")
    return engine.Job(
        request_id=row["id"], app_id=row["app_id"], method=row["method"], url=row["url"],
        headers=dict(row["headers"]), direction=row["direction"], parts=parts,
        expected_sha256=row["expected_sha256"], validator=row["validator"],
        known_total=row["total_bytes_to_receive"], form_fields=row["form_fields"],
        refreshable=row["refresh_task"] is not None, upload_url=row["upload_url"],
    )


# Calls a URL refresh task by name with the request (as a dict); returns its answer.
Refresher = Callable[[str, dict[str, Any]], Any]


@dataclasses.dataclass
class Attempt:
    """An attempt's outcome, and the admission pass that ran when it gave its slot back (None
    when it could not: its lease was lost)."""

    out: engine.Outcome
    after: Pass | None


def run_attempt(store: Store, s: Settings, request_id: str, token: int, refresher: Refresher | None = None,
                claim_next: bool = False, row: dict[str, Any] | None = None) -> Attempt | None:
    """Claim the request with ``token`` (unless ``row`` is one already claimed) and run one
    attempt; None if the wake-up was stale. With ``claim_next``, the pass that ends it claims
    the next admitted request for this process too (``Attempt.after.claimed``)."""
    owner = attempt_owner()
    row = row or store.claim(request_id, token, owner, s)
    if row is None:
        return None
    cond = row["conditions"]
    limits = engine.Limits(
        max_bytes=policy.size_cap(row["direction"], cond, s),
        min_rate=policy.min_rate(cond, s), window=s.min_rate_window,
    )
    job = job_from_row(row)
    lease = StoreLease(store, row, token, owner, s)
    started = time.monotonic()
    expires = row["url_expires"]
    try:
        if job.refreshable and expires is not None and expires - s.refresh_margin_seconds <= time.time():
            out = engine.Outcome("refresh", "the URL expires")  # no request with it: get a new one first
        else:
            out = engine.run(job, lease, limits, s)
    except TransferError as exc:  # the sandbox changed under us (a symlink swapped in, a file gone)
        out = engine.Outcome("failed", str(exc))
    except OSError as exc:  # disk full and the like: keep the partial file, try again later
        out = engine.Outcome("retry", f"local file error: {exc.strerror or exc}")
    except Exception as exc:  # a bug must still count against the retry budget, not loop forever
        log.exception("request %s: attempt crashed", request_id)
        out = engine.Outcome("retry", f"internal error: {exc!r}")
    used = lease.count(out.moved)
    kind, error = final_kind(row, out, s)
    changes: dict[str, Any] = {}
    if kind == "refresh":
        kind, error, changes = refresh(row, s, refresher)
    if kind in ("failed", "cancelled") and row["direction"] == "download":
        # before the outcome is visible: no one may see a failed request with its partial file
        delete_partial(s, job.app_id, job.parts, request_id)
    try:
        after = record_outcome(store, s, row, token, out, kind, error, used, changes, owner, claim_next)
    except LeaseLost:
        log.info("request %s: lease lost, outcome %s dropped", request_id, out.kind)
        return Attempt(out, None)
    _metrics.observe(row, kind, out, time.monotonic() - started, time.time())
    return Attempt(out, after)


def final_kind(row: dict[str, Any], out: engine.Outcome, s: Settings) -> tuple[str, str | None]:
    """The attempt's outcome as the request will take it: a retry past the budget is a failure."""
    if out.kind in ("retry", "slow", "refresh") and row["attempts"] >= s.max_attempts:
        return "failed", f"gave up after {row['attempts']} attempts: {out.error}"
    return out.kind, out.error


def refresh(row: dict[str, Any], s: Settings, refresher: Refresher | None) -> tuple[str, str | None, dict[str, Any]]:
    """Ask the request's refresh task for a fresh URL: ("refreshed", None, the new url, headers
    and expiry), or a failure (a bad answer) or a retry (the task failed) with its reason."""
    task = row["refresh_task"]
    try:
        if refresher is None:
            raise TransferError("no Celery app here to call it with")
        answer = refresher(task, to_request(row).to_dict())
        if not isinstance(answer, dict) or not isinstance(answer.get("url"), str):
            raise TransferError(f"expected a dict with a 'url', got {answer!r:.200}")
        url = policy.check_url(answer["url"], "url")
        headers = policy.check_headers(answer.get("headers", row["headers"]), s)
        _, expires = policy.check_refresh(task, answer.get("expires_at"))
    except TransferError as exc:  # an answer that can never work: say so
        return "failed", f"URL refresh by {task}: {exc}", {}
    except Exception as exc:  # the task failed this time: try again later
        return "retry", f"URL refresh by {task} failed: {exc!r:.300}", {}
    return "refreshed", None, {"url": url, "headers": headers, "url_expires": expires}


def record_outcome(store: Store, s: Settings, row: dict[str, Any], token: int, out: engine.Outcome,
                   kind: str, error: str | None, used: int = 0, changes: dict[str, Any] | None = None,
                   owner: str | None = None, claim_next: bool = False) -> Pass | None:
    """Turn an attempt's outcome (taken as ``kind``) into the request's next state, give the slot
    back, record the ``used`` bytes not yet counted against the app's quota, apply ``changes``
    (a refreshed URL), and run the admission pass for the freed slot, all in one transaction;
    that pass, or None for a lost lease (nothing to give back). The attempt is ``owner``'s, who
    runs the next request the pass admits with ``claim_next``."""
    if kind == "lost":
        raise LeaseLost(row["id"])
    now = time.time()
    down = row["direction"] == "download"
    fields: dict[str, Any] = {"status_code": out.status_code}
    if out.total is not None:
        fields["total_bytes_to_receive" if down else "total_bytes_to_send"] = out.total
    fields["bytes_received" if down else "bytes_sent"] = out.bytes_done
    if out.validator is not None or out.kind == "completed":
        fields["validator"] = out.validator
    if out.degraded:
        fields["degraded"] = out.degraded
    if kind in ("completed", "failed"):
        fields.update(phase="done", status=TransferStatus.COMPLETED.value, error=error, wait_reason=None,
                      completed_at=now)
    elif kind in ("retry", "slow"):
        fields.update(
            phase="queued", wait_reason=error,
            status=(TransferStatus.PAUSED if kind == "slow" else TransferStatus.WAITING).value,
            not_before=now + policy.backoff(row["attempts"], s, out.retry_after),
        )
    elif kind == "requeue":  # admission decides again with what was learnt (the size)
        fields.update(phase="queued", status=TransferStatus.WAITING.value, wait_reason=error, not_before=0.0)
    elif kind == "refreshed":  # at once with the new URL; the bytes held stay, validated as usual
        fields.update(phase="queued", status=TransferStatus.WAITING.value, wait_reason="URL refreshed",
                      not_before=0.0, **(changes or {}))
    elif kind == "paused":
        fields.update(phase="paused", status=TransferStatus.PAUSED.value, wait_reason=error, control=None)
    # "cancelled": the row is marked removed; finish() deletes it
    after = store.finish_and_pass(row["id"], token, row["device"], s, owner if claim_next else None, used, owner,
                                  **fields)
    log.info("request %s: %s%s", row["id"], kind, f" ({error})" if error else "")
    return after
