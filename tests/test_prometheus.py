"""The dashboard and the alert rules against a real Prometheus scraping a real worker.

A worker (concurrency 2) serves its metrics on 127.0.0.1; Prometheus scrapes it every second
and evaluates deploy/prometheus/alerts.yml every second. Real transfers, chosen so that every
series bgtransfer exports appears, go through it: downloads from three apps, a dropped one, one
from a server ignoring Range, one refused once with 503, an upload, a 404, one paused and
resumed by its app, one removed while running, and one held by cellular conditions. Then:

- the counters in Prometheus equal what the test server saw moving and what the state store
  says ended, by outcome;
- every expression of the Grafana dashboard evaluates to a non-empty result;
- every alert rule evaluates without error and Prometheus reports it healthy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import yaml

from bgtransfer import BackgroundTransferRequest, TransferStatus
from tests.conftest import Deployment, wait_for
from tests.httpserver import FileServer

ROOT = Path(__file__).resolve().parent.parent
ALERTS_YML = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "grafana" / "dashboards" / "bgtransfer.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
WAIT = 60.0  # the bound of every wait

pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A real Prometheus process on 127.0.0.1, its HTTP API, and its end by pid."""

    def __init__(self, tmp: Path, target_port: int) -> None:
        self.tmp, self.port = tmp, free_port()
        shutil.copy(ALERTS_YML, tmp / "alerts.yml")
        config = {  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "bgtransfer", "static_configs": [
                {"targets": [f"127.0.0.1:{target_port}"]}]}],
        }
        (tmp / "prometheus.yml").write_text(json.dumps(config, indent=2))
        self.log = tmp / "prometheus.log"
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            cwd=tmp, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def get(self, path: str, **params: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}{path}"
        data = urllib.parse.urlencode(params).encode() if params else None
        try:
            with urllib.request.urlopen(url, data=data, timeout=10) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as exc:  # a bad query answers 400 with a JSON error
            return json.load(exc)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited:\n{self.log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> dict[str, Any]:
        """The whole answer of an instant query: status, and data or error."""
        return self.get("/api/v1/query", query=expr)

    def vector(self, expr: str) -> dict[tuple[str, ...], float]:
        """An instant vector as {label values in label-name order: value}."""
        answer = self.query(expr)
        assert answer["status"] == "success", (expr, answer)
        return {tuple(v for _, v in sorted(r["metric"].items())): float(r["value"][1])
                for r in answer["data"]["result"]}

    def value(self, expr: str) -> float | None:
        found = self.vector(expr)
        assert len(found) <= 1, (expr, found)
        return next(iter(found.values()), None)


@contextlib.contextmanager
def running_prometheus(tmp: Path, target_port: int) -> Iterator[Prometheus]:
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip(f"no Prometheus server at {PROMETHEUS} (Debian/Ubuntu: apt-get install prometheus)")
    prom = Prometheus(tmp, target_port)
    try:
        wait_for(prom.ready, WAIT, 0.1, "prometheus ready")
        yield prom
    finally:
        prom.stop()


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(device: str) -> dict[str, str]:
    """Each panel target's expression, with Grafana's variables replaced as Grafana would."""
    out = {}
    for panel in dashboard()["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            for t in p.get("targets", []):
                expr = t["expr"].replace("$device", device).replace("$app", ".*")
                expr = re.sub(r"\$__(rate_interval|interval|range)\b", "1m", expr)
                assert "$" not in expr, f"unknown variable in {t['expr']}"
                out[f"{p['title']} [{t['refId']}]"] = expr
    return out


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS_YML.read_text())["groups"] for r in g["rules"]]


def download(dep: Deployment, srv: FileServer, app: str, path: str, **kw: Any) -> BackgroundTransferRequest:
    req = BackgroundTransferRequest(srv.url(path), download_location=f"/shared/transfers{path}", **kw)
    dep.service(app).add(req)
    return req


def wire_bytes(srv: FileServer, path: str) -> int:
    """Body bytes the server sent for ``path``: the file's content (what it counts), plus the
    short text body of each error answer (``404 Not Found\\n``), which libcurl counts as
    downloaded too: the engine reports SIZE_DOWNLOAD, whatever the status."""
    errors = sum(len(f"{r.status} {BaseHTTPRequestHandler.responses[r.status][0]}\n")
                 for r in srv.requests_for(path) if r.status >= 400)
    return srv.bytes_sent(path) + errors


def received(dep: Deployment, app: str, req: BackgroundTransferRequest, more_than: int) -> Any:
    svc = dep.service(app)
    return wait_for(lambda: (r := svc.find(req.request_id)) and r.bytes_received > more_than, WAIT, 0.02,
                    f"{req.request_uri}: more than {more_than} bytes")


def test_dashboard_and_alerts_on_a_real_prometheus(deployment: Deployment, server: FileServer,
                                                   tmp_path: Path) -> None:
    dev = deployment.device
    files = {  # path: (app, size)
        "/a1.bin": ("alpha", 300_000), "/drop.bin": ("alpha", 1_000_000), "/busy.bin": ("alpha", 50_000),
        "/b1.bin": ("beta", 500_000), "/norange.bin": ("beta", 600_000), "/wifi.bin": ("beta", 100_000),
        "/paused.bin": ("gamma", 2_000_000), "/cancel.bin": ("gamma", 2_000_000),
    }
    for path, (_, size) in files.items():
        server.put(path, os.urandom(size))
    server.behave("/drop.bin", drop_after=400_000)  # a retry (network or short_body), then a resume
    server.behave("/norange.bin", ignore_range=True, drop_after=200_000)  # restarts from zero: no_range
    server.behave("/busy.bin", status_sequence=[(503, {"Retry-After": "0"})])  # a retry: http_5xx
    server.behave("/paused.bin", rate=400_000)
    server.behave("/cancel.bin", rate=200_000)
    upload = os.urandom(300_000)
    (deployment.sandbox("beta") / "up.bin").write_bytes(upload)

    metrics_port = free_port()
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    with running_prometheus(prom_dir, metrics_port) as prom:
        deployment.worker(concurrency=2, BGTRANSFER_METRICS_PORT=str(metrics_port),
                          BGTRANSFER_METRICS_ADDR="127.0.0.1",
                          BGTRANSFER_MAX_DAILY_BYTES_PER_APP=str(10**10))  # quota use shows too

        # -- transfers that run to their end at once
        batch = [
            ("alpha", download(deployment, server, "alpha", "/a1.bin")),
            ("alpha", download(deployment, server, "alpha", "/drop.bin")),
            ("alpha", download(deployment, server, "alpha", "/busy.bin")),
            ("alpha", download(deployment, server, "alpha", "/missing.bin")),  # 404: failed
            ("beta", download(deployment, server, "beta", "/b1.bin")),
            ("beta", download(deployment, server, "beta", "/norange.bin")),
        ]
        up = BackgroundTransferRequest(server.url("/up"), "POST", upload_location="/shared/transfers/up.bin")
        deployment.service("beta").add(up)
        batch.append(("beta", up))
        ended = {req.request_id: deployment.wait_done(app, req.request_id, WAIT) for app, req in batch}
        errors = {r.request_uri.rsplit("/", 1)[1]: r.transfer_error for r in ended.values() if r.transfer_error}
        assert errors == {"missing.bin": "HTTP 404"}

        # -- paused by its app mid-transfer, resumed at full speed
        gamma = deployment.service("gamma")
        paused = download(deployment, server, "gamma", "/paused.bin")
        received(deployment, "gamma", paused, 200_000)
        gamma.pause(paused)
        wait_for(lambda: gamma.find(paused.request_id).transfer_status == TransferStatus.PAUSED, WAIT, 0.02,
                 "paused")
        server.behave("/paused.bin")
        gamma.resume(paused)
        assert deployment.wait_done("gamma", paused.request_id, WAIT).transfer_error is None

        # -- removed by its app while running: cancelled
        cancel = download(deployment, server, "gamma", "/cancel.bin")
        received(deployment, "gamma", cancel, 100_000)
        gamma.remove(cancel)

        # -- held by the conditions: cellular, and the default preferences need Wi-Fi
        beta = deployment.service("beta")
        beta.set_conditions(network="cellular")
        held = download(deployment, server, "beta", "/wifi.bin")
        wait_for(lambda: beta.find(held.request_id).transfer_status == TransferStatus.WAITING_FOR_WIFI, WAIT,
                 0.05, "WAITING_FOR_WIFI")

        # Prometheus has scraped all of it once the cancellation and the waiting request show
        wait_for(lambda: prom.value(f'sum(bgtransfer_completions_total{{device="{dev}", outcome="cancelled"}})')
                 == 1 and prom.value(f'sum(bgtransfer_requests{{device="{dev}", status="WAITING_FOR_WIFI"}})')
                 == 1, WAIT, 0.25, "prometheus to scrape the cancellation and the waiting request")

        # (2) every dashboard expression has data (a series seen only once has no rate yet: retry)
        for title, expr in dashboard_exprs(dev).items():
            def has_data(expr: str = expr, title: str = title) -> Any:
                answer = prom.query(expr)
                assert answer["status"] == "success", (title, expr, answer)
                return answer["data"]["result"]

            wait_for(has_data, 15, 0.5, f"data for the panel {title}: {expr}")

        # (3) every alert rule evaluates, and Prometheus evaluates them all without error
        names = [r["alert"] for r in alert_rules()]
        for rule in alert_rules():
            answer = prom.query(rule["expr"])
            assert answer["status"] == "success", (rule["alert"], answer)
        assert prom.vector(next(r["expr"] for r in alert_rules() if r["alert"] == "BgtransferNoWorkerUp")) == {}

        def rules_healthy() -> Any:
            groups = prom.get("/api/v1/rules")["data"]["groups"]
            found = {r["name"]: r for g in groups for r in g["rules"]}
            return sorted(found) == sorted(names) and all(r["health"] == "ok" for r in found.values())

        wait_for(rules_healthy, WAIT, 0.25, "every rule evaluated with health ok")

        # -- back on Wi-Fi: the held request runs
        beta.set_conditions(network="wifi")
        assert deployment.wait_done("beta", held.request_id, WAIT).transfer_error is None
        wait_for(lambda: prom.value(f'sum(bgtransfer_completions_total{{device="{dev}"}})') == 10, WAIT, 0.25,
                 "prometheus to scrape the last completion")
        # the store's series come from the same scrape as the last completion, or a later one
        wait_for(lambda: prom.value(f'max(bgtransfer_device_active_transfers{{device="{dev}"}})') == 0, WAIT, 0.25,
                 "no slot held")

        # (1) the counters are what moved and what ended
        assert server.wait_idle(10)
        paths = {**files, "/missing.bin": ("alpha", 0)}
        sent = {app: sum(wire_bytes(server, p) for p, (a, _) in paths.items() if a == app)
                for app in ("alpha", "beta", "gamma")}
        moved = prom.vector(f'sum by (app, direction) (bgtransfer_transfer_bytes_total{{device="{dev}"}})')
        assert moved[("alpha", "download")] == sent["alpha"]
        assert moved[("beta", "download")] == sent["beta"]
        assert moved[("beta", "upload")] == len(upload) == len(server.uploads[-1].body)
        # An attempt stopped by the client (pause, remove) cannot know what the server had already
        # written into the socket: the count covers at least every byte of the paused file.
        assert files["/paused.bin"][1] <= moved[("gamma", "download")] <= sent["gamma"]

        outcomes = prom.vector(f'sum by (app, direction, outcome) (bgtransfer_completions_total{{device="{dev}"}})')
        assert outcomes == {
            ("alpha", "download", "completed"): 3, ("alpha", "download", "failed"): 1,
            ("beta", "download", "completed"): 3, ("beta", "upload", "completed"): 1,
            ("gamma", "download", "completed"): 1, ("gamma", "download", "cancelled"): 1,
        }
        durations = prom.vector(
            f'sum by (outcome) (bgtransfer_transfer_duration_seconds_count{{device="{dev}"}})')
        assert durations == {("completed",): 8, ("failed",): 1, ("cancelled",): 1}
        stored = prom.vector(f'max by (app, status) (bgtransfer_requests{{device="{dev}"}} > 0)')
        assert prom.value(f'count(bgtransfer_requests{{device="{dev}"}})') == 3 * 10  # every status, no gaps
        assert prom.value(f'max(bgtransfer_store_up{{device="{dev}"}})') == 1
        assert stored == {("alpha", "COMPLETED"): 4, ("beta", "COMPLETED"): 4, ("gamma", "COMPLETED"): 1}
        assert prom.value(f'max(bgtransfer_device_max_concurrent_transfers{{device="{dev}"}})') == 2

        # the retries, pauses, resumes and degradations the misbehaving server caused
        retries = prom.vector(f'sum by (app, reason) (bgtransfer_retries_total{{device="{dev}"}})')
        assert retries.get(("alpha", "http_5xx")) == 1
        assert retries.get(("alpha", "network"), 0) + retries.get(("alpha", "short_body"), 0) == 1
        assert retries.get(("beta", "network"), 0) + retries.get(("beta", "short_body"), 0) == 1
        assert prom.vector(f'sum by (app, reason) (bgtransfer_pauses_total{{device="{dev}"}})') == {
            ("gamma", "app"): 1}
        resumed = prom.vector(f'sum by (app) (bgtransfer_resumed_bytes_total{{device="{dev}"}})')
        resumed_at = [r.range_start for r in server.requests_for("/paused.bin") if r.range_start]
        assert resumed == {("alpha",): 400_000, ("gamma",): resumed_at[-1]}
        assert prom.vector(f'sum by (app, reason) (bgtransfer_degraded_downloads_total{{device="{dev}"}})') == {
            ("beta", "no_range"): 1}
        decisions = prom.vector(
            f'max by (decision, reason) (bgtransfer_admission_decisions_total{{device="{dev}"}})')
        assert decisions[("wait", "preferences need Wi-Fi")] >= 1
        assert decisions[("admit", "admitted")] >= 10
        assert prom.value(f'max(bgtransfer_lease_reclaims_total{{device="{dev}"}})') == 0
        rates = prom.vector(f'sum by (direction) (bgtransfer_transfer_rate_bytes_per_second_count{{device="{dev}"}})')
        assert rates[("download",)] >= 9 and rates[("upload",)] == 1
        assert prom.value('sum(up{job="bgtransfer"})') == 1
