"""Add-time rules through the public API, against the real store and the embedded broker.

A refused add must store nothing and send nothing: every test checks both.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bgtransfer import (
    BackgroundTransferRequest,
    BackgroundTransferService,
    NotSupportedError,
    QuotaExceededError,
    SandboxError,
    TransferError,
    TransferStatus,
)
from tests.conftest import STORES, Deployment


def messages(dep: Deployment) -> int:
    folder = Path(dep.env["BGTRANSFER_DATA_ROOT"]) / "broker" / "messages"
    return len(os.listdir(folder)) if folder.exists() else 0


def download(name: str = "x.bin", **kw: object) -> BackgroundTransferRequest:
    return BackgroundTransferRequest("http://127.0.0.1:9/" + name, download_location=f"/shared/transfers/{name}",
                                     **kw)  # type: ignore[arg-type]


def refused(dep: Deployment, svc: BackgroundTransferService, req: object, error: type, words: str) -> None:
    before = (len(dep.service(svc.app_id).store.list()), messages(dep))
    with pytest.raises(TransferError) as info:
        svc.add(req)  # type: ignore[arg-type]
    assert isinstance(info.value, error), info.value
    if error is TransferError:  # plain bad input, not one of the named kinds
        assert not isinstance(info.value, (NotSupportedError, SandboxError, QuotaExceededError)), info.value
    assert words in str(info.value)
    assert (len(svc.store.list()), messages(dep)) == before, "a refused add stored or sent something"


def test_add_stores_and_sends_one_wakeup(deployment: Deployment) -> None:
    svc = deployment.service("photos")
    req = download(tag="t")
    assert svc.add(req) is req
    assert (req.app_id, req.transfer_status) == ("photos", TransferStatus.WAITING)
    found = svc.find(req.request_id)
    assert found is not None and found.tag == "t" and found.request_uri == req.request_uri
    assert [r.request_id for r in svc.requests] == [req.request_id]
    assert messages(deployment) == 1
    assert (deployment.sandbox("photos")).is_dir()


def test_rules_that_need_no_disk_refuse_without_storing(deployment: Deployment) -> None:
    svc = deployment.service("photos")
    refused(deployment, svc, download(headers={"rAnGe": "bytes=1-"}), NotSupportedError, "reserved")
    refused(deployment, svc, BackgroundTransferRequest("ftp://127.0.0.1/x", download_location="/shared/transfers/a"),
            NotSupportedError, "scheme")
    refused(deployment, svc, download(headers={"X": "1\r\nEvil: 1"}), TransferError, "CR, LF")
    refused(deployment, svc, BackgroundTransferRequest("http://127.0.0.1/x", download_location="/tmp/x"),
            SandboxError, "outside the sandbox")
    refused(deployment, svc, "http://127.0.0.1/x", TransferError, "BackgroundTransferRequest")
    other = download()
    other.app_id = "someone-else"
    refused(deployment, svc, other, TransferError, "belongs to app")


def test_symlinks_out_of_the_sandbox_are_refused(deployment: Deployment, tmp_path: Path) -> None:
    svc = deployment.service("photos")
    box = deployment.sandbox("photos")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (box / "escape").symlink_to(outside)
    (box / "link.bin").symlink_to(outside / "secret")
    refused(deployment, svc, download("escape/x.bin"), SandboxError, "symlink")
    refused(deployment, svc, download("link.bin"), SandboxError, "symlink")
    up = BackgroundTransferRequest("http://127.0.0.1/u", "POST", upload_location="/shared/transfers/link.bin")
    refused(deployment, svc, up, SandboxError, "symlink")
    os.link(outside / "secret", box / "hard.bin")  # a hard link is a file of the sandbox: allowed to upload
    ok = BackgroundTransferRequest("http://127.0.0.1/u", "POST", upload_location="/shared/transfers/hard.bin")
    svc.add(ok)
    assert svc.find(ok.request_id).total_bytes_to_send == 6
    assert (outside / "secret").read_bytes() == b"secret"


def test_upload_source_must_exist_and_fit(deployment: Deployment) -> None:
    s = deployment.settings
    svc = BackgroundTransferService("photos", settings=type(s)(**{**vars(s), "max_upload_bytes": 10}))
    box = deployment.sandbox("photos")
    (box / "small").write_bytes(b"12345")
    (box / "big").write_bytes(b"x" * 11)
    (box / "dir").mkdir()

    def up(name: str) -> BackgroundTransferRequest:
        return BackgroundTransferRequest("http://127.0.0.1/u", "POST", upload_location=f"/shared/transfers/{name}")

    refused(deployment, svc, up("missing"), TransferError, "does not exist")
    refused(deployment, svc, up("big"), TransferError, "exceeds the largest allowed (10)")
    refused(deployment, svc, up("dir"), TransferError, "not a regular file")
    svc.add(up("small"))
    assert len(svc.requests) == 1


@pytest.mark.parametrize("deployment", STORES, indirect=True)
def test_download_target_rules(deployment: Deployment) -> None:
    svc = deployment.service("photos")
    box = deployment.sandbox("photos")
    (box / "adir").mkdir()
    refused(deployment, svc, download("adir"), TransferError, "not a regular file")
    first = download("same.bin")
    svc.add(first)
    refused(deployment, svc, download("same.bin"), TransferError, f"already the target of request {first.request_id}")
    refused(deployment, svc, first, TransferError, "already added")
    # another app may use the same sandbox path: it is its own sandbox
    deployment.service("music").add(download("same.bin"))


@pytest.mark.parametrize("deployment", STORES, indirect=True)
def test_per_app_and_per_device_quotas(deployment: Deployment) -> None:
    s = deployment.settings
    small = type(s)(**{**vars(s), "max_outstanding_per_app": 3, "max_queued_per_device": 5})
    a = BackgroundTransferService("a", settings=small)
    b = BackgroundTransferService("b", settings=small)
    for i in range(3):
        a.add(download(f"{i}.bin"))
    refused(deployment, a, download("3.bin"), QuotaExceededError, "app 'a' has 3 outstanding")
    b.add(download("0.bin"))
    b.add(download("1.bin"))
    refused(deployment, b, download("2.bin"), QuotaExceededError, "5 queued requests")
    # completed requests count until removed; removing frees the place
    a.remove(a.requests[0])
    a.add(download("3.bin"))
    assert len(a.requests) == 3
    refused(deployment, b, download("2.bin"), QuotaExceededError, "5 queued requests")  # full again


def test_default_caps_are_25_per_app(deployment: Deployment) -> None:
    svc = deployment.service("many")
    for i in range(25):
        svc.add(download(f"{i}.bin"))
    refused(deployment, svc, download("25.bin"), QuotaExceededError, "at most 25")


@pytest.mark.parametrize("deployment", STORES, indirect=True)
def test_tenant_isolation(deployment: Deployment) -> None:
    a, b = deployment.service("a"), deployment.service("b")
    req = download()
    a.add(req)
    assert b.find(req.request_id) is None
    assert b.requests == []
    for verb in (b.remove, b.pause, b.resume):
        with pytest.raises(TransferError, match="no request"):
            verb(req.request_id)
    assert a.find(req.request_id) is not None


def test_pause_resume_and_remove_of_a_waiting_request(deployment: Deployment) -> None:
    svc = deployment.service("a")
    req = download()
    svc.add(req)
    svc.pause(req)
    assert svc.find(req.request_id).transfer_status == TransferStatus.PAUSED
    svc.resume(req)
    assert svc.find(req.request_id).transfer_status == TransferStatus.WAITING
    svc.remove(req)
    assert svc.find(req.request_id) is None
    with pytest.raises(TransferError, match="no request"):
        svc.remove(req)


def test_bad_app_id_is_refused() -> None:
    with pytest.raises(TransferError, match="invalid app id"):
        BackgroundTransferService("Bad App")
