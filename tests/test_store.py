"""The state store on SQLite and on PostgreSQL: caps, leases, fencing, reclaim, round-robin."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa

from bgtransfer import BackgroundTransferRequest, Settings, TransferStatus
from bgtransfer import _policy as policy
from bgtransfer._exceptions import LeaseLost, TransferError
from bgtransfer._store import _HELD, _TALLY, Store, schema
from tests.conftest import STORES, Deployment


@pytest.fixture(params=STORES)
def env(request: pytest.FixtureRequest, tmp_path) -> tuple[Store, Settings, Deployment]:
    import contextlib

    from tests.conftest import make_deployment

    with contextlib.ExitStack() as stack:
        dep = make_deployment(tmp_path, *request.param, stack)
        s = dep.settings
        yield Store(s.store_url), s, dep


def row(app: str, i: int, device: str, prefs: str = "NONE") -> dict:
    r = BackgroundTransferRequest("http://127.0.0.1/x", download_location=f"/shared/transfers/{app}{i}")
    return {"id": r.request_id, "device": device, "app_id": app, "method": "GET", "url": r.request_uri,
            "headers": {}, "direction": "download", "local_path": r.download_location,
            "preferences": prefs, "tag": None, "expected_sha256": None}


def add(store: Store, s: Settings, app: str, n: int, device: str, prefs: str = "NONE") -> list[str]:
    """Add ``n`` requests without the admission pass an add runs (its settings give it no slot),
    so that the test's own ``promote`` calls are the ones that admit."""
    no_slots = dataclasses.replace(s, max_concurrent_per_device=0)
    ids = []
    for i in range(n):
        r = row(app, i, device, prefs)
        assert store.insert(r, no_slots) == []
        ids.append(r["id"])
    return ids


def test_migrate_is_idempotent_and_versioned(env) -> None:
    store, s, dep = env
    Store(s.store_url)  # a second process starting up
    with store.tx() as conn:
        assert [r.version for r in conn.execute(sa.select(schema.c.version))] == [1, 2, 3, 4]


def live(store: Store, device: str) -> int:
    with store.tx(read=True) as conn:
        return conn.exec_driver_sql(f"SELECT live FROM bgt_queues WHERE device = '{device}'").scalar_one()


def test_the_device_counts_its_live_requests(env) -> None:
    """Rule 6 reads a count kept by add and remove: a running request removed counts no more,
    although its row stays until its attempt stops."""
    store, s, dep = env
    a = add(store, s, "a", 3, dep.device)
    add(store, s, "b", 1, dep.device)
    assert live(store, dep.device) == 4
    [(rid, token), _] = store.promote(dep.device, s)
    store.claim(rid, token, "w", s)
    assert store.remove("a", rid)[1]  # still running: it stops at its next tick
    assert live(store, dep.device) == 3
    store.remove("a", a[2])  # queued: deleted at once
    assert live(store, dep.device) == 2
    store.finish(rid, token, phase="done", status="COMPLETED")  # the removed row goes now
    assert live(store, dep.device) == 2
    with store.tx(read=True) as conn:
        rows = conn.exec_driver_sql(f"SELECT count(*) FROM bgt_requests WHERE device = '{dep.device}'").scalar_one()
    assert rows == 2


def test_two_removes_of_one_request_count_it_once(env) -> None:
    """Both removes read the request before either holds the device's lock: the second must see
    the first's work once it has the lock, not remove (and uncount) the request again."""
    store, s, dep = env
    rid, _ = add(store, s, "a", 2, dep.device)
    said: list[str] = []

    def remove() -> None:
        try:
            said.append(f"removed, running: {store.remove('a', rid)[1]}")
        except TransferError as exc:
            said.append(str(exc))

    removers = [threading.Thread(target=remove) for _ in range(2)]
    with store.tx() as conn:
        store._lock_device(conn, dep.device)  # as a pass holding the device
        for t in removers:
            t.start()
        time.sleep(0.3)  # both removers get as far as the device's lock
    for t in removers:
        t.join(30)
    assert sorted(said) == [f"no request {rid!r} for app 'a'", "removed, running: False"]
    assert live(store, dep.device) == 1


def test_cap_fencing_and_release(env) -> None:
    store, s, dep = env
    a = add(store, s, "a", 3, dep.device)
    picks = store.promote(dep.device, s)
    assert [rid for rid, _ in picks] == a[:2]  # the cap of 2
    assert store.promote(dep.device, s) == []  # nothing more while both slots are held
    (rid, token) = picks[0]
    assert store.claim(rid, token + 1, "w", s) is None  # a stale or forged token
    row = store.claim(rid, token, "w", s)
    assert row is not None and row["status"] == TransferStatus.TRANSFERRING.value and row["attempts"] == 1
    assert store.claim(rid, token, "w2", s) is None  # a duplicate delivery
    assert store.heartbeat(rid, token, 5, bytes_received=10) is None
    with pytest.raises(LeaseLost):
        store.heartbeat(rid, token - 1, 5, bytes_received=99)
    store.finish(rid, token, phase="done", status="COMPLETED")
    with pytest.raises(LeaseLost):  # a finished attempt cannot write again
        store.heartbeat(rid, token, 5)
    assert [r for r, _ in store.promote(dep.device, s)] == [a[2]]
    assert store.get(rid)["bytes_received"] == 10


def test_expired_lease_is_reclaimed_and_its_writer_fenced(env) -> None:
    store, s, dep = env
    (rid,) = add(store, s, "a", 1, dep.device)
    [(_, token)] = store.promote(dep.device, s)
    store.claim(rid, token, "dead", s)
    later = time.time() + s.lease_seconds + 1
    [(rid2, token2)] = store.promote(dep.device, s, now=later)  # the dead worker's slot comes back
    assert rid2 == rid and token2 == token + 1
    with pytest.raises(LeaseLost):
        store.heartbeat(rid, token, 5, bytes_received=1)
    with pytest.raises(LeaseLost):
        store.finish(rid, token, phase="done", status="COMPLETED")


def test_round_robin_start_order_across_apps(env) -> None:
    store, s, dep = env
    a = add(store, s, "a", 3, dep.device)
    b = add(store, s, "b", 2, dep.device)
    c = add(store, s, "c", 1, dep.device)
    order = []
    for _ in range(6):
        picks = store.promote(dep.device, s)
        for rid, token in picks:
            order.append(rid)
            store.claim(rid, token, "w", s)
            store.finish(rid, token, phase="done", status="COMPLETED")
    assert order == [a[0], b[0], c[0], a[1], b[1], a[2]]


def queue_in_fair_order(store: Store, s: Settings, device: str, arrivals: list[str], free: int) -> list[str]:
    """Queue a request per app named in ``arrivals`` (no pass admits them), and return their ids
    in the order the policy alone, over every waiting request, starts them ``free`` at a time."""
    no_slots = dataclasses.replace(s, max_concurrent_per_device=0)
    queue: list[tuple[str, str]] = []
    for n, app in enumerate(arrivals):
        r = row(app, n, device)
        assert store.insert(r, no_slots) == []
        queue.append((app, r["id"]))
    expected: list[str] = []
    clocks: dict[str, float] = {}
    vnow = 0.0
    while queue:
        share = policy.fair_share(queue, clocks, free, s.weights, vnow)
        expected += share.picked
        clocks.update(share.clocks)
        vnow = share.now
        queue = [q for q in queue if q[1] not in share.picked]
    return expected


def test_a_pass_reads_only_the_apps_whose_turn_comes_first(env) -> None:
    """With more apps than free slots the pass reads the heads of the first few apps only; the
    start order is still the one fair share gives over the whole queue (weights and ties too)."""
    store, s, dep = env
    s = dataclasses.replace(s, max_concurrent_per_device=3, app_weights="a3=3,a7=2")
    arrivals = [f"a{(i * 7) % 11}" for i in range(40)]  # 11 apps, interleaved, uneven lengths
    expected = queue_in_fair_order(store, s, dep.device, arrivals, 3)
    order: list[str] = []
    while picks := store.promote(dep.device, s):
        for rid, token in picks:
            order.append(rid)
            store.claim(rid, token, "w", s)
            store.finish(rid, token, phase="done", status="COMPLETED")
    assert order == expected


def test_chained_passes_start_what_fair_share_picks(env) -> None:
    """A pass that ends an attempt and claims the next request for its worker (one slot to give)
    reads only the first pick: the order is still fair share's over the whole queue, also when
    a long run of one app's requests fills the front of the queue."""
    store, s, dep = env
    s = dataclasses.replace(s, max_concurrent_per_device=1, app_weights="a3=3,a7=2", max_outstanding_per_app=50)
    arrivals = ["big"] * 45 + [f"a{(i * 7) % 11}" for i in range(40)]
    expected = queue_in_fair_order(store, s, dep.device, arrivals, 1)
    [(rid, token)] = store.promote(dep.device, s)
    order = [rid]
    running = store.claim(rid, token, "w", s)
    while running is not None:
        after = store.finish_and_pass(running["id"], running["lease_token"], dep.device, s, "w",
                                      phase="done", status="COMPLETED")
        assert after.picks == []  # the one slot went to this worker
        running = after.claimed
        if running is not None:
            order.append(running["id"])
    assert order == expected


def test_an_attempts_end_reclaims_an_expired_lease_before_it_gives_its_slot_on(env) -> None:
    """An attempt that ends while another's lease has expired leaves the next start to a pass,
    which reclaims the dead worker's request and gives both free slots by fair share: the
    next to a newly arrived app, the other back to the dead worker's request, with a new token."""
    store, s, dep = env
    [dead], [rid] = add(store, s, "a", 1, dep.device), add(store, s, "b", 1, dep.device)
    picks = store.promote(dep.device, s)
    assert [r for r, _ in picks] == [dead, rid]  # the cap of 2
    [(_, dead_token), (_, token)] = picks
    store.claim(dead, dead_token, "dead", s)
    store.claim(rid, token, "w", s)
    [new] = add(store, s, "c", 1, dep.device)  # an app whose turn comes first
    with store.tx() as conn:
        conn.execute(sa.text("UPDATE bgt_requests SET lease_expires = 0 WHERE id = :id"), {"id": dead})
    after = store.finish_and_pass(rid, token, dep.device, s, "w", phase="done", status="COMPLETED")
    assert after.claimed is not None and after.claimed["id"] == new
    [(again, again_token)] = after.picks
    assert again == dead and again_token > dead_token
    with pytest.raises(LeaseLost):
        store.heartbeat(dead, dead_token, 5)


def test_an_attempts_end_decides_again_what_a_change_of_conditions_made_stale(env) -> None:
    """Requests decided on Wi-Fi do not start on the slot an attempt gives back after the
    network changed to cellular: that attempt's end decides them again first."""
    store, s, dep = env
    s = dataclasses.replace(s, max_concurrent_per_device=1)
    store.set_conditions(dep.device, {"network": "wifi", "power": "external"})
    [first] = add(store, s, "a", 1, dep.device)
    [(rid, token)] = store.promote(dep.device, s)
    assert rid == first and store.claim(rid, token, "w", s) is not None
    rest = add(store, s, "b", 1, dep.device) + add(store, s, "c", 1, dep.device)  # apps whose turn comes first
    store.set_conditions(dep.device, {"network": "cellular"})
    after = store.finish_and_pass(rid, token, dep.device, s, "w", phase="done", status="COMPLETED")
    assert after.claimed is None and after.picks == []
    assert [store.get(r)["status"] for r in rest] == [TransferStatus.WAITING_FOR_WIFI.value] * 2


def test_an_attempts_end_notices_an_app_leaving_the_foreground_before_it_gives_its_slot_on(env) -> None:
    """On 2G only an app in the foreground may transfer: an app whose time there ended while it
    waited does not get the slot an attempt gives back; that attempt's end decides again first."""
    store, s, dep = env
    s = dataclasses.replace(s, max_concurrent_per_device=1)
    now = time.time()
    store.set_conditions(dep.device, {"network": "cellular-2g", "foreground": {"a": now + 600, "b": now + 0.5}})
    (rid,) = add(store, s, "a", 1, dep.device, prefs="ALLOW_CELLULAR_AND_BATTERY")
    [(_, token)] = store.promote(dep.device, s)
    assert store.claim(rid, token, "w", s) is not None
    (waiting,) = add(store, s, "b", 1, dep.device, prefs="ALLOW_CELLULAR_AND_BATTERY")
    assert store.get(waiting)["admissible"]  # b is in the foreground for now
    time.sleep(max(0.0, now + 0.6 - time.time()))
    after = store.finish_and_pass(rid, token, dep.device, s, "w", phase="done", status="COMPLETED")
    assert after.claimed is None
    row_now = store.get(waiting)
    assert not row_now["admissible"]
    assert row_now["status"] == TransferStatus.WAITING_FOR_NON_VOICE_BLOCKING_NETWORK.value


def test_an_attempt_that_puts_its_request_back_in_the_queue_has_its_pass_start_it_again(env) -> None:
    """A requeued attempt (its size learnt, say) is decided again by the pass its end runs, which
    starts it again at once when nothing else waits, with a new token."""
    store, s, dep = env
    (rid,) = add(store, s, "a", 1, dep.device)
    [(_, token)] = store.promote(dep.device, s)
    store.claim(rid, token, "w", s)
    after = store.finish_and_pass(rid, token, dep.device, s, "w", phase="queued", status="WAITING", not_before=0.0)
    assert after.claimed is not None and after.claimed["id"] == rid and after.claimed["lease_token"] > token


def test_attempts_ending_at_once_hand_their_slots_on_side_by_side(env, monkeypatch) -> None:
    """PostgreSQL: workers whose attempts end at the same time each claim the next request in one
    hand-off, beside each other (no device lock between them): every request runs once, with
    one token, and the slots held never exceed the cap, whatever the interleaving."""
    store, s, dep = env
    if store.dialect == "sqlite":
        pytest.skip("SQLite: one writer at a time, so every attempt's end is a pass")
    s = dataclasses.replace(s, max_concurrent_per_device=4)
    store.set_conditions(dep.device, {"network": "wifi", "power": "external"})
    ids = [rid for app in ("a", "b", "c", "d", "e") for rid in add(store, s, app, 20, dep.device)]
    handed: list[str] = []
    hand_off = Store._hand_off

    def counted(self: Store, *args: object, **kwargs: object) -> object:
        handed_on = hand_off(self, *args, **kwargs)
        if handed_on is not None and handed_on.claimed is not None:
            handed.append(handed_on.claimed["id"])
        return handed_on

    monkeypatch.setattr(Store, "_hand_off", counted)
    import psycopg

    runs: list[tuple[str, int]] = []
    errors: list[BaseException] = []
    held_most, stop = [0], threading.Event()

    def watch() -> None:
        with psycopg.connect(s.store_url, autocommit=True) as conn:
            while not stop.is_set():
                [(n,)] = conn.execute("SELECT count(*) FROM bgt_requests WHERE device = %s "
                                      "AND phase IN ('admitted', 'running')", (dep.device,)).fetchall()
                held_most[0] = max(held_most[0], n)

    def work(first: tuple[str, int], owner: str) -> None:
        try:
            running = store.claim(*first, owner, s)
            while running is not None:
                runs.append((running["id"], running["lease_token"]))
                after = store.finish_and_pass(running["id"], running["lease_token"], dep.device, s, owner,
                                              phase="done", status="COMPLETED")
                assert after.picks == []  # every slot was handed on, none left to dispatch
                running = after.claimed
        except BaseException as exc:  # seen by the test's thread
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    workers = [threading.Thread(target=work, args=(pick, f"w{k}"))
               for k, pick in enumerate(store.promote(dep.device, s))]
    watcher.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    stop.set()
    watcher.join(30)
    assert len(workers) == 4 and errors == []
    assert sorted(rid for rid, _ in runs) == sorted(ids)  # each once
    assert all(store.get(rid)["phase"] == "done" for rid in ids)
    assert 1 <= held_most[0] <= 4
    assert len(handed) > len(ids) // 2  # mostly hand-offs: the queue ran dry only at its end


def test_a_hand_off_does_not_wait_for_its_attempts_row_held_elsewhere(env) -> None:
    """PostgreSQL: a hand-off whose attempt's row another transaction holds (a concurrent
    hand-off's pick that read it while it was queued) neither waits nor writes: it leaves the
    end to the pass, which waits its turn. Hand-offs waiting on each other's rows while holding
    their own picks could otherwise close a cycle (a deadlock, seen once in CI)."""
    store, s, dep = env
    if store.dialect == "sqlite":
        pytest.skip("SQLite: one writer at a time, so every attempt's end is a pass")
    import psycopg

    store.set_conditions(dep.device, {"network": "wifi", "power": "external"})
    rid, *_ = add(store, s, "a", 1, dep.device) + add(store, s, "b", 2, dep.device)
    [(_, token)] = store.promote(dep.device, dataclasses.replace(s, max_concurrent_per_device=1))
    store.claim(rid, token, "w", s)
    holder = psycopg.connect(s.store_url, autocommit=False)
    try:
        holder.execute("SELECT 1 FROM bgt_requests WHERE id = %s FOR UPDATE", (rid,))
        outcome: list[object] = []
        now = time.time()
        handing = threading.Thread(target=lambda: outcome.append(store._hand_off(
            rid, token, "w", dep.device, s, "w", {"phase": "done", "status": "COMPLETED", "updated_at": now}, now)))
        handing.start()
        handing.join(10)
        assert not handing.is_alive() and outcome == [None]
        assert store.get(rid)["phase"] == "running"  # nothing written
    finally:
        holder.close()
    after = store.finish_and_pass(rid, token, dep.device, s, "w", phase="done", status="COMPLETED")
    assert after.claimed is not None and store.get(rid)["phase"] == "done"


def alone_and_running(store: Store, s: Settings, dep: Deployment) -> tuple[str, int]:
    """PostgreSQL (a skip on SQLite, where an add runs its own pass, in turn with every other
    writer): the device's only request, claimed by "w"; its id and token."""
    if store.dialect == "sqlite":
        pytest.skip("SQLite: an add runs its own pass, in turn with every other writer")
    store.set_conditions(dep.device, {"network": "wifi", "power": "external"})
    (rid,) = add(store, s, "a", 1, dep.device)
    [(_, token)] = store.promote(dep.device, s)
    store.claim(rid, token, "w", s)
    return rid, token


def test_a_recheck_that_fails_after_a_dry_hand_off_leaves_the_attempt_ended(env, monkeypatch) -> None:
    """PostgreSQL: the recheck after a hand-off that found the queue dry runs after the attempt's
    end has committed; if it fails, the attempt is still ended (its slot free), and the failure is
    the periodic pass's to make up, not the attempt's."""
    store, s, dep = env
    from bgtransfer import _store

    rid, token = alone_and_running(store, s, dep)
    monkeypatch.setattr(_store, "_arrived", lambda device, arrivals: [(sa.text("SELECT 1 / 0"), {})])
    after = store.finish_and_pass(rid, token, dep.device, s, "w", owner="w", phase="done", status="COMPLETED")
    assert after.claimed is None and after.picks == []
    assert store.get(rid)["phase"] == "done"
    with store.tx() as conn:
        assert conn.execute(sa.text(f"SELECT count(*) FROM bgt_requests WHERE {_HELD}"),
                            {"device": dep.device}).scalar() == 0


def test_a_hand_off_that_the_server_aborts_leaves_the_end_to_the_pass(env, monkeypatch) -> None:
    """PostgreSQL: a hand-off aborted by the server (a deadlock, a serialization failure) wrote
    nothing; the attempt's end then runs as a pass, which ends it and claims the next request."""
    store, s, dep = env
    if store.dialect == "sqlite":
        pytest.skip("SQLite: one writer at a time, so every attempt's end is a pass")
    import psycopg

    def aborted(*_args: object, **_kwargs: object) -> object:
        raise psycopg.errors.DeadlockDetected("deadlock detected")

    store.set_conditions(dep.device, {"network": "wifi", "power": "external"})
    rid, nxt = add(store, s, "a", 1, dep.device) + add(store, s, "b", 1, dep.device)
    [(_, token)] = store.promote(dep.device, dataclasses.replace(s, max_concurrent_per_device=1))
    store.claim(rid, token, "w", s)
    monkeypatch.setattr(Store, "_hand_off", aborted)
    after = store.finish_and_pass(rid, token, dep.device, dataclasses.replace(s, max_concurrent_per_device=1), "w",
                                  phase="done", status="COMPLETED")
    assert store.get(rid)["phase"] == "done"
    assert after.claimed is not None and after.claimed["id"] == nxt


def test_an_attempt_that_ends_on_a_dry_queue_frees_its_slot_and_wakes_the_workers_for_an_add_under_way(env) -> None:
    """PostgreSQL: an attempt that ends with nothing queued ends in its hand-off all the same and
    frees its slot; an add under way then (holding the queue row, having read the slot held) is
    waited for after the commit and wakes the workers, as after a pass that leaves a slot free."""
    store, s, dep = env
    import psycopg

    rid, token = alone_and_running(store, s, dep)
    wakeups, stopping = store.wakeups(dep.device), threading.Event()
    adding = psycopg.connect(s.store_url, autocommit=False)
    try:
        adding.execute("UPDATE bgt_queues SET next_seq = next_seq + 1 WHERE device = %s", (dep.device,))
        outcome: list[object] = []
        ending = threading.Thread(target=lambda: outcome.append(store.finish_and_pass(
            rid, token, dep.device, s, "w", phase="done", status="COMPLETED")))
        ending.start()
        ending.join(0.5)
        assert ending.is_alive()  # its recheck waits for the add's commit
        adding.commit()
        ending.join(30)
        [after] = outcome
        assert after.claimed is None and after.picks == []
        assert store.get(rid)["phase"] == "done"
        with store.tx() as conn:
            assert conn.execute(sa.text(f"SELECT count(*) FROM bgt_requests WHERE {_HELD}"),
                                {"device": dep.device}).scalar() == 0
        t0 = time.monotonic()
        wakeups.wait(30, stopping)  # returns on the recheck's NOTIFY
        assert time.monotonic() - t0 < 20
    finally:
        adding.close()
        wakeups.close()


def test_an_add_and_a_dispatched_claim_are_durable_when_they_return(env) -> None:
    """PostgreSQL: passes and hand-offs commit without waiting for the WAL flush, but an add
    returns only when the log is flushed past the row it wrote (its page says how far the log
    must reach for it), so a server crash after cannot lose an accepted request; and so does the
    claim of a dispatched request, which the wake-up's token alone fences."""
    store, s, dep = env
    if store.dialect == "sqlite":
        pytest.skip("SQLite: every commit is the database file's own")
    import psycopg

    with psycopg.connect(s.store_url, autocommit=True) as pg:
        try:
            pg.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
        except psycopg.Error as exc:
            pytest.skip(f"PostgreSQL's pageinspect extension is not available: {exc}")

        def flushed(rid: str) -> tuple[str, bool]:
            return pg.execute(
                "SELECT r.phase, pg_current_wal_flush_lsn() >= h.lsn FROM bgt_requests r, page_header(get_raw_page("
                "'bgt_requests', (r.ctid::text::point)[0]::int)) h WHERE r.id = %s", (rid,)).fetchone()

        store.set_conditions(dep.device, {"network": "wifi", "power": "external"})
        (rid,) = add(store, s, "a", 1, dep.device)
        assert flushed(rid) == ("queued", True)
        [(_, token)] = store.promote(dep.device, s)
        store.claim(rid, token, "w", s)
        assert flushed(rid) == ("running", True)


def test_a_claim_that_a_server_crash_lost_is_fenced_out_by_its_owner(env) -> None:
    """A hand-off's commit does not wait for the WAL flush, so a server crash can lose its claim
    while its worker runs the request; a later pass then gives the same token out again, but the
    next claim's owner differs, and the first holder can no longer write (PostgreSQL; the fence
    is the same on SQLite, where the loss is made the same way)."""
    store, s, dep = env
    s = dataclasses.replace(s, max_concurrent_per_device=1)
    store.set_conditions(dep.device, {"network": "wifi", "power": "external"})
    first, nxt = add(store, s, "a", 2, dep.device)
    [(_, token)] = store.promote(dep.device, s)
    store.claim(first, token, "w1", s)
    after = store.finish_and_pass(first, token, dep.device, s, "w1", owner="w1", phase="done", status="COMPLETED")
    assert after.claimed is not None and after.claimed["id"] == nxt
    lost = after.claimed["lease_token"]
    with store.tx() as conn:  # the crash: the claim's commit never reached the disk
        conn.execute(sa.text("UPDATE bgt_requests SET phase = 'queued', status = 'WAITING', lease_token = :t - 1, "
                             "lease_owner = NULL, lease_expires = NULL, attempts = attempts - 1 WHERE id = :id"),
                     {"t": lost, "id": nxt})
    assert store.promote(dep.device, s) == [(nxt, lost)]  # the same token, given out again
    assert store.claim(nxt, lost, "w2", s) is not None
    with pytest.raises(LeaseLost):
        store.heartbeat(nxt, lost, 5, owner="w1", bytes_received=1)
    with pytest.raises(LeaseLost):
        store.finish_and_pass(nxt, lost, dep.device, s, "w1", owner="w1", phase="done", status="COMPLETED")
    assert store.get(nxt)["phase"] == "running" and store.get(nxt)["bytes_received"] == 0
    assert store.heartbeat(nxt, lost, 5, owner="w2", bytes_received=7) is None
    store.finish_and_pass(nxt, lost, dep.device, s, "w2", owner="w2", phase="done", status="COMPLETED")
    assert store.get(nxt)["phase"] == "done" and store.get(nxt)["bytes_received"] == 7


def test_conditions_decide_and_persist(env) -> None:
    store, s, dep = env
    (rid,) = add(store, s, "a", 1, dep.device)
    store.set_conditions(dep.device, {"network": "cellular"})
    assert store.promote(dep.device, s) == []
    assert store.get(rid)["status"] == TransferStatus.WAITING_FOR_WIFI.value
    store.set_conditions(dep.device, {"foreground": {"a": time.time() + 60}})
    cond = store.conditions(dep.device)
    assert cond.network == "cellular" and cond.foreground == frozenset({"a"})
    store.set_conditions(dep.device, {"network": "wifi"})
    assert [r for r, _ in store.promote(dep.device, s)] == [rid]


def test_remove_of_a_running_request_waits_for_its_worker(env) -> None:
    store, s, dep = env
    (rid,) = add(store, s, "a", 1, dep.device)
    [(_, token)] = store.promote(dep.device, s)
    store.claim(rid, token, "w", s)
    row, running = store.remove("a", rid)
    assert running and store.get(rid) is None  # gone for the app at once
    assert store.heartbeat(rid, token, 5) == "cancel"  # the worker learns at its next tick
    assert store.finish(rid, token, phase="queued", status="WAITING")["phase"] == "removed"
    with store.tx() as conn:
        from bgtransfer._store import requests

        assert conn.execute(sa.select(sa.func.count()).select_from(requests)).scalar() == 0


def decisions(store: Store, device: str) -> int:
    from bgtransfer._store import counters

    with store.tx() as conn:
        return conn.execute(sa.select(sa.func.coalesce(sa.func.sum(counters.c.value), 0)).where(
            counters.c.device == device, counters.c.metric == "decision")).scalar()


def test_add_decides_at_once_and_a_pass_decides_only_what_changed(env) -> None:
    store, s, dep = env
    store.set_conditions(dep.device, {"network": "cellular"})
    (rid,) = add(store, s, "a", 1, dep.device)
    row = store.get(rid)  # decided by the add itself, before any pass
    assert not row["admissible"] and row["status"] == TransferStatus.WAITING_FOR_WIFI.value
    assert row["decided_version"] == 1 and decisions(store, dep.device) == 1
    (rid2,) = add(store, s, "b", 1, dep.device)
    assert store.promote(dep.device, s) == [] and decisions(store, dep.device) == 2  # nothing re-decided
    store.set_conditions(dep.device, {"network": "wifi"})
    assert sorted(r for r, _ in store.promote(dep.device, s)) == sorted([rid, rid2])
    assert decisions(store, dep.device) == 4  # both, once, under the new conditions


def test_a_pass_notices_an_app_leaving_the_foreground(env) -> None:
    store, s, dep = env
    now = time.time()
    store.set_conditions(dep.device, {"network": "cellular-2g", "foreground": {"a": now + 5}})
    (rid,) = add(store, s, "a", 1, dep.device, prefs="ALLOW_CELLULAR_AND_BATTERY")
    assert store.get(rid)["admissible"]  # 2G is allowed for an app in the foreground
    assert store.promote(dep.device, s, now=now + 10) == []  # ... but it left before a slot was given
    row = store.get(rid)
    assert not row["admissible"] and row["status"] == TransferStatus.WAITING_FOR_NON_VOICE_BLOCKING_NETWORK.value
    assert store.conditions(dep.device, now + 10).foreground == frozenset()


def test_a_version_1_store_is_upgraded_in_place(env) -> None:
    """A store made by version 1 (no partial indexes; each app's last admission time, kept only for
    apps already served; the arrival order on the device's row, no count of live requests) gets
    indexes, fair-share clocks, and each device's queue row, at the next start, and admits as before."""
    store, s, dep = env
    (rid,) = add(store, s, "a", 1, dep.device)
    with store.tx() as conn:
        for name in ("bgt_requests_held", "bgt_requests_undecided", "bgt_requests_heads"):
            conn.exec_driver_sql(f"DROP INDEX {name}")
        conn.exec_driver_sql("DELETE FROM bgt_app_turns")
        conn.exec_driver_sql("ALTER TABLE bgt_app_turns RENAME COLUMN clock TO last_admit_at")
        conn.exec_driver_sql(f"INSERT INTO bgt_app_turns VALUES ('{dep.device}', 'z', {time.time()})")
        conn.exec_driver_sql("DROP TABLE bgt_queues")
        conn.exec_driver_sql("ALTER TABLE bgt_devices ADD COLUMN next_seq BIGINT NOT NULL DEFAULT 2")
        conn.execute(schema.delete().where(schema.c.version >= 2))
    upgraded = Store(s.store_url)
    with upgraded.tx() as conn:
        assert [r.version for r in conn.execute(sa.select(schema.c.version))] == [1, 2, 3, 4]
        assert conn.exec_driver_sql("SELECT device, next_seq, live FROM bgt_queues").all() == [(dep.device, 2, 1)]
        assert {c["name"] for c in sa.inspect(conn).get_columns("bgt_devices")} == {"name", "conditions",
                                                                                    "cond_version"}
        names = {i["name"] for i in sa.inspect(conn).get_indexes("bgt_requests")}
        clocks = dict(conn.exec_driver_sql("SELECT app_id, clock FROM bgt_app_turns").all())
    assert {"bgt_requests_held", "bgt_requests_undecided", "bgt_requests_heads"} <= names
    assert clocks == {"z": 0, "a": 0}  # wall times are no clocks: everyone starts level
    assert [r for r, _ in upgraded.promote(dep.device, s)] == [rid]


def test_an_add_that_a_free_slot_could_start_starts_it_or_wakes_the_workers(env) -> None:
    """SQLite: the add runs the pass itself. PostgreSQL: it wakes the device's workers, whose
    pass admits; an add that no slot could start wakes nobody."""
    store, s, dep = env
    first, second, third = (row("a", i, dep.device) for i in range(3))
    wakeups, stopping = store.wakeups(dep.device), threading.Event()
    try:
        if store.dialect == "sqlite":
            [(rid, token)] = store.insert(first, s)  # its own pass, in its own transaction
            assert rid == first["id"] and store.get(rid)["phase"] == "admitted"
            assert [r for r, _ in store.insert(second, s)] == [second["id"]]
        else:
            other = store.wakeups("another-device")
            try:
                assert store.insert(first, s) == [] and store.get(first["id"])["phase"] == "queued"
                t0 = time.monotonic()
                wakeups.wait(30, stopping)  # returns on the add's NOTIFY, not after 30 s
                assert time.monotonic() - t0 < 20
                t0 = time.monotonic()
                other.wait(0.5, stopping)  # another device's workers sleep on
                assert time.monotonic() - t0 >= 0.5
            finally:
                other.close()
            [(rid, token)] = store.promote(dep.device, s)
            store.insert(second, s)
            wakeups.wait(30, stopping)
            assert [r for r, _ in store.promote(dep.device, s)] == [second["id"]]
        assert store.insert(third, s) == []  # the cap of 2 is reached: it waits
        if store.dialect == "postgresql":
            t0 = time.monotonic()
            wakeups.wait(0.5, stopping)  # and wakes nobody
            assert time.monotonic() - t0 >= 0.5
        assert store.claim(rid, token, "w", s) is not None
    finally:
        wakeups.close()


def test_an_app_over_its_daily_quota_waits_and_says_why(env) -> None:
    store, s, dep = env
    s = dataclasses.replace(s, max_daily_bytes_per_app=1000)
    a1, a2 = add(store, s, "a", 2, dep.device)
    add(store, s, "b", 1, dep.device)
    [(rid, token), _] = store.promote(dep.device, s)
    assert rid == a1
    store.claim(a1, token, "w", s)
    store.heartbeat(a1, token, 5, used=600)
    store.finish(a1, token, used=500, phase="done", status="COMPLETED")  # 1,100 bytes today
    assert store.day_usage(dep.device) == {"a": 1100}
    assert [r for r, _ in store.promote(dep.device, s)] == []  # b1 holds the other slot; a2 may not go
    row = store.get(a2)
    assert row["phase"] == "queued" and row["status"] == "WAITING" and "daily byte quota" in row["wait_reason"]
    assert store.day_usage(dep.device, now=time.time() + 25 * 3600) == {}  # a day later it is free again
    more = dataclasses.replace(s, max_daily_bytes_per_app=2000)
    assert [r for r, _ in store.promote(dep.device, more)] == [a2]



def test_a_wait_for_conditions_ends_when_they_hold_even_before_a_slot_is_free(env) -> None:
    store, s, dep = env
    store.set_conditions(dep.device, {"network": "cellular"})
    (rid,) = add(store, s, "a", 1, dep.device)
    assert store.get(rid)["status"] == TransferStatus.WAITING_FOR_WIFI.value
    store.set_conditions(dep.device, {"network": "wifi"})
    assert store.promote(dep.device, dataclasses.replace(s, max_concurrent_per_device=0)) == []  # no slot
    row = store.get(rid)
    assert row["admissible"] and row["status"] == TransferStatus.WAITING.value and row["wait_reason"] is None


def test_an_add_decided_under_conditions_changed_elsewhere_is_decided_again_first(env) -> None:
    """A PostgreSQL add decides under the device's conditions as its process last read them: if
    another process changed them since, no pass admits the request before deciding it again."""
    store, s, dep = env
    store.set_conditions(dep.device, {"network": "wifi", "power": "external"})  # read by this process
    elsewhere = Store(s.store_url)
    try:
        elsewhere.set_conditions(dep.device, {"network": "cellular"})
    finally:
        elsewhere.close()
    (rid,) = add(store, s, "a", 1, dep.device)
    assert store.promote(dep.device, s) == []  # on cellular a request with no preferences waits
    row_now = store.get(rid)
    assert row_now["phase"] == "queued" and not row_now["admissible"]
    assert row_now["status"] == TransferStatus.WAITING_FOR_WIFI.value


def test_an_add_learns_conditions_changed_elsewhere_for_the_next_add(env) -> None:
    """The add that finds the conditions changed since this process read them brings them back,
    so the next add decides under them (here: waits for Wi-Fi at once), not under the old ones."""
    store, s, dep = env
    store.set_conditions(dep.device, {"network": "wifi", "power": "external"})
    elsewhere = Store(s.store_url)
    try:
        elsewhere.set_conditions(dep.device, {"network": "cellular"})
    finally:
        elsewhere.close()
    first, second = add(store, s, "a", 2, dep.device)
    assert store.get(second)["status"] == TransferStatus.WAITING_FOR_WIFI.value
    assert not store.get(second)["admissible"]


def test_a_pass_that_leaves_a_slot_free_wakes_the_workers_for_an_add_it_missed(env) -> None:
    """PostgreSQL: an add that committed after a pass read the queue, and read the slots as held
    before that pass freed one, is seen by the pass's recheck after its commit, which waits for
    an add still under way (it holds the queue row) and wakes the workers; no add, no wake-up."""
    store, s, dep = env
    if store.dialect == "sqlite":
        pytest.skip("SQLite: an add runs its own pass, in turn with every other writer")
    import psycopg

    store.set_conditions(dep.device, {"network": "wifi", "power": "external"})
    with store.tx() as conn:
        [tally] = store._batch(conn, [(_TALLY, {"device": dep.device, "now": time.time()})])
    wakeups, stopping = store.wakeups(dep.device), threading.Event()
    try:
        with store.tx() as conn:  # nothing arrived since the read: the workers sleep on
            store._batch(conn, store._recheck(dep.device, tally[0], 1), commit=True)
        t0 = time.monotonic()
        wakeups.wait(0.5, stopping)
        assert time.monotonic() - t0 >= 0.5
        adding = psycopg.connect(s.store_url, autocommit=False)  # an add under way, holding the queue row
        try:
            adding.execute("UPDATE bgt_queues SET next_seq = next_seq + 1 WHERE device = %s", (dep.device,))
            done = threading.Event()

            def recheck() -> None:
                with store.tx() as conn:
                    store._batch(conn, store._recheck(dep.device, tally[0], 1), commit=True)
                done.set()

            waiter = threading.Thread(target=recheck)
            waiter.start()
            assert not done.wait(0.5)  # it waits for the add's commit
            adding.commit()
            waiter.join(30)
            assert done.is_set()
        finally:
            adding.close()
        t0 = time.monotonic()
        wakeups.wait(30, stopping)  # returns on the recheck's NOTIFY
        assert time.monotonic() - t0 < 20
    finally:
        wakeups.close()


def test_an_attempt_ending_while_its_app_removes_it_does_not_deadlock(env) -> None:
    """The pass that records an attempt's outcome takes the device's row before the request's,
    as remove, pause and resume do: ending a transfer while its app removes it waits, it does
    not deadlock (PostgreSQL; SQLite has one writer at a time)."""
    store, s, dep = env
    if store.dialect == "sqlite":
        pytest.skip("SQLite: one writer at a time")
    import psycopg

    (rid,) = add(store, s, "a", 1, dep.device)
    [(rid, token)] = store.promote(dep.device, s)
    assert store.claim(rid, token, "w", s) is not None
    remover = psycopg.connect(s.store_url, autocommit=False)
    try:
        remover.execute("SELECT 1 FROM bgt_devices WHERE name = %s FOR UPDATE", (dep.device,))  # as remove does
        outcome: dict[str, object] = {}

        def end() -> None:
            try:
                outcome["pass"] = store.finish_and_pass(rid, token, dep.device, s, None, phase="done",
                                                        status="COMPLETED")
            except Exception as exc:  # a deadlock would land here
                outcome["error"] = exc

        ending = threading.Thread(target=end)
        ending.start()
        time.sleep(0.5)  # the pass waits for the device's row now
        remover.execute("UPDATE bgt_requests SET removed = true, control = 'cancel' WHERE id = %s", (rid,))
        remover.commit()
        ending.join(30)
    finally:
        remover.close()
    assert "error" not in outcome and "pass" in outcome
    assert store.get(rid) is None  # the removed request's end deleted it


def test_a_batch_returns_each_value_in_its_type_and_raises_a_failed_statement(env) -> None:
    """The hot paths' statements (``Store._batch``): parameters go and values come back as they
    are (quotes, backslashes, non-ASCII text, JSON, NULL, booleans, numbers), each statement's
    rows apart; a statement that fails raises the driver's error for it and stores nothing."""
    store, s, dep = env
    text = "it's a \\ back'slash, \"quoted\", café ∑"
    r = {**row("a", 0, dep.device), "tag": text, "headers": {"X-Note": text}}
    assert store.insert(r, dataclasses.replace(s, max_concurrent_per_device=0)) == []
    read = sa.text("SELECT tag, headers, seq, not_before, removed, expected_sha256 FROM bgt_requests WHERE id = :id")
    with store.tx() as conn:
        got, gone, [dev] = store._batch(conn, [
            (read, {"id": r["id"]}), (read, {"id": "none"}),
            (sa.text("SELECT conditions, cond_version FROM bgt_devices WHERE name = :device"), {"device": dep.device})])
    [(tag, headers, seq, not_before, removed, sha)] = [tuple(x) for x in got]
    assert (tag, headers, sha) == (text, {"X-Note": text}, None)
    assert isinstance(seq, int) and not_before == 0.0 and removed == False  # noqa: E712 (SQLite's is 0)
    assert gone == [] and isinstance(dev.conditions, dict) and isinstance(dev.cond_version, int)
    with pytest.raises(Exception) as failed, store.tx() as conn:
        store._batch(conn, [(sa.text("UPDATE bgt_requests SET tag = 'changed' WHERE id = :id"), {"id": r["id"]}),
                            (sa.text("INSERT INTO bgt_queues (device, next_seq, live) VALUES (:device, 1, 0)"),
                             {"device": dep.device})], commit=True)  # (the device has its queue row)
    import psycopg

    assert isinstance(failed.value, psycopg.errors.UniqueViolation if store.dialect == "postgresql"
                      else sqlite3.IntegrityError)
    assert store.get(r["id"])["tag"] == text


def test_a_batch_follows_a_statements_columns_when_they_change(env) -> None:
    """PostgreSQL: rows are made by the columns each result has, not by those a statement had
    before (``*`` changes with an upgrade made by another process)."""
    store, _s, _dep = env
    if store.dialect == "sqlite":
        pytest.skip("SQLite: its rows are made from each cursor's description")
    import psycopg

    every = sa.text("SELECT * FROM bgt_shape_probe")
    with store.tx() as conn:
        conn.exec_driver_sql("CREATE TABLE bgt_shape_probe (a INTEGER, b TEXT)")
        conn.exec_driver_sql("INSERT INTO bgt_shape_probe VALUES (1, 'x')")
    try:
        with store.tx() as conn:
            [[first]] = store._batch(conn, [(every, {})])
        with store.tx() as conn:
            conn.exec_driver_sql("ALTER TABLE bgt_shape_probe ADD COLUMN c FLOAT DEFAULT 2.5")
        with contextlib.suppress(psycopg.errors.FeatureNotSupported), store.tx() as conn:
            store._batch(conn, [(every, {})])  # (the prepared plan's result type changed: prepared again after)
        with store.tx() as conn:
            [[then]] = store._batch(conn, [(every, {})])
    finally:
        with store.tx() as conn:
            conn.exec_driver_sql("DROP TABLE bgt_shape_probe")
    assert tuple(first) == (1, "x") and tuple(then) == (1, "x", 2.5) and then.c == 2.5


def test_an_add_without_its_devices_queue_row_is_stored_all_the_same(env) -> None:
    """An add whose one-round-trip way finds no queue row for its device (a device's first add
    in this process, or a row gone) is refused there, not lost: the checked way stores it."""
    store, s, dep = env
    [first] = add(store, s, "a", 1, dep.device)
    with store.tx() as conn:
        conn.exec_driver_sql(f"DELETE FROM bgt_queues WHERE device = '{dep.device}'")
    r = row("b", 0, dep.device)
    assert store.insert(r, dataclasses.replace(s, max_concurrent_per_device=0)) == []
    assert store.get(first) is not None and store.get(r["id"]) is not None
