"""``shadowlens rejudge`` on real parts: a real worker (Kafka, replay and judge stages, chDB) judges a
good and a broken candidate beside a noise reference (the baseline replayed: noise floor, paired
latency), in three parts of traffic so that the judge looks several times. Then, with the worker
stopped, ``rejudge`` replays the stored diff rows (no model calls) through the judge:

- under the recorded policy it reproduces every recorded verdict exactly (the whole verdict: its
  decision, samples, reasons, metrics and slices), for each of the three pairs;
- under a looser policy the broken candidate never rolls back, under a tighter one it rolls back
  at its first look: another timeline, printed beside the recorded one;
- an unknown pair, a pair without stored verdicts, a missing, broken or unknown-field policy file,
  and a chDB path held by the running worker are each one line and exit status 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from streams.demo import DEMO_POLICY, TrafficGenerator
from harness import WorkerProcess, free_port, produce, window_aligned_start, write_worker_config
from streams.models import build_digits_models

pytestmark = pytest.mark.kafka

REQUESTS = 3000
POLICY = {"min_span_s": 25.0}  # the broken candidate holds for the first looks, then rolls back
PAIRS = ("digits-v2", "digits-v2-broken", "digits-v1-replay")


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHADOWLENS_")}  # the config decides
    return subprocess.run([sys.executable, "-m", "streams.cli", "rejudge", *args], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


def one_error_line(done: subprocess.CompletedProcess, words: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and done.stdout == "", done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], done.stderr


@pytest.fixture(scope="module")
def run(kafka_bootstrap, new_topic, tmp_path_factory):
    """The worker's config and its stored data, after three parts of traffic (worker stopped)."""
    tmp = tmp_path_factory.mktemp("rejudge")
    models = build_digits_models(tmp / "models")
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    topic = new_topic("rejudge", partitions=3)
    candidates = {"digits-v2": models["good"], "digits-v2-broken": models["broken"]}
    config = write_worker_config(tmp, kafka_bootstrap, candidates, topic, port, window_s=10, policy=POLICY)
    config.write_text(config.read_text() + noise_reference(models["baseline"]))
    start = window_aligned_start(REQUESTS, rate_per_s=50, window_s=10)
    messages = TrafficGenerator(models["baseline"], rate_per_s=50).messages(REQUESTS, start=start)

    def scored() -> int:
        rows = [httpx.get(f"{api}/v1/windows/digits/{c}", params={"limit": 1000}, timeout=5) for c in PAIRS]
        return min(sum(w["requests"] for w in r.json()) if r.status_code == 200 else 0 for r in rows)

    worker = WorkerProcess(config, tmp / "worker.log")
    try:
        for part in range(1, 4):  # each part judged before the next arrives: several looks
            produce(kafka_bootstrap, topic, messages[(part - 1) * REQUESTS // 3 : part * REQUESTS // 3])
            worker.wait_for(lambda n=part * REQUESTS // 3: scored() >= n, 120, f"the windows of part {part}")
        held = cli("--config", str(config), "--model", "digits", "--candidate", "digits-v2")
        one_error_line(held, "in use by process")  # chDB: one process per data path, said with the fix
    finally:
        worker.stop()
    other = write_worker_config(tmp, kafka_bootstrap, {**candidates, "digits-v9": models["good"]}, topic, port,
                                window_s=10, policy=POLICY, name="other.toml")  # fmt: skip
    return {"config": config, "other": other, "dir": tmp}


def noise_reference(path) -> str:
    """The baseline replayed as it is (it takes the v1 inputs: no adapter), its diffs the noise floor."""
    policy = ", ".join(f"{k} = {v!r}" for k, v in {**DEMO_POLICY, **POLICY}.items())
    return (f'\n[[candidates]]\nname = "digits-v1-replay"\nmodel = "digits"\npath = "{path}"\n'
            f"noise_reference = true\npolicy = {{ {policy} }}\n")


def rejudged(config, candidate: str, *more: str) -> tuple[dict, int]:
    done = cli("--config", str(config), "--model", "digits", "--candidate", candidate, "--json", *more)
    assert "Traceback" not in done.stderr, done.stderr
    return json.loads(done.stdout), done.returncode


@pytest.mark.parametrize("candidate", PAIRS)
def test_the_recorded_policy_reproduces_every_recorded_verdict(run, candidate):
    report, code = rejudged(run["config"], candidate)
    assert code == 0 and report["same_policy"] and report["reproduced"] is True, report
    assert report["rows"] == REQUESTS and report["caveats"] == []
    looks = report["looks"]
    assert len(looks) >= 3 and [lk["look"] for lk in looks] == list(range(1, len(looks) + 1))
    assert all(lk["differs"] == [] and lk["rejudged"] == lk["recorded"] for lk in looks)
    assert report["rejudged"] == report["recorded"]
    assert looks[-1]["received"] == REQUESTS and looks[-1]["rejudged_samples"] == REQUESTS


def test_another_policy_gives_another_timeline_beside_the_recorded_one(run):
    recorded, _ = rejudged(run["config"], "digits-v2-broken")
    first_rollback = recorded["recorded"]["rollback"]
    assert first_rollback is not None and first_rollback["look"] > 1, recorded  # min_span_s held it first

    loose = run["dir"] / "loose.toml"
    loose.write_text("[policy]\nlabel_flip_rate_margin = 0.99\nabs_confidence_delta_margin = 0.99\n"
                     "accuracy_drop_margin = 0.99\nlatency_p99_ratio_margin = 100.0\nlatency_p50_ratio_margin = 100.0\n")  # fmt: skip
    report, code = rejudged(run["config"], "digits-v2-broken", "--policy", str(loose))
    assert code == 0 and not report["same_policy"] and report["reproduced"] is None
    assert report["policy"] not in report["recorded_policies"]
    assert report["recorded"]["rollback"] == first_rollback and report["rejudged"]["rollback"] is None
    assert all(lk["rejudged"] != "rollback" for lk in report["looks"])

    tight = run["dir"] / "tight.toml"
    tight.write_text("min_span_s = 0.0\n")  # top-level fields work too
    report, _ = rejudged(run["config"], "digits-v2-broken", "--policy", str(tight))
    assert report["rejudged"]["rollback"]["look"] == 1 < first_rollback["look"]

    text = cli("--config", str(run["config"]), "--model", "digits", "--candidate", "digits-v2-broken",
               "--policy", str(loose))  # fmt: skip
    assert text.returncode == 0, text.stderr
    assert f"recorded: never promotes; rolls back at look {first_rollback['look']} after" in text.stdout
    assert "rejudged: never promotes; never rolls back" in text.stdout
    same = cli("--config", str(run["config"]), "--model", "digits", "--candidate", "digits-v2-broken")
    assert "reproduced: all" in same.stdout and "looks identical to the recorded verdicts" in same.stdout


def test_operator_errors_are_one_line_and_exit_2(run):
    config = str(run["config"])
    one_error_line(cli("--config", config, "--model", "digits", "--candidate", "nope"), "not a [[candidates]] entry")
    one_error_line(cli("--config", str(run["other"]), "--model", "digits", "--candidate", "digits-v9"),
                   "no verdict is stored for digits/digits-v9")  # fmt: skip
    args = ("--config", config, "--model", "digits", "--candidate", "digits-v2", "--policy")
    one_error_line(cli(*args, str(run["dir"] / "missing.toml")), "no such file")
    broken = run["dir"] / "broken.toml"
    broken.write_text("label_flip_rate_margin = [\n")
    one_error_line(cli(*args, str(broken)), "not a readable TOML file")
    unknown = run["dir"] / "unknown.toml"
    unknown.write_text("[policy]\nflip_margin = 0.1\n")
    one_error_line(cli(*args, str(unknown)), "unknown judge policy keys: ['flip_margin']")
