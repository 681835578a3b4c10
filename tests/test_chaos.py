"""Random SIGKILLs of worker processes (main and pool children) during many transfers.

Every request completes with the right sha256, none completes twice, the device cap is never
exceeded (sampled every 20 ms from the store and counted by the server), and no slot stays
held by a dead worker past its lease.
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import re
import threading
import time

import pytest
import sqlalchemy as sa

from bgtransfer import BackgroundTransferRequest
from bgtransfer._store import requests
from tests.conftest import STORES, Deployment, wait_for
from tests.httpserver import FileServer


@pytest.mark.parametrize("deployment", STORES, indirect=True)
def test_random_kills_lose_nothing_and_never_exceed_the_cap(deployment: Deployment, server: FileServer) -> None:
    rng = random.Random(7)
    files = {f"/{i}.bin": os.urandom(rng.randrange(200_000, 1_500_000)) for i in range(24)}
    for path, data in files.items():
        server.put(path, data)
        server.behave(path, rate=1_500_000)
    workers = [deployment.worker(concurrency=3), deployment.worker(concurrency=3)]
    apps = ["a", "b", "c"]
    reqs = {}
    for i, path in enumerate(files):
        app = apps[i % 3]
        r = BackgroundTransferRequest(server.url(path), download_location=f"/shared/transfers{path}")
        deployment.service(app).add(r)
        reqs[r.request_id] = (app, path)

    store, device, cap = deployment.service("a").store, deployment.device, deployment.settings.max_concurrent_per_device
    held_max, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with store.tx() as conn:
                n = conn.execute(sa.select(sa.func.count()).where(
                    requests.c.device == device, requests.c.phase.in_(("admitted", "running")))).scalar()
            held_max[0] = max(held_max[0], n)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    kills = collections.Counter()
    while sum(kills.values()) < 8:
        time.sleep(rng.uniform(0.7, 1.5))
        i = rng.randrange(len(workers))
        w = workers[i]
        children = w.children()
        if children and rng.random() < 0.6:
            os.kill(rng.choice(children), 9)  # a pool child: billiard replaces it
            kills["child"] += 1
        else:
            w.kill()  # the whole worker: restart it, as a supervisor would
            kills["main"] += 1
            workers[i] = deployment.worker(concurrency=3)
    for rid, (app, path) in reqs.items():
        done = deployment.wait_done(app, rid, 120)
        assert done.transfer_error is None, done.transfer_error
        got = (deployment.sandbox(app) / path[1:]).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(files[path]).digest(), path
    stop.set()
    sampler.join()
    server.wait_idle()
    assert held_max[0] <= cap and server.max_concurrent <= cap, (held_max, server.max_concurrent)
    completed = collections.Counter()
    for w in deployment.workers:
        completed.update(re.findall(r"request ([0-9a-f]{32}): completed", w.text()))
    assert max(completed.values()) == 1, "a request completed twice"
    # (a worker logs an outcome after its commit: a kill in between takes that line with it)
    assert set(completed) <= set(reqs) and len(set(reqs) - set(completed)) <= sum(kills.values())
    # nothing is left holding a slot once all is done
    wait_for(lambda: store.promote(device, deployment.settings) == [] and all(
        r["phase"] == "done" for r in store.list(device=device)), 10, 0.2, "no slot held")
