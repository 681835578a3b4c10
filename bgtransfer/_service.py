"""``BackgroundTransferService``: the app-facing API (add, find, requests, remove, pause, resume).

It validates with the pure policy, checks the sandbox on disk, stores through the store's
single transaction, then asks for an admission pass; it never moves bytes itself.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from . import _policy as policy
from ._exceptions import TransferError
from ._models import BackgroundTransferRequest, TransferStatus
from ._sandbox import check_target, delete_partial, upload_size
from ._settings import Settings, load
from ._store import Store, to_request

log = logging.getLogger("bgtransfer.service")
_stores: dict[str, Store] = {}


def store_for(s: Settings) -> Store:
    """One Store per database URL per process (the Store itself re-creates its engine after fork)."""
    url = s.store_url
    if url not in _stores:
        _stores[url] = Store(url)
    return _stores[url]


class BackgroundTransferService:
    """The transfers of one app on one device; configured from the environment by default."""

    def __init__(self, app_id: str = "default", *, settings: Settings | None = None,
                 device: str | None = None) -> None:
        self.app_id = policy.check_app_id(app_id)
        self.settings = settings or load()
        self.device = device or self.settings.device
        self.store = store_for(self.settings)

    # ------------------------------------------------------------------ the phone's API
    def add(self, request: BackgroundTransferRequest) -> BackgroundTransferRequest:
        """Validate, persist and enqueue ``request``; raise a TransferError and keep nothing on bad input."""
        s = self.settings
        if not isinstance(request, BackgroundTransferRequest):
            raise TransferError(f"add takes a BackgroundTransferRequest, got {type(request).__name__}")
        if request.app_id not in (None, self.app_id):
            raise TransferError(f"request {request.request_id} belongs to app {request.app_id!r}")
        c = policy.check_request(request, s)
        row: dict[str, Any] = {
            "id": request.request_id, "device": self.device, "app_id": self.app_id, "method": c.method,
            "url": c.url, "headers": c.headers, "direction": c.direction,
            "local_path": policy.SANDBOX_PREFIX + "/".join(c.local_parts),
            "preferences": c.preferences.value, "tag": c.tag, "expected_sha256": c.expected_sha256,
            "form_fields": c.form_fields, "refresh_task": c.refresh_task, "url_expires": c.url_expires_at,
        }
        if c.direction == "upload":
            size = upload_size(s, self.app_id, c.local_parts)
            if size > s.max_upload_bytes:
                raise TransferError(f"upload of {size} bytes exceeds the largest allowed ({s.max_upload_bytes})")
            row["total_bytes_to_send"] = size
        else:
            check_target(s, self.app_id, c.local_parts)
        picks = self.store.insert(row, s)
        request.app_id, request.transfer_status = self.app_id, TransferStatus.WAITING
        self._kick(picks)
        return request

    def find(self, request_id: str) -> BackgroundTransferRequest | None:
        """The request with fresh status and progress, or None (also for another app's id)."""
        row = self.store.get(_id_of(request_id), self.app_id)
        return to_request(row) if row else None

    @property
    def requests(self) -> list[BackgroundTransferRequest]:
        return [to_request(r) for r in self.store.list(self.app_id)]

    def remove(self, request: BackgroundTransferRequest | str) -> None:
        """Cancel if running (stops within a second), free the slot, delete partial data."""
        row, running = self.store.remove(self.app_id, _id_of(request))
        if not running and row["direction"] == "download" and row["phase"] != "done":
            parts = policy.check_sandbox_path(row["local_path"], "download_location")
            delete_partial(self.settings, self.app_id, parts, row["id"])
        self._kick()

    def pause(self, request: BackgroundTransferRequest | str) -> None:
        """Stop moving bytes and give the slot back; the bytes held are kept for ``resume``."""
        self.store.pause(self.app_id, _id_of(request))
        self._kick()

    def resume(self, request: BackgroundTransferRequest | str) -> None:
        self.store.resume(self.app_id, _id_of(request))
        self._kick()

    # ------------------------------------------------------------------ device conditions
    def conditions(self) -> policy.Conditions:
        return self.store.conditions(self.device)

    def set_conditions(self, **changes: Any) -> policy.Conditions:
        """Change the device's network, power or data flags; waiting requests are re-decided."""
        cond = self.store.set_conditions(self.device, changes)
        self._kick()
        return cond

    def set_foreground(self, ttl: float = 60.0) -> policy.Conditions:
        """Mark this app as in the foreground for ``ttl`` seconds."""
        return self.set_conditions(foreground={self.app_id: time.time() + ttl})

    # ------------------------------------------------------------------ helpers
    def _kick(self, picks: list[tuple[str, int]] | None = None) -> None:
        """Dispatch ``picks`` (already admitted), or run an admission pass and dispatch what it admits."""
        from ._celery import dispatch, kick  # the Celery app loads only when something is to be sent

        try:
            if picks is None:
                kick(self.settings, self.device)
            elif picks:
                dispatch(self.settings, self.device, picks)
        except Exception:  # the broker is down: the request is stored; the periodic pass dispatches it
            log.warning("could not dispatch now; a worker's periodic pass will", exc_info=True)


def _id_of(request: BackgroundTransferRequest | str) -> str:
    rid = request.request_id if isinstance(request, BackgroundTransferRequest) else request
    if not isinstance(rid, str):
        raise TransferError(f"request id must be a string, got {type(rid).__name__}")
    return rid
