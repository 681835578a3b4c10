"""Bad input through every entry point (Python API, Celery task, CLI): each gets a clear error
naming what was wrong, and nothing is stored, written or sent. Plus property-based checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from celery import Celery
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bgtransfer import BackgroundTransferRequest, Settings, TransferError, TransferPreferences
from bgtransfer import _policy as policy
from bgtransfer._celeryconf import celery_config
from bgtransfer._models import STATE_FIELDS
from bgtransfer.cli import main as cli
from tests.conftest import Deployment
from tests.test_policy import BAD

D = "/shared/transfers/x.bin"
U = "http://127.0.0.1/x"
# (request as a caller of another language would send it, error class name, words in the message)
MORE = [
    ({"url": U, "download_location": D, "app_id": "Bad App"}, "TransferError", "invalid app id"),
    ({"url": U, "download_location": D, "app_id": "a" * 64}, "TransferError", "invalid app id"),
    ({"url": [U], "download_location": D}, "TransferError", "request_uri must be a string, got list"),
    ({"url": U, "download_location": 5}, "TransferError", "download_location must be a string, got int"),
    ({"url": U, "download_location": D, "headers": "X: 1"}, "TransferError", "headers must be a mapping, got str"),
    ({"url": U, "download_location": D, "tag": 7}, "TransferError", "tag must be a string, got int"),
    ({"url": U, "download_location": D, "bogus": 1}, "TransferError", "unknown request field"),
    ({"download_location": D}, "TransferError", "request_uri is required"),
    ({"url": U, "download_location": D, "request_id": "../../x"}, "TransferError",
     "invalid request_id"),
    ({"url": U, "download_location": "/shared/transfers/%2e%2e/x"}, None, None),  # literal name
    ({"url": U, "download_location": "/shared/transfers/a/./../../etc"}, "SandboxError", "'..'"),
    ({"url": U, "download_location": "//shared/transfers/x"}, "SandboxError", "outside"),
    ({"url": U, "download_location": "/SHARED/transfers/x"}, "SandboxError", "outside"),
    ({"url": U, "download_location": D, "headers": {"Transfer-Encoding": "chunked"}},
     "NotSupportedError", "set by the service"),
    ({"url": U, "download_location": D, "headers": {"Range\t": "x"}}, "NotSupportedError",
     "reserved"),
    ({"url": "http://127.0.0.1/x\r\nHost: evil", "download_location": D}, "TransferError", "control characters"),
    ({"url": "HTTP://127.0.0.1/x", "method": "get ", "download_location": D}, "NotSupportedError", "method"),
]


def cases() -> list[tuple[str, dict, str | None, str | None]]:
    out = []
    for i, (make, error, words) in enumerate(BAD):
        req = make()
        d = req.to_dict()
        out.append((f"policy-{i}", {k: v for k, v in d.items() if v is not None and k not in STATE_FIELDS},
                    error.__name__, words))
    out += [(f"more-{i}", d, e, w) for i, (d, e, w) in enumerate(MORE)]
    return out


CASES = cases()


def cli_args(d: dict) -> list[str] | None:
    """The same request on the command line, where the CLI can say it at all."""
    if set(d) - {"url", "request_uri", "download_location", "upload_location", "method", "headers", "tag",
                 "expected_sha256", "transfer_preferences", "app_id", "request_id"}:
        return None
    url = d.get("url", d.get("request_uri"))
    path = d.get("upload_location") or d.get("download_location")
    if not isinstance(url, str) or not isinstance(path, str) or "request_id" in d or not isinstance(
            d.get("headers", {}), dict):
        return None
    if d.get("upload_location") and d.get("download_location"):
        return None
    if any(not isinstance(d[k], str) for k in ("tag", "expected_sha256", "method", "app_id") if k in d):
        return None  # the command line has only strings
    args = ["add", url, path, "--app", d.get("app_id", "bad")]
    if d.get("upload_location"):
        args.append("--upload")
    if "method" in d and d["method"] not in ("GET", "POST"):
        return None
    if "method" in d:
        args += ["--method", d["method"]]
    for k, v in d.get("headers", {}).items():
        if not isinstance(v, str) or "\n" in k + v or "\r" in k + v or ":" in k:
            return None
        args += ["--header", f"{k}: {v}"]
    if d.get("tag") is not None:
        args += ["--tag", d["tag"]]
    if d.get("expected_sha256") is not None:
        args += ["--sha256", d["expected_sha256"]]
    if d.get("transfer_preferences", "NONE") != "NONE":
        return None
    return args


def nothing_left(dep: Deployment) -> None:
    assert dep.service("bad").store.list() == [], "a refused add stored something"
    messages = Path(dep.env["BGTRANSFER_DATA_ROOT"]) / "broker" / "messages"
    assert not messages.exists() or not [m for m in os.listdir(messages) if "transfer" in m]
    apps = Path(dep.env["BGTRANSFER_DATA_ROOT"]) / "apps"
    written = [p for p in apps.rglob("*") if p.is_file()] if apps.exists() else []
    assert written == [], written


def test_matrix_through_api_celery_and_cli(deployment: Deployment, monkeypatch) -> None:
    bad = [c for c in CASES if c[2] is not None]
    assert len({name for name, *_ in bad}) >= 50
    deployment.worker(concurrency=2)
    s = deployment.settings
    client = Celery("client", set_as_current=False, config_source=celery_config(s))
    for key, value in deployment.env.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    through_cli = 0
    for name, d, error, words in bad:
        # 1. the Python API
        with pytest.raises(TransferError) as info:
            app = d.get("app_id", "bad")
            from bgtransfer import BackgroundTransferService

            BackgroundTransferService(app, settings=s).add(
                BackgroundTransferRequest.from_dict({k: v for k, v in d.items() if k != "app_id"}))
        assert type(info.value).__name__ == error and words in str(info.value), (name, info.value)
        # 2. the Celery task, as a client in another language would call it
        result = client.send_task("bgtransfer.add", args=[{"app_id": "bad", **d}], queue=s.queue)
        with pytest.raises(Exception) as info:
            result.get(timeout=30)
        assert type(info.value).__name__ == error and words in str(info.value), (name, info.value)
        # 3. the command line, where it can express the request
        args = cli_args(d)
        if args is not None:
            run = runner.invoke(cli, args)
            assert run.exit_code == 1 and run.output.startswith("error: ") and words in run.output, (name, run)
            through_cli += 1
    assert through_cli >= 30
    nothing_left(deployment)


def test_literal_percent_names_stay_in_the_sandbox(deployment: Deployment) -> None:
    svc = deployment.service("bad")
    req = BackgroundTransferRequest("http://127.0.0.1/x", download_location="/shared/transfers/%2e%2e/x")
    svc.add(req)  # '%2e%2e' is a directory name here, not '..': it stays inside
    assert svc.find(req.request_id).download_location == "/shared/transfers/%2e%2e/x"


def test_symlink_swapped_in_after_add_is_refused_at_transfer(deployment: Deployment, server, tmp_path) -> None:
    server.put("/x.bin", b"x" * 1000)
    box = deployment.sandbox("bad")
    (box / "d").mkdir()
    svc = deployment.service("bad")
    req = BackgroundTransferRequest(server.url("/x.bin"), download_location="/shared/transfers/d/x.bin")
    svc.add(req)
    outside = tmp_path / "outside"
    outside.mkdir()
    (box / "d").rmdir()
    (box / "d").symlink_to(outside)  # swapped in after add, before any worker ran
    deployment.worker()
    done = deployment.wait_done("bad", req.request_id)
    assert "symlink" in done.transfer_error
    assert list(outside.iterdir()) == []
    assert "Traceback" not in deployment.workers[0].text(), "the refusal must not crash the task"


S = Settings(data_root="/nonexistent")
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(url=st.one_of(text, st.sampled_from(["http://127.0.0.1/x", "https://h/x", "ftp://h/x"])),
       method=st.sampled_from(["GET", "POST", "PUT", "get", ""]),
       path=st.one_of(text, text.map(lambda t: "/shared/transfers/" + t)),
       headers=st.dictionaries(text, text, max_size=4), tag=st.one_of(st.none(), text))
def test_check_request_raises_only_transfer_errors(url, method, path, headers, tag) -> None:
    req = BackgroundTransferRequest(url, method, download_location=path, headers=headers, tag=tag)
    try:
        c = policy.check_request(req, S)
    except TransferError:
        return
    assert c.url.lower().startswith(("http://", "https://"))
    assert ".." not in c.local_parts and all(c.local_parts)
    assert not {k.strip().lower() for k in c.headers} & policy.RESERVED_HEADERS


conds = st.builds(policy.Conditions, network=st.sampled_from(policy.NETWORKS), power=st.sampled_from(policy.POWERS),
                  roaming=st.booleans(), over_data_limit=st.booleans(), approaching_data_limit=st.booleans(),
                  foreground=st.frozensets(st.sampled_from(["a", "b"])))
cands = st.builds(policy.Candidate, app_id=st.sampled_from(["a", "b"]),
                  direction=st.sampled_from(["download", "upload"]),
                  preferences=st.sampled_from(list(TransferPreferences)),
                  size=st.one_of(st.none(), st.integers(0, 300_000_000)))


@settings(max_examples=500, deadline=None)
@given(c=cands, cond=conds)
def test_admitted_requests_meet_every_rule(c: policy.Candidate, cond: policy.Conditions) -> None:
    d = policy.decide(c, cond, S)
    if d.action != "admit":
        assert d.reason and (d.action == "wait") == (d.status.value.startswith("WAITING"))
        return
    cellular = cond.network.startswith("cellular")
    assert cond.network != "none"
    if cellular:
        assert c.preferences in (TransferPreferences.ALLOW_CELLULAR, TransferPreferences.ALLOW_CELLULAR_AND_BATTERY)
        assert not cond.roaming
        assert not cond.over_data_limit or c.app_id in cond.foreground
    if cond.power != "external":
        assert c.preferences in (TransferPreferences.ALLOW_BATTERY, TransferPreferences.ALLOW_CELLULAR_AND_BATTERY)
    if cond.power == "battery-saver" or cond.network == "cellular-2g":
        assert c.app_id in cond.foreground
    cap = policy.size_cap(c.direction, cond, S)
    if c.size is not None and cap is not None and c.direction == "upload":
        assert c.size <= cap
