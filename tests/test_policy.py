"""The pure policy, table-driven: add-time rules and admission decisions, no I/O."""

from __future__ import annotations

import pytest

from bgtransfer import (
    BackgroundTransferRequest,
    NotSupportedError,
    SandboxError,
    Settings,
    TransferError,
    TransferPreferences,
    TransferStatus,
)
from bgtransfer import _policy as policy
from bgtransfer._policy import Candidate, Conditions

S = Settings(data_root="/nonexistent")
P = TransferPreferences
T = TransferStatus
MB = 1_000_000


def req(url: str = "http://127.0.0.1/x", method: str = "GET", **kw: object) -> BackgroundTransferRequest:
    kw.setdefault("download_location", "/shared/transfers/x.bin")
    return BackgroundTransferRequest(url, method, **kw)  # type: ignore[arg-type]


BAD = [
    # (request factory, error class, words the message must contain)
    (lambda: req("ftp://127.0.0.1/x"), NotSupportedError, "scheme 'ftp'"),
    (lambda: req("file:///etc/passwd"), NotSupportedError, "scheme 'file'"),
    (lambda: req("gopher://h/x"), NotSupportedError, "gopher"),
    (lambda: req("javascript:alert(1)"), NotSupportedError, "javascript"),
    (lambda: req("data:text/plain,hi"), NotSupportedError, "data"),
    (lambda: req("//127.0.0.1/x"), NotSupportedError, "(none)"),
    (lambda: req(""), TransferError, "missing"),
    (lambda: req("http:///x"), TransferError, "no host"),
    (lambda: req("http://127.0.0.1:99999/x"), TransferError, "not a valid URL"),
    (lambda: req("http://127.0.0.1/x y"), TransferError, "whitespace"),
    (lambda: req(method="PUT"), NotSupportedError, "method 'PUT'"),
    (lambda: req(method="DELETE"), NotSupportedError, "DELETE"),
    (lambda: req(download_location=None), TransferError, "GET request needs download_location"),
    (lambda: req(upload_location="/shared/transfers/a"), TransferError, "GET request needs"),
    (lambda: req(method="POST", upload_location="/shared/transfers/a"), TransferError, "exactly one"),
    (lambda: req(method="POST", download_location=None), TransferError, "exactly one"),
    (lambda: req(download_location="/etc/passwd"), SandboxError, "outside the sandbox"),
    (lambda: req(download_location="shared/transfers/x"), SandboxError, "outside the sandbox"),
    (lambda: req(download_location="/shared/transfers/../x"), SandboxError, "'..'"),
    (lambda: req(download_location="/shared/transfers/a/../../b"), SandboxError, "'..'"),
    (lambda: req(download_location="/shared/transfers/"), SandboxError, "sandbox root"),
    (lambda: req(download_location="/shared/transfers/a\x00b"), SandboxError, "NUL"),
    (lambda: req(download_location="/shared/transfersx/a"), SandboxError, "outside"),
    (lambda: req(download_location="/shared/transfers/" + "a" * 300), TransferError, "too long"),
    (lambda: req(headers={"Range": "bytes=0-"}), NotSupportedError, "reserved"),
    (lambda: req(headers={"range": "bytes=0-"}), NotSupportedError, "reserved"),
    (lambda: req(headers={"IF-RANGE": "x"}), NotSupportedError, "reserved"),
    (lambda: req(headers={"If-None-Match": "x"}), NotSupportedError, "reserved"),
    (lambda: req(headers={"if-modified-since": "x"}), NotSupportedError, "reserved"),
    (lambda: req(headers={"Unless-Modified-Since": "x"}), NotSupportedError, "reserved"),
    (lambda: req(headers={" Range ": "x"}), NotSupportedError, "reserved"),
    (lambda: req(headers={"Content-Length": "5"}), NotSupportedError, "set by the service"),
    (lambda: req(headers={"X-A": "a\r\nInjected: 1"}), TransferError, "CR, LF or NUL"),
    (lambda: req(headers={"X-A": "a\nb"}), TransferError, "CR, LF or NUL"),
    (lambda: req(headers={"X-A": "a\x00b"}), TransferError, "CR, LF or NUL"),
    (lambda: req(headers={"X A": "a"}), TransferError, "not a valid HTTP header name"),
    (lambda: req(headers={"X-A:": "a"}), TransferError, "not a valid HTTP header name"),
    (lambda: req(headers={"": "a"}), TransferError, "not a valid HTTP header name"),
    (lambda: req(headers={f"X-{i}": "v" for i in range(16)}), TransferError, "too many headers: 16"),
    (lambda: req(headers={"X-Big": "v" * (16 * 1024)}), TransferError, "at most 16384"),
    (lambda: req(headers={"X-N": 5}), TransferError, "string name and value"),
    (lambda: req(headers=[("a", "b")]), TransferError, "mapping"),
    (lambda: req(tag="t" * 4001), TransferError, "at most 4000"),
    (lambda: req(transfer_preferences="WHENEVER"), TransferError, "transfer_preferences"),
    (lambda: req(expected_sha256="abc"), TransferError, "64 hex"),
]


@pytest.mark.parametrize(("make", "error", "words"), BAD, ids=[b[2] + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_request_is_refused_with_the_exact_class(make, error, words) -> None:
    with pytest.raises(TransferError) as info:
        policy.check_request(make(), S)
    assert type(info.value) is error
    assert words in str(info.value)


def test_a_good_request_is_normalised() -> None:
    c = policy.check_request(
        req("HTTP://127.0.0.1/x", "get", headers={"X-A": "1"}, tag="t" * 4000, expected_sha256="AB" * 32), S
    )
    assert (c.method, c.direction, c.local_parts) == ("GET", "download", ("x.bin",))
    assert c.expected_sha256 == "ab" * 32
    up = policy.check_request(
        req(method="POST", download_location=None, upload_location="/shared/transfers/./d//a.jpg"), S
    )
    assert (up.direction, up.local_parts) == ("upload", ("d", "a.jpg"))
    assert len(policy.check_request(req(headers={f"X-{i}": "v" for i in range(15)}), S).headers) == 15


@pytest.mark.parametrize("app_id", ["", "A", "-a", "a/b", "a b", "a" * 64, "é", None, 5])
def test_bad_app_ids(app_id: object) -> None:
    with pytest.raises(TransferError, match="invalid app id"):
        policy.check_app_id(app_id)


@pytest.mark.parametrize("app_id", ["a", "0", "photos", "a.b-c_d", "a" * 63])
def test_good_app_ids(app_id: str) -> None:
    assert policy.check_app_id(app_id) == app_id


def cond(network: str = "wifi", power: str = "external", fg: tuple[str, ...] = (), **flags: bool) -> Conditions:
    return Conditions(network=network, power=power, foreground=frozenset(fg), **flags)  # type: ignore[arg-type]


def cand(prefs: P = P.NONE, direction: str = "download", size: int | None = None, app: str = "a") -> Candidate:
    return Candidate(app, direction, prefs, size)  # type: ignore[arg-type]


ADMISSION = [
    # rule 7: preferences against conditions
    ("none on wifi+external", cand(P.NONE), cond(), "admit", T.TRANSFERRING),
    ("none on cellular", cand(P.NONE), cond("cellular"), "wait", T.WAITING_FOR_WIFI),
    ("none on battery", cand(P.NONE), cond(power="battery"), "wait", T.WAITING_FOR_EXTERNAL_POWER),
    ("cellular allowed", cand(P.ALLOW_CELLULAR), cond("cellular"), "admit", T.TRANSFERRING),
    (
        "cellular pref on battery",
        cand(P.ALLOW_CELLULAR),
        cond("cellular", "battery"),
        "wait",
        T.WAITING_FOR_EXTERNAL_POWER,
    ),
    ("battery allowed", cand(P.ALLOW_BATTERY), cond(power="battery"), "admit", T.TRANSFERRING),
    ("battery pref on cellular", cand(P.ALLOW_BATTERY), cond("cellular"), "wait", T.WAITING_FOR_WIFI),
    ("both allowed", cand(P.ALLOW_CELLULAR_AND_BATTERY), cond("cellular", "battery"), "admit", T.TRANSFERRING),
    (
        "battery saver, background",
        cand(P.ALLOW_CELLULAR_AND_BATTERY),
        cond(power="battery-saver"),
        "wait",
        T.WAITING_FOR_EXTERNAL_POWER_DUE_TO_BATTERY_SAVER_MODE,
    ),
    (
        "battery saver, foreground",
        cand(P.ALLOW_BATTERY),
        cond(power="battery-saver", fg=("a",)),
        "admit",
        T.TRANSFERRING,
    ),
    (
        "battery saver, foreground, none",
        cand(P.NONE),
        cond(power="battery-saver", fg=("a",)),
        "wait",
        T.WAITING_FOR_EXTERNAL_POWER,
    ),
    ("no network", cand(P.ALLOW_CELLULAR_AND_BATTERY), cond("none"), "wait", T.WAITING),
    # rule 10: 2G and data-cost flags
    ("2g background", cand(P.ALLOW_CELLULAR), cond("cellular-2g"), "wait", T.WAITING_FOR_NON_VOICE_BLOCKING_NETWORK),
    ("2g foreground", cand(P.ALLOW_CELLULAR), cond("cellular-2g", fg=("a",)), "admit", T.TRANSFERRING),
    (
        "2g, other app foreground",
        cand(P.ALLOW_CELLULAR),
        cond("cellular-2g", fg=("b",)),
        "wait",
        T.WAITING_FOR_NON_VOICE_BLOCKING_NETWORK,
    ),
    ("roaming", cand(P.ALLOW_CELLULAR), cond("cellular", roaming=True), "wait", T.WAITING),
    ("roaming in foreground", cand(P.ALLOW_CELLULAR), cond("cellular", fg=("a",), roaming=True), "wait", T.WAITING),
    ("roaming on wifi is fine", cand(P.NONE), cond(roaming=True), "admit", T.TRANSFERRING),
    ("over data limit", cand(P.ALLOW_CELLULAR), cond("cellular", over_data_limit=True), "wait", T.WAITING),
    (
        "over data limit, foreground",
        cand(P.ALLOW_CELLULAR),
        cond("cellular", fg=("a",), over_data_limit=True),
        "admit",
        T.TRANSFERRING,
    ),
    (
        "approaching data limit",
        cand(P.ALLOW_CELLULAR),
        cond("cellular", approaching_data_limit=True),
        "admit",
        T.TRANSFERRING,
    ),
    # rule 8: upload size caps
    ("upload 5MB cellular", cand(P.ALLOW_CELLULAR, "upload", 5 * MB), cond("cellular"), "admit", T.TRANSFERRING),
    (
        "upload >5MB cellular",
        cand(P.ALLOW_CELLULAR, "upload", 5 * MB + 1),
        cond("cellular"),
        "wait",
        T.WAITING_FOR_WIFI,
    ),
    (
        "upload 20MB wifi battery",
        cand(P.ALLOW_BATTERY, "upload", 20 * MB),
        cond(power="battery"),
        "admit",
        T.TRANSFERRING,
    ),
    (
        "upload >20MB wifi battery",
        cand(P.ALLOW_BATTERY, "upload", 20 * MB + 1),
        cond(power="battery"),
        "wait",
        T.WAITING_FOR_EXTERNAL_POWER,
    ),
    ("upload 100MB wifi external", cand(P.NONE, "upload", 100 * MB), cond(), "admit", T.TRANSFERRING),
    ("upload grew past 100MB", cand(P.NONE, "upload", 100 * MB + 1), cond(), "fail", T.COMPLETED),
    # rule 9: download size
    ("download 20MB cellular", cand(P.ALLOW_CELLULAR, size=20 * MB), cond("cellular"), "admit", T.TRANSFERRING),
    ("download >20MB cellular", cand(P.ALLOW_CELLULAR, size=20 * MB + 1), cond("cellular"), "wait", T.WAITING_FOR_WIFI),
    ("download >100MB battery", cand(P.ALLOW_BATTERY, size=100 * MB + 1), cond(power="battery"), "fail", T.COMPLETED),
    ("download >100MB external", cand(P.ALLOW_BATTERY, size=100 * MB + 1), cond(), "admit", T.TRANSFERRING),
    ("download size unknown on cellular", cand(P.ALLOW_CELLULAR), cond("cellular"), "admit", T.TRANSFERRING),
]


@pytest.mark.parametrize(("name", "c", "conditions", "action", "status"), ADMISSION, ids=[a[0] for a in ADMISSION])
def test_admission_table(name: str, c: Candidate, conditions: Conditions, action: str, status: T) -> None:
    d = policy.decide(c, conditions, S)
    assert (d.action, d.status) == (action, status), d.reason
    assert d.reason


def test_large_cellular_download_switches_to_allow_battery() -> None:
    d = policy.decide(cand(P.ALLOW_CELLULAR_AND_BATTERY, size=21 * MB), cond("cellular"), S)
    assert d.preferences == P.ALLOW_BATTERY
    # and after the switch it waits for Wi-Fi, then may run on battery
    assert policy.decide(cand(P.ALLOW_BATTERY, size=21 * MB), cond("cellular"), S).status == T.WAITING_FOR_WIFI
    assert policy.decide(cand(P.ALLOW_BATTERY, size=21 * MB), cond(power="battery"), S).action == "admit"


def test_every_number_is_a_setting() -> None:
    s = Settings(data_root="/x", max_upload_cellular_bytes=10, max_download_cellular_bytes=10)
    assert policy.decide(cand(P.ALLOW_CELLULAR, "upload", 11), cond("cellular"), s).action == "wait"
    assert policy.decide(cand(P.ALLOW_CELLULAR, size=11), cond("cellular"), s).action == "wait"
    assert policy.size_cap("download", cond("cellular"), s) == 10
    assert policy.size_cap("download", cond(), s) is None
    assert policy.size_cap("upload", cond(power="battery"), s) == 20 * MB
    assert policy.min_rate(cond("cellular"), S) == 50_000 / 8
    assert policy.min_rate(cond(), S) == 100_000 / 8


def test_invalid_conditions_name_the_field() -> None:
    with pytest.raises(TransferError, match="invalid network 'lte'"):
        Conditions(network="lte")  # type: ignore[arg-type]
    with pytest.raises(TransferError, match="invalid power"):
        Conditions(power="solar")  # type: ignore[arg-type]


def picks(queue, clocks, free, weights=None, now=0.0) -> list[str]:
    return policy.fair_share(queue, clocks, free, weights, now).picked


def test_fair_share_is_round_robin_across_apps_in_arrival_order_within() -> None:
    queue = [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1"), ("b", "b2")]
    assert picks(queue, {}, 10) == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert picks(queue, {}, 2) == ["a1", "b1"]
    # remembered clocks: a and b were served, c never was, so c goes first
    assert picks(queue, {"a": 5, "b": 5.5}, 3) == ["c1", "a1", "b1"]
    assert picks([], {}, 3) == []
    assert picks(queue, {}, 0) == []


def test_fair_share_by_weight_over_many_passes() -> None:
    """Weights 3:1, both apps always backlogged, two slots per pass: starts split 3:1."""
    clocks: dict[str, float] = {}
    now, started = 0.0, {"a": 0, "b": 0}
    for n in range(50):
        queue = [("b", f"b{n}-{i}") for i in range(3)] + [("a", f"a{n}-{i}") for i in range(3)]
        share = policy.fair_share(queue, clocks, 2, {"a": 3, "b": 1}, now)
        clocks, now = {**clocks, **share.clocks}, share.now
        for rid in share.picked:
            started[rid[0]] += 1
    assert started == {"a": 75, "b": 25}


def test_fair_share_gives_an_app_back_from_idle_no_burst() -> None:
    # b was away while a's clock ran to 100: b's old clock counts as the device's time now
    share = policy.fair_share([("a", "a1"), ("a", "a2"), ("b", "b1"), ("b", "b2")], {"a": 100, "b": 3}, 4, now=99.5)
    assert share.picked == ["b1", "a1", "b2", "a2"]  # alternating, not b twice first
    assert share.clocks == {"a": 102, "b": 101.5} and share.now == 101


def test_backoff_grows_caps_and_honours_retry_after() -> None:
    s = Settings(data_root="/x", retry_base_seconds=2, retry_max_seconds=60)
    assert [policy.backoff(n, s) for n in (1, 2, 3, 10)] == [2, 4, 8, 60]
    assert policy.backoff(3, s, retry_after=7) == 7
    assert policy.backoff(3, s, retry_after=600) == 60


def test_form_fields_are_checked() -> None:
    def up(**kw: object) -> BackgroundTransferRequest:
        return req(method="POST", download_location=None, upload_location="/shared/transfers/a", **kw)

    assert policy.check_request(up(form_fields={"a": "1"}), S).form_fields == {"a": "1"}
    for fields, words in [({"file": "x"}, "other than 'file'"), ({"a b": "x"}, "token"),
                          ({"a": 1}, "must be a string"), ({"a": "\x00"}, "without NUL"), ("a=1", "mapping")]:
        with pytest.raises(TransferError, match=words):
            policy.check_request(up(form_fields=fields), S)
    with pytest.raises(TransferError, match="only for uploads"):
        policy.check_request(req(form_fields={"a": "1"}), S)
    with pytest.raises(NotSupportedError, match="Content-Type"):
        policy.check_request(up(form_fields={}, headers={"content-type": "x"}), S)


@pytest.mark.parametrize("limits, on_device, of_app, share", [
    ({}, 3, 1, 0.0),  # no limit at all
    ({"max_rate_per_transfer": 500}, 3, 1, 500),
    ({"max_rate_per_device": 1000}, 4, 2, 250),  # an even share of the device's
    ({"max_rate_per_app": 1000}, 4, 2, 500),  # ... or of the app's, among its own
    ({"max_rate_per_app": 1000, "max_rate_per_device": 1000}, 2, 1, 500),  # the tightest wins
    ({"max_rate_per_transfer": 100, "max_rate_per_device": 1000}, 2, 2, 100),
    ({"max_rate_per_device": 1000}, 0, 0, 1000),  # counted before it runs: a share of one
])
def test_rate_share(limits: dict, on_device: int, of_app: int, share: float) -> None:
    assert policy.rate_share(Settings(data_root="/x", **limits), on_device, of_app) == share


@pytest.mark.parametrize("limits, usage, over", [
    ({}, {"a": 10**12}, set()),  # no quota at all
    ({"max_daily_bytes_per_app": 100}, {"a": 99, "b": 100}, {"b"}),
    ({"max_daily_bytes_per_app": 100, "app_daily_bytes": "a=50"}, {"a": 60, "b": 60}, {"a"}),  # a's own
    ({"app_daily_bytes": "a=50"}, {"a": 60, "b": 10**9}, {"a"}),  # only a has one
])
def test_over_quota(limits: dict, usage: dict, over: set) -> None:
    got = policy.over_quota(usage, Settings(data_root="/x", **limits))
    assert set(got) == over
    assert all("daily byte quota" in reason for reason in got.values())


@pytest.mark.parametrize("raw", ["a", "a=", "=3", "a=0", "a=-1", "a=x", "a=inf", "a=nan"])
def test_per_app_settings_refuse_bad_values(raw: str) -> None:
    with pytest.raises(ValueError, match="app_daily_bytes"):
        Settings(data_root="/x", app_daily_bytes=raw)
