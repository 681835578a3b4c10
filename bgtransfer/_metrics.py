"""Prometheus metrics, from two sources that together cover every process that decides.

- What a transfer does (bytes, completions, durations, rates, pauses, retries, resumed bytes,
  degraded servers) is counted in the worker's pool children with prometheus-client in
  multiprocess mode: ``bgtransfer worker --metrics-port`` wipes a per-worker directory,
  points ``PROMETHEUS_MULTIPROC_DIR`` at it before anything imports prometheus-client, marks
  dead children, and serves the sum of all its children on one port.
- What admission does (decisions by reason, lease reclaims) can happen in any process that
  adds, removes or changes conditions, including a client's; it is counted in the state
  store (``bgt_counters``) and read at scrape time together with the requests by status and
  the active slots. These are device-wide: every worker of a device reports the same values,
  so dashboards take ``max`` over instances for them.

Labels are device, app, direction, outcome and reason: never a request id or a URL.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ._models import TransferStatus
from ._settings import Settings

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
RATE_BUCKETS = (1e3, 1e4, 5e4, 1e5, 5e5, 1e6, 5e6, 1e7, 5e7, 1e8, 5e8, 1e9, 5e9)

BYTES = Counter("bgtransfer_transfer_bytes", "Bytes moved on the wire (body bytes, both directions).",
                ["device", "app", "direction"])
COMPLETIONS = Counter("bgtransfer_completions", "Requests that reached COMPLETED, by outcome.",
                      ["device", "app", "direction", "outcome"])
DURATION = Histogram("bgtransfer_transfer_duration_seconds", "From add to COMPLETED, waiting included.",
                     ["device", "direction", "outcome"], buckets=DURATION_BUCKETS)
RATE = Histogram("bgtransfer_transfer_rate_bytes_per_second", "Average rate of each attempt that moved bytes.",
                 ["device", "direction"], buckets=RATE_BUCKETS)
PAUSES = Counter("bgtransfer_pauses", "Transfers paused: by the app, or below the minimum rate.",
                 ["device", "app", "reason"])
RETRIES = Counter("bgtransfer_retries", "Attempts that ended to be tried again later, by cause.",
                  ["device", "app", "reason"])
RESUMED = Counter("bgtransfer_resumed_bytes", "Bytes not fetched again because a download resumed.",
                  ["device", "app"])
DEGRADED = Counter("bgtransfer_degraded_downloads", "Completed downloads whose server lacked Range, "
                   "Content-Length or a validator (rule 14).", ["device", "app", "reason"])

_DEGRADATIONS = {"server ignores Range": "no_range", "no Content-Length": "no_content_length",
                 "no validator": "no_validator"}


def retry_reason(error: str | None, status_code: int | None) -> str:
    """A small fixed set of causes, so the label never carries free text."""
    if status_code in (408, 429):
        return f"http_{status_code}"
    if status_code is not None and status_code >= 500:
        return "http_5xx"
    text = error or ""
    for prefix, reason in (("curl error", "network"), ("received ", "short_body"), ("range", "range"),
                           ("server answered", "range"), ("state store", "store"), ("local file", "disk"),
                           ("internal", "internal"), ("a previous attempt", "busy"), ("lease", "lease")):
        if text.startswith(prefix):
            return reason
    return "other"


def observe(row: dict[str, Any], kind: str, out: Any, elapsed: float, now: float) -> None:
    """Count one finished attempt of ``row`` whose outcome became ``kind``."""
    device, app, direction = row["device"], row["app_id"], row["direction"]
    BYTES.labels(device, app, direction).inc(0)  # the series exists from the first attempt on
    if out.resumed_from:
        RESUMED.labels(device, app).inc(out.resumed_from)
    if out.moved and elapsed > 0:
        RATE.labels(device, direction).observe(out.moved / elapsed)
    if kind in ("retry", "requeue"):
        RETRIES.labels(device, app, retry_reason(out.error, out.status_code)).inc()
    elif kind == "refreshed":
        RETRIES.labels(device, app, "url_refresh").inc()
    elif kind in ("slow", "paused"):
        PAUSES.labels(device, app, "min_rate" if kind == "slow" else "app").inc()
    elif kind in ("completed", "failed", "cancelled"):
        COMPLETIONS.labels(device, app, direction, kind).inc()
        DURATION.labels(device, direction, kind).observe(max(now - row["created_at"], 0.0))
        if kind == "completed" and out.degraded:
            for text in out.degraded.split(", "):
                if text in _DEGRADATIONS:
                    DEGRADED.labels(device, app, _DEGRADATIONS[text]).inc()


class StoreCollector:
    """Device-wide figures read from the state store at each scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        from ._celery import pass_lock  # a scrape must not overlap a fork of the pool
        from ._service import store_for
        from ._store import counters, requests

        s, device = self.settings, self.settings.device
        try:
            with pass_lock, store_for(s).tx(read=True) as conn:
                by_status = conn.execute(
                    sa.select(requests.c.app_id, requests.c.status, sa.func.count())
                    .where(requests.c.device == device, requests.c.removed.is_(False))
                    .group_by(requests.c.app_id, requests.c.status)).all()
                active = conn.execute(sa.select(sa.func.count()).where(
                    requests.c.device == device, requests.c.phase.in_(("admitted", "running")))).scalar()
                counts = conn.execute(sa.select(counters.c.metric, counters.c.decision, counters.c.reason,
                                                counters.c.value).where(counters.c.device == device)).all()
            with pass_lock:
                day = store_for(s).day_usage(device) if s.quotas else {}
        except sa.exc.SQLAlchemyError:  # the store is down: say so, and keep the workers' own series
            yield _gauge("bgtransfer_store_up", "1 if the state store answered this scrape.", device, 0)
            return
        yield _gauge("bgtransfer_store_up", "1 if the state store answered this scrape.", device, 1)
        g = GaugeMetricFamily("bgtransfer_requests", "Requests stored now, by status (COMPLETED until removed).",
                              labels=["device", "app", "status"])
        stored = {(app, status): n for app, status, n in by_status}
        for app in sorted({app for app, _ in stored}):  # every status of a known app, 0 included: no gaps
            for status in TransferStatus:
                g.add_metric([device, app, status.value], stored.get((app, status.value), 0))
        yield g
        yield _gauge("bgtransfer_device_active_transfers", "Slots held now (admitted or running).", device, active)
        yield _gauge("bgtransfer_device_max_concurrent_transfers", "The device's cap of concurrent transfers.",
                     device, s.max_concurrent_per_device)
        decisions = CounterMetricFamily("bgtransfer_admission_decisions", "Admission verdicts, by decision "
                                        "and reason.", labels=["device", "decision", "reason"])
        reclaims = CounterMetricFamily("bgtransfer_lease_reclaims", "Slots taken back from expired leases "
                                       "(a dead or stuck worker).", labels=["device"])
        reclaimed = 0
        for metric, decision, reason, value in counts:
            if metric == "decision":
                decisions.add_metric([device, decision, reason], value)
            else:
                reclaimed += value
        reclaims.add_metric([device], reclaimed)
        yield decisions
        yield reclaims
        if s.quotas:  # quota use: bytes in the rolling day against each app's quota
            used = GaugeMetricFamily("bgtransfer_app_daily_bytes", "Bytes an app moved in the last 24 hours "
                                     "(counted for its quota).", labels=["device", "app"])
            quota = GaugeMetricFamily("bgtransfer_app_daily_quota_bytes", "An app's byte quota for a rolling "
                                      "day.", labels=["device", "app"])
            for app in sorted({*day, *s.daily_quotas}):
                used.add_metric([device, app], day.get(app, 0))
                quota.add_metric([device, app], s.daily_quota(app))
            yield used
            yield quota


def _gauge(name: str, doc: str, device: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["device"])
    g.add_metric([device], value)
    return g


def serve(settings: Settings, port: int) -> None:
    """Serve the sum over this worker's children plus the store's device-wide figures."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    registry.register(StoreCollector(settings))  # type: ignore[arg-type]
    start_http_server(port, addr=os.environ.get("BGTRANSFER_METRICS_ADDR", "0.0.0.0"), registry=registry)


def child_exited(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
