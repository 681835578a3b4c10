"""The ops HTTP API: JSON over HTTP for services that speak neither Python nor Celery.

Each route authenticates its caller and calls one ``BackgroundTransferService`` method; every
rule stays in the service, so HTTP, Python, Celery and the CLI refuse the same input with the
same message. Tokens come from the environment, never from ``Settings`` (they are secrets):

- ``BGTRANSFER_HTTP_TOKENS="app=token,app=token"`` or ``BGTRANSFER_HTTP_TOKENS_FILE=path``
  (one ``app=token`` a line, ``#`` comments): an app's token sees only that app's requests.
- ``BGTRANSFER_HTTP_ADMIN_TOKEN``: the only token that may change the device's conditions
  (they are every app's, as on the phone where the OS, not an app, sets them).
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import _policy as policy
from ._exceptions import QuotaExceededError, TransferError
from ._models import BackgroundTransferRequest, TransferPreferences, TransferStatus
from ._service import BackgroundTransferService
from ._settings import Settings, load

log = logging.getLogger("bgtransfer.http")

TOKENS_ENV = "BGTRANSFER_HTTP_TOKENS"
TOKENS_FILE_ENV = "BGTRANSFER_HTTP_TOKENS_FILE"
ADMIN_TOKEN_ENV = "BGTRANSFER_HTTP_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 16  # guessing is the only attack left on a compare_digest check
MAX_BODY_BYTES = 1 << 20  # far above the largest valid request (15 headers of 16 KB, a 4000-char tag)


class ConfigError(ValueError):
    """Bad HTTP API configuration; a ValueError so the CLI reports it as one ``error:`` line."""


# ---------------------------------------------------------------------------------- tokens


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Who may call: app tokens and the admin token (kept out of repr, so out of any log)."""

    apps: tuple[tuple[str, bytes], ...] = dataclasses.field(default=(), repr=False)
    admin: bytes | None = dataclasses.field(default=None, repr=False)

    def app_for(self, token: str) -> str | None:
        """The app whose token this is; every token is compared, so timing tells nothing."""
        given = token.encode("utf-8", "surrogateescape")
        found = None
        for app_id, expected in self.apps:
            if hmac.compare_digest(given, expected):
                found = app_id
        return found

    def is_admin(self, token: str) -> bool:
        given = token.encode("utf-8", "surrogateescape")
        return self.admin is not None and hmac.compare_digest(given, self.admin)


def _check_token(token: str, where: str) -> bytes:
    if len(token) < MIN_TOKEN_CHARS or not all("!" <= c <= "~" and c != "," for c in token):
        raise ConfigError(f"{where}: a token must be at least {MIN_TOKEN_CHARS} visible ASCII characters, "
                          "without spaces or commas (e.g. python3 -c 'import secrets; print(secrets.token_urlsafe())')")
    return token.encode()


def load_tokens(env: Mapping[str, str] | None = None) -> Tokens:
    """Tokens from ``BGTRANSFER_HTTP_TOKENS`` or ``..._FILE`` and ``..._ADMIN_TOKEN``; errors never echo a token."""
    env = os.environ if env is None else env
    inline, path = env.get(TOKENS_ENV, "").strip(), env.get(TOKENS_FILE_ENV, "").strip()
    if inline and path:
        raise ConfigError(f"set {TOKENS_ENV} or {TOKENS_FILE_ENV}, not both")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                lines = [(f"{TOKENS_FILE_ENV} line {n}", line.strip()) for n, line in enumerate(f, 1)]
        except OSError as exc:
            raise ConfigError(f"{TOKENS_FILE_ENV}: cannot read {path}: {exc.strerror}") from None
        items = [(where, line) for where, line in lines if line and not line.startswith("#")]
    else:
        items = [(f"{TOKENS_ENV} item {n}", item.strip()) for n, item in enumerate(inline.split(","), 1)
                 if item.strip()]
    apps: dict[str, bytes] = {}
    for where, item in items:
        app_id, sep, token = (part.strip() for part in item.partition("="))
        if not sep or not app_id:
            raise ConfigError(f"{where} is not of the form app=token")
        try:
            policy.check_app_id(app_id)
        except TransferError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if app_id in apps:
            raise ConfigError(f"{where}: app {app_id!r} is given twice")
        apps[app_id] = _check_token(token, where)
    if len(set(apps.values())) < len(apps):
        raise ConfigError("two apps share a token: each app needs its own")
    admin_raw = env.get(ADMIN_TOKEN_ENV, "").strip()
    admin = _check_token(admin_raw, ADMIN_TOKEN_ENV) if admin_raw else None
    if admin is not None and admin in apps.values():
        raise ConfigError(f"{ADMIN_TOKEN_ENV} is also an app's token")
    if not apps and admin is None:
        raise ConfigError(f"no tokens: set {TOKENS_ENV} (app=token,...) or {TOKENS_FILE_ENV}, "
                          f"and {ADMIN_TOKEN_ENV} to change device conditions")
    return Tokens(tuple(apps.items()), admin)


# ---------------------------------------------------------------------------------- models

# Request fields the HTTP API leaves out on purpose: a refresh task is a Celery task name, which
# a client that speaks neither Python nor Celery has none of (and url_expires_at only serves it).
NOT_OVER_HTTP = frozenset({"refresh_task", "url_expires_at"})


def _utf8(value: str) -> str:
    """JSON can carry lone surrogates; nothing downstream can store them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode text (lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]
Preferences = Literal[tuple(p.value for p in TransferPreferences)]  # type: ignore[valid-type]
Status = Literal[tuple(s.value for s in TransferStatus)]  # type: ignore[valid-type]
REQUEST_ID = f"^{policy.REQUEST_ID.pattern}$"
APP_ID = f"^{policy.APP_ID.pattern}$"
RequestId = Annotated[str, Path(pattern=REQUEST_ID, description="The request's id (32 hex digits).")]


class TransferIn(BaseModel):
    """A new request. The service checks the rules (sandbox, reserved headers, quotas)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    request_uri: Text = Field(validation_alias=AliasChoices("request_uri", "url"),
                              description="http or https URL (also accepted as `url`).")
    method: Literal["GET", "POST"] = "GET"
    download_location: Text | None = Field(None, description="Sandbox path `/shared/transfers/...` to write.")
    upload_location: Text | None = Field(None, description="Sandbox path `/shared/transfers/...` to send (POST).")
    headers: dict[Text, Text] = Field(default_factory=dict, description="Extra request headers.")
    transfer_preferences: Preferences = "NONE"
    tag: Text | None = None
    expected_sha256: Text | None = Field(None, description="64 hex digits; the download must match it.")
    form_fields: dict[Text, Text] | None = Field(None, description="Upload as multipart/form-data with these.")
    request_id: Annotated[str, Field(pattern=REQUEST_ID)] | None = Field(
        None, description="Your own id (32 hex digits), so a retried add is refused as already added.")


class TransferOut(BaseModel):
    """A stored request with fresh status and progress (the Python API's fields)."""

    request_id: str
    app_id: str | None
    request_uri: str
    method: str
    headers: dict[str, str]
    download_location: str | None
    upload_location: str | None
    transfer_preferences: Preferences
    tag: str | None
    expected_sha256: str | None
    form_fields: dict[str, str] | None
    transfer_status: Status
    bytes_received: int
    total_bytes_to_receive: int | None
    bytes_sent: int
    total_bytes_to_send: int | None
    status_code: int | None
    transfer_error: str | None = Field(description="Set when the transfer ended in failure (then COMPLETED).")
    wait_reason: str | None


class ConditionsOut(BaseModel):
    """The device's conditions; an app's token sees itself in ``foreground``, never other apps."""

    network: policy.Network
    power: policy.Power
    roaming: bool
    over_data_limit: bool
    approaching_data_limit: bool
    foreground: list[str]


class ConditionsPatch(BaseModel):
    """The conditions to change; absent or null ones stay as they are."""

    model_config = ConfigDict(extra="forbid", strict=True)

    network: policy.Network | None = None
    power: policy.Power | None = None
    roaming: bool | None = None
    over_data_limit: bool | None = None
    approaching_data_limit: bool | None = None


class ForegroundIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    ttl: float = Field(60.0, gt=0, le=86400, allow_inf_nan=False, description="Seconds the app stays foreground.")


class ErrorOut(BaseModel):
    """Every error: ``error`` is the kind (the exception's name), ``message`` says what was wrong."""

    error: str
    message: str
    field: str | None = Field(None, description="The offending field, when one is to blame.")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {401: "Missing or invalid bearer token", 403: "The token may not do this",
            404: "No such request for this app (absent or another app's: the same answer)",
            409: "Quota exceeded, or the request's state forbids it", 413: "Body larger than 1 MiB",
            422: "Invalid input; `field` names it"}
    return {code: {"model": ErrorOut, "description": text[code]} for code in codes}


# ---------------------------------------------------------------------------------- errors


class ApiError(Exception):
    def __init__(self, status: int, error: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.field, self.headers = status, error, message, field, headers


def _json_error(status: int, error: str, message: str, field: str | None = None,
                headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "message": message, "field": field}, status, headers=headers)


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in ("body", "path", "query", "header") else list(map(str, loc))
    return ".".join(parts) or (str(loc[0]) if loc else "body")


def _validation(_: Request, exc: Exception) -> JSONResponse:
    """Pydantic's errors as one message that names each field (never echoing the input)."""
    assert isinstance(exc, RequestValidationError)
    items = []
    for e in exc.errors():
        field = _field(tuple(e.get("loc", ())))
        if e.get("type") == "json_invalid":
            items.append(("body", f"body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})"))
        elif e.get("type") == "missing" and field == "body":
            items.append(("body", "body is required: a JSON object"))
        elif e.get("type") == "extra_forbidden":
            items.append((field, f"{field}: unknown field"))
        else:
            items.append((field, f"{field}: {e.get('msg', 'invalid')}"))
    return _json_error(422, "ValidationError", "; ".join(m for _, m in items) or "invalid input",
                       items[0][0] if items else None)


def _transfer_error(_: Request, exc: Exception) -> JSONResponse:
    status = 409 if isinstance(exc, QuotaExceededError) else 422
    return _json_error(status, type(exc).__name__, str(exc))


def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _json_error(exc.status, exc.error, exc.message, exc.field, exc.headers)


def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400:  # FastAPI could not read the body (not UTF-8, ...): bad input like the rest
        return _json_error(422, "ValidationError", f"body is not valid JSON ({exc.detail})", "body")
    name = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
    return _json_error(exc.status_code, name, str(exc.detail), headers=exc.headers)


def _internal(_: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error in the HTTP API", exc_info=exc)
    return _json_error(500, "InternalError", "internal error; the server's log has the details")


def _not_found(request_id: str) -> ApiError:
    return ApiError(404, "NotFound", f"no request {request_id!r} for this app", "request_id")


class _BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413 before anything parses them (chunked ones too)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                response = _json_error(413, "PayloadTooLarge", f"body is larger than {self.limit} bytes", "body")
                await response(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ---------------------------------------------------------------------------------- the app


def create_app(tokens: Tokens, *, settings: Settings | None = None, device: str | None = None) -> FastAPI:
    """The ASGI app for one device; its routes call BackgroundTransferService and nothing else."""
    from . import __version__

    api = FastAPI(title="bgtransfer ops API", version=__version__, openapi_url="/openapi.json",
                  docs_url=None, redoc_url=None,
                  description="Background HTTP/HTTPS transfers over JSON. Each app has its own bearer token "
                              "and sees only its own requests; changing device conditions needs the admin token.")
    api.state.tokens, api.state.settings, api.state.device = tokens, settings or load(), device
    api.add_exception_handler(RequestValidationError, _validation)
    api.add_exception_handler(TransferError, _transfer_error)
    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(HTTPException, _http_error)
    api.add_exception_handler(Exception, _internal)
    api.add_middleware(_BodyLimit)
    api.include_router(router)
    return api


_bearer = HTTPBearer(auto_error=False, description="An app's token; the admin token for device conditions.")


def caller(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str | None:
    """The app id of the caller's token, or None for the admin token; 401 for anything else."""
    tokens: Tokens = request.app.state.tokens
    if creds is not None:
        app_id = tokens.app_for(creds.credentials)
        if app_id is not None:
            return app_id
        if tokens.is_admin(creds.credentials):
            return None
    raise ApiError(401, "Unauthorized", "missing or invalid bearer token (Authorization: Bearer TOKEN)",
                   headers={"WWW-Authenticate": "Bearer"})


def app_caller(app_id: Annotated[str | None, Depends(caller)]) -> str:
    if app_id is None:
        raise ApiError(403, "Forbidden", "the admin token manages device conditions; use an app's token")
    return app_id


def admin_caller(app_id: Annotated[str | None, Depends(caller)]) -> None:
    if app_id is not None:
        raise ApiError(403, "Forbidden", "changing device conditions needs the admin token")


def _service(request: Request, app_id: str) -> BackgroundTransferService:
    state = request.app.state
    return BackgroundTransferService(app_id, settings=state.settings, device=state.device)


def app_service(request: Request, app_id: Annotated[str, Depends(app_caller)]) -> BackgroundTransferService:
    """The caller's own service: every request route reaches the store only through it."""
    return _service(request, app_id)


Svc = Annotated[BackgroundTransferService, Depends(app_service)]
router = APIRouter()


@router.post("/v1/requests", status_code=201, response_model=TransferOut, tags=["requests"],
             responses=_errors(401, 403, 409, 413, 422))
def add(body: TransferIn, svc: Svc, response: Response) -> dict[str, Any]:
    """Add a transfer: validated, stored and queued; nothing is stored when it is refused."""
    req = BackgroundTransferRequest.from_dict(body.model_dump(exclude_unset=True, exclude_none=True))
    svc.add(req)
    response.headers["Location"] = f"/v1/requests/{req.request_id}"
    return (svc.find(req.request_id) or req).to_dict()


@router.get("/v1/requests", response_model=list[TransferOut], tags=["requests"], responses=_errors(401, 403))
def list_requests(svc: Svc) -> list[dict[str, Any]]:
    """This app's requests, oldest first (completed ones stay until removed)."""
    return [r.to_dict() for r in svc.requests]


@router.get("/v1/requests/{request_id}", response_model=TransferOut, tags=["requests"],
            responses=_errors(401, 403, 404, 422))
def find(request_id: RequestId, svc: Svc) -> dict[str, Any]:
    """One request with fresh status and progress."""
    r = svc.find(request_id)
    if r is None:
        raise _not_found(request_id)
    return r.to_dict()


def _change(verb: Callable[[BackgroundTransferService, str], None], svc: BackgroundTransferService,
            request_id: str) -> None:
    if svc.find(request_id) is None:
        raise _not_found(request_id)
    try:
        verb(svc, request_id)
    except TransferError as exc:  # it exists, but its state forbids this (e.g. already completed)
        raise ApiError(409, type(exc).__name__, str(exc)) from None


def _fresh(svc: BackgroundTransferService, request_id: str) -> dict[str, Any]:
    r = svc.find(request_id)
    if r is None:  # removed in between
        raise _not_found(request_id)
    return r.to_dict()


@router.delete("/v1/requests/{request_id}", status_code=204, response_class=Response, tags=["requests"],
               responses=_errors(401, 403, 404, 409, 422))
def remove(request_id: RequestId, svc: Svc) -> Response:
    """Cancel (within a second if running) and forget; partial data is deleted, a completed file kept."""
    _change(BackgroundTransferService.remove, svc, request_id)
    return Response(status_code=204)


@router.post("/v1/requests/{request_id}/pause", response_model=TransferOut, tags=["requests"],
             responses=_errors(401, 403, 404, 409, 422))
def pause(request_id: RequestId, svc: Svc) -> dict[str, Any]:
    """Stop moving bytes and free the slot, keeping the bytes held (a running one stops within a second)."""
    _change(BackgroundTransferService.pause, svc, request_id)
    return _fresh(svc, request_id)


@router.post("/v1/requests/{request_id}/resume", response_model=TransferOut, tags=["requests"],
             responses=_errors(401, 403, 404, 409, 422))
def resume(request_id: RequestId, svc: Svc) -> dict[str, Any]:
    """Queue a paused request again; it goes on from the bytes held."""
    _change(BackgroundTransferService.resume, svc, request_id)
    return _fresh(svc, request_id)


def _conditions(cond: policy.Conditions, app_id: str | None) -> dict[str, Any]:
    """An app sees itself in ``foreground`` and no other app; the admin sees all."""
    seen = sorted(cond.foreground) if app_id is None else sorted(cond.foreground & {app_id})
    return {**{f.name: getattr(cond, f.name) for f in dataclasses.fields(cond)}, "foreground": seen}


@router.get("/v1/conditions", response_model=ConditionsOut, tags=["conditions"], responses=_errors(401))
def show_conditions(request: Request, app_id: Annotated[str | None, Depends(caller)]) -> dict[str, Any]:
    """The device's network, power and data-cost conditions (any token)."""
    return _conditions(_service(request, app_id or "default").conditions(), app_id)


@router.patch("/v1/conditions", response_model=ConditionsOut, tags=["conditions"],
              responses=_errors(401, 403, 413, 422), dependencies=[Depends(admin_caller)])
def set_conditions(request: Request, body: ConditionsPatch) -> dict[str, Any]:
    """Change conditions (admin token); waiting requests are decided again at once."""
    changes = body.model_dump(exclude_none=True)
    return _conditions(_service(request, "default").set_conditions(**changes), None)


@router.put("/v1/conditions/foreground/{app_id}", response_model=ConditionsOut, tags=["conditions"],
            responses=_errors(401, 403, 413, 422), dependencies=[Depends(admin_caller)])
def set_foreground(request: Request, app_id: Annotated[str, Path(pattern=APP_ID, description="The app to mark.")],
                   body: ForegroundIn | None = None) -> dict[str, Any]:
    """Mark an app as in the foreground for ``ttl`` seconds (admin token, as the phone's OS would)."""
    return _conditions(_service(request, app_id).set_foreground((body or ForegroundIn()).ttl), None)


@router.get("/healthz", tags=["health"])
def health() -> dict[str, str]:
    """Liveness, without a token: the process answers (it touches neither store nor broker)."""
    return {"status": "ok"}


# ---------------------------------------------------------------------------------- the server


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, made before anything else starts so a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(sock: socket.socket, tokens: Tokens, *, device: str | None = None, log_level: str = "info",
          parent_pid: int | None = None) -> None:
    """Serve the API on ``sock`` until SIGINT/SIGTERM (or, with ``parent_pid``, until that parent is gone)."""
    app = create_app(tokens, device=device)
    # Open the store now: a bad database URL fails at start, and threads never race to make it.
    BackgroundTransferService(settings=app.state.settings, device=device).conditions()
    level = logging.getLevelName(log_level.upper())
    server = uvicorn.Server(uvicorn.Config(app, log_level=level if isinstance(level, int) else logging.INFO,
                                           lifespan="off"))
    if parent_pid is not None:
        def watch() -> None:  # `serve` was killed: do not outlive it holding the port
            while not server.should_exit:
                if os.getppid() != parent_pid:
                    server.should_exit = True
                time.sleep(0.5)

        threading.Thread(target=watch, name="bgtransfer-http-parent", daemon=True).start()
    server.run(sockets=[sock])
