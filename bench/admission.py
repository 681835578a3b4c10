"""Admission decision latency with a full device queue (500 requests over 20 apps), and how it
grows with the queue (10, 100, 500 queued).

    python -m bench.admission [--rounds 300] [--queued 10,100,500] [--stores sqlite,postgresql] [--json out.json]

Each round times one admission pass (``Store.promote``: one transaction that locks the
device, reclaims expired leases, decides the waiting requests whose verdict is stale (here
none: each add decides its own request) and hands the free slots round-robin over the apps'
next requests), then, untimed, runs the admitted requests
to completion, removes them and adds new ones so the queue stays at its size. ``add`` (the
counted rules 5-6, the request's first decision and the insert, also one transaction) is timed
as well. Nothing runs ANALYZE: the plans are those of a fresh database. PostgreSQL is the
server on 127.0.0.1 (a fresh database, dropped at the end); SQLite is a file in a temporary
directory. Prints p50/p99 per store; the target is p99 < 5 ms for the admission pass.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator

from bench._services import PG_ADMIN
from bgtransfer import Settings
from bgtransfer._store import Store

APPS = [f"app{i:02d}" for i in range(20)]


def row(app: str, device: str) -> dict:
    rid = uuid.uuid4().hex
    return {"id": rid, "device": device, "app_id": app, "method": "GET", "url": f"http://127.0.0.1/{rid}",
            "headers": {}, "direction": "download", "local_path": f"/shared/transfers/{rid}",
            "preferences": "NONE", "tag": None, "expected_sha256": None, "form_fields": None}


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def measure(store: Store, rounds: int, queued: int) -> dict:
    """Time ``rounds`` admission passes and adds with ``queued`` requests waiting on one device."""
    # each replacement is added while the request it replaces still holds its slot, one over the
    # per-app and per-device limits for a moment: those are raised so that rules 5-6 stay out of it
    s = Settings(data_root="/nonexistent", max_outstanding_per_app=10_000, max_queued_per_device=10_000)
    device = f"bench{queued}"
    adds: list[float] = []

    def add(app: str) -> list[tuple[str, int]]:
        t = time.perf_counter()
        picks = store.insert(row(app, device), s)  # on SQLite an add runs an admission pass too
        adds.append(time.perf_counter() - t)
        return picks

    admitted = [pick for i in range(queued) for pick in add(APPS[i % 20])]
    passes: list[float] = []
    n_admitted = 0
    for _ in range(rounds):
        # run the admitted to completion, each replaced while every slot is held, so that the
        # adds' own passes admit nothing and the timed pass below is the one that fills them
        running = [(store.claim(rid, token, "bench", s), token) for rid, token in admitted]
        for r, _ in running:
            add(r["app_id"])
        for r, token in running:
            store.finish(r["id"], token, phase="done", status="COMPLETED")
            store.remove(r["app_id"], r["id"])
        t = time.perf_counter()
        admitted = store.promote(device, s)
        passes.append(time.perf_counter() - t)
        n_admitted += len(admitted)
    assert len(store.list(device=device)) == queued and n_admitted == 2 * rounds
    ms = 1000
    return {"rounds": rounds, "admitted": n_admitted, "queued": queued,
            "promote_p50_ms": pct(passes, 50) * ms, "promote_p99_ms": pct(passes, 99) * ms,
            "promote_mean_ms": statistics.fmean(passes) * ms,
            "add_p50_ms": pct(adds, 50) * ms, "add_p99_ms": pct(adds, 99) * ms}


def run(args: argparse.Namespace) -> dict:
    """{store: {queued: figures}} for every store and queue length asked for."""
    sizes = [int(n) for n in str(args.queued).split(",")]
    results: dict[str, dict[int, dict]] = {}
    for name in args.stores.split(","):
        with _store(name) as store:
            results[name] = {n: measure(store, args.rounds, n) for n in sizes}
    return results


@contextlib.contextmanager
def _store(name: str) -> Iterator[Store]:
    """A fresh store: a SQLite file in a temporary directory, or a new PostgreSQL database."""
    if name == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(f"sqlite:///{tmp}/state.sqlite")
            try:
                yield store
            finally:
                store.close()
        return
    import psycopg

    db = f"bgt_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")
    try:
        store = Store(PG_ADMIN.rsplit("/", 1)[0] + "/" + db)
        try:
            yield store
        finally:
            store.close()
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--queued", default="10,100,500", help="queue lengths, comma-separated")
    ap.add_argument("--stores", default="sqlite,postgresql")
    ap.add_argument("--json", default=None)
    return ap


def report(results: dict) -> None:
    """Print ``run``'s figures."""
    print(f"{'store':<12}{'queued':>8}{'pass p50':>10}{'pass p99':>10}{'add p50':>10}{'add p99':>10}   (ms; 20 apps)")
    for name, by_size in results.items():
        for n, r in by_size.items():
            print(f"{name:<12}{n:>8}{r['promote_p50_ms']:>10.2f}{r['promote_p99_ms']:>10.2f}{r['add_p50_ms']:>10.2f}"
                  f"{r['add_p99_ms']:>10.2f}")
    for name, by_size in results.items():
        if 500 in by_size:
            print(f"{name}: admission pass p99 at 500 queued = {by_size[500]['promote_p99_ms']:.2f} ms (target < 5 ms)")


def main() -> None:
    args = parser().parse_args()
    results = run(args)
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
