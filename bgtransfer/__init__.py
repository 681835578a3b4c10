"""bgtransfer: background HTTP/HTTPS file transfers as Celery tasks.

The public API is re-exported here; modules starting with ``_`` are private. ``bgtransfer.app``
(the Celery app, for ``celery -A bgtransfer worker``) loads only when asked for.
"""

from __future__ import annotations

from typing import Any

from ._exceptions import NotSupportedError, QuotaExceededError, SandboxError, TransferError
from ._models import BackgroundTransferRequest, TransferPreferences, TransferStatus
from ._policy import Conditions
from ._service import BackgroundTransferService
from ._settings import Settings

__all__ = [
    "BackgroundTransferRequest",
    "BackgroundTransferService",
    "Conditions",
    "NotSupportedError",
    "QuotaExceededError",
    "SandboxError",
    "Settings",
    "TransferError",
    "TransferPreferences",
    "TransferStatus",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "app":
        from ._celery import app

        return app
    raise AttributeError(f"module 'bgtransfer' has no attribute {name!r}")
