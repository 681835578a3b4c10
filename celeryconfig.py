"""Celery settings for bgtransfer, derived from BGTRANSFER_* environment variables.

With no broker configured, the embedded default is Celery's ``filesystem://`` transport in
folders under the data root: no server to install. It can lose a message when a whole worker
is SIGKILLed; that is harmless because the state store is the record and every worker's
periodic pass re-dispatches what a lost message did not start.
"""

import os

from bgtransfer._settings import load

_s = load()

if _s.broker_url:
    broker_url = _s.broker_url
else:
    _folder = os.path.join(_s.data_root, "broker")
    for _sub in ("messages", "processed", "control"):
        os.makedirs(os.path.join(_folder, _sub), exist_ok=True)
    broker_url = "filesystem://"
    broker_transport_options = {
        "data_folder_in": os.path.join(_folder, "messages"),
        "data_folder_out": os.path.join(_folder, "messages"),
        "processed_folder": os.path.join(_folder, "processed"),
        "control_folder": os.path.join(_folder, "control"),
        "store_processed": False,
        "polling_interval": 0.05,
    }

result_backend = _s.result_backend or (
    "db+" + _s.database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    if _s.database_url
    else f"db+sqlite:///{os.path.join(_s.data_root, 'results.sqlite')}"
)
result_expires = 3600

task_default_queue = _s.queue
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
task_acks_late = True
worker_prefetch_multiplier = 1
worker_send_task_events = True
task_send_sent_event = True
worker_cancel_long_running_tasks_on_connection_loss = True
broker_connection_retry_on_startup = True
worker_lost_wait = 2.0
worker_hijack_root_logger = False
