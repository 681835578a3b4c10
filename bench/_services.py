"""The servers the benchmarks may use on this machine, and one check that a broker answers."""

from __future__ import annotations

import os

AMQP_URL = os.environ.get("BGTRANSFER_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")


def rabbitmq_unreachable(url: str = AMQP_URL) -> str | None:
    """Why RabbitMQ at ``url`` cannot be used now, or None when it answers."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        return f"RabbitMQ is not reachable at {url}: {exc}"
    return None
