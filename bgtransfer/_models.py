"""The request and its enums: plain data that crosses every edge (store, Celery, CLI)."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from typing import Any

from ._exceptions import TransferError


class TransferPreferences(str, enum.Enum):
    """Which conditions a request may run under (the phone's TransferPreferences)."""

    NONE = "NONE"  # Wi-Fi and external power
    ALLOW_CELLULAR = "ALLOW_CELLULAR"  # any network, external power
    ALLOW_BATTERY = "ALLOW_BATTERY"  # Wi-Fi, any power
    ALLOW_CELLULAR_AND_BATTERY = "ALLOW_CELLULAR_AND_BATTERY"


class TransferStatus(str, enum.Enum):
    """What a request is doing; a failed transfer is COMPLETED with ``transfer_error`` set."""

    NONE = "NONE"
    TRANSFERRING = "TRANSFERRING"
    WAITING = "WAITING"
    WAITING_FOR_WIFI = "WAITING_FOR_WIFI"
    WAITING_FOR_EXTERNAL_POWER = "WAITING_FOR_EXTERNAL_POWER"
    WAITING_FOR_EXTERNAL_POWER_DUE_TO_BATTERY_SAVER_MODE = (
        "WAITING_FOR_EXTERNAL_POWER_DUE_TO_BATTERY_SAVER_MODE"
    )
    WAITING_FOR_NON_VOICE_BLOCKING_NETWORK = "WAITING_FOR_NON_VOICE_BLOCKING_NETWORK"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"
    UNKNOWN = "UNKNOWN"


# What the caller sets; everything else is state the service fills in.
INPUT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "request_uri": str,
    "method": str,
    "headers": dict,
    "download_location": (str, type(None)),
    "upload_location": (str, type(None)),
    "transfer_preferences": str,
    "tag": (str, type(None)),
    "expected_sha256": (str, type(None)),
    "form_fields": (dict, type(None)),
    # URL refresh: a Celery task that returns a fresh URL (and headers) when the server answers
    # 401/403 or the URL is about to expire (a unix time), e.g. a presigned URL
    "refresh_task": (str, type(None)),
    "url_expires_at": (int, float, type(None)),
}
STATE_FIELDS: tuple[str, ...] = (
    "request_id",
    "app_id",
    "transfer_status",
    "bytes_received",
    "total_bytes_to_receive",
    "bytes_sent",
    "total_bytes_to_send",
    "status_code",
    "transfer_error",
    "wait_reason",
)


class BackgroundTransferRequest:
    """One upload or download, as the app describes it and as the service reports it.

    ``download_location``/``upload_location`` are sandbox paths (``/shared/transfers/...``).
    State fields are refreshed by ``BackgroundTransferService.find``.
    """

    def __init__(
        self,
        request_uri: str,
        method: str = "GET",
        *,
        download_location: str | None = None,
        upload_location: str | None = None,
        headers: dict[str, str] | None = None,
        transfer_preferences: TransferPreferences | str = TransferPreferences.NONE,
        tag: str | None = None,
        expected_sha256: str | None = None,
        form_fields: dict[str, str] | None = None,
        refresh_task: str | None = None,
        url_expires_at: float | None = None,
    ) -> None:
        self.request_id: str = uuid.uuid4().hex
        self.app_id: str | None = None
        self.request_uri = request_uri
        self.method = method
        # kept as given when not a mapping, so add() can name the mistake
        self.headers: dict[str, str] = dict(headers) if isinstance(headers, Mapping) else (headers or {})
        self.download_location = download_location
        self.upload_location = upload_location
        self.transfer_preferences = transfer_preferences
        self.tag = tag
        self.expected_sha256 = expected_sha256
        self.form_fields = form_fields  # an upload as multipart/form-data: these fields plus part "file"
        self.refresh_task = refresh_task
        self.url_expires_at = url_expires_at
        self.transfer_status = TransferStatus.NONE
        self.bytes_received = 0
        self.total_bytes_to_receive: int | None = None
        self.bytes_sent = 0
        self.total_bytes_to_send: int | None = None
        self.status_code: int | None = None
        self.transfer_error: str | None = None
        self.wait_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict: what the Celery tasks take and return."""
        d = {name: getattr(self, name) for name in (*STATE_FIELDS, *INPUT_FIELDS)}
        d["headers"] = dict(self.headers) if isinstance(self.headers, Mapping) else self.headers
        d["transfer_preferences"] = _value(self.transfer_preferences)
        d["transfer_status"] = _value(self.transfer_status)
        return d

    @classmethod
    def from_dict(cls, data: Any) -> BackgroundTransferRequest:
        """Build a request from a caller's dict, naming the first field of the wrong type."""
        if not isinstance(data, dict):
            raise TransferError(f"request must be a dict, got {type(data).__name__}")
        unknown = set(data) - set(INPUT_FIELDS) - set(STATE_FIELDS) - {"url"}
        if unknown:
            raise TransferError(f"unknown request field(s): {', '.join(sorted(map(str, unknown)))}")
        data = dict(data)
        if "url" in data:  # the friendlier spelling for callers of other languages
            data.setdefault("request_uri", data.pop("url"))
        if "request_uri" not in data:
            raise TransferError("request_uri is required")
        for name, kind in INPUT_FIELDS.items():
            if name in data and not isinstance(data[name], kind):
                what = "a mapping" if kind in (dict, (dict, type(None))) else "a string"
                raise TransferError(f"{name} must be {what}, got {type(data[name]).__name__}")
        req = cls(**{k: v for k, v in data.items() if k in INPUT_FIELDS})
        for name in STATE_FIELDS:
            if name in data and data[name] is not None:
                setattr(req, name, data[name])
        req.transfer_status = TransferStatus(req.transfer_status)
        return req

    def __repr__(self) -> str:
        return (
            f"<BackgroundTransferRequest {self.request_id} {self.method} {self.request_uri!r} "
            f"{_value(self.transfer_status)}>"
        )


def _value(member: Any) -> Any:
    return member.value if isinstance(member, enum.Enum) else member
