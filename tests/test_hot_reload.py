"""Hot reload on a running group: two ``--role replay`` processes and a ``--role judge`` on a real
broker, the registry changed with ``shadowlens candidates`` while traffic flows.

A candidate added mid-stream is scored for exactly the mirror messages at or after its recorded
start offsets (each once, none before), and a retired one for none at or after its recorded stop
offsets; a candidate whose SHA-256 does not match its file is refused (state and reason in
``candidates show``, the log and the metrics of each replay process) and not scored until it is reset
with the right file, then from the reset's offsets; a policy change shows in the verdicts'
policy_hash; the TOML's candidate is scored for every message exactly once throughout. The replay
processes are paused (SIGSTOP) around the changes, so that the micro-batches after them straddle the
recorded offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest

from scorers.judge import JudgePolicy
from streams.config import load_settings
from streams.demo import DEMO_POLICY, TrafficGenerator
from harness import Workers, create_topic, free_port, produce, window_aligned_start, write_worker_config
from streams.judge.history import policy_hash
from streams.models import build_digits_models
from streams.registry.store import mirror_end_offsets, sha256_file
from streams.sink import ClickHouseSink

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

MOST, CHUNK, RATE, PARTITIONS = 30000, 300, 150, 4  # produced: until told to stop
POLICY = {"latency_p99_ratio_margin": 1000.0, "latency_p50_ratio_margin": 1000.0}
ADAPTER = {"rename": {"pixels": "image"}, "cast": {"image": "float32"}, "scale": {"image": 0.0625}}
CLI = [sys.executable, "-m", "streams.cli", "candidates"]


def cli(config, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*CLI, *args, "-c", str(config)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def show(config, candidate: str) -> dict:
    return json.loads(cli(config, "show", "--model", "digits", "--candidate", candidate).stdout)


@contextlib.contextmanager
def paused(processes):
    """SIGSTOP the processes meanwhile (shorter than the session timeout: they stay in the group)."""
    for p in processes:
        os.killpg(p.proc.pid, signal.SIGSTOP)
    try:
        yield
        time.sleep(0.5)  # more traffic after the change, before they read again
    finally:
        for p in processes:
            os.killpg(p.proc.pid, signal.SIGCONT)


def test_candidates_added_refused_retired_and_repoliced_while_traffic_flows(kafka_bootstrap, tmp_path):
    models = build_digits_models(tmp_path / "models")
    topic = f"reload-{uuid.uuid4().hex[:8]}"
    create_topic(kafka_bootstrap, topic, PARTITIONS)
    api_port = free_port()
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, topic, api_port,
                                 partitions=PARTITIONS, policy=POLICY, timing="batched")  # fmt: skip
    settings = load_settings(config)
    start = window_aligned_start(MOST, rate_per_s=RATE, window_s=20)
    traffic = TrafficGenerator(models["baseline"], rate_per_s=RATE, seed=11).messages(MOST, start=start)
    workers = Workers(config, tmp_path, "split", replays=2)
    chunks_sent = [0]
    sent, stop = threading.Condition(), threading.Event()

    def producer() -> None:  # traffic flows until the registry changes are done
        for i in range(0, MOST, CHUNK):
            if stop.is_set():
                return
            produce(kafka_bootstrap, topic, traffic[i : i + CHUNK])
            with sent:
                chunks_sent[0] += 1
                sent.notify_all()
            time.sleep(0.3)

    def after(chunks: int) -> None:
        with sent:
            sent.wait_for(lambda: chunks_sent[0] >= chunks, timeout=300)

    new_policy = {**DEMO_POLICY, **POLICY, "min_samples": 123}
    fixable = tmp_path / "fixable.onnx"  # registered with the SHA-256 of another file: refused until it is that file
    shutil.copy(models["good"], fixable)
    try:
        for p in workers.processes:
            p.wait_for(lambda p=p: "worker started" in p.log_path.read_text(), 120, "the worker to start")
        thread = threading.Thread(target=producer)
        thread.start()
        after(5)
        common = ["--model", "digits", "--adapter", json.dumps(ADAPTER), "--policy", json.dumps({**DEMO_POLICY, **POLICY})]
        with paused(workers.replays):  # traffic piles up: the next micro-batches straddle the start offsets
            cli(config, "add", "--candidate", "late", "--path", str(models["degraded"]), *common)
        after(8)
        want_sha = sha256_file(models["degraded"])
        cli(config, "add", "--candidate", "bad", "--path", str(fixable), "--sha256", want_sha, *common)
        workers.wait_for(lambda: show(config, "bad")["state"] == "refused", 60, "the SHA mismatch to be reported")
        bad = show(config, "bad")
        assert "sha256 mismatch" in bad["reason"] and want_sha in bad["reason"], bad
        for p in workers.replays:  # the refusal on each replay process's log and /metrics
            text = p.log_path.read_text()
            assert "candidate digits/bad refused: sha256 mismatch" in text
            url = re.search(r"Prometheus metrics on (http://\S+/metrics)", text).group(1)
            series = [line for line in httpx.get(url, timeout=5).text.splitlines()
                      if line.startswith("shadowlens_candidate{") and 'candidate="bad"' in line]  # fmt: skip
            assert len(series) == 1 and 'state="refused"' in series[0] and "sha256 mismatch" in series[0], series
        after(chunks_sent[0] + 3)
        cli(config, "add", "--model", "digits", "--candidate", "digits-v2", "--policy", json.dumps(new_policy))
        after(chunks_sent[0] + 3)
        shutil.copy(models["degraded"], fixable)  # the file the registry names, now
        with paused(workers.replays):
            cli(config, "reset", "--model", "digits", "--candidate", "bad")
        after(chunks_sent[0] + 3)
        with paused(workers.replays):  # ... and the stop offsets
            cli(config, "retire", "--model", "digits", "--candidate", "late", "--reason", "test")
        after(chunks_sent[0] + 3)
        stop.set()
        thread.join()
        requests = chunks_sent[0] * CHUNK
        late, bad, base = show(config, "late"), show(config, "bad"), show(config, "digits-v2")
        assert base["policy_version"] == 2 and late["state"] == "retired", (base, late)
        assert (bad["version"], bad["pair"], bad["stop_offsets"]) == (1, "bad", None), bad
        start_at = {int(p): o for p, o in late["start_offsets"].items()}
        stop_at = {int(p): o for p, o in late["stop_offsets"].items()}
        reset_at = {int(p): o for p, o in bad["start_offsets"].items()}
        ends = asyncio.run(mirror_end_offsets(settings))
        assert sum(ends.values()) == requests < MOST  # stopped while the traffic still flowed
        # Added, reset and retired mid-stream: every position inside the traffic.
        assert 0 < sum(start_at.values()) < sum(reset_at.values()) < sum(stop_at.values()) < requests
        expected = {"digits-v2": requests, "late": sum(max(0, min(stop_at[p], ends[p]) - start_at[p]) for p in ends),
                    "bad": sum(ends[p] - reset_at[p] for p in ends)}  # fmt: skip
        api = f"http://127.0.0.1:{api_port}"

        def complete():
            totals = {c: sum(r["requests"] for r in httpx.get(f"{api}/v1/windows/digits/{c}", params={"limit": 1000},
                                                               timeout=5).json()) for c in expected}
            return totals if all(totals[c] >= expected[c] for c in expected) else None

        totals = workers.wait_for(complete, 300, f"windows adding up to {expected}")
        assert totals == expected
        # Replayed again after its reset; the degraded model's verdict may have turned to rollback already.
        assert show(config, "bad")["state"] in ("shadowing", "rolled_back")
        assert all(p.alive for p in workers.processes)
        assert all("candidate digits/late loaded" in p.log_path.read_text() for p in workers.replays)
    finally:
        stop.set()
        workers.stop()
    sink = ClickHouseSink(f"chdb:///{tmp_path / 'chdb'}")
    try:
        rows = sink.query("SELECT candidate, source_partition, source_offset FROM shadowlens.request_diffs")
        hashes = sink.query("SELECT policy_hash FROM shadowlens.verdicts WHERE candidate = 'digits-v2' "
                            "ORDER BY updated_at")  # fmt: skip
        late_verdict = sink.latest_verdict("digits", "late")
    finally:
        sink.close()
    scored: dict[str, list[tuple[int, int]]] = {}
    for cand, p, o in rows:
        scored.setdefault(cand, []).append((int(p), int(o)))
    every = {(p, o) for p in ends for o in range(ends[p])}
    assert len(scored["digits-v2"]) == requests and set(scored["digits-v2"]) == every
    want_late = {(p, o) for p, o in every if start_at[p] <= o < stop_at[p]}
    assert len(scored["late"]) == len(want_late) and set(scored["late"]) == want_late
    # Refused until reset: scored from the offsets the reset recorded, never before.
    want_bad = {(p, o) for p, o in every if o >= reset_at[p]}
    assert len(scored["bad"]) == len(want_bad) and set(scored["bad"]) == want_bad
    assert set(scored) == {"digits-v2", "late", "bad"}
    # The policy change: later verdicts carry the new policy's hash, the earlier ones (if any) the old one's.
    old_hash, new_hash = (policy_hash(JudgePolicy.from_dict(p)) for p in ({**DEMO_POLICY, **POLICY}, new_policy))
    assert hashes and hashes[-1][0] == new_hash and {h for (h,) in hashes} <= {old_hash, new_hash}
    # Retired: its verdict, if it had one, is final (the retirement), whatever closed after.
    assert late_verdict is None or late_verdict.state == "retired"
