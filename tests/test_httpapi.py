"""The ops HTTP API as a service in another language uses it: a real ``bgtransfer http`` (or
``serve --http-port``) process on 127.0.0.1, a real worker, the real test file server; plus a
schemathesis property test against the live server's own /openapi.json.

Every address here is 127.0.0.1; the property test runs no worker, so none of the URLs it
makes up is ever fetched.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from bgtransfer import BackgroundTransferRequest
from bgtransfer._httpapi import NOT_OVER_HTTP, ConfigError, TransferIn, TransferOut, load_tokens
from bgtransfer._models import INPUT_FIELDS
from bgtransfer.cli import main as cli
from tests.conftest import ROOT, Deployment, make_deployment, wait_for
from tests.httpserver import FileServer

PHOTOS = "photos-" + "p" * 24
MUSIC = "music-" + "m" * 24
ADMIN = "admin-" + "a" * 24
TOKENS = {"BGTRANSFER_HTTP_TOKENS": f"photos={PHOTOS},music={MUSIC}", "BGTRANSFER_HTTP_ADMIN_TOKEN": ADMIN}
LISTENING = re.compile(r"ops HTTP API on (http://127\.0\.0\.1:\d+)")


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


@dataclass
class Api:
    """A running API process and a small JSON client for it (stdlib only, as any client could)."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def call(self, method: str, path: str, token: str | None = PHOTOS, body: Any = None,
             raw: bytes | None = None) -> Reply:
        host, port = self.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            text = resp.read()
            return Reply(resp.status, json.loads(text) if text else None, {k.lower(): v for k, v in resp.getheaders()})
        finally:
            conn.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(dep: Deployment, args: list[str], log: Path, ready: str | None = None, **env: str) -> Api:
    """``python -m bgtransfer ARGS`` with the tokens set; returns once it answers (and logged ``ready``)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bgtransfer", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=dep.subprocess_env(**{**TOKENS, **env}))

    def up() -> str | None:
        if proc.poll() is not None:
            pytest.fail(f"{args} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        text = log.read_text(errors="replace")
        found = LISTENING.search(text)
        return found.group(1) if found and (ready is None or ready in text) else None

    api = Api(wait_for(up, 60, 0.05, f"{args} to listen"), proc, log)
    wait_for(lambda: api.call("GET", "/healthz", None).status == 200, 30, 0.05, "/healthz")
    return api


@pytest.fixture
def api(deployment: Deployment, request: pytest.FixtureRequest) -> Iterator[Api]:
    """``bgtransfer http --port 0`` for the deployment (extra env when parametrized indirectly)."""
    a = start(deployment, ["http", "--port", "0"], deployment.tmp / "http.log", **getattr(request, "param", {}))
    yield a
    a.stop()
    assert PHOTOS not in a.text() and ADMIN not in a.text(), "a token reached the log"


def download(name: str, url: str = "http://127.0.0.1:9/x", **extra: Any) -> dict[str, Any]:
    return {"url": url, "download_location": f"/shared/transfers/{name}", **extra}


def wait_status(api: Api, rid: str, status: str, token: str = PHOTOS, timeout: float = 30) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        r = api.call("GET", f"/v1/requests/{rid}", token)
        assert r.status == 200, r
        return r.body if r.body["transfer_status"] == status else None

    return wait_for(reached, timeout, 0.1, f"{rid} to be {status}")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------- transfers


def test_download_added_over_http_completes_and_is_managed(deployment: Deployment, server: FileServer,
                                                          api: Api) -> None:
    data = os.urandom(1_500_000)
    server.put("/f.bin", data)
    deployment.worker(concurrency=2)
    added = api.call("POST", "/v1/requests", body=download("f.bin", server.url("/f.bin"), headers={"X-Who": "http"}))
    assert added.status == 201, added
    rid = added.body["request_id"]
    assert added.headers["location"] == f"/v1/requests/{rid}" and added.body["app_id"] == "photos"

    done = wait_status(api, rid, "COMPLETED")
    assert done["transfer_error"] is None and done["bytes_received"] == len(data) == done["total_bytes_to_receive"]
    assert sha((deployment.sandbox("photos") / "f.bin").read_bytes()) == sha(data)
    assert server.requests_for("/f.bin")[0].headers["x-who"] == "http"
    assert [r["request_id"] for r in api.call("GET", "/v1/requests").body] == [rid]

    # another app's token: the same answer as for an id that does not exist, and nothing changes
    absent = "0" * 32
    for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/pause"), ("POST", "/resume")):
        theirs = api.call(method, f"/v1/requests/{rid}{suffix}", MUSIC)
        nobody = api.call(method, f"/v1/requests/{absent}{suffix}", MUSIC)
        assert theirs.status == nobody.status == 404, (method, suffix, theirs)
        assert theirs.body == {**nobody.body, "message": nobody.body["message"].replace(absent, rid)}
    assert api.call("GET", "/v1/requests", MUSIC).body == []
    assert api.call("GET", f"/v1/requests/{rid}").body["transfer_status"] == "COMPLETED"

    paused = api.call("POST", f"/v1/requests/{rid}/pause")
    assert paused.status == 409 and "already completed" in paused.body["message"], paused
    assert api.call("DELETE", f"/v1/requests/{rid}").status == 204
    assert api.call("GET", f"/v1/requests/{rid}").status == 404
    assert api.call("DELETE", f"/v1/requests/{rid}").status == 404
    assert api.call("GET", "/v1/requests").body == []
    assert (deployment.sandbox("photos") / "f.bin").exists(), "a completed file stays the app's"


def test_pause_and_resume_a_running_download(deployment: Deployment, server: FileServer, api: Api) -> None:
    data = os.urandom(1_200_000)
    server.put("/slow.bin", data)
    server.behave("/slow.bin", rate=300_000)
    deployment.worker(concurrency=2)
    rid = api.call("POST", "/v1/requests", body=download("slow.bin", server.url("/slow.bin"))).body["request_id"]
    wait_for(lambda: api.call("GET", f"/v1/requests/{rid}").body["bytes_received"] > 100_000, 30, 0.05, "bytes")

    assert api.call("POST", f"/v1/requests/{rid}/pause").status == 200
    held = wait_status(api, rid, "PAUSED")["bytes_received"]
    time.sleep(0.8)
    assert api.call("GET", f"/v1/requests/{rid}").body["bytes_received"] == held < len(data), "bytes still move"

    server.behave("/slow.bin")  # full speed from here
    resumed = api.call("POST", f"/v1/requests/{rid}/resume")
    assert resumed.status == 200 and resumed.body["transfer_status"] != "PAUSED", resumed
    assert wait_status(api, rid, "COMPLETED")["transfer_error"] is None
    assert sha((deployment.sandbox("photos") / "slow.bin").read_bytes()) == sha(data)
    assert server.requests_for("/slow.bin")[-1].range_start, "resume went on from the bytes held"


def test_remove_cancels_a_running_download_and_deletes_partial_data(deployment: Deployment, server: FileServer,
                                                                    api: Api) -> None:
    server.put("/r.bin", os.urandom(1_000_000))
    server.behave("/r.bin", rate=200_000)
    deployment.worker(concurrency=2)
    rid = api.call("POST", "/v1/requests", body=download("r.bin", server.url("/r.bin"))).body["request_id"]
    wait_for(lambda: api.call("GET", f"/v1/requests/{rid}").body["bytes_received"] > 0, 30, 0.05, "bytes")
    assert api.call("DELETE", f"/v1/requests/{rid}").status == 204
    assert api.call("GET", f"/v1/requests/{rid}").status == 404
    box = deployment.sandbox("photos")
    wait_for(lambda: not any(box.iterdir()), 10, 0.1, "partial data to be deleted")


# ---------------------------------------------------------------------------------- auth and bad input


def test_tokens_and_roles(api: Api) -> None:
    for token in (None, "wrong-" + "w" * 24, PHOTOS + "x", PHOTOS[:-1]):
        r = api.call("GET", "/v1/requests", token)
        assert r.status == 401 and r.body["error"] == "Unauthorized", (token, r)
        assert r.headers["www-authenticate"] == "Bearer"
    assert api.call("GET", "/v1/requests", ADMIN).status == 403, "the admin token is not an app"
    assert api.call("POST", "/v1/requests", ADMIN, download("a.bin")).status == 403
    assert api.call("PATCH", "/v1/conditions", PHOTOS, {"network": "cellular"}).status == 403
    assert api.call("PUT", "/v1/conditions/foreground/photos", PHOTOS, {"ttl": 60}).status == 403
    assert api.call("PATCH", "/v1/conditions", None, {"network": "cellular"}).status == 401
    assert api.call("GET", "/v1/conditions", MUSIC).body["network"] == "wifi", "nothing above changed them"
    doc = api.call("GET", "/openapi.json", None)
    assert doc.status == 200 and doc.body["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


BAD = [  # (body, status, error, field, words in the message)
    ({"download_location": "/shared/transfers/a"}, 422, "ValidationError", "request_uri",
     "request_uri: Field required"),
    (download("a", tag=7), 422, "ValidationError", "tag", "tag: Input should be a valid string"),
    (download("a", bogus=1), 422, "ValidationError", "bogus", "bogus: unknown field"),
    (download("a", headers="X: 1"), 422, "ValidationError", "headers", "headers: Input should be a valid dict"),
    (download("a", headers={"X": 1}), 422, "ValidationError", "headers.X", "headers.X"),
    (download("a", method="PUT"), 422, "ValidationError", "method", "method: Input should be 'GET' or 'POST'"),
    (download("a", transfer_preferences="ALWAYS"), 422, "ValidationError", "transfer_preferences",
     "transfer_preferences"),
    (download("a", request_id="../../x"), 422, "ValidationError", "request_id", "request_id"),
    (download("a", tag="\ud800"), 422, "ValidationError", "tag", "lone surrogate"),
    ([download("a")], 422, "ValidationError", "body", "valid dictionary"),
    (download("a", url="ftp://127.0.0.1/x"), 422, "NotSupportedError", None, "scheme 'ftp' is not supported"),
    (download("a", headers={"rAnGe": "bytes=1-"}), 422, "NotSupportedError", None, "reserved"),
    (download("a", headers={"X": "1\r\nEvil: 1"}), 422, "TransferError", None, "CR, LF"),
    ({"url": "http://127.0.0.1/x", "download_location": "/etc/passwd"}, 422, "SandboxError", None,
     "outside the sandbox"),
    ({"url": "http://127.0.0.1/x", "download_location": "/shared/transfers/../../x"}, 422, "SandboxError", None,
     "'..'"),
    (download("a", expected_sha256="xyz"), 422, "TransferError", None, "expected_sha256 must be 64 hex digits"),
    ({"url": "http://127.0.0.1/x", "method": "POST", "upload_location": "/shared/transfers/none"}, 422,
     None, None, "does not exist"),  # a TransferError; its subclass's name is the service's to choose
    (download("taken.bin"), 422, "TransferError", None, "already the target of request"),
]


@pytest.mark.parametrize("api", [{"BGTRANSFER_MAX_OUTSTANDING_PER_APP": "2"}], indirect=True, ids=["quota-2"])
def test_bad_input_names_the_field_and_stores_nothing(deployment: Deployment, api: Api) -> None:
    first = api.call("POST", "/v1/requests", body=download("taken.bin"))
    assert first.status == 201, first
    messages = Path(deployment.env["BGTRANSFER_DATA_ROOT"]) / "broker" / "messages"
    sent = len(os.listdir(messages))
    for body, status, error, field, words in BAD:
        r = api.call("POST", "/v1/requests", body=body)
        assert r.status == status and r.body["error"] == (error or r.body["error"]), (body, r)
        assert words in r.body["message"] and r.body["field"] == field, (body, r.body)
    mine = "1" * 32  # a client's own id makes a retried add safe
    second = api.call("POST", "/v1/requests", body=download("2.bin", request_id=mine))
    assert (second.status, second.body["request_id"]) == (201, mine), second
    sent += 1
    again = api.call("POST", "/v1/requests", body=download("2.bin", request_id=mine))
    assert again.status == 422 and "already added" in again.body["message"], again
    full = api.call("POST", "/v1/requests", body=download("3.bin"))
    assert (full.status, full.body["error"]) == (409, "QuotaExceededError"), full
    assert "app 'photos' has 2 outstanding" in full.body["message"]

    raw = [(b"{not json", "body is not valid JSON"), (b"", "body is required"), (b"x" * (2 << 20), "larger than")]
    for data, words in raw:
        r = api.call("POST", "/v1/requests", raw=data)
        assert r.status in (413, 422) and words in r.body["message"] and r.body["field"] == "body", r
    for path, method, field in (("/v1/requests/NOTANID", "GET", "request_id"),
                                ("/v1/requests/abc/pause", "POST", "request_id"),
                                ("/v1/conditions/foreground/Bad%20App", "PUT", "app_id")):
        r = api.call(method, path, ADMIN if "conditions" in path else PHOTOS, body={} if method == "PUT" else None)
        assert r.status == 422 and r.body["field"] == field, (path, r)

    kept = {first.body["request_id"], mine}
    assert {row["id"] for row in deployment.service("photos").store.list()} == kept, "a refused add stored something"
    assert len(os.listdir(messages)) == sent, "a refused add sent something"
    assert sorted(p.name for p in deployment.sandbox("photos").iterdir()) == [], "a refused add wrote a file"


def test_conditions_and_foreground(deployment: Deployment, api: Api) -> None:
    assert api.call("GET", "/v1/conditions", PHOTOS).body == {
        "network": "wifi", "power": "external", "roaming": False, "over_data_limit": False,
        "approaching_data_limit": False, "foreground": []}
    r = api.call("PATCH", "/v1/conditions", ADMIN, {"network": "cellular", "power": "battery"})
    assert r.status == 200 and (r.body["network"], r.body["power"]) == ("cellular", "battery"), r
    rid = api.call("POST", "/v1/requests", body=download("c.bin")).body["request_id"]
    assert api.call("GET", f"/v1/requests/{rid}").body["transfer_status"] == "WAITING_FOR_WIFI"

    for body, field in (({"network": "lte"}, "network"), ({"roaming": "yes"}, "roaming"), ({"colour": 1}, "colour")):
        bad = api.call("PATCH", "/v1/conditions", ADMIN, body)
        assert bad.status == 422 and bad.body["field"] == field and field in bad.body["message"], bad
    assert api.call("PUT", "/v1/conditions/foreground/photos", ADMIN, {"ttl": 0}).body["field"] == "ttl"
    assert api.call("PUT", "/v1/conditions/foreground/photos", ADMIN, {"ttl": 60}).status == 200
    assert api.call("PUT", "/v1/conditions/foreground/maps", ADMIN).body["foreground"] == ["maps", "photos"]
    assert api.call("GET", "/v1/conditions", PHOTOS).body["foreground"] == ["photos"]
    assert api.call("GET", "/v1/conditions", MUSIC).body["foreground"] == [], "an app sees no other app"
    assert api.call("GET", "/v1/conditions", ADMIN).body["foreground"] == ["maps", "photos"]
    assert deployment.service().conditions().network == "cellular", "the store holds what the API set"

    assert api.call("PATCH", "/v1/conditions", ADMIN, {"network": "wifi", "power": "external"}).status == 200
    assert api.call("GET", f"/v1/requests/{rid}").body["wait_reason"] is None, "decided again: waits for nothing"


# ---------------------------------------------------------------------------------- the commands


def test_serve_with_http_port_runs_worker_and_api(deployment: Deployment, server: FileServer, tmp_path: Path) -> None:
    data = os.urandom(800_000)
    server.put("/s.bin", data)
    api = start(deployment, ["serve", "--http-port", "0", "--concurrency", "1"], tmp_path / "serve.log", " ready.")
    children = Path(f"/proc/{api.proc.pid}/task/{api.proc.pid}/children").read_text().split()
    try:
        rid = api.call("POST", "/v1/requests", body=download("s.bin", server.url("/s.bin"))).body["request_id"]
        assert wait_status(api, rid, "COMPLETED")["transfer_error"] is None
        assert sha((deployment.sandbox("photos") / "s.bin").read_bytes()) == sha(data)
        # serve killed outright (no `finally` runs in it): its API process must not linger on the port
        os.kill(api.proc.pid, signal.SIGKILL)
        api.proc.wait(timeout=10)

        def closed() -> bool:
            try:
                api.call("GET", "/healthz", None)
            except OSError:
                return True
            return False

        wait_for(closed, 10, 0.1, "the orphaned API process to exit")
    finally:
        for pid in children:  # the API process and the Celery pool
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    assert PHOTOS not in api.text() and ADMIN not in api.text()


def test_bad_settings_stop_the_command_with_one_line(deployment: Deployment) -> None:
    runner = CliRunner()
    env: dict[str, str | None] = {**deployment.env, **TOKENS}
    run = runner.invoke(cli, ["http", "--port", "0"], env={**env, "BGTRANSFER_HTTP_TOKENS": None,
                                                             "BGTRANSFER_HTTP_ADMIN_TOKEN": None})
    assert run.exit_code == 1 and run.output.startswith("error: no tokens"), run.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for args in (["http", "--port", port], ["serve", "--http-port", port]):
            run = runner.invoke(cli, args, env=env)
            assert run.exit_code == 1 and f"error: cannot listen on 127.0.0.1:{port}" in run.output, run.output
            assert " ready." not in run.output, "serve must not start a worker when the API cannot listen"
    secret = "short1"
    run = runner.invoke(cli, ["serve", "--http-port", "0"], env={**env, "BGTRANSFER_HTTP_TOKENS": f"photos={secret}"})
    assert run.exit_code == 1 and "at least 16" in run.output and secret not in run.output, run.output


def test_token_settings(tmp_path: Path) -> None:
    tokens = load_tokens({"BGTRANSFER_HTTP_TOKENS": f" photos = {PHOTOS} , music={MUSIC},"})
    assert (tokens.app_for(PHOTOS), tokens.app_for(MUSIC), tokens.app_for(ADMIN)) == ("photos", "music", None)
    assert not tokens.is_admin(ADMIN) and PHOTOS not in repr(tokens)
    file = tmp_path / "tokens"
    file.write_text(f"# app=token\nphotos={PHOTOS}\n\nmusic = {MUSIC}\n")
    from_file = load_tokens({"BGTRANSFER_HTTP_TOKENS_FILE": str(file), "BGTRANSFER_HTTP_ADMIN_TOKEN": ADMIN})
    assert from_file.app_for(MUSIC) == "music" and from_file.is_admin(ADMIN) and from_file.app_for(ADMIN) is None
    assert load_tokens({"BGTRANSFER_HTTP_ADMIN_TOKEN": ADMIN}).apps == ()
    bad = [
        ({}, "no tokens"),
        ({"BGTRANSFER_HTTP_TOKENS": PHOTOS}, "item 1 is not of the form app=token"),
        ({"BGTRANSFER_HTTP_TOKENS": f"Photos={PHOTOS}"}, "invalid app id"),
        ({"BGTRANSFER_HTTP_TOKENS": f"a={PHOTOS},a={MUSIC}"}, "given twice"),
        ({"BGTRANSFER_HTTP_TOKENS": f"a={PHOTOS},b={PHOTOS}"}, "share a token"),
        ({"BGTRANSFER_HTTP_TOKENS": f"a={PHOTOS}", "BGTRANSFER_HTTP_ADMIN_TOKEN": PHOTOS}, "also an app's token"),
        ({"BGTRANSFER_HTTP_TOKENS": f"a={PHOTOS}", "BGTRANSFER_HTTP_TOKENS_FILE": str(file)}, "not both"),
        ({"BGTRANSFER_HTTP_TOKENS_FILE": str(tmp_path / "missing")}, "cannot read"),
        ({"BGTRANSFER_HTTP_TOKENS": "a=" + "x" * 15}, "at least 16"),
        ({"BGTRANSFER_HTTP_TOKENS": "a=" + "x y" * 8}, "without spaces"),
        ({"BGTRANSFER_HTTP_ADMIN_TOKEN": "é" * 20}, "visible ASCII"),
    ]
    for env, words in bad:
        with pytest.raises(ConfigError, match=words) as info:
            load_tokens(env)
        assert not any(v and v in str(info.value) for k, v in env.items() if "FILE" not in k)


def test_the_models_cover_every_request_field() -> None:
    """A field added to the request reaches HTTP clients too, or is left out by name."""
    taken = set(TransferIn.model_fields) - {"request_id"}
    assert taken <= set(INPUT_FIELDS), taken - set(INPUT_FIELDS)
    assert not set(INPUT_FIELDS) - taken - NOT_OVER_HTTP, "add it to TransferIn, or to NOT_OVER_HTTP"
    shown = set(BackgroundTransferRequest("http://h/x").to_dict())
    assert set(TransferOut.model_fields) <= shown and not shown - set(TransferOut.model_fields) - NOT_OVER_HTTP


# ---------------------------------------------------------------------------------- properties


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One API process for the property test, with no worker: nothing it is sent is fetched."""
    with contextlib.ExitStack() as stack:
        dep = make_deployment(tmp_path_factory.mktemp("schema"), "embedded", "sqlite", stack)
        a = start(dep, ["http", "--port", "0"], dep.tmp / "http.log")
        yield a
        a.stop()


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.mark.timeout(120)
def test_every_operation_conforms_to_its_schema(live: Api) -> None:
    """Cases made from the server's own /openapi.json, valid and invalid, for every operation: no
    5xx, every status and body as documented, and invalid input refused. (Driven with Hypothesis
    directly: schemathesis' lazy pytest fixture loader does not run on pytest 9.)"""
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json", timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 10
    calls = 0

    def check(case: Any) -> None:
        nonlocal calls
        admin = case.path.startswith("/v1/conditions") and case.method.upper() != "GET"
        case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN if admin else PHOTOS}"}, timeout=10,
                               checks=CHECKS)
        calls += 1

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run = settings(max_examples=10, deadline=3000, derandomize=True, database=None,
                           suppress_health_check=list(HealthCheck))(given(operation.as_strategy(generation_mode=mode))(check))
            try:
                run()
            except Unsatisfiable:  # nothing of it can be made invalid: no parameters, no body, no token
                assert (mode, operation.path) == (GenerationMode.NEGATIVE, "/healthz")

    assert calls >= 100
