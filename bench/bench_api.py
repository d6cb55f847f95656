"""Verdicts API under load while the worker runs at full speed. Not a test; prints medians.

One ``--role all`` worker (replay + judge in one process, its API in a child process; chDB) drains a pre-filled mirror topic of
--requests digits requests against 2 candidates. In alternate runs a separate poller process sends
GET /v1/verdicts/{model}/{candidate} (with a bearer token) at --rate requests/s over --connections
keep-alive connections for as long as the worker drains. Reported:

- API latency p50 / p99 / max, measured from each request's *scheduled* send time (so a stalled
  server shows up as queueing, not as a lower rate), and the rate achieved;
- the worker's drain rate (requests/s from its first commit to its last) with and without polling,
  and their ratio, side by side in one run.

``--analyst``: every run is polled, and in alternate runs an analyst keeps a long query running
through ``POST /v1/query`` for the whole drain (each one ends at the 10 s cap). Reported side by
side: drain rate and verdict p99 with and without the analyst (issue: reads never touch the writer).
A third arm runs the same query, with the same caps, on a chDB session of its own in another process
(``--cpu-control``): the CPU the analyst burns, without shadowlens. When the worker drains as fast
beside the analyst as beside that control, what the analyst costs ingestion is the box's CPU, not a
lock, a session or a queue it shares with the writer. ``--analyst-rows-per-s``: the analysts' read
budget ([api] analyst_rows_per_s; default: the config's); several: an analyst arm for each, side
by side (the control runs at the first).

Usage: KAFKA_BOOTSTRAP=127.0.0.1:19092 python bench/bench_api.py [--requests 60000] [--runs 3]
       [--rate 1000] [--connections 16] [--analyst [--analyst-rows-per-s N [N ...]]]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_stages import CANDIDATES, MIRROR_PARTITIONS, bootstrap, drain_rate  # noqa: E402

from streams.demo import TrafficGenerator  # noqa: E402
from harness import WorkerProcess, create_topic, free_port, produce, write_worker_config  # noqa: E402
from streams.models import build_digits_models  # noqa: E402
from streams.api.analyst_sql import ANALYST_ROWS_PER_S, session_caps  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
# About 30 s of CPU on one core: each one runs until the analyst session's 10 s cap ends it.
LONG_QUERY = "SELECT count() FROM numbers(100000000) WHERE NOT ignore(arraySum(range(number % 3000)))"


def cpu_control_main(stop_file: str, rows_per_s: int) -> None:
    """The analyst's query on its own chDB session, with the analyst session's caps, until told to stop."""
    from chdb import session

    with tempfile.TemporaryDirectory() as tmp:
        s = session.Session(str(Path(tmp) / "control"))
        for name, value in session_caps(rows_per_s).items():
            s.query(f"SET {name} = {value!r}" if isinstance(value, str) else f"SET {name} = {value}")
        while not Path(stop_file).exists():
            try:
                s.query(LONG_QUERY)
            except Exception:  # noqa: BLE001 - the 10 s cap ends each one, as it does the analyst's
                pass


def _analyst(port: int, stop: threading.Event, answers: list) -> None:
    import httpx

    while not stop.is_set():
        t0 = time.perf_counter()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/query", json={"sql": LONG_QUERY},
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)  # fmt: skip
        answers.append((r.status_code, time.perf_counter() - t0))


# -- the poller (its own process) ------------------------------------------------------------------
async def _poll(port: int, path: str, rate: float, connections: int, stop_file: Path) -> dict:
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").encode()
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter() + 0.5

    async def connection(k: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = 0
        while not stop_file.exists():
            due = start + (i * connections + k) / rate
            i += 1
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))  # fmt: skip
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - due)
            errors += not head.startswith(b"HTTP/1.1 200")
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(connection(k) for k in range(connections)))
    elapsed = time.perf_counter() - t0
    return {"latencies_ms": [x * 1000 for x in latencies], "errors": errors, "elapsed_s": elapsed}


def poller_main(port: int, path: str, rate: float, connections: int, stop_file: str, out: str) -> None:
    try:  # the load generator on uvloop, as the server is: its own loop overhead is measured as latency
        import uvloop

        result = uvloop.run(_poll(port, path, rate, connections, Path(stop_file)))
    except ImportError:
        result = asyncio.run(_poll(port, path, rate, connections, Path(stop_file)))
    Path(out).write_text(json.dumps(result))


# -- the benchmark ------------------------------------------------------------------------------------
def run_once(broker, models, messages, work: Path, i: int, poll: bool, rate: float, connections: int,
             analyst: bool = False, control: bool = False, rows_per_s: int = ANALYST_ROWS_PER_S) -> dict:  # fmt: skip
    topic = f"bench-api-{uuid.uuid4().hex[:8]}"
    create_topic(broker, topic, MIRROR_PARTITIONS)
    produce(broker, topic, messages)
    port = free_port()
    config = write_worker_config(
        work, broker, {c: models["good" if c == "digits-v2" else "degraded"] for c in CANDIDATES}, topic, port,
        window_s=10, idle_close_s=3600, partitions=MIRROR_PARTITIONS, diffs_partitions=4, name=f"api-{i}.toml",
        chdb=work / f"api-{i}-chdb", api={"tokens": [TOKEN], "analyst_rows_per_s": rows_per_s},
    )  # fmt: skip
    worker = WorkerProcess(config, work / f"api-{i}.log")
    stop_file, out = work / f"stop-{i}", work / f"poll-{i}.json"
    poller = None
    stop_analyst, answers = threading.Event(), []
    try:
        if poll:
            time.sleep(6)  # the API is up (it binds first); the poller starts before the drain
            poller = subprocess.Popen([sys.executable, __file__, "--poller", str(port), "/v1/verdicts/digits/digits-v2",
                                       str(rate), str(connections), str(stop_file), str(out)])  # fmt: skip
        if analyst:
            threading.Thread(target=_analyst, args=(port, stop_analyst, answers), daemon=True).start()
        if control:
            burner = subprocess.Popen([sys.executable, __file__, "--cpu-control", str(stop_file), str(rows_per_s)])
        rate_rps, _ = drain_rate(broker, topic, f"worker-{topic}", [worker], "api bench", poll_s=1.0)
    finally:
        stop_analyst.set()
        stop_file.touch()
        if control:
            burner.wait(timeout=60)
        if poller is not None:
            poller.wait(timeout=60)
        worker.stop()
    result = {"drain_rps": rate_rps, "analyst_queries": answers}
    if poll:
        polled = json.loads(out.read_text())
        lat = sorted(polled["latencies_ms"]) or [float("nan")]  # the drain ended before the first poll
        result.update(p50=lat[len(lat) // 2], p99=lat[int(len(lat) * 0.99)], max=lat[-1], errors=polled["errors"],
                      achieved=len(lat) / polled["elapsed_s"])  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=60_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--analyst", action="store_true", help="polled runs with and without a long analyst query")
    parser.add_argument("--analyst-rows-per-s", type=int, nargs="+", default=[ANALYST_ROWS_PER_S],
                        help="the analysts' read budget, rows a second (0: none); several: one analyst arm each, "
                        "the CPU control at the first")  # fmt: skip
    parser.add_argument("--poller", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--cpu-control", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_control:
        cpu_control_main(args.cpu_control[0], int(args.cpu_control[1]))
        return
    if args.poller:
        port, path, rate, conns, stop_file, out = args.poller
        poller_main(int(port), path, float(rate), int(conns), stop_file, out)
        return
    broker = bootstrap()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        models = build_digits_models(work / "models")
        messages = TrafficGenerator(models["baseline"], rate_per_s=1000).messages(args.requests)
        print(f"{args.requests:,} requests, 2 candidates, one --role all worker; poller {args.rate:g} req/s over "
              f"{args.connections} connections; {os.cpu_count()} cores")  # fmt: skip
        if args.analyst:
            analyst_series(broker, models, messages, work, args)
            return
        quiet, polled = [], []
        for i in range(args.runs):
            quiet.append(run_once(broker, models, messages, work, 2 * i, False, args.rate, args.connections))
            polled.append(run_once(broker, models, messages, work, 2 * i + 1, True, args.rate, args.connections))
            q, p = quiet[-1], polled[-1]
            print(f"  run {i + 1}: worker {q['drain_rps']:,.0f} req/s unpolled, {p['drain_rps']:,.0f} polled "
                  f"({p['drain_rps'] / q['drain_rps']:.0%}); API p50 {p['p50']:.2f} ms, p99 {p['p99']:.2f} ms, "
                  f"max {p['max']:.1f} ms at {p['achieved']:,.0f} req/s, {p['errors']} non-200")  # fmt: skip
        med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
        print(f"median: API p50 {med(polled, 'p50'):.2f} ms, p99 {med(polled, 'p99'):.2f} ms at "
              f"{med(polled, 'achieved'):,.0f} req/s; worker {med(quiet, 'drain_rps'):,.0f} -> "
              f"{med(polled, 'drain_rps'):,.0f} req/s while polled "
              f"({med(polled, 'drain_rps') / med(quiet, 'drain_rps'):.0%})")  # fmt: skip


def analyst_series(broker, models, messages, work: Path, args) -> None:
    """Alone, beside the analyst at each budget, beside the CPU control (at the first budget):
    every run has each arm once, the order turning from run to run."""
    budgets = args.analyst_rows_per_s
    name = lambda b: f"analyst at {b:,} rows/s" if b else "analyst, no budget"  # noqa: E731
    arms: list[tuple[str, dict, list]] = [("alone", {}, [])]
    arms += [(name(b), {"analyst": True, "rows_per_s": b}, []) for b in budgets]
    arms.append((f"CPU control ({name(budgets[0]).replace('analyst', 'same query')})",
                 {"control": True, "rows_per_s": budgets[0]}, []))  # fmt: skip
    alone = arms[0][2]
    for i in range(args.runs):
        # The order turns each run: on a shared box a run's place in the series (the previous
        # run's chDB still merging, topics piling up) is an effect too.
        for k in range(len(arms)):
            _, kind, rows = arms[(i + k) % len(arms)]
            rows.append(run_once(broker, models, messages, work, len(arms) * i + k, True, args.rate, args.connections,
                                 **kind))  # fmt: skip
        parts = [f"{label} {rows[-1]['drain_rps']:,.0f} ({rows[-1]['drain_rps'] / alone[-1]['drain_rps']:.0%}), "
                 f"p99 {rows[-1]['p99']:.1f} ms" for label, _, rows in arms]  # fmt: skip
        queries = "; ".join(f"{label}: " + ", ".join(f"{c} after {t:.1f} s" for c, t in rows[-1]["analyst_queries"])
                            for label, kind, rows in arms if kind.get("analyst"))  # fmt: skip
        print(f"  run {i + 1}: worker req/s " + "; ".join(parts) + f" | queries {queries}", flush=True)
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    base = med(alone, "drain_rps")
    print("median: worker req/s " + "; ".join(
        f"{label} {med(rows, 'drain_rps'):,.0f} ({med(rows, 'drain_rps') / base:.0%}), p99 {med(rows, 'p99'):.1f} ms"
        for label, _, rows in arms))  # fmt: skip
    # The test: each analyst arm's median no worse than the alone arm's own run-to-run range
    # (drain no slower than alone's slowest run, p99 no higher than alone's highest).
    low, high = min(r["drain_rps"] for r in alone), max(r["drain_rps"] for r in alone)
    p99_high = max(r["p99"] for r in alone)
    print(f"alone arm's run-to-run range: drain {low:,.0f}-{high:,.0f} req/s, p99 "
          f"{min(r['p99'] for r in alone):.1f}-{p99_high:.1f} ms")  # fmt: skip
    for label, _, rows in arms[1:]:
        inside = med(rows, "drain_rps") >= low and med(rows, "p99") <= p99_high
        print(f"  {label}: median drain {med(rows, 'drain_rps'):,.0f} req/s, p99 {med(rows, 'p99'):.1f} ms: "
              f"{'within' if inside else 'OUTSIDE'} the alone arm's range")

if __name__ == "__main__":
    main()
