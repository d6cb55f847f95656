"""How many of KServe's logged calls one ``shadowlens ingest`` process takes, and how fast they reach
the mirror topic as mirrored requests.

A call is two POSTs (its request and its response CloudEvent, Open Inference Protocol bodies of the
digits model: 64 float32 in, 10 out), sent by ``--senders`` threads on kept-alive connections with
TCP_NODELAY, as Go's net/http (KServe's logger) sends them. Printed per run and as medians:

- accepted: calls a second whose two events were answered 200 (each on the halves topic, acked);
- mirrored: calls a second from the first POST until the last mirrored request is on the mirror topic.

Needs a broker: ``KAFKA_KEEP_RUNNING=1 bash scripts/kafka.sh start``.
    python bench/bench_ingest.py --calls 4000 --runs 3
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from harness import consume_all, free_port  # noqa: E402

REQUEST = "org.kubeflow.serving.inference.request"
RESPONSE = "org.kubeflow.serving.inference.response"


def events(i: int, run: str) -> list[tuple[dict, bytes]]:
    call = f"{run}-{i}"
    pixels = [float((i * 7 + j) % 17) for j in range(64)]
    probs = [0.1] * 10
    common = {"Ce-Id": call, "Ce-Specversion": "1.0", "Ce-Source": "bench", "Ce-Inferenceservicename": "digits-isvc",
              "Content-Type": "application/json", "Ce-Metadata": "{}"}  # fmt: skip
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}000Z"
    req = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": pixels}]}
    res = {"model_name": "digits", "model_version": "v1",
           "outputs": [{"name": "probabilities", "shape": [1, 10], "datatype": "FP32", "data": probs}]}  # fmt: skip
    return [({**common, "Ce-Type": REQUEST, "Ce-Time": stamp}, json.dumps(req).encode()),
            ({**common, "Ce-Type": RESPONSE, "Ce-Time": stamp}, json.dumps(res).encode())]


def sender(port: int, calls: range, run: str, failures: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in calls:
        for headers, body in events(i, run):
            conn.request("POST", "/v1/ingest/kserve", body=body, headers=headers)
            answer = conn.getresponse()
            answer.read()
            if answer.status != 200:
                failures.append(answer.status)
    conn.close()


def one_run(bootstrap: str, calls: int, senders: int) -> tuple[float, float]:
    topic = f"bench-ingest-{uuid.uuid4().hex[:6]}"
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "ingest.toml"
        config.write_text(f"""
[kafka]
bootstrap = "{bootstrap}"
topic = "{topic}"
dead_letter_topic = "{topic}.dlq"
partitions = 4
[ingest]
port = {port}
[[ingest.kserve]]
inference_service = "digits-isvc"
model = "digits"
[[candidates]]
name = "c"
model = "digits"
path = "{Path(__file__).resolve()}"
""")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHADOWLENS_")}
        proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "ingest", "-c", str(config), "--loglevel",
                                 "warning"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("ingest did not start") from None
                    time.sleep(0.2)
            time.sleep(1.0)  # its pairing consumer joins its group
            failures: list = []
            parts = [range(s, calls, senders) for s in range(senders)]
            threads = [threading.Thread(target=sender, args=(port, part, "r", failures)) for part in parts]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            accepted_s = time.perf_counter() - t0
            if failures:
                raise RuntimeError(f"{len(failures)} events refused: {sorted(set(failures))}")
            got = consume_all(bootstrap, topic, expect=calls, timeout_s=120)
            mirrored_s = time.perf_counter() - t0
            if len(got) < calls:
                raise RuntimeError(f"{len(got)} of {calls} calls mirrored")
        finally:
            proc.terminate()
            proc.wait(30)
    return calls / accepted_s, calls / mirrored_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:19092"))
    args = parser.parse_args()
    accepted, mirrored = [], []
    for run in range(args.runs):
        a, m = one_run(args.bootstrap, args.calls, args.senders)
        accepted.append(a)
        mirrored.append(m)
        print(f"run {run + 1}: accepted {a:,.0f} calls/s ({2 * a:,.0f} events/s), mirrored {m:,.0f} calls/s")
    print(f"median of {args.runs}: accepted {statistics.median(accepted):,.0f} calls/s, mirrored "
          f"{statistics.median(mirrored):,.0f} calls/s ({args.calls} calls, {args.senders} senders, {os.cpu_count()} "
          "cores shared with the broker and the senders)")  # fmt: skip


if __name__ == "__main__":
    main()
