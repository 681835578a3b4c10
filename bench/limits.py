"""Bandwidth limits and weighted fair share, measured against what was set.

    python -m bench.limits [--quick] [--json out.json]

Everything runs on the embedded default (filesystem broker, SQLite) in one temporary directory
under /tmp, deleted at the end; the files come from ``tests.httpserver.FileServer`` on
127.0.0.1, which unthrottled sends hundreds of MB/s here.

device limit    ``BGTRANSFER_MAX_RATE_PER_DEVICE`` = 10 MB/s, four worker processes of
                concurrency 1 (device cap 4), eight downloads of 20 MB (``--quick``: 8 MB)
                added at once. The rate is the bytes of all eight over the time from the
                first add until ``find`` reports the last one COMPLETED (polled every 50 ms),
                so it includes dispatch and is if anything below the transfers' own rate.
transfer limit  ``BGTRANSFER_MAX_RATE_PER_TRANSFER`` = 5 MB/s, one worker, one download of
                the same size, timed the same way.
fair share      ``BGTRANSFER_APP_WEIGHTS`` = ``a=3,b=1``, one worker of concurrency 2 (device
                cap 2), 40 small downloads per app queued while the network is ``none``, then
                the network set to Wi-Fi; the server's log gives the start order. Reported:
                a's share of the first 40 starts (3:1 means 30 of 40), and the longest run of
                starts b waited through (no starvation means a short one).

Workers are started and stopped by pid (``tests.workerproc.WorkerProcess``). Every file is
checked (size, sha256); a failed check ends the run with exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bgtransfer import BackgroundTransferRequest, BackgroundTransferService  # noqa: E402
from bgtransfer._settings import load  # noqa: E402
from tests.httpserver import FileServer  # noqa: E402
from tests.workerproc import FAST, WorkerProcess  # noqa: E402

MB = 1_000_000


class Deployment(contextlib.ExitStack):
    """A data root, some workers and a service for one measurement; all ended on exit."""

    def __init__(self, tmp: Path, name: str, **env: str) -> None:
        super().__init__()
        self.root = tmp / name
        self.root.mkdir(parents=True)
        self.env = {"BGTRANSFER_DATA_ROOT": str(self.root / "data"), "BGTRANSFER_DEVICE": name, **FAST,
                    "BGTRANSFER_MAX_OUTSTANDING_PER_APP": "100", **env}

    def workers(self, n: int, concurrency: int) -> None:
        for i in range(n):
            w = WorkerProcess(self.env, self.root / f"worker-{i}.log", concurrency)
            self.callback(w.stop)
            if not w.wait_ready():
                raise RuntimeError(f"worker did not start:\n{w.text()[-2000:]}")

    def service(self, app: str) -> BackgroundTransferService:
        return BackgroundTransferService(app, settings=load(self.env))


def wait_completed(svcs: dict[str, BackgroundTransferService], ids: dict[str, list[str]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for app, rids in ids.items():
        for rid in rids:
            while (r := svcs[app].find(rid)) is None or r.transfer_status.value != "COMPLETED":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"request {rid} did not complete in {timeout:g} s")
                time.sleep(0.05)
            if r.transfer_error:
                raise RuntimeError(f"request {rid} failed: {r.transfer_error}")


def measured_rate(tmp: Path, server: FileServer, name: str, files: int, size: int, workers: int,
                  **env: str) -> float:
    """Bytes per second for ``files`` downloads of ``size`` added at once, checked on disk."""
    data = os.urandom(size)
    digest = hashlib.sha256(data).hexdigest()
    for i in range(files):
        server.put(f"/{name}/{i}.bin", data)
    with Deployment(tmp, name, **env) as dep:
        dep.workers(workers, 1)
        svc = dep.service("a")
        reqs = [BackgroundTransferRequest(server.url(f"/{name}/{i}.bin"),
                                          download_location=f"/shared/transfers/{i}.bin") for i in range(files)]
        started = time.monotonic()
        for r in reqs:
            svc.add(r)
        wait_completed({"a": svc}, {"a": [r.request_id for r in reqs]}, 600)
        elapsed = time.monotonic() - started
        box = dep.root / "data" / "apps" / "a" / "shared" / "transfers"
        for i in range(files):
            if hashlib.sha256((box / f"{i}.bin").read_bytes()).hexdigest() != digest:
                raise RuntimeError(f"{name}: file {i} is corrupt")
    return files * size / elapsed


def fair_share(tmp: Path, server: FileServer, per_app: int) -> dict[str, Any]:
    data = os.urandom(20_000)
    for app in ("a", "b"):
        for i in range(per_app):
            server.put(f"/share/{app}/{i}.bin", data)
    with Deployment(tmp, "share", BGTRANSFER_APP_WEIGHTS="a=3,b=1", BGTRANSFER_MAX_CONCURRENT_PER_DEVICE="2") as dep:
        svcs = {app: dep.service(app) for app in ("a", "b")}
        svcs["a"].set_conditions(network="none")
        ids: dict[str, list[str]] = {"a": [], "b": []}
        for i in range(per_app):
            for app in ("b", "a"):  # b's arrive first: the weights, not arrival, must decide
                r = BackgroundTransferRequest(server.url(f"/share/{app}/{i}.bin"),
                                              download_location=f"/shared/transfers/{i}.bin")
                svcs[app].add(r)
                ids[app].append(r.request_id)
        dep.workers(1, 2)
        svcs["a"].set_conditions(network="wifi")
        wait_completed(svcs, ids, 300)
    starts = [r.path.split("/")[2] for r in sorted(server.requests, key=lambda r: r.started)
              if r.path.startswith("/share/")]
    first = starts[:40]
    longest, run = 0, 0
    for app in starts[: len(starts) - starts[::-1].index("b")]:  # up to b's last start
        run = run + 1 if app == "a" else 0
        longest = max(longest, run)
    return {"a_of_first_40": first.count("a"), "target": 30, "longest_wait_of_b_in_starts": longest}


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = (8 if args.quick else 20) * MB
    with tempfile.TemporaryDirectory(prefix="bgt-bench-limits-") as tmp, FileServer() as server:
        device = measured_rate(Path(tmp), server, "device", 8, size, 4,
                               BGTRANSFER_MAX_RATE_PER_DEVICE=str(10 * MB), BGTRANSFER_MAX_CONCURRENT_PER_DEVICE="4")
        one = measured_rate(Path(tmp), server, "transfer", 1, size, 1, BGTRANSFER_MAX_RATE_PER_TRANSFER=str(5 * MB))
        share = fair_share(Path(tmp), server, 40)
    return {"device_limit": {"set_mb_s": 10, "measured_mb_s": device / MB, "ratio": device / (10 * MB)},
            "transfer_limit": {"set_mb_s": 5, "measured_mb_s": one / MB, "ratio": one / (5 * MB)},
            "fair_share": share}


def report(r: dict[str, Any]) -> None:
    """Print ``run``'s figures."""
    print(f"{'limit':<34}{'set MB/s':>10}{'measured':>10}{'ratio':>8}")
    for key, label in (("device_limit", "device, 4 workers, 8 downloads"), ("transfer_limit", "one transfer")):
        x = r[key]
        print(f"{label:<34}{x['set_mb_s']:>10.1f}{x['measured_mb_s']:>10.2f}{x['ratio']:>8.2f}")
    f = r["fair_share"]
    print(f"fair share a=3,b=1: a had {f['a_of_first_40']} of the first 40 starts (3:1 is {f['target']}); "
          f"b never waited through more than {f['longest_wait_of_b_in_starts']} starts in a row")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 MB files instead of 20 MB")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        r = run(args)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
