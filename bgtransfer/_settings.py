"""Settings: every number of the policy, with SPEC defaults, overridable by environment.

Each field ``name`` reads ``BGTRANSFER_<NAME>``; nothing else configures the service, so the
same code runs from a laptop (embedded defaults) to many hosts (env set by deploy/).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

MB = 1_000_000
KBIT = 1000 / 8  # bytes per second in one kbit/s


def _default_data_root() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "bgtransfer")


@dataclasses.dataclass(frozen=True)
class Settings:
    data_root: str = dataclasses.field(default_factory=_default_data_root)
    broker_url: str = ""  # empty: the embedded filesystem broker under data_root
    database_url: str = ""  # empty: a SQLite file under data_root
    result_backend: str = ""  # empty: a SQLite file beside the store, or the database
    device: str = "default"
    # add-time limits (rules 4-6)
    max_headers: int = 15
    max_header_bytes: int = 16 * 1024
    max_tag_chars: int = 4000
    max_outstanding_per_app: int = 25
    max_queued_per_device: int = 500
    max_upload_bytes: int = 100 * MB
    # admission (rules 8-11)
    max_concurrent_per_device: int = 2
    # fair share of the slots across apps, as "app=weight,app=weight" (unnamed apps weigh 1)
    app_weights: str = ""
    # byte quotas over a rolling day: every app's, and some apps' own as "app=bytes,..." (0: none);
    # an app over its quota waits; a transfer already running finishes
    max_daily_bytes_per_app: int = 0
    app_daily_bytes: str = ""
    max_upload_cellular_bytes: int = 5 * MB
    max_upload_battery_bytes: int = 20 * MB
    max_download_cellular_bytes: int = 20 * MB
    max_download_battery_bytes: int = 100 * MB
    # slow transfers (rule 12), in bytes per second, averaged over min_rate_window seconds
    min_rate_cellular: float = 50 * KBIT
    min_rate_wifi: float = 100 * KBIT
    min_rate_window: float = 30.0
    # leases, retries and the periodic pass
    lease_seconds: float = 30.0
    dispatch_seconds: float = 60.0  # an admitted request not claimed by then is re-dispatched
    sweep_interval: float = 5.0
    # a pool process that ends a transfer runs the next one it admits itself, with no broker
    # round trip, for this long; then it hands over through the broker (0: always hand over)
    chain_seconds: float = 10.0
    progress_interval: float = 1.0
    max_attempts: int = 20
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    # bandwidth limits in bytes per second (0: none); the app's and the device's are shared
    # evenly by their transfers on every host that run or are about to (admitted since the last
    # renewal), recounted when a transfer starts and at every progress renewal
    max_rate_per_transfer: float = 0.0
    max_rate_per_app: float = 0.0
    max_rate_per_device: float = 0.0
    # URL refresh: modules the worker imports at start (where refresh tasks live), and how long
    # before a URL's stated expiry it is refreshed rather than used
    imports: str = ""
    refresh_margin_seconds: float = 30.0
    # transport
    buffer_size: int = 1024 * 1024
    connect_timeout: float = 30.0
    ca_bundle: str = ""  # empty: the system's trusted CAs
    max_redirects: int = 10
    # uploads without form fields ask the server (OPTIONS) whether it speaks tus 1.0; if it does,
    # an interrupted upload continues at the server's offset. Off: every upload is a plain POST,
    # and servers see exactly what they saw before (no OPTIONS)
    resumable_uploads: bool = False
    # refuse destinations that are not globally routable (private, loopback, link-local, ...),
    # checked on the address actually connected to: after DNS and at every redirect
    block_private_destinations: bool = False
    # observability: 0 serves no metrics
    metrics_port: int = 0
    # Celery task events (what Flower and celery-exporter read): four more broker messages per
    # transfer, so off unless asked for, as in Celery itself
    task_events: bool = False

    def __post_init__(self) -> None:
        self.weights, self.daily_quotas  # noqa: B018 - bad values are refused when the settings are made

    @property
    def weights(self) -> dict[str, float]:
        """``app_weights`` parsed: {app: weight > 0}."""
        return _per_app(self.app_weights, "app_weights")

    @property
    def daily_quotas(self) -> dict[str, float]:
        """``app_daily_bytes`` parsed: {app: bytes > 0}."""
        return _per_app(self.app_daily_bytes, "app_daily_bytes")

    def daily_quota(self, app_id: str) -> float:
        """The bytes ``app_id`` may move in a rolling day (0: no quota)."""
        return self.daily_quotas.get(app_id, self.max_daily_bytes_per_app)

    @property
    def quotas(self) -> bool:
        return bool(self.max_daily_bytes_per_app or self.app_daily_bytes)

    @property
    def root(self) -> Path:
        return Path(self.data_root)

    @property
    def store_url(self) -> str:
        return self.database_url or f"sqlite:///{self.root / 'state.sqlite'}"

    @property
    def queue(self) -> str:
        return queue_name(self.device)


def _per_app(raw: str, name: str) -> dict[str, float]:
    """An "app=number,app=number" setting as {app: number}; every number above 0."""
    values: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        app, sep, number = item.partition("=")
        try:
            value = float(number) if sep and app.strip() else 0.0
        except ValueError:
            value = 0.0
        if not 0 < value < float("inf"):
            raise ValueError(f"{name}: {item!r} is not app=number with a number above 0")
        values[app.strip()] = value
    return values


def queue_name(device: str) -> str:
    return f"bgtransfer.{device}"


def _parse_bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def load(env: dict[str, str] | None = None, **overrides: object) -> Settings:
    """Settings from ``env`` (default ``os.environ``); ``overrides`` win over both."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for f in dataclasses.fields(Settings):
        raw = env.get(f"BGTRANSFER_{f.name.upper()}")
        if raw is None or raw == "":
            continue
        kind = type(f.default) if f.default is not dataclasses.MISSING else str
        try:
            values[f.name] = _parse_bool(raw) if kind is bool else kind(raw)
        except ValueError:
            raise ValueError(f"BGTRANSFER_{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
    values.update(overrides)
    return Settings(**values)
