"""URL refresh tasks for the tests, imported by test workers (BGTRANSFER_IMPORTS=tests.refresh_tasks).

Each plays the part of an app's own task that signs a fresh URL: the test server accepts only
the current signature (``FileServer.behave(path, signed="sig=N")``).
"""

from __future__ import annotations

from typing import Any

from bgtransfer._celery import app


@app.task(name="tests.next_signature")
def next_signature(request: dict[str, Any]) -> dict[str, Any]:
    """The same URL signed once more: ``?sig=N`` becomes ``?sig=N+1``; the headers get a mark."""
    base, _, query = request["request_uri"].partition("?")
    n = int(query.removeprefix("sig=") or 0)
    return {"url": f"{base}?sig={n + 1}", "headers": {**request["headers"], "X-Signed": str(n + 1)}}


@app.task(name="tests.bad_answer")
def bad_answer(request: dict[str, Any]) -> Any:
    return {"url": "ftp://127.0.0.1/nope"}
