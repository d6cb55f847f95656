"""``shadowlens doctor`` and ``worker --processes``, on the real things: Kafka, chDB, ONNX models, processes.

The doctor on a good setup says ✓ to everything and consumes nothing (a worker started afterwards
replays every record); on a bad one it names each problem in a ✗ row with its fix: an output the
model lacks, a file that is not ONNX, records whose inputs do not fit the model (shape; float64
for a float32 model that may not cast), an API port in use, a chDB path another process holds. Before any traffic it says so without failing, and creates
nothing. Two replay processes on one box get ports of their own and share the mirror partitions.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from schemas import MirroredRequest
from schemas.tensors import Tensor
from streams.demo import TrafficGenerator
from harness import WorkerProcess, free_port, free_port_pair, group_progress, produce, write_worker_config

pytestmark = pytest.mark.kafka
CLI = [sys.executable, "-m", "streams.cli"]


@pytest.fixture(scope="module")
def traffic(models) -> list[bytes]:
    return TrafficGenerator(models["baseline"], rate_per_s=100).messages(400)


def doctor(config: Path, *args: str) -> tuple[int, list[tuple[str, str, str]], str]:
    """(exit code, rows as (mark, check, result), the whole output)."""
    done = subprocess.run([*CLI, "doctor", "--config", str(config), *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    rows = [tuple(re.split(r"\s{2,}", line.strip(), maxsplit=2)) for line in done.stdout.splitlines()
            if line[:1] in ("✓", "✗", "–")]  # fmt: skip
    return done.returncode, rows, done.stdout


def row(rows, check: str, mark: str | None = None) -> list[str]:
    """The results of the rows of this check (with this mark)."""
    return [r[2] for r in rows if r[1] == check and (mark is None or r[0] == mark)]


def metric(url: str, name: str) -> float | None:
    """The series' value, summed over its labels (None: not exported)."""
    values = [float(line.rsplit(" ", 1)[1]) for line in httpx.get(url, timeout=5).text.splitlines()
              if line.startswith((name + " ", name + "{"))]  # fmt: skip
    return sum(values) if values else None


def topics(bootstrap: str) -> set[str]:
    async def run() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    return asyncio.run(run())


def group_state(bootstrap: str, group: str) -> tuple[str, int]:
    """(state, members) of a consumer group."""

    async def run() -> tuple[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            (response,) = await admin.describe_consumer_groups([group])
            _, _, state, _, _, members = response.groups[0][:6]
            return state, len(members)
        finally:
            await admin.close()

    return asyncio.run(run())


def test_doctor_passes_a_good_setup_and_consumes_nothing(kafka_bootstrap, new_topic, models, traffic, tmp_path):
    topic = new_topic("doctor-good", partitions=3)
    produce(kafka_bootstrap, topic, traffic[:300])
    metrics_port = free_port()
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, topic, free_port(),
                                 partitions=3, metrics={"port": metrics_port})  # fmt: skip
    code, rows, out = doctor(config)
    assert code == 0 and rows and {r[0] for r in rows} == {"✓"}, out
    assert "probabilities float32[?,10]" in row(rows, "model digits/digits-v2")[0]
    (scored,) = row(rows, "sample → digits/digits-v2")
    assert re.match(r"(\d+) of \1 records scored", scored) and int(scored.split()[0]) >= 100, scored
    assert row(rows, "mirror topic") == [f"{topic}: 3 partitions"]
    assert row(rows, "diffs topic") == [f"{topic}.diffs: will be created at worker start (2 partitions)"]
    # No offsets anywhere for the worker's group: the replay worker started now replays all 300.
    assert group_progress(kafka_bootstrap, topic, f"worker-{topic}") == (0, 300)
    worker = WorkerProcess(config, tmp_path / "worker.log", role="replay")
    try:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        worker.wait_for(lambda: metric(url, "shadowlens_replayed_requests_total") == 300, 90, "300 replayed")
        time.sleep(1.0)  # nothing more arrives
        assert metric(url, "shadowlens_replayed_requests_total") == 300
        assert metric(url, "shadowlens_dead_letters_total") == 0
    finally:
        worker.stop()


def test_doctor_names_each_problem_with_its_fix(kafka_bootstrap, new_topic, models, traffic, tmp_path):
    topic = new_topic("doctor-bad", partitions=1)

    def with_pixels(raw: bytes, pixels: np.ndarray) -> bytes:
        request = MirroredRequest.model_validate_json(raw)
        return request.model_copy(update={"inputs": {"pixels": Tensor.from_array(pixels)}}).model_dump_json().encode()

    narrow = [with_pixels(raw, np.ones((1, 32), dtype=np.float32)) for raw in traffic[:20]]  # the model takes 64
    wide = [with_pixels(raw, MirroredRequest.model_validate_json(raw).inputs["pixels"].to_array().astype(np.float64))
            for raw in traffic[40:60]]  # float64 where the float32 model's adapter of "strict" casts nothing
    produce(kafka_bootstrap, topic, traffic[20:40] + narrow + wide)
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("these are notes, not a model")
    chdb = tmp_path / "chdb"
    code = (f"import time; from streams.sink import ClickHouseSink; s = ClickHouseSink('chdb://{chdb}'); "
            f"print('open', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            api_port = taken.getsockname()[1]
            config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"], "no-output":
                                         models["good"], "not-onnx": not_onnx, "strict": models["good"]}, topic,
                                         api_port, partitions=1, chdb=chdb,
                                         extra={"no-output": {"output": "nope"}, "strict": {"cast": "no"}})  # fmt: skip
            head, *blocks = config.read_text().split("[[candidates]]")  # "strict": an adapter without the cast
            blocks[-1] = blocks[-1].replace('cast = { image = "float32" }, ', "")
            config.write_text("[[candidates]]".join([head, *blocks]))
            code, rows, out = doctor(config)
    finally:
        holder.kill()
        holder.wait()
    assert code == 1, out
    (missing,) = row(rows, "model digits/no-output", "✗")
    assert "'nope' is not an output of" in missing and "→ fix: set candidates.no-output.output" in missing
    (file,) = row(rows, "model digits/not-onnx", "✗")
    assert file.startswith("candidates.not-onnx.path:") and str(not_onnx) in file and "onnx" in file.lower()
    (port,) = row(rows, "API port", "✗")
    assert port.startswith(f"127.0.0.1:{api_port} is not available") and "SHADOWLENS_API__PORT" in port
    (held,) = row(rows, "chDB path", "✗")
    assert f"in use by process {holder.pid}" in held and "→ fix:" in held and "http://" in held
    # The replay core's own dead letters, per candidate and reason: 20 of the 60 records do not fit
    # the model's shape; for "strict" (cast = "no") 20 more carry float64 where the model takes float32.
    (shape,) = row(rows, "sample → digits/digits-v2", "✗")
    assert shape.startswith("20 of 60 records dead-lettered as adapter:") and "inputs.image" in shape, shape
    assert "candidates.digits-v2.adapter" in shape
    shape, dtype = row(rows, "sample → digits/strict", "✗")
    assert shape.startswith("20 of 60 records dead-lettered as adapter:")
    assert dtype.startswith("20 of 60 records dead-lettered as input_dtype:") and "inputs.pixels" in dtype, dtype
    assert "float64" in dtype and "float32" in dtype and "candidates.strict.cast" in dtype
    assert row(rows, "sample → digits/no-output", "–") == ["not replayed: the model does not load (above)"]
    assert out.rstrip().endswith("7 problem(s): fix the ✗ rows and run doctor again")


def test_doctor_before_any_traffic_is_neutral_and_creates_nothing(kafka_bootstrap, models, tmp_path):
    topic = f"doctor-none-{os.getpid()}-{time.monotonic_ns()}"
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, topic, free_port())
    code, rows, out = doctor(config)
    assert code == 0, out
    assert row(rows, "sample", "–") == [f"{topic} does not exist yet: no records yet; run doctor again once the "
                                        "producer sends"]  # fmt: skip
    assert row(rows, "mirror topic", "✓") == [f"{topic}: will be created at worker start (3 partitions)"]
    assert not {t for t in topics(kafka_bootstrap) if t.startswith(topic)}
    assert not (tmp_path / "chdb").exists()


def start_replicas(config: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP"}
    return subprocess.Popen([*CLI, "worker", "--config", str(config), "--role", "replay", "--processes", "2"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)  # fmt: skip


def wait_for(predicate, timeout_s: float, what: str, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if result := predicate():
                return result
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def child_pids(log: Path) -> list[int]:
    return [int(p) for p in re.findall(r"replay process \d/2: pid (\d+)", log.read_text())]


def test_two_replay_processes_on_one_box_share_the_work(kafka_bootstrap, new_topic, models, traffic, tmp_path):
    topic = new_topic("doctor-procs", partitions=4)
    base = free_port_pair()
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, topic, free_port(),
                                 partitions=4, metrics={"port": base})  # fmt: skip
    log = tmp_path / "replicas.log"
    parent = start_replicas(config, log)
    urls = [f"http://127.0.0.1:{base + i}/metrics" for i in range(2)]
    try:
        # Records only once both are in the group: none is replayed before the partitions are split.
        wait_for(lambda: group_state(kafka_bootstrap, f"worker-{topic}") == ("Stable", 2), 90, "two members", log)
        produce(kafka_bootstrap, topic, traffic)
        counts = wait_for(lambda: (c := [metric(u, "shadowlens_replayed_requests_total") for u in urls]) and
                          sum(c) == len(traffic) and c, 90, f"{len(traffic)} replayed", log)  # fmt: skip
        assert all(c > 0 for c in counts), counts  # each owns two of the four partitions
        text = log.read_text()
        for i in (1, 2):
            port = base + i - 1  # [metrics] port + i
            assert f"[replay {i}/2] shadowlens.worker:   Prometheus metrics on http://127.0.0.1:{port}/metrics" in text
        pids = child_pids(log)
        assert len(pids) == 2 and parent.pid not in pids
        parent.send_signal(signal.SIGTERM)  # to the supervisor alone: it stops both
        assert parent.wait(timeout=60) == 0, log.read_text()[-4000:]
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_replay_process_that_dies_stops_the_set(kafka_bootstrap, new_topic, models, tmp_path):
    topic = new_topic("doctor-die", partitions=2)
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, topic, free_port(),
                                 partitions=2, metrics={"port": 0})  # fmt: skip
    log = tmp_path / "replicas.log"
    parent = start_replicas(config, log)
    try:
        wait_for(lambda: log.read_text().count("Prometheus metrics on") == 2, 90, "both started", log)
        first, second = child_pids(log)
        ports = re.findall(r"Prometheus metrics on http://127.0.0.1:(\d+)/metrics", log.read_text())
        assert len(set(ports)) == 2  # port 0: any free port each, logged
        os.kill(first, signal.SIGKILL)
        assert parent.wait(timeout=60) == 1
        assert f"replay process 1/2 (pid {first}) exited with code -9; stopping the others" in log.read_text()
        with pytest.raises(ProcessLookupError):
            os.kill(second, 0)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
