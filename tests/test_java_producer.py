"""A producer in another language: a Java program using only the JDK and the official Kafka client
(org.apache.kafka:kafka-clients, the jar kafka.sh fetched from Maven Central) mirrors requests by the
wire contract; the worker scores them exactly like the same requests sent by the Python SDK.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from mirror import MirrorClient
from harness import WorkerProcess, create_topic, free_port, window_totals, write_worker_config
from streams.models import build_digits_models, load_digits_split
from streams.sink import ClickHouseSink

pytestmark = pytest.mark.kafka

JAVA = Path(__file__).resolve().parent / "java" / "MirrorProducer.java"
REQUESTS = 300
COLUMNS = ("baseline_label", "candidate_label", "label_flip", "confidence_delta", "l1_distance", "baseline_confidence",
           "candidate_confidence", "baseline_latency_ms", "attributes['country']", "error", "sent_at", "metrics")


def kafka_clients_classpath() -> str | None:
    home = os.environ.get("SHADOWLENS_HOME", str(Path.home() / ".cache" / "shadowlens"))
    jars = sorted(glob.glob(f"{home}/kafka-*/libs/kafka-clients-*.jar"))
    return f"{Path(jars[-1]).parent}/*" if jars else None


def test_java_producer_is_scored_like_the_python_sdk(kafka_bootstrap, tmp_path):
    classpath = kafka_clients_classpath()
    if classpath is None or shutil.which("javac") is None:
        pytest.skip("needs javac and the Kafka client jars scripts/kafka.sh fetches (an external broker has none)")
    subprocess.run(["javac", "-cp", classpath, "-d", str(tmp_path), str(JAVA)], check=True, timeout=120)

    models = build_digits_models(tmp_path / "models")
    session = ort.InferenceSession(str(models["baseline"]), providers=["CPUExecutionProvider"])
    pixels = load_digits_split().holdout_x[:REQUESTS].astype(np.float32)
    probs = session.run(["probabilities"], {"pixels": pixels})[0].astype(np.float32)
    start_ms = int(time.time() * 1000) - 120_000
    countries = ("de", "fr", "us")

    topic = f"java-{uuid.uuid4().hex[:8]}"
    api_port = free_port()
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, topic, api_port)
    create_topic(kafka_bootstrap, topic, 3)  # the config's partitions
    # Both producers write before the worker starts: with windows closed 4 s after the last request
    # (idle_close_s), a JVM that starts slowly on a busy box would otherwise make its requests late.
    # The same requests twice: ids py-i through the SDK, java-i through the Java program.
    with MirrorClient(bootstrap_servers=kafka_bootstrap, topic=topic, close_timeout_s=15) as mirror:
        for i in range(REQUESTS):
            assert mirror.publish(f"py-{i}", "digits", "v1", {"pixels": pixels[i : i + 1]},
                                  {"probabilities": probs[i : i + 1]}, latency_ms=1.25 + i / 1000,
                                  attributes={"country": countries[i % 3]}, sent_at=(start_ms + 10 * i) / 1000)
    spec = tmp_path / "requests.txt"
    with spec.open("w") as out:
        for i in range(REQUESTS):
            values = " ".join(repr(float(v)) for v in [*pixels[i], *probs[i]])
            out.write(f"java-{i} {start_ms + 10 * i} {1.25 + i / 1000!r} {countries[i % 3]} {values}\n")
    java = subprocess.run(["java", "-cp", f"{classpath}:{tmp_path}", "MirrorProducer", kafka_bootstrap, topic,
                           str(spec)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert java.returncode == 0 and f"sent {REQUESTS}" in java.stdout, java.stderr[-3000:]

    worker = WorkerProcess(config, tmp_path / "worker.log")
    api = f"http://127.0.0.1:{api_port}"
    try:
        import httpx

        worker.wait_for(lambda: httpx.get(f"{api}/healthz", timeout=2).status_code == 200, 60, "the worker API")

        def all_counted():
            totals = window_totals(api, "digits", ["digits-v2"])
            return totals if totals["digits-v2"] >= 2 * REQUESTS else None

        assert worker.wait_for(all_counted, 90, "both producers' requests") == {"digits-v2": 2 * REQUESTS}
    finally:
        worker.stop()

    sink = ClickHouseSink(f"chdb:///{tmp_path / 'chdb'}")
    try:
        rows = sink.query(f"SELECT request_id, {', '.join(COLUMNS)} FROM shadowlens.request_diffs FINAL "
                          "WHERE candidate = 'digits-v2'")
        letters = sink.query("SELECT count() FROM shadowlens.request_diffs WHERE error != ''")[0][0]
    finally:
        sink.close()
    by_id = {r[0]: r[1:] for r in rows}
    assert len(by_id) == 2 * REQUESTS and letters == 0
    for i in range(REQUESTS):
        assert by_id[f"java-{i}"] == by_id[f"py-{i}"], i  # every scored column identical
