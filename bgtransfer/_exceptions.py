"""Errors raised by bgtransfer.

All of them derive from ``TransferError`` so a caller can catch one class:

    TransferError                 bad input, or a request that cannot be found or changed
    ├── NotSupportedError         reserved header, unsupported scheme or method
    ├── SandboxError              a local path outside the app's sandbox
    └── QuotaExceededError        per-app outstanding or per-device queue limit reached

The message always names what was wrong, because it is also what a non-Python client
receives from the ``bgtransfer.add`` Celery task.
"""

from __future__ import annotations


class TransferError(Exception):
    """Bad input or an impossible operation on a request."""


class NotSupportedError(TransferError):
    """The request uses something the service reserves or does not support."""


class SandboxError(TransferError):
    """A local path resolves outside ``/shared/transfers`` of the app's sandbox."""


class QuotaExceededError(TransferError):
    """A queue limit (per app or per device) would be exceeded."""



class LeaseLost(Exception):
    """Internal: an attempt's lease is gone (another attempt owns the request, or it was removed).

    Not a ``TransferError``: no caller ever sees it; the attempt just stops writing.
    """
