"""Every benchmark in one command, then one table of their ratios and targets.

    python -m bench --repeat 2           # all, on every backend: about 8 minutes on 2 cores
    python -m bench --quick              # smaller and fewer, embedded only: about 3 minutes
    python -m bench --only download,small --backends embedded,rabbitmq+postgresql --repeat 2
    python -m bench --json all.json

It runs, in this order, ``bench.download`` (one 1 GiB download against curl, aria2c and bare
pycurl; 8 at once; worker RSS), ``bench.small`` (1,000 small downloads against a plain Celery
task and aria2c; scale-out; queue depth), ``bench.admission`` (the admission pass and add at
10, 100 and 500 queued) and ``bench.limits`` (bandwidth limits and fair share against their
settings), each as its own command would with the options below, printing as it goes (for
admission and limits, their figures when they end). Each module's docstring says what it
measures and how. ``bench.soak`` is not among them: it is a fault test with a verdict of its
own (``python -m bench.soak``), not a ratio.

``--backends`` applies to download and small (default: all three; ``--quick``: embedded), and
admission measures PostgreSQL when one of them is a PostgreSQL backend. ``--repeat`` applies to
download and small (default: each one's own; download's ``--quick`` takes one sample whatever it
says). ``--quick`` gives each its quick form (admission: 50 rounds). The table's targets are the
benchmarks' own, plus one for the limits: a limit is a ceiling, so measured / set at most 1.02
(the rate counts dispatch too, so it is if anything low). A benchmark that fails, or a backend
that it skips or fails on, is reported and the rest still runs; the exit status is 1 then, not
when a target was missed (that is a figure, printed in the table).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import admission, download, limits, small  # noqa: E402
from bench._services import BACKENDS, code_line, code_tree  # noqa: E402

BENCHMARKS = ("download", "small", "admission", "limits")
ADMISSION_TARGET_MS = 5.0  # admission pass p99 at the deepest queue (bench.admission)
LIMIT_CEILING = 1.02  # a bandwidth limit's measured / set (bench.limits), with room for the clock's noise

# A row of the table: benchmark, figure, value, target (None: informational), and the target's direction.
Row = tuple[str, str, float, float | None, str]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated, of {', '.join(BENCHMARKS)}")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated, of {', '.join(BACKENDS)} (default all; --quick: embedded)")
    p.add_argument("--repeat", type=int, default=None, help="samples per variant for download and small")
    p.add_argument("--quick", action="store_true", help="each benchmark's quick form")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write every figure to FILE")
    args = p.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    if unknown := [x for x in args.only if x not in BENCHMARKS]:
        p.error(f"unknown benchmark(s) {unknown}: choose from {', '.join(BENCHMARKS)}")
    backends = args.backends or ("embedded" if args.quick else ",".join(BACKENDS))
    args.backends = [x.strip() for x in backends.split(",") if x.strip()]
    if unknown := [x for x in args.backends if x not in BACKENDS]:
        p.error(f"unknown backend(s) {unknown}: choose from {', '.join(BACKENDS)}")
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def _common(args: argparse.Namespace) -> list[str]:
    """The options download and small share, as their command-line words."""
    words = ["--backends", ",".join(args.backends)]
    if args.repeat is not None:
        words += ["--repeat", str(args.repeat)]
    return words + (["--quick"] if args.quick else [])


def run_download(args: argparse.Namespace) -> tuple[dict[str, Any], list[Row]]:
    result = download.run(download.parse_args(_common(args)))
    rows: list[Row] = [("download", name, x["value"], x["target"], ">=") for name, x in result["ratios"].items()]
    rows += [("download", name, value, None, ">=") for name, value in result["info_ratios"].items()
             if value is not None]
    if result["parallel"]:
        rows += [("download", f"{result['parallel']['files']} at once: {name}", value, None, ">=")
                 for name, value in result["parallel"]["ratio"].items()]
    rss = result["worker_rss"]
    rows += [("download", f"worker peak RSS growth, {download.size_label(r['size_bytes'])} file (MiB)",
              r["growth_mib"], rss["target_mib"], "<") for k, r in rss.items() if k != "target_mib"]
    return result, rows


def run_small(args: argparse.Namespace) -> tuple[dict[str, Any], list[Row]]:
    result = small.run(small.parse_args(_common(args)))  # (a backend that failed: an "error" in its entry)
    print()
    print(small.report(result))
    return result, [("small", name, x["value"], x["target"], x["op"]) for name, x in result["ratios"].items()]


def run_admission(args: argparse.Namespace) -> tuple[dict[str, Any], list[Row]]:
    stores = ["sqlite", *(["postgresql"] if any(b.endswith("+postgresql") for b in args.backends) else [])]
    words = ["--stores", ",".join(stores)] + (["--rounds", "50"] if args.quick else [])
    result = admission.run(admission.parser().parse_args(words))
    admission.report(result)
    rows: list[Row] = []
    for store, by_size in result.items():
        deepest = max(by_size)
        for n, r in sorted(by_size.items()):
            rows.append(("admission", f"{store}: pass p99 at {n} queued (ms)", r["promote_p99_ms"],
                         ADMISSION_TARGET_MS if n == deepest else None, "<"))
        rows.append(("admission", f"{store}: add p99 at {deepest} queued (ms)", by_size[deepest]["add_p99_ms"],
                     None, "<"))
    return result, rows


def run_limits(args: argparse.Namespace) -> tuple[dict[str, Any], list[Row]]:
    result = limits.run(argparse.Namespace(quick=args.quick, json=None))
    limits.report(result)
    share = result["fair_share"]
    rows: list[Row] = [
        ("limits", f"device limit {result['device_limit']['set_mb_s']:g} MB/s: measured / set",
         result["device_limit"]["ratio"], LIMIT_CEILING, "<="),
        ("limits", f"transfer limit {result['transfer_limit']['set_mb_s']:g} MB/s: measured / set",
         result["transfer_limit"]["ratio"], LIMIT_CEILING, "<="),
        ("limits", f"weights a=3,b=1: a's starts of the first 40 (3:1 is {share['target']})",
         share["a_of_first_40"], None, ""),
        ("limits", "weights a=3,b=1: longest run of starts b waited through", share["longest_wait_of_b_in_starts"],
         None, "<="),
    ]
    return result, rows


RUNNERS: dict[str, Callable[[argparse.Namespace], tuple[dict[str, Any], list[Row]]]] = {
    "download": run_download, "small": run_small, "admission": run_admission, "limits": run_limits}


def failure(result: dict[str, Any]) -> str | None:
    """Why a benchmark failed (small: one of its backends; download: a backend it skipped), or None."""
    if "error" in result:
        return result["error"]
    bad = [f"{r['backend']}: {r['error']}" for r in result.get("backends", []) if "error" in r]
    bad += [f"{name}: skipped: {why}" for name, why in result.get("skipped_backends", {}).items()]
    return "; ".join(bad) or None


def met(value: float, target: float | None, op: str) -> str:
    if target is None:
        return ""
    ok = {">=": value >= target, "<=": value <= target, "<": value < target}[op]
    return "yes" if ok else "NO"


def table(rows: list[Row]) -> str:
    width = max([len(name) for _, name, *_ in rows] + [6])
    lines = [f"{'benchmark':<10} {'figure':<{width}} {'value':>8} {'target':>8} {'met':>4}"]
    for bench, name, value, target, op in rows:
        goal = f"{op} {target:g}" if target is not None else "-"
        lines.append(f"{bench:<10} {name:<{width}} {value:>8.2f} {goal:>8} {met(value, target, op):>4}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: each benchmark stops its workers and servers and deletes its files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    code = code_tree()
    print(f"bench: {', '.join(args.only)}; backends {', '.join(args.backends)}"
          f"{'; quick' if args.quick else ''}\n  {code_line(code)}", flush=True)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    rows: list[Row] = []
    for name in args.only:
        print(f"\n===== bench.{name} =====", flush=True)
        t0 = time.perf_counter()
        try:
            results[name], got = RUNNERS[name](args)
        except Exception as exc:  # a failed check or a server gone: this benchmark only
            print(f"\nbench.{name} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        rows += got
        print(f"\nbench.{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    total = time.perf_counter() - started
    print(f"\n===== all ratios and figures ({code_line(code)}) =====")
    print(table(rows) if rows else "(none)")
    failed = [name for name in args.only if failure(results[name])]
    for name in failed:
        print(f"\nbench.{name} FAILED: {failure(results[name])}")
    missed = [name for bench, name, value, target, op in rows if met(value, target, op) == "NO"]
    print(f"\ntargets: {sum(1 for r in rows if r[3] is not None) - len(missed)} met, {len(missed)} missed"
          + (f" ({'; '.join(missed)})" if missed else "") + f"; total {total:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({"tree": code, "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows, "results": results, "wall_seconds": total},
                                        indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
