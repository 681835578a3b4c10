"""The ``bgtransfer`` command: run workers and manage requests from a shell.

Errors print one line (``error: ...``) and exit 1; ``add --wait`` exits 1 when the transfer
ends with an error, 0 when it completes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

import click

from . import _policy as policy
from ._exceptions import TransferError
from ._models import BackgroundTransferRequest, TransferPreferences, TransferStatus
from ._service import BackgroundTransferService
from ._settings import Settings, load

APP = click.option("--app", "app_id", default=lambda: os.environ.get("BGTRANSFER_APP", "default"),
                   show_default="$BGTRANSFER_APP or default", help="The app (tenant) the requests belong to.")
DEVICE = click.option("--device", default=None, help="The device (transfer pool); default $BGTRANSFER_DEVICE.")
PREFS = {p.value.lower().replace("_", "-"): p for p in TransferPreferences}


class _Group(click.Group):
    """Turn the service's errors into one clear line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (TransferError, ValueError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
def main() -> None:
    """Background HTTP/HTTPS file transfers as Celery tasks."""


def _run_worker(device: str | None, concurrency: int | None, loglevel: str, metrics_port: int | None) -> None:
    if device:
        os.environ["BGTRANSFER_DEVICE"] = policy.check_app_id(device)  # same syntax as app ids
    if metrics_port is not None:
        os.environ["BGTRANSFER_METRICS_PORT"] = str(metrics_port)
    s = load()
    if s.metrics_port:
        _prepare_multiprocess(s)
    from ._celery import app

    argv = ["worker", "-Q", s.queue, "-n", f"{s.device}.%h.{os.getpid()}", "-l", loglevel,
            "-c", str(concurrency or s.max_concurrent_per_device + 2), "--without-gossip", "--without-mingle"]
    app.worker_main(argv)


def _prepare_multiprocess(s: Settings) -> None:
    """A fresh, empty metrics directory for this worker's children, set before prometheus-client
    is imported (it chooses multiprocess mode at import)."""
    path = os.path.join(s.data_root, "metrics", f"{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


def _worker_options(command: Any) -> Any:
    """The options ``serve`` and ``worker`` share."""
    for option in reversed([
        DEVICE,
        click.option("--concurrency", type=int, default=None, help="Worker processes (default: the device cap + 2)."),
        click.option("--metrics-port", type=int, default=None,
                     help="Serve Prometheus metrics on this port (default $BGTRANSFER_METRICS_PORT; 0: none)."),
        click.option("--loglevel", default="INFO"),
    ]):
        command = option(command)
    return command


@main.command()
@_worker_options
@click.option("--http-port", type=int, default=None,
              help="Also serve the ops HTTP API on this port (0: any free port; default: no HTTP API).")
@click.option("--http-host", default="127.0.0.1", show_default=True, help="Address for the ops HTTP API.")
def serve(device: str | None, concurrency: int | None, metrics_port: int | None, loglevel: str,
          http_port: int | None, http_host: str) -> None:
    """Run a whole device on this machine (embedded defaults: no server needed)."""
    s = load()
    click.echo(f"bgtransfer: data root {s.root}, state {s.store_url.split('://')[0]}, "
               f"broker {s.broker_url or 'filesystem (embedded)'}", err=True)
    api = None if http_port is None else _start_http(http_host, http_port, device, loglevel)
    try:
        _run_worker(device, concurrency, loglevel, metrics_port)
    finally:
        if api is not None:
            _stop(api)


def _start_http(host: str, port: int, device: str | None, loglevel: str) -> subprocess.Popen[bytes]:
    """The ops HTTP API beside the worker: `bgtransfer http` in a child process (so Celery's pool
    never forks a process with a server thread in it), on a socket bound here so a busy port or a
    bad token setting fails before the worker starts."""
    from . import _httpapi

    _httpapi.load_tokens()
    if device:
        policy.check_app_id(device)
    sock = _httpapi.bind(host, port)
    with sock:
        args = ["--fd", str(sock.fileno()), "--parent-pid", str(os.getpid()), "--loglevel", loglevel]
        proc = subprocess.Popen([sys.executable, "-m", "bgtransfer", "http", *args,
                                 *(["--device", device] if device else [])], pass_fds=[sock.fileno()])
        click.echo(f"bgtransfer: ops HTTP API on {_httpapi.url_of(sock)}", err=True)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=9800, show_default=True, help="Port to listen on (0: any free port).")
@DEVICE
@click.option("--loglevel", default="INFO")
@click.option("--fd", type=int, default=None, hidden=True, help="A listening socket inherited from serve.")
@click.option("--parent-pid", type=int, default=None, hidden=True, help="Exit when this parent is gone.")
def http(host: str, port: int, device: str | None, loglevel: str, fd: int | None,
         parent_pid: int | None) -> None:
    """Serve the ops HTTP API (JSON, OpenAPI at /openapi.json) for a device.

    Tokens: BGTRANSFER_HTTP_TOKENS="app=token,..." (or BGTRANSFER_HTTP_TOKENS_FILE, one app=token
    a line); only BGTRANSFER_HTTP_ADMIN_TOKEN may change device conditions.
    """
    from . import _httpapi

    if device:
        policy.check_app_id(device)
    tokens = _httpapi.load_tokens()  # refuse a bad setting before binding
    if fd is not None:
        sock = socket.socket(fileno=fd)
    else:
        sock = _httpapi.bind(host, port)
        click.echo(f"bgtransfer: ops HTTP API on {_httpapi.url_of(sock)}", err=True)
    _httpapi.serve(sock, tokens, device=device, log_level=loglevel, parent_pid=parent_pid)


@main.command()
@_worker_options
def worker(device: str | None, concurrency: int | None, metrics_port: int | None, loglevel: str) -> None:
    """Run a Celery worker for one device."""
    _run_worker(device, concurrency, loglevel, metrics_port)


def _line(r: BackgroundTransferRequest) -> str:
    if r.upload_location:
        done, total, where = r.bytes_sent, r.total_bytes_to_send, r.upload_location
    else:
        done, total, where = r.bytes_received, r.total_bytes_to_receive, r.download_location
    extra = r.transfer_error or r.wait_reason or ""
    return f"{r.request_id}  {r.transfer_status.value:<12} {done}/{total if total is not None else '?'}  " \
           f"{r.method} {r.request_uri} {where}  {extra}".rstrip()


@main.command()
@click.argument("url")
@click.argument("path")
@APP
@click.option("--method", type=click.Choice(["GET", "POST"], case_sensitive=False), default=None)
@click.option("--upload", is_flag=True, help="PATH is the file to send (POST).")
@click.option("--header", "headers", multiple=True, help='A header "Name: value" (repeatable).')
@click.option("--preferences", type=click.Choice(list(PREFS)), default="none")
@click.option("--tag", default=None)
@click.option("--sha256", default=None, help="Expected sha256 of the download.")
@click.option("--wait", is_flag=True, help="Return when the request completes; exit 1 if it failed.")
def add(url: str, path: str, app_id: str, method: str | None, upload: bool, headers: tuple[str, ...],
        preferences: str, tag: str | None, sha256: str | None, wait: bool) -> None:
    """Add a transfer; prints its id."""
    hdrs: dict[str, str] = {}
    for h in headers:
        name, sep, value = h.partition(":")
        if not sep:
            raise TransferError(f"header {h!r} is not of the form 'Name: value'")
        hdrs[name.strip()] = value.strip()
    req = BackgroundTransferRequest(
        url, (method or ("POST" if upload else "GET")).upper(),
        download_location=None if upload else path, upload_location=path if upload else None,
        headers=hdrs, transfer_preferences=PREFS[preferences], tag=tag, expected_sha256=sha256,
    )
    svc = BackgroundTransferService(app_id)
    svc.add(req)
    click.echo(req.request_id)
    if wait:
        final = _follow(svc, req.request_id, quiet=True)
        click.echo(_line(final))
        if final.transfer_error:
            sys.exit(1)


def _follow(svc: BackgroundTransferService, request_id: str, quiet: bool) -> BackgroundTransferRequest:
    last = ""
    while True:
        r = svc.find(request_id)
        if r is None:
            raise TransferError(f"request {request_id} was removed")
        line = _line(r)
        if not quiet and line != last:
            click.echo(line)
            last = line
        if r.transfer_status == TransferStatus.COMPLETED:
            return r
        time.sleep(0.2)


@main.command(name="list")
@APP
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_(app_id: str, as_json: bool) -> None:
    """List the app's requests."""
    for r in BackgroundTransferService(app_id).requests:
        click.echo(json.dumps(r.to_dict()) if as_json else _line(r))


@main.command()
@click.argument("request_id")
@APP
@click.option("--follow", is_flag=True, help="Print each change until the request completes.")
def show(request_id: str, app_id: str, follow: bool) -> None:
    """Show one request (as JSON), or follow it."""
    svc = BackgroundTransferService(app_id)
    if follow:
        _follow(svc, request_id, quiet=False)
        return
    r = svc.find(request_id)
    if r is None:
        raise TransferError(f"no request {request_id!r} for app {app_id!r}")
    click.echo(json.dumps(r.to_dict(), indent=2))


def _simple(name: str, verb: str, doc: str) -> None:
    @main.command(name=name, help=doc)
    @click.argument("request_id")
    @APP
    def command(request_id: str, app_id: str) -> None:
        getattr(BackgroundTransferService(app_id), verb)(request_id)
        click.echo(f"{name}: {request_id}")


_simple("remove", "remove", "Cancel and forget a request (partial data is deleted).")
_simple("pause", "pause", "Pause a request, keeping the bytes held.")
_simple("resume", "resume", "Resume a paused request.")


def _table(reqs: list[BackgroundTransferRequest], rates: dict[str, float]) -> Any:
    """Every request with a progress bar, rate, ETA and status (rich renders it in place)."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    table = Table(expand=True)
    for column in ("id", "app", "status", "progress", "bytes", "rate", "ETA", "target / reason"):
        table.add_column(column, no_wrap=column != "target / reason")
    for r in reqs:
        up = r.upload_location is not None
        done, total = (r.bytes_sent, r.total_bytes_to_send) if up else (r.bytes_received, r.total_bytes_to_receive)
        rate = rates.get(r.request_id, 0.0)
        eta = f"{(total - done) / rate:.0f} s" if rate > 0 and total else ""
        bar = ProgressBar(total=total or None, completed=done, width=20)
        table.add_row(r.request_id[:8], r.app_id or "", r.transfer_status.value, bar,
                      f"{done}/{total if total is not None else '?'}", f"{rate / 1e6:.2f} MB/s" if rate else "",
                      eta, r.transfer_error or r.wait_reason or (r.upload_location or r.download_location))
    return table


@main.command()
@click.option("--app", "app_id", default=None, help="Only this app's requests (default: every app of the device).")
@DEVICE
@click.option("--interval", type=float, default=0.5, show_default=True, help="Seconds between refreshes.")
@click.option("--count", type=int, default=0, help="Stop after this many refreshes (0: until Ctrl-C).")
def watch(app_id: str | None, device: str | None, interval: float, count: int) -> None:
    """Show every active and waiting request, updating in place."""
    from rich.console import Console
    from rich.live import Live

    from ._store import to_request

    svc = BackgroundTransferService(app_id or "default", device=device)
    last: dict[str, tuple[float, int]] = {}
    rates: dict[str, float] = {}
    console = Console()
    with Live(console=console, auto_refresh=False, transient=not console.is_terminal) as live:
        n = 0
        while True:
            now = time.monotonic()
            rows = svc.store.list(app_id=app_id, device=svc.device)
            reqs = [to_request(row) for row in rows]
            for r in reqs:
                moved = r.bytes_sent + r.bytes_received
                if r.request_id in last and now > last[r.request_id][0]:
                    t0, b0 = last[r.request_id]
                    rates[r.request_id] = max(moved - b0, 0) / (now - t0)
                last[r.request_id] = (now, moved)
            live.update(_table(reqs, rates), refresh=True)
            n += 1
            if count and n >= count:
                break
            time.sleep(interval)
    if not console.is_terminal:  # piped: print the last view once
        console.print(_table(reqs, rates))


@main.group()
def conditions() -> None:
    """Show or set a device's network, power and data-cost conditions."""


@conditions.command(name="show")
@DEVICE
def conditions_show(device: str | None) -> None:
    cond = BackgroundTransferService(device=device).conditions()
    click.echo(json.dumps({**vars(cond), "foreground": sorted(cond.foreground)}, indent=2))


@conditions.command(name="set")
@DEVICE
@click.option("--network", type=click.Choice(policy.NETWORKS), default=None)
@click.option("--power", type=click.Choice(policy.POWERS), default=None)
@click.option("--roaming/--no-roaming", default=None)
@click.option("--over-data-limit/--no-over-data-limit", default=None)
@click.option("--approaching-data-limit/--no-approaching-data-limit", default=None)
def conditions_set(device: str | None, **changes: Any) -> None:
    changes = {k: v for k, v in changes.items() if v is not None}
    cond = BackgroundTransferService(device=device).set_conditions(**changes)
    click.echo(json.dumps({**vars(cond), "foreground": sorted(cond.foreground)}, indent=2))


@main.command()
@click.argument("app_id")
@DEVICE
@click.option("--ttl", type=float, default=60.0, show_default=True, help="Seconds the app stays foreground.")
def foreground(app_id: str, device: str | None, ttl: float) -> None:
    """Mark an app as in the foreground (2G and over-data-limit transfers may then run)."""
    BackgroundTransferService(app_id, device=device).set_foreground(ttl)
    click.echo(f"{app_id} in the foreground for {ttl:g} s")
