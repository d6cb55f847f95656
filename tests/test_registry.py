"""The candidate registry's commands on a real broker (no worker): what each writes, and their
one-line errors (exit 2). Hot reload in running workers: tests/test_hot_reload.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import pytest

from streams.config import load_settings
from harness import free_port, free_port_pair, produce, write_worker_config
from streams.kafka_io import ensure_topics
from streams.registry.store import read_all, seed

pytestmark = [pytest.mark.kafka]
CLI = [sys.executable, "-m", "streams.cli"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def one_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "╭" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture()
def setup(kafka_bootstrap, tmp_path, models):
    topic = f"registry-{uuid.uuid4().hex[:8]}"
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, topic, free_port(),
                                 partitions=3)  # fmt: skip
    settings = load_settings(config)
    asyncio.run(ensure_topics(settings))
    asyncio.run(seed(settings))
    return settings, config, topic


def show(config, candidate: str) -> dict:
    done = cli("candidates", "show", "-c", str(config), "--model", "digits", "--candidate", candidate)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_add_change_retire_reset_record_versions_and_offsets(setup, models, kafka_bootstrap):
    settings, config, topic = setup
    seeded = show(config, "digits-v2")  # the TOML's candidate, scored from the beginning
    assert (seeded["version"], seeded["state"], seeded["start_offsets"], seeded["stop_offsets"]) == (1, "registered",
                                                                                                        {}, None)
    produce(kafka_bootstrap, topic, [b"{}"] * 30, partition=lambda i: i % 3)  # 10 per partition
    c = str(config)
    done = cli("candidates", "add", "-c", c, "--model", "digits", "--candidate", "late", "--path", str(models["degraded"]),
               "--adapter", json.dumps({"rename": {"pixels": "image"}, "cast": {"image": "float32"}}))
    assert done.returncode == 0, done.stderr
    late = show(config, "late")
    assert late["start_offsets"] == {"0": 10, "1": 10, "2": 10} and late["pending"] is False
    assert (late["version"], late["pair"], late["policy_version"]) == (1, "late", 1)
    # A policy change alone: a new policy version, the same artifact version and start offsets.
    produce(kafka_bootstrap, topic, [b"{}"] * 3, partition=lambda i: i % 3)
    done = cli("candidates", "add", "-c", c, "--model", "digits", "--candidate", "late", "--policy",
               json.dumps({"min_samples": 77}))
    assert done.returncode == 0, done.stderr
    changed = show(config, "late")
    assert (changed["version"], changed["policy_version"], changed["policy"]["min_samples"]) == (1, 2, 77)
    assert changed["start_offsets"] == late["start_offsets"]
    # Another artifact: version 2, its own pair id, scored from now; version 1 stops where it starts.
    done = cli("candidates", "add", "-c", c, "--model", "digits", "--candidate", "late", "--path", str(models["good"]))
    assert done.returncode == 0, done.stderr
    v2 = show(config, "late")
    assert (v2["version"], v2["pair"], v2["start_offsets"]) == (2, "late@v2", {"0": 11, "1": 11, "2": 11})
    (v1,) = v2["earlier_versions"]
    assert (v1["version"], v1["state"], v1["stop_offsets"]) == (1, "retired", v2["start_offsets"])
    assert v1["policy"]["min_samples"] == 77
    # Retire: stopped at the end offsets now; reset of a retired candidate: a new version from now.
    produce(kafka_bootstrap, topic, [b"{}"] * 3, partition=lambda i: i % 3)
    assert cli("candidates", "retire", "-c", c, "--model", "digits", "--candidate", "late").returncode == 0
    retired = show(config, "late")
    assert (retired["state"], retired["stop_offsets"]) == ("retired", {"0": 12, "1": 12, "2": 12})
    assert cli("candidates", "reset", "-c", c, "--model", "digits", "--candidate", "late").returncode == 0
    v3 = show(config, "late")
    assert (v3["version"], v3["pair"], v3["state"], v3["stop_offsets"]) == (3, "late@v3", "registered", None)
    assert {v["version"] for v in v3["earlier_versions"]} == {1, 2}
    listed = cli("candidates", "list", "-c", c, "--json")
    assert {(r["candidate"], r["version"]) for r in json.loads(listed.stdout)} == {("digits-v2", 1), ("late", 3)}
    specs, _ = asyncio.run(read_all(settings))
    assert not any(r.pending for r in specs.values())
    # A second seed (a later start) writes nothing: the registry wins.
    assert asyncio.run(seed(settings)) == 0


def test_registry_commands_fail_in_one_line(setup, models, tmp_path):
    _, config, _ = setup
    c = str(config)
    assert "not registered" in one_error(cli("candidates", "show", "-c", c, "--model", "digits", "--candidate", "x"))
    assert "no such artifact" in one_error(cli("candidates", "add", "-c", c, "--model", "digits", "--candidate", "x",
                                               "--path", str(tmp_path / "missing.onnx")))  # fmt: skip
    assert "only local files" in one_error(cli("candidates", "add", "-c", c, "--model", "digits", "--candidate", "x",
                                               "--path", "s3://bucket/model.onnx"))  # fmt: skip
    assert "give --path" in one_error(cli("candidates", "add", "-c", c, "--model", "digits", "--candidate", "x"))
    assert "not JSON" in one_error(cli("candidates", "add", "-c", c, "--model", "digits", "--candidate", "x",
                                       "--path", str(models["good"]), "--policy", "{oops"))  # fmt: skip
    bad_kind = one_error(cli("candidates", "add", "-c", c, "--model", "digits", "--candidate", "x", "--path",
                             str(models["good"]), "--kind", "poetry"))  # fmt: skip
    assert "poetry" in bad_kind and "output kind" in bad_kind
    assert "sha256" in one_error(cli("candidates", "add", "-c", c, "--model", "digits", "--candidate", "x",
                                     "--path", str(models["good"]), "--sha256", "abc"))  # fmt: skip
    assert "reset clears" in one_error(cli("candidates", "reset", "-c", c, "--model", "digits",
                                           "--candidate", "digits-v2"))  # fmt: skip
    assert "not registered" in one_error(cli("candidates", "retire", "-c", c, "--model", "digits", "--candidate", "x"))


def test_registry_before_any_worker_created_it_fails_in_one_line(kafka_bootstrap, tmp_path, models):
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, f"none-{uuid.uuid4().hex[:8]}",
                                 free_port())  # fmt: skip
    assert "start a worker once" in one_error(cli("candidates", "list", "-c", str(config)))


def test_registry_without_a_broker_fails_in_one_line(tmp_path, models):
    config = write_worker_config(tmp_path, f"127.0.0.1:{free_port_pair()}", {"digits-v2": models["good"]}, "nobroker",
                                 free_port())  # fmt: skip
    line = one_error(cli("candidates", "list", "-c", str(config)))
    assert "unreachable" in line and "kafka.sh start" in line


def test_registry_over_the_api_reads_with_a_token_and_writes_only_with_one(setup, models):
    from fastapi.testclient import TestClient

    from streams.api.app import create_app
    from streams.api.board import VerdictBoard

    settings, config, _ = setup
    token = "registry-token-0123456789"
    auth = {"Authorization": f"Bearer {token}"}
    body = {"path": str(models["degraded"]), "adapter": {"rename": {"pixels": "image"}}, "by": "tester"}
    with TestClient(create_app(VerdictBoard.from_settings(settings), tokens=[token], registry=settings)) as client:
        assert client.get("/v1/candidates").status_code == 401
        assert client.post("/v1/candidates/digits/api-one", json=body).status_code == 401
        added = client.post("/v1/candidates/digits/api-one", json=body, headers=auth)
        assert added.status_code == 200, added.text
        assert (added.json()["version"], added.json()["updated_by"]) == (1, "tester")
        listed = client.get("/v1/candidates", headers=auth).json()
        assert {r["candidate"] for r in listed} == {"digits-v2", "api-one"}
        assert client.get("/v1/candidates/digits/nope", headers=auth).status_code == 404
        bad = client.post("/v1/candidates/digits/api-two", json={**body, "kind": "poetry"}, headers=auth)
        assert bad.status_code == 422 and "poetry" in bad.json()["detail"]
        retired = client.post("/v1/candidates/digits/api-one/retire", json={"reason": "done"}, headers=auth)
        assert retired.status_code == 200 and retired.json()["state"] == "retired"
    with TestClient(create_app(VerdictBoard.from_settings(settings), registry=settings)) as open_api:
        assert open_api.get("/v1/candidates").status_code == 200  # reads: as /v1/verdicts without tokens
        assert open_api.post("/v1/candidates/digits/api-three", json=body).status_code == 403  # writes: never
    assert show(config, "api-one")["state"] == "retired"


def test_doctor_checks_every_registry_entry_as_a_replay_process_would_load_it(setup, models, tmp_path):
    """A registered candidate whose file no longer has its pinned SHA-256, or is gone, is a failed
    check naming it and the fix; the seeded one and a good one pass; a retired one is not loaded."""
    settings, config, _ = setup
    moved = tmp_path / "degraded-copy.onnx"
    moved.write_bytes(models["degraded"].read_bytes())
    for name, path in (("digits-good-2", models["good"]), ("digits-moved", moved), ("digits-retired", models["good"])):
        done = cli("candidates", "add", "-c", str(config), "--model", "digits", "--candidate", name, "--path", str(path))
        assert done.returncode == 0, done.stderr
    done = cli("candidates", "add", "-c", str(config), "--model", "digits", "--candidate", "digits-pinned",
               "--path", str(models["good"]), "--sha256", "0" * 64)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert cli("candidates", "retire", "-c", str(config), "--model", "digits", "--candidate", "digits-retired").returncode == 0
    moved.unlink()
    from streams.doctor.checks import FAIL, OK, run_doctor

    checks = {c.what: c for c in run_doctor(settings, sample=0, role="replay") if c.what.startswith("registry ")}
    assert checks["registry digits/digits-v2 v1"].status == OK
    assert checks["registry digits/digits-good-2 v1"].status == OK
    assert checks["registry digits/digits-retired v1"].status == OK and "retired" in checks["registry digits/digits-retired v1"].detail
    pinned, gone = checks["registry digits/digits-pinned v1"], checks["registry digits/digits-moved v1"]
    assert pinned.status == FAIL and "the registry pins 000000000000" in pinned.detail
    assert gone.status == FAIL and "degraded-copy.onnx" in gone.detail
    for check in (pinned, gone):
        assert "shadowlens candidates add --model digits" in check.fix
