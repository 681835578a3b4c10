"""The policy as plain data and pure functions: no I/O, so every rule is testable by table.

- ``check_request``: the add-time rules 1-4 and 6 that need nothing but the request (SPEC).
- ``decide``: admission (rules 7-10) for one request under a device's conditions.
- ``fair_share``: which admissible requests take the free slots (rule 11), by app weight.
Caps that need counts (rule 5, rule 11's cap) are applied by the store inside one transaction.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal
from urllib.parse import urlsplit

from ._exceptions import NotSupportedError, SandboxError, TransferError
from ._models import BackgroundTransferRequest, TransferPreferences, TransferStatus
from ._settings import Settings

APP_ID = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
REQUEST_ID = re.compile(r"[0-9a-f]{32}")
SHA256 = re.compile(r"[0-9a-f]{64}")
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
RESERVED_HEADERS = frozenset(
    {"if-modified-since", "if-none-match", "if-range", "range", "unless-modified-since"}
)
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})  # set by the engine
SANDBOX_PREFIX = "/shared/transfers/"
SCHEMES = ("http", "https")
METHODS = ("GET", "POST")


def check_app_id(app_id: object) -> str:
    if not isinstance(app_id, str) or not APP_ID.fullmatch(app_id):
        raise TransferError(f"invalid app id {app_id!r}: expected [a-z0-9][a-z0-9_.-]{{0,62}}")
    return app_id


def check_sandbox_path(path: str, field: str) -> tuple[str, ...]:
    """The parts below ``/shared/transfers`` of a sandbox path; refuse any way out."""
    if "\x00" in path:
        raise SandboxError(f"{field} contains a NUL byte")
    if not path.startswith(SANDBOX_PREFIX):
        raise SandboxError(f"{field} {path!r} is outside the sandbox: it must start with {SANDBOX_PREFIX}")
    parts = tuple(p for p in path[len(SANDBOX_PREFIX):].split("/") if p not in ("", "."))
    if any(p == ".." for p in parts):
        raise SandboxError(f"{field} {path!r} uses '..'")
    if not parts:
        raise SandboxError(f"{field} {path!r} names the sandbox root, not a file")
    if any(len(p.encode()) > 255 for p in parts) or len(path.encode()) > 4000:
        raise TransferError(f"{field} {path!r} is too long")
    return parts


def check_url(url: object, field: str = "request_uri") -> str:
    if not isinstance(url, str) or not url:
        raise TransferError(f"{field} is missing")
    if any(c in url for c in "\r\n\x00 \t"):
        raise TransferError(f"{field} contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise TransferError(f"{field} {url!r} is not a valid URL: {exc}") from None
    if parts.scheme.lower() not in SCHEMES:
        raise NotSupportedError(
            f"{field} scheme {parts.scheme or '(none)'!r} is not supported: use http or https"
        )
    if not parts.hostname:
        raise TransferError(f"{field} {url!r} has no host")
    return url


def check_headers(headers: object, settings: Settings) -> dict[str, str]:
    if not isinstance(headers, Mapping):
        raise TransferError(f"headers must be a mapping of name to value, got {type(headers).__name__}")
    if len(headers) > settings.max_headers:
        raise TransferError(f"too many headers: {len(headers)} (at most {settings.max_headers})")
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TransferError(f"header {name!r} must have a string name and value")
        key = name.strip().lower()
        if key in RESERVED_HEADERS:
            raise NotSupportedError(f"header {name!r} is reserved: the service sets it to resume")
        if key in FRAMING_HEADERS:
            raise NotSupportedError(f"header {name!r} is set by the service")
        if not TOKEN.fullmatch(name):
            raise TransferError(f"header name {name!r} is not a valid HTTP header name")
        if any(c in value for c in "\r\n\x00"):
            raise TransferError(f"header {name!r} contains CR, LF or NUL")
        size = len(name.encode()) + len(value.encode())
        if size > settings.max_header_bytes:
            raise TransferError(f"header {name!r} is {size} bytes (at most {settings.max_header_bytes})")
    return dict(headers)


@dataclasses.dataclass(frozen=True)
class Checked:
    """A request that passed the add-time rules, in the form the store keeps."""

    method: str
    url: str
    headers: dict[str, str]
    preferences: TransferPreferences
    direction: Literal["download", "upload"]
    local_parts: tuple[str, ...]  # below the sandbox root
    tag: str | None
    expected_sha256: str | None
    form_fields: dict[str, str] | None
    refresh_task: str | None = None
    url_expires_at: float | None = None


TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def check_refresh(task: object, expires_at: object) -> tuple[str | None, float | None]:
    """A URL refresh task's name (dotted identifiers) and the URL's expiry (a finite unix time)."""
    if task is not None and (not isinstance(task, str) or len(task) > 200 or not TASK_NAME.fullmatch(task)):
        raise TransferError(f"refresh_task {task!r} must be a Celery task name (dotted identifiers)")
    if expires_at is not None and (isinstance(expires_at, bool) or not isinstance(expires_at, (int, float))
                                   or not math.isfinite(expires_at)):
        raise TransferError(f"url_expires_at {expires_at!r} must be a unix time (a number)")
    return task, None if expires_at is None else float(expires_at)


def check_request(req: BackgroundTransferRequest, settings: Settings) -> Checked:
    """Rules 1, 2 (syntax), 3, 4, 6 (the parts without counts); raise on the first breach."""
    if not isinstance(req.request_id, str) or not REQUEST_ID.fullmatch(req.request_id):
        raise TransferError(f"invalid request_id {req.request_id!r}: expected 32 hex digits")
    url = check_url(req.request_uri)
    if not isinstance(req.method, str) or req.method.upper() not in METHODS:
        raise NotSupportedError(f"method {req.method!r} is not supported: use GET or POST")
    method = req.method.upper()
    down, up = req.download_location, req.upload_location
    for field, value in (("download_location", down), ("upload_location", up)):
        if value is not None and not isinstance(value, str):
            raise TransferError(f"{field} must be a string")
    if method == "GET" and (down is None or up is not None):
        raise TransferError("a GET request needs download_location and no upload_location")
    if method == "POST" and (down is None) == (up is None):
        raise TransferError("a POST request needs exactly one of upload_location or download_location")
    direction: Literal["download", "upload"] = "upload" if up is not None else "download"
    parts = check_sandbox_path(up if up is not None else down, f"{direction}_location")
    headers = check_headers(req.headers, settings)
    try:
        prefs = TransferPreferences(req.transfer_preferences)
    except ValueError:
        raise TransferError(f"invalid transfer_preferences {req.transfer_preferences!r}") from None
    if req.tag is not None and (not isinstance(req.tag, str) or len(req.tag) > settings.max_tag_chars):
        raise TransferError(f"tag must be a string of at most {settings.max_tag_chars} characters")
    sha = req.expected_sha256
    if sha is not None and (not isinstance(sha, str) or not SHA256.fullmatch(sha.lower())):
        raise TransferError("expected_sha256 must be 64 hex digits")
    form = check_form_fields(req.form_fields, direction, settings)
    if form is not None and any(k.strip().lower() == "content-type" for k in headers):
        raise NotSupportedError("header 'Content-Type' is set by the service for a form upload")
    refresh = check_refresh(getattr(req, "refresh_task", None), getattr(req, "url_expires_at", None))
    return Checked(method, url, headers, prefs, direction, parts, req.tag, sha.lower() if sha else None, form,
                   *refresh)


def check_form_fields(fields: object, direction: str, settings: Settings) -> dict[str, str] | None:
    """Fields of a multipart upload: token names (not "file", the file's part), string values."""
    if fields is None:
        return None
    if direction != "upload":
        raise TransferError("form_fields are only for uploads")
    if not isinstance(fields, Mapping) or len(fields) > settings.max_headers:
        raise TransferError(f"form_fields must be a mapping of at most {settings.max_headers} fields")
    for name, value in fields.items():
        if not isinstance(name, str) or not TOKEN.fullmatch(name) or name == "file":
            raise TransferError(f"form field name {name!r} must be a token other than 'file'")
        if not isinstance(value, str) or "\x00" in value or len(value.encode()) > settings.max_header_bytes:
            raise TransferError(f"form field {name!r} must be a string without NUL of at most "
                                f"{settings.max_header_bytes} bytes")
    return dict(fields)


# ---------------------------------------------------------------- admission (rules 7-12)

Network = Literal["wifi", "cellular", "cellular-2g", "none"]
Power = Literal["external", "battery", "battery-saver"]
NETWORKS: tuple[str, ...] = ("wifi", "cellular", "cellular-2g", "none")
POWERS: tuple[str, ...] = ("external", "battery", "battery-saver")


@dataclasses.dataclass(frozen=True)
class Conditions:
    """A device's conditions; the default is the phone emulator's: Wi-Fi and external power."""

    network: Network = "wifi"
    power: Power = "external"
    roaming: bool = False
    over_data_limit: bool = False
    approaching_data_limit: bool = False
    foreground: frozenset[str] = frozenset()  # apps in the foreground now (expired ones removed)

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise TransferError(f"invalid network {self.network!r}: one of {', '.join(NETWORKS)}")
        if self.power not in POWERS:
            raise TransferError(f"invalid power {self.power!r}: one of {', '.join(POWERS)}")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """What admission needs to know of a request."""

    app_id: str
    direction: Literal["download", "upload"]
    preferences: TransferPreferences
    size: int | None  # upload: file size; download: length once a server has told it


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Literal["admit", "wait", "fail"]
    status: TransferStatus = TransferStatus.WAITING
    reason: str = "admitted"  # one of a fixed set: it is also a metrics label
    preferences: TransferPreferences | None = None  # rule 9 may change them
    detail: str | None = None  # the request's error message, with its numbers, for a failure


ADMIT = Decision("admit", TransferStatus.TRANSFERRING)


def _wait(status: TransferStatus, reason: str, prefs: TransferPreferences | None = None) -> Decision:
    return Decision("wait", status, reason, prefs)


def decide(c: Candidate, cond: Conditions, s: Settings) -> Decision:
    """Admit, wait (with the exact status and a reason) or fail one request: rules 7-10."""
    S = TransferStatus
    fg = c.app_id in cond.foreground
    cellular = cond.network in ("cellular", "cellular-2g")
    on_battery = cond.power != "external"
    prefs = c.preferences
    if cond.network == "none":
        return _wait(S.WAITING, "no network")
    if cond.power == "battery-saver" and not fg:
        return _wait(S.WAITING_FOR_EXTERNAL_POWER_DUE_TO_BATTERY_SAVER_MODE, "battery saver mode")
    if cellular and prefs in (TransferPreferences.NONE, TransferPreferences.ALLOW_BATTERY):
        return _wait(S.WAITING_FOR_WIFI, "preferences need Wi-Fi")
    if on_battery and prefs in (TransferPreferences.NONE, TransferPreferences.ALLOW_CELLULAR):
        return _wait(S.WAITING_FOR_EXTERNAL_POWER, "preferences need external power")
    if cond.network == "cellular-2g" and not fg:
        return _wait(S.WAITING_FOR_NON_VOICE_BLOCKING_NETWORK, "2G only in the foreground")
    if cellular and cond.roaming:
        return _wait(S.WAITING, "roaming")
    if cellular and cond.over_data_limit and not fg:
        return _wait(S.WAITING, "over data limit")
    size = c.size
    if size is not None and c.direction == "upload":
        if size > s.max_upload_bytes:  # refused at add; the file may have grown since
            return Decision("fail", S.COMPLETED, "upload too large",
                            detail=f"upload of {size} bytes exceeds the largest allowed ({s.max_upload_bytes})")
        if cellular and size > s.max_upload_cellular_bytes:
            return _wait(S.WAITING_FOR_WIFI, "upload too large for cellular")
        if on_battery and size > s.max_upload_battery_bytes:
            return _wait(S.WAITING_FOR_EXTERNAL_POWER, "upload too large on battery")
    if size is not None and c.direction == "download":
        if cellular and size > s.max_download_cellular_bytes:
            return _wait(S.WAITING_FOR_WIFI, "download too large for cellular", TransferPreferences.ALLOW_BATTERY)
        if on_battery and size > s.max_download_battery_bytes:
            return Decision(
                "fail", S.COMPLETED, "download too large on battery",
                detail=f"download of {size} bytes exceeds {s.max_download_battery_bytes} on battery; "
                "set transfer_preferences to NONE",
            )
    return ADMIT


def size_cap(direction: str, cond: Conditions, s: Settings) -> int | None:
    """The most bytes a transfer may move under ``cond``: enforced on the stream (rule 9)."""
    cellular = cond.network in ("cellular", "cellular-2g")
    on_battery = cond.power != "external"
    if direction == "upload":
        return s.max_upload_cellular_bytes if cellular else (
            s.max_upload_battery_bytes if on_battery else s.max_upload_bytes)
    if cellular:
        return s.max_download_cellular_bytes
    return s.max_download_battery_bytes if on_battery else None


def over_quota(day_usage: Mapping[str, int], s: Settings) -> dict[str, str]:
    """The apps that moved their rolling day's quota of bytes, each with its ``wait_reason``."""
    over = {}
    for app, used in day_usage.items():
        quota = s.daily_quota(app)
        if quota and used >= quota:
            over[app] = f"daily byte quota of {int(quota)} bytes used"
    return over


def rate_share(s: Settings, on_device: int, of_app: int) -> float:
    """Bytes per second one transfer may move (0: no limit): the tightest of the per-transfer
    limit and an even share of the app's and the device's limits among the transfers that run
    or are about to (``Store.sharing``)."""
    shares = [s.max_rate_per_transfer, s.max_rate_per_app / max(of_app, 1), s.max_rate_per_device / max(on_device, 1)]
    return min((r for r in shares if r > 0), default=0.0)


def min_rate(cond: Conditions, s: Settings) -> float:
    """Bytes per second below which a transfer is paused (rule 12)."""
    return s.min_rate_cellular if cond.network.startswith("cellular") else s.min_rate_wifi


@dataclasses.dataclass(frozen=True)
class Share:
    """What ``fair_share`` picked, and the clocks to remember for the next pass."""

    picked: list[str]
    clocks: dict[str, float]  # the served apps' new clocks
    now: float  # the device's virtual time after these picks


def fair_share(
    admissible: Sequence[tuple[str, str]], clocks: Mapping[str, float], free: int,
    weights: Mapping[str, float] | None = None, now: float = 0.0,
) -> Share:
    """Pick up to ``free`` request ids: arrival order within an app, and across apps the one
    with the lowest virtual clock (ties: the earliest head), each pick moving that app's clock
    on by 1/weight (stride scheduling; weight 1 for an app not named). With equal weights this
    is round-robin; with weights 3:1 and both apps backlogged, starts split 3:1.

    ``admissible`` is (app_id, request_id) in arrival order; ``clocks`` maps an app to its clock
    (absent: 0); ``now`` is the device's virtual time, the clock of its latest pick. An app's
    clock never counts below ``now``, so an app back from idle gets its next turn soon but no
    burst of turns saved up while it was away.
    """
    weights = weights or {}
    queues: dict[str, list[str]] = {}
    for app, rid in admissible:
        queues.setdefault(app, []).append(rid)
    clock = {app: max(clocks.get(app, 0.0), now) for app in queues}
    first_seen = {app: i for i, app in enumerate(queues)}
    picked: list[str] = []
    served: set[str] = set()
    while len(picked) < free and queues:
        app = min(queues, key=lambda a: (clock[a], first_seen[a]))
        picked.append(queues[app].pop(0))
        served.add(app)
        now = clock[app]
        clock[app] += 1.0 / weights.get(app, 1.0)
        if not queues[app]:
            del queues[app]
    return Share(picked, {app: clock[app] for app in served}, now)


def backoff(attempt: int, s: Settings, retry_after: float | None = None) -> float:
    """Seconds before the next try: the server's Retry-After, else capped exponential."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), s.retry_max_seconds)
    return min(s.retry_base_seconds * 2 ** max(attempt - 1, 0), s.retry_max_seconds)


def foreground_apps(entries: Iterable[tuple[str, float]], now: float) -> frozenset[str]:
    return frozenset(app for app, until in entries if until > now)
