"""Celery settings derived from bgtransfer's Settings (read by ``celeryconfig.py``).

With no broker configured, the embedded default is Celery's ``filesystem://`` transport
(made safe for concurrent producers in ``_fsbroker.py``) in folders under the data root: no
server to install. It can lose a message when a whole worker is SIGKILLed; that is harmless
because the state store is the record and every worker's periodic pass re-dispatches what a
lost message did not start.
"""

from __future__ import annotations

import os
from typing import Any

from ._settings import Settings


def celery_config(s: Settings) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "task_default_queue": s.queue,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_expires": 3600,
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": s.task_events,
        "task_send_sent_event": s.task_events,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
        "worker_lost_wait": 2.0,
        "worker_hijack_root_logger": False,
        "imports": [m.strip() for m in s.imports.split(",") if m.strip()],
    }
    if s.broker_url:
        conf["broker_url"] = s.broker_url
        if s.broker_url.startswith(("redis://", "rediss://")):
            # kombu's Redis pub/sub consumer (remote control only) crashes the whole worker when
            # Redis restarts (seen with kombu 5.7, redis-py 8); without it the worker reconnects.
            # Task events are still sent, so Flower and celery-exporter keep working.
            conf["worker_enable_remote_control"] = False
    else:
        folder = os.path.join(s.data_root, "broker")
        for sub in ("messages", "processed", "control"):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
        conf["broker_url"] = "filesystem://localhost/"
        conf["broker_transport"] = "bgtransfer._fsbroker:Transport"
        conf["broker_transport_options"] = {
            "data_folder_in": os.path.join(folder, "messages"),
            "data_folder_out": os.path.join(folder, "messages"),
            "processed_folder": os.path.join(folder, "processed"),
            "control_folder": os.path.join(folder, "control"),
            "store_processed": False,
            "polling_interval": 0.02,  # latency of a wake-up; a listdir each time costs little
        }
    if s.result_backend:
        conf["result_backend"] = s.result_backend
    elif s.database_url:
        conf["result_backend"] = "db+" + s.database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    else:
        conf["result_backend"] = f"db+sqlite:///{os.path.join(s.data_root, 'results.sqlite')}"
    return conf
