"""A real ``python -m bgtransfer worker`` process, started and ended by its pid.

Shared by the tests (conftest) and the benchmarks, which all need the same thing: start a
worker with some BGTRANSFER_* variables, wait until Celery says it is ready, find its pool
children, and end it by SIGKILL (a crash) or SIGTERM (an operator).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Fast clocks for tests and benchmarks: leases and passes in seconds, not minutes.
FAST = {
    "BGTRANSFER_LEASE_SECONDS": "3",
    "BGTRANSFER_DISPATCH_SECONDS": "5",
    "BGTRANSFER_SWEEP_INTERVAL": "0.5",
    "BGTRANSFER_PROGRESS_INTERVAL": "0.25",
    "BGTRANSFER_RETRY_BASE_SECONDS": "0.2",
    "BGTRANSFER_RETRY_MAX_SECONDS": "2",
    "BGTRANSFER_MIN_RATE_WINDOW": "2",
}


class WorkerProcess:
    def __init__(self, env: dict[str, str], log: Path, concurrency: int = 4) -> None:
        """Start a worker with ``env`` (BGTRANSFER_* variables) over a clean copy of this environment."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("BGTRANSFER_")}
        self.log, self.concurrency = log, concurrency
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bgtransfer", "worker", "--concurrency", str(concurrency),
                 "--loglevel", "INFO"],
                cwd=ROOT, env={**base, **env, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def children(self) -> list[int]:
        """Pool children, whichever thread forked them (billiard's supervisor thread replaces
        killed children, and /proc lists those under that thread)."""
        kids: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids += [int(p) for p in (task / "children").read_text().split()]
        return kids

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """True once Celery logged " ready." and every pool child exists; False if it exited first."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if " ready." in self.text() and len(self.children()) >= self.concurrency:
                return True
            time.sleep(0.1)
        return False

    def kill(self) -> None:
        """SIGKILL the worker and its pool children: a crash."""
        kids = self.children()
        for pid in [self.pid, *kids]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (Celery's warm shutdown); SIGKILL what is left after ``grace`` seconds."""
        if self.proc.poll() is not None:
            return
        kids = self.children()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
        for pid in kids:  # a pool child left behind would hold the data root open
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
