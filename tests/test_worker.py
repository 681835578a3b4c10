"""An attempt's glue between the store and the engine (bgtransfer._worker): who owns an attempt,
and what share of the bandwidth limits its lease gives it."""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time

from bgtransfer._worker import StoreLease, attempt_owner
from tests.test_store import add, env  # noqa: F401 (env: a store on SQLite and on PostgreSQL)


def test_an_attempts_owner_is_one_per_process_and_thread() -> None:
    """The owner that fences an attempt's writes (with its token) names the host and process, a
    random part per process (two hosts may share a name), and the thread beside the main one: the
    same in one thread, another in a second thread and in a forked child."""
    mine = attempt_owner()
    assert mine == attempt_owner()
    host, pid, nonce = mine.split(":")
    assert host == socket.gethostname() and int(pid) == os.getpid() and len(nonce) == 8
    other: list[str] = []
    thread = threading.Thread(target=lambda: other.append(attempt_owner()))
    thread.start()
    thread.join()
    assert other[0].startswith(mine + ":") and other[0] != mine
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        os.write(write, attempt_owner().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    theirs = os.read(read, 200).decode().split(":")
    os.close(read)
    assert theirs[0] == host and theirs[1] == str(child) and theirs[2] != nonce


def test_a_lease_shares_the_limits_among_the_transfers_about_to_run(env) -> None:  # noqa: F811
    """Four requests admitted together: the first one claimed already takes its share among the
    four, not the whole limit while the other three have yet to start (which let a device move
    more than its limit). A slot given back no longer counts; nor does a request admitted longer
    ago than a renewal (no worker has taken it yet: a cap above the workers' processes, a host
    down), nor a transfer whose lease ran out (its worker died)."""
    store, s, dep = env
    s = dataclasses.replace(s, max_concurrent_per_device=4, max_rate_per_device=8e6, max_rate_per_app=3e6,
                            progress_interval=60.0, lease_seconds=3.0)
    a_ids = add(store, s, "a", 3, dep.device)
    [b_id] = add(store, s, "b", 1, dep.device)
    tokens = dict(store.promote(dep.device, s))
    assert len(tokens) == 4
    a = store.claim(a_ids[0], tokens[a_ids[0]], "w", s)  # the first to start; three more admitted
    assert StoreLease(store, a, tokens[a_ids[0]], "w", s).max_rate() == 1e6  # app a: 3 MB/s among its 3
    b = store.claim(b_id, tokens[b_id], "w", s)
    lease_b = StoreLease(store, b, tokens[b_id], "w", s)
    assert lease_b.max_rate() == 2e6  # the device: 8 MB/s among 4 (app b alone: 3)
    store.finish(a["id"], tokens[a_ids[0]], owner="w", phase="done", status="COMPLETED")
    assert lease_b.renew(0) is None and lease_b.max_rate() == 8e6 / 3  # b and a's two admitted
    assert store.sharing(dep.device, "b", recent=0.0) == (1, 1)  # a's two, admitted before now, wait
    assert store.sharing(dep.device, "b", recent=60.0, now=time.time() + 10) == (2, 0)  # b's lease ran out
