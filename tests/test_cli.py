"""The command line as a user types it: ``bgtransfer serve`` in one shell, ``add --wait`` in another."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

from tests.conftest import ROOT, Deployment, wait_for
from tests.httpserver import FileServer


def test_serve_and_add_wait_from_a_shell(deployment: Deployment, server: FileServer, tmp_path) -> None:
    data = os.urandom(1_500_000)
    server.put("/f.bin", data)
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen([sys.executable, "-m", "bgtransfer", "serve", "--concurrency", "3"], cwd=ROOT,
                             env=deployment.subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: b" ready." in (tmp_path / "serve.log").read_bytes(), 60, 0.1, "serve ready")
        run = deployment.cli("add", server.url("/f.bin"), "/shared/transfers/f.bin", "--app", "photos", "--wait",
                             "--sha256", hashlib.sha256(data).hexdigest(), "--header", "X-Who: cli")
        assert run.returncode == 0, run.stderr
        rid = run.stdout.split()[0]
        assert "COMPLETED" in run.stdout and "1500000/1500000" in run.stdout
        target = deployment.sandbox("photos") / "f.bin"
        assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()
        assert server.requests_for("/f.bin")[0].headers["x-who"] == "cli"

        shown = json.loads(deployment.cli("show", rid, "--app", "photos").stdout)
        assert shown["transfer_status"] == "COMPLETED" and shown["bytes_received"] == len(data)
        listed = deployment.cli("list", "--app", "photos", "--json").stdout.splitlines()
        assert [json.loads(line)["request_id"] for line in listed] == [rid]

        server.behave("/missing", status_sequence=[(404, {})])
        failed = deployment.cli("add", server.url("/missing"), "/shared/transfers/m.bin", "--app", "photos",
                                "--wait")
        assert failed.returncode == 1 and "HTTP 404" in failed.stdout

        assert deployment.cli("remove", rid, "--app", "photos").returncode == 0
        assert target.exists(), "remove forgets the request; a completed file stays the app's"
        assert len(deployment.cli("list", "--app", "photos").stdout.splitlines()) == 1
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)


def test_cli_errors_are_one_line_and_nonzero(deployment: Deployment) -> None:
    cases = [
        (["add", "ftp://127.0.0.1/x", "/shared/transfers/x"], "scheme 'ftp' is not supported"),
        (["add", "http://127.0.0.1/x", "/etc/passwd"], "outside the sandbox"),
        (["add", "http://127.0.0.1/x", "/shared/transfers/x", "--header", "Range: bytes=0-"], "reserved"),
        (["add", "http://127.0.0.1/x", "/shared/transfers/x", "--header", "NoColon"], "'Name: value'"),
        (["add", "http://127.0.0.1/x", "/shared/transfers/x", "--app", "Bad App"], "invalid app id"),
        (["add", "http://127.0.0.1/x", "/shared/transfers/x", "--sha256", "xyz"], "64 hex digits"),
        (["show", "0" * 32], "no request"),
        (["remove", "0" * 32], "no request"),
        (["pause", "0" * 32], "no request"),
    ]
    for args, words in cases:
        run = deployment.cli(*args)
        assert run.returncode == 1, (args, run.stdout, run.stderr)
        assert run.stderr.startswith("error: ") and words in run.stderr, (args, run.stderr)
        assert run.stderr.count("\n") == 1, run.stderr
    assert deployment.cli("list").stdout == ""


def test_conditions_and_foreground(deployment: Deployment) -> None:
    run = deployment.cli("conditions", "set", "--network", "cellular", "--power", "battery", "--roaming")
    assert run.returncode == 0, run.stderr
    shown = json.loads(deployment.cli("conditions", "show").stdout)
    assert (shown["network"], shown["power"], shown["roaming"]) == ("cellular", "battery", True)
    assert deployment.cli("foreground", "maps", "--ttl", "60").returncode == 0
    assert json.loads(deployment.cli("conditions", "show").stdout)["foreground"] == ["maps"]
    bad = deployment.cli("conditions", "set", "--network", "lte")
    assert bad.returncode == 2 and "lte" in bad.stderr  # click's usage error names the value
    other = json.loads(deployment.cli("conditions", "show", "--device", "other").stdout)
    assert other["network"] == "wifi", "conditions are per device"


def test_watch_shows_progress_rate_and_status(deployment: Deployment, server: FileServer) -> None:
    server.put("/w.bin", os.urandom(3_000_000))
    server.behave("/w.bin", rate=500_000)
    server.put("/q.bin", b"q" * 10)
    deployment.worker()
    svc = deployment.service("photos")
    svc.set_conditions(power="battery")
    from bgtransfer import BackgroundTransferRequest

    moving = BackgroundTransferRequest(server.url("/w.bin"), download_location="/shared/transfers/w.bin",
                                       transfer_preferences="ALLOW_BATTERY")
    waiting = BackgroundTransferRequest(server.url("/q.bin"), download_location="/shared/transfers/q.bin")
    svc.add(moving)
    svc.add(waiting)
    wait_for(lambda: svc.find(moving.request_id).bytes_received > 200_000, 30, 0.05, "bytes moving")
    run = deployment.cli("watch", "--app", "photos", "--count", "4", "--interval", "0.3", COLUMNS="200")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert moving.request_id[:8] in out and waiting.request_id[:8] in out
    assert "TRANSFERRING" in out and "WAITING_FOR_EXTERNAL_POWER" in out
    assert "MB/s" in out and "/3000000" in out
