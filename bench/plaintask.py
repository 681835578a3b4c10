"""The baseline for ``bench.small``: a plain Celery task that GETs one URL into one file with pycurl.

It is what a service would write without bgtransfer (no state store, no admission, no lease,
no resume), so ``bench.small`` can tell what bgtransfer's machinery costs per small transfer
on the same broker. Run by a real worker::

    celery -A bench.plaintask worker -Q <queue> --concurrency C

configured from environment variables, read once at import (``bench.small`` sets them):

    BENCH_PLAIN_BROKER_URL   a broker URL (amqp://, redis://); empty: bgtransfer's embedded
                             filesystem broker under BENCH_PLAIN_DATA_ROOT, with the same
                             transport and options bgtransfer uses (so "the same broker")
    BENCH_PLAIN_DATA_ROOT    where that filesystem broker keeps its folders
    BENCH_PLAIN_QUEUE        the queue the tasks go to (one per run, so runs never mix)
    BENCH_PLAIN_LIKE_BGT     "1": also take bgtransfer's other Celery settings (prefetch 1,
                             acks_late, task events on, ...); else Celery's defaults

The task writes to ``<path>.part`` and renames it to ``<path>`` once the body is complete and
the status was 200, so a file present under its final name is a finished download: the
benchmark detects completion from the directory alone, with no result backend (results are
ignored, as bgtransfer's transfer task ignores its own).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import pycurl
from celery import Celery

from bgtransfer._celeryconf import celery_config
from bgtransfer._settings import Settings

TASK = "bench.plain_download"


def config(broker_url: str, data_root: str, queue: str, like_bgtransfer: bool = False) -> dict[str, Any]:
    """Celery settings for the baseline: bgtransfer's broker settings for the same broker URL
    (identical transport and options), plus Celery's defaults or bgtransfer's own choices."""
    bgt = celery_config(Settings(data_root=data_root, broker_url=broker_url))
    conf = {k: v for k, v in bgt.items() if k.startswith("broker_")}
    if like_bgtransfer:
        conf.update({k: v for k, v in bgt.items() if not k.startswith(("broker_", "result_backend"))})
    conf.update(task_default_queue=queue, broker_connection_retry_on_startup=True, task_ignore_result=True,
                worker_hijack_root_logger=False)
    conf.pop("result_backend", None)
    return conf


def config_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The worker's settings; refuses to guess a queue or a folder (a guess could mix runs)."""
    queue, root = env.get("BENCH_PLAIN_QUEUE", ""), env.get("BENCH_PLAIN_DATA_ROOT", "")
    broker = env.get("BENCH_PLAIN_BROKER_URL", "")
    if not queue or not (broker or root):
        raise RuntimeError("set BENCH_PLAIN_QUEUE and BENCH_PLAIN_BROKER_URL or BENCH_PLAIN_DATA_ROOT")
    return config(broker, root, queue, env.get("BENCH_PLAIN_LIKE_BGT", "") == "1")


def download(url: str, path: str) -> int:
    """GET ``url`` into ``path`` (via ``path.part``, renamed when complete); the byte count."""
    part = path + ".part"
    c = pycurl.Curl()
    try:
        with open(part, "wb") as f:
            c.setopt(pycurl.URL, url)
            c.setopt(pycurl.WRITEDATA, f)
            c.setopt(pycurl.NOSIGNAL, 1)
            c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
            c.perform()
            status = c.getinfo(pycurl.RESPONSE_CODE)
            size = f.tell()
    finally:
        c.close()
    if status != 200:
        os.unlink(part)
        raise RuntimeError(f"{url}: HTTP {status}")
    os.rename(part, path)
    return size


def make_app(conf: Mapping[str, Any]) -> Celery:
    """A Celery app with these settings and the one task (senders and the worker alike)."""
    app = Celery("benchplain", set_as_current=False)
    app.conf.update(conf)
    app.task(name=TASK, ignore_result=True)(download)
    return app


_app: Celery | None = None


def __getattr__(name: str) -> Any:
    """``app``, made on first use from the environment: importing this module (as bench.small
    does, to make its senders) creates nothing and reads no variable."""
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        _app = make_app(config_from_env(os.environ))
    return _app
