"""The replay and judge cores, embedded (ONNX models, chDB): adapter, dedup, windows, verdicts, API."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import numpy as np
import pytest
from fastapi.testclient import TestClient

from schemas import MirroredRequest, Tensor
from streams.replay.adapter import AdapterConfig, AdapterError, InputAdapter
from streams.api.app import create_app
from streams.config import ConfigError, load_settings
from streams.demo import TrafficGenerator, demo_settings
from harness import window_aligned_start
from streams.judge.core import JudgeCore
from streams.pipeline import Pipeline
from streams.replay.core import Inbound
from streams.replay.runner import OnnxRunner, choose_providers
from streams.sink import ClickHouseSink


@pytest.fixture(scope="module")
def start() -> datetime:
    # Recent (request_diffs has a retention TTL) and on a window boundary (tests count windows).
    return window_aligned_start(1500, rate_per_s=50, window_s=10)


@pytest.fixture(scope="module")
def traffic(models, start) -> list[bytes]:
    return TrafficGenerator(models["baseline"], rate_per_s=50).messages(1500, start=start)


@pytest.fixture
def pipeline(models, tmp_path):
    settings = demo_settings(tmp_path, models, window_s=10)
    sink = ClickHouseSink(settings.clickhouse.dsn, settings.clickhouse.database)
    yield Pipeline(settings, sink)
    sink.close()


def at(messages, partition=0, first_offset=0):
    return [Inbound(m, partition, first_offset + i) for i, m in enumerate(messages)]


def test_adapter_maps_v1_to_v2():
    adapter = InputAdapter(AdapterConfig(rename={"pixels": "image"}, cast={"image": "float32"},
                                         scale={"image": 0.5}, shift={"image": 1.0}, drop=["debug"]))  # fmt: skip
    out = adapter({"pixels": np.array([[2, 4]], dtype=np.int64), "debug": np.zeros(1), "other": np.ones(1)})
    assert set(out) == {"image", "other"}
    assert out["image"].dtype == np.float32 and out["image"].tolist() == [[2.0, 3.0]]
    with pytest.raises(AdapterError, match="pixels"):
        adapter({"image": np.zeros((1, 2))})


def test_cpu_is_always_a_provider_and_cuda_only_when_present():
    import onnxruntime as ort

    chosen = choose_providers()
    assert chosen[-1] == "CPUExecutionProvider"
    assert ("CUDAExecutionProvider" in chosen) == ("CUDAExecutionProvider" in ort.get_available_providers())


def test_runner_timing_modes_agree_on_outputs(models):
    runner = OnnxRunner(str(models["good"]))
    rows = [{"image": np.random.default_rng(i).random((1, 64), dtype=np.float32)} for i in range(8)]
    per_request, lat1 = runner.run(rows, "probabilities", "per_request")
    batched, lat2 = runner.run(rows, "probabilities", "batched")
    np.testing.assert_allclose(np.stack(per_request), np.stack(batched), rtol=1e-5, atol=1e-6)
    assert (lat1 > 0).all() and np.ptp(lat2) == 0  # batched: the batch time shared evenly


def test_config_errors_name_the_field(tmp_path, models):
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[windows]\nsize_s = -1\n[[candidates]]\nname = "x"\nmodel = "m"\npath = "{models["good"]}"\n'
                   'policy = { label_flip_margin = 0.1 }\n')  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load_settings(bad)
    message = str(info.value)
    assert "windows.size_s" in message and "candidates.0.policy" in message and "label_flip_margin" in message
    with pytest.raises(ConfigError, match="no such model file"):
        load_settings(overrides={"candidates": [{"name": "x", "model": "m", "path": str(tmp_path / "nope.onnx")}]})
    with pytest.raises(ConfigError, match="no such config file"):
        load_settings(tmp_path / "missing.toml")


def test_env_overrides_file(monkeypatch, models):
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "kafka.example:9092")
    monkeypatch.setenv("SHADOWLENS_WINDOWS__SIZE_S", "30")
    settings = load_settings(overrides={"candidates": [{"name": "x", "model": "m", "path": str(models["good"])}]})
    assert settings.kafka.bootstrap == "kafka.example:9092" and settings.windows.size_s == 30


def test_pipeline_scores_windows_and_judges(pipeline, traffic):
    for lo in range(0, len(traffic), 200):
        assert not pipeline.process(traffic[lo : lo + 200]).dead_letters
        pipeline.close_due()
    verdicts = {v.candidate: v for v in pipeline.close_due(force=True)}
    counts = pipeline.sink.diff_counts()
    assert counts == {("digits", c): len(traffic) for c in ("digits-v2", "digits-v2-degraded", "digits-v1-replay")}
    windows = pipeline.sink.query(
        "SELECT candidate, sum(requests), count() FROM shadowlens.window_stats FINAL GROUP BY candidate")
    for candidate, requests, n_windows in windows:
        assert requests == len(traffic)
        assert n_windows == 3  # 1500 requests at 50/s = 30 s of event time in 10 s windows
    assert verdicts["digits-v2-degraded"].verdict == "rollback"
    # Window rows carry distribution statistics of the predictions (reported, not gating).
    js = dict(pipeline.sink.query(
        "SELECT candidate, avg(divergence['js_distance']) FROM shadowlens.window_stats FINAL GROUP BY candidate"))
    assert js["digits-v1-replay"] < 1e-6 < js["digits-v2"] < js["digits-v2-degraded"]
    pvalues = pipeline.sink.query("SELECT min(divergence['stuart_maxwell_pvalue']) FROM shadowlens.window_stats "
                                  "FINAL WHERE candidate = 'digits-v2-degraded'")[0][0]  # fmt: skip
    assert pvalues < 1e-3  # the degraded retrain predicts other labels for the same inputs
    # The baseline replayed through the same path reproduces itself: no flips at all.
    replay = pipeline.sink.query("SELECT sum(label_flip), max(l1_distance) FROM shadowlens.request_diffs "
                                 "WHERE candidate = 'digits-v1-replay'")[0]  # fmt: skip
    assert replay[0] == 0 and replay[1] < 1e-5


def test_redelivered_requests_count_once(pipeline, traffic):
    first = pipeline.process(at(traffic[:400]))
    # Producer retries: the same requests again under new offsets, and twice within one batch.
    again = pipeline.process(at(traffic[200:600] + traffic[:50], first_offset=400))
    assert first.duplicates == 0
    assert again.duplicates == 3 * 250  # 200 already scored + 50 again: per each of the 3 candidates
    pipeline.close_due(force=True)
    rows = dict(pipeline.sink.query(
        "SELECT candidate, sum(requests) FROM shadowlens.window_stats FINAL GROUP BY candidate"))  # fmt: skip
    assert set(rows.values()) == {600}
    assert pipeline.sink.query("SELECT count() FROM shadowlens.request_diffs")[0][0] == 3 * 600


def test_poison_messages_are_dead_letters_and_the_batch_is_scored(pipeline, traffic):
    good = json.loads(traffic[0])
    poison = [
        None,  # a tombstone
        b"\xff\xfe not utf8",
        b"[" * 200_000,  # nested far deeper than any request
        json.dumps({**good, "inputs": {}}).encode(),
        json.dumps({**good, "baseline_output": {"probabilities": {
            "dtype": "float32", "shape": [1, 10], "data": "AAAA"}}}).encode(),
        json.dumps({**good, "request_id": "empty", "inputs": {"pixels": {"dtype": "float32", "shape": [0, 64], "data": ""}}}).encode(),
        json.dumps({**good, "request_id": "nan", "inputs": {"pixels": {"dtype": "float32", "shape": [1, 64], "data": [float("nan")] * 64}}}).encode(),
        json.dumps({**good, "request_id": "huge-attr", "attributes": {"country": "x" * 2_000_000}}).encode(),
        json.dumps({**good, "request_id": "u-1", "model": "unknown"}).encode(),
        json.dumps({**good, "request_id": "rows", "inputs": {"pixels": {"dtype": "float32", "shape": [5, 64], "data": [0.0] * 320}}}).encode(),
    ]  # fmt: skip
    batch = traffic[:100] + poison + traffic[100:200]
    result = pipeline.process(batch)
    letters = sorted(result.dead_letters, key=lambda d: d.offset)
    kinds = [d.error_type for d in letters]
    assert kinds == ["tombstone", "invalid_json", "too_deep", "invalid_schema", "invalid_tensor", "invalid_tensor",
                     "non_finite_input", "invalid_schema", "unknown_model", "invalid_tensor"], [d.reason for d in letters]
    assert result.diff_rows == 3 * 200  # every valid request, each candidate
    assert [d.offset for d in letters] == list(range(100, 100 + len(poison)))
    big = next(d for d in letters if d.original_size and d.original_size > 1_000_000)
    assert big.payload_truncated and len(big.model_dump_json()) < 100_000 and big.payload_sha256
    assert "no candidate is configured" in letters[-2].reason and "carries one" in letters[-1].reason


def test_a_request_that_does_not_fit_one_candidate_is_a_dead_letter_for_that_one(models, tmp_path, traffic):
    settings = demo_settings(tmp_path, models, window_s=10)
    sink = ClickHouseSink(settings.clickhouse.dsn)
    try:
        pipeline = Pipeline(settings, sink)
        good = json.loads(traffic[0])
        wide = {"dtype": "float32", "shape": [1, 32], "data": [0.0] * 32}  # the models take 64 pixels
        result = pipeline.process([json.dumps({**good, "request_id": "w", "inputs": {"pixels": wide}}).encode()])
        assert sorted(d.candidate for d in result.dead_letters) == sorted(c.name for c in settings.candidates)
        assert all(d.error_type == "adapter" and ("inputs.image" in d.reason or "inputs.pixels" in d.reason)
                   for d in result.dead_letters), [d.reason for d in result.dead_letters]  # fmt: skip
        assert result.diff_rows == 0
    finally:
        sink.close()


def test_mismatched_baseline_shape_is_a_dead_letter_not_a_candidate_error(pipeline, traffic):
    good = json.loads(traffic[0])
    ninefold = Tensor.from_array(np.full((1, 9), 1 / 9, dtype=np.float32))  # baseline answered 9 classes
    event = MirroredRequest.model_validate({**good, "request_id": "odd", "baseline_output": {"probabilities": ninefold}})
    result = pipeline.process([event.model_dump_json().encode(), traffic[1]])
    assert result.diff_rows == 3  # the good request, for each candidate
    assert {(d.error_type, d.candidate) for d in result.dead_letters} == {
        ("baseline_mismatch", c.name) for c in pipeline.settings.candidates}
    assert "baseline_output.probabilities: 9 values" in result.dead_letters[0].reason
    assert pipeline.sink.query("SELECT count() FROM shadowlens.request_diffs WHERE request_id = 'odd'") == [(0,)]
    assert pipeline.pair("digits", "digits-v2").unscorable == {"baseline_mismatch": 1}
    assert pipeline.pair("digits", "digits-v2").cumulative.errors == 0  # not the candidate's fault


def test_api_answers_gates(pipeline, traffic):
    pipeline.process(traffic[:400])
    client = TestClient(create_app(pipeline.board, pipeline.sink))
    pending = client.get("/v1/verdicts/digits/digits-v2")
    assert pending.status_code == 200 and pending.json()["verdict"] == "hold"  # scored, no window closed yet
    assert pending.json()["state"] == "scoring"
    pipeline.close_due(force=True)
    body = client.get("/v1/verdicts/digits/digits-v2-degraded").json()
    assert body["verdict"] == "rollback" and body["samples"] == 400
    assert {m["name"] for m in body["metrics"]} >= {"label_flip_rate", "abs_confidence_delta"}
    assert client.get("/v1/verdicts/digits/nope").status_code == 404
    assert len(client.get("/v1/verdicts").json()) == 3
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/v1/windows/digits/digits-v2").json()[0]["requests"] > 0
    # Flagger webhooks: 2xx advances (confirm-promotion) or rolls back (rollback hook).
    flagger = {"name": "digits", "namespace": "ml", "phase": "Progressing", "checksum": "x", "metadata": {}}
    assert client.post("/v1/gates/flagger/digits/digits-v2-degraded", json=flagger).status_code == 412
    assert client.post("/v1/gates/flagger-rollback/digits/digits-v2-degraded", json=flagger).status_code == 200
    for candidate in ("digits-v2", "digits-v1-replay"):
        gate = client.post(f"/v1/gates/flagger/digits/{candidate}", json=flagger)
        assert (gate.status_code == 200) == (gate.json()["verdict"] == "promote")
    assert client.post("/v1/gates/flagger-rollback/digits/nope", json=flagger).status_code == 404
    spec = client.get("/openapi.json").json()
    assert "Verdict" in spec["components"]["schemas"]


def test_late_events_join_the_evidence_not_a_closed_window(pipeline, traffic, start):
    pipeline.process(at(traffic[500:1000], first_offset=500))
    pipeline.close_due(force=True)  # closes every window seen so far
    pipeline.process(at(traffic[:500], first_offset=1000))  # earlier event time: their windows are closed
    state = pipeline.pair("digits", "digits-v2")
    assert state.late_events == 500
    assert state.cumulative.summary()["requests"] == 1000
    assert state.closed_upto_ms >= int((start + timedelta(seconds=20)).timestamp() * 1000)


def test_window_closes_on_the_watermark_and_idle_only_when_drained(pipeline, traffic, start):
    pipeline.process(traffic[:600])  # 12 s of event time: the first 10 s window is final (grace 0 here)
    closed = pipeline.close_due()
    assert [v.window_end for v in closed] == [start + timedelta(seconds=10)] * 3
    state = pipeline.pair("digits", "digits-v2")
    assert sorted(state.open_windows) == [int((start + timedelta(seconds=10)).timestamp() * 1000)]
    # The source is drained (embedded: always) but the pair is not idle yet: nothing more closes.
    assert pipeline.close_due() == []
    idle = pipeline.settings.windows.idle_close_s
    assert len(pipeline.close_due(now_wall=state.last_event_wall + idle + 1)) == 3


def test_redelivery_and_producer_retries_across_a_crash(pipeline, traffic):
    pipeline.process(at(traffic[:400]))
    # Redelivery of messages the state already holds (consumer restarted before its commit).
    again = pipeline.process(at(traffic[300:600], first_offset=300))
    assert again.duplicates == 0 and again.redelivered == 3 * 100 and again.diff_rows == 3 * 200
    # A producer retry: same request ids, new offsets -> duplicates, not scored again.
    retry = pipeline.process(at(traffic[:100], partition=1))
    assert retry.duplicates == 3 * 100 and retry.diff_rows == 0

    # A restart that recovered the state from the changelog: redeliveries are skipped silently.
    restarted = Pipeline(pipeline.settings, pipeline.sink, replay=pipeline.replay)
    for key in pipeline.judge.pairs():
        restarted.judge.restore(key, pipeline.judge.serialized(key))
    redelivered = restarted.process(at(traffic[:100], partition=1) + at(traffic[500:600], first_offset=500))
    assert redelivered.duplicates == 0 and redelivered.diff_rows == 0 and redelivered.redelivered == 3 * 200
    # A crash after the rows were written but before any state reached the changelog:
    # same positions as the rows in ClickHouse, so they are counted (once) into the new state.
    lost_state = Pipeline(pipeline.settings, pipeline.sink, replay=pipeline.replay)
    replayed = lost_state.process(at(traffic[:600]))
    assert replayed.duplicates == 0 and replayed.diff_rows == 3 * 600
    lost_state.close_due(force=True)
    rows = dict(pipeline.sink.query(
        "SELECT candidate, sum(requests) FROM shadowlens.window_stats FINAL GROUP BY candidate"))  # fmt: skip
    assert set(rows.values()) == {600}
    assert pipeline.sink.diff_counts()[("digits", "digits-v2")] == 600


def test_relative_chdb_dsn_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    from streams.sink import resolve_dsn

    monkeypatch.chdir(tmp_path)
    assert resolve_dsn("chdb:///./data/ch") == f"chdb://{tmp_path}/data/ch"
    assert resolve_dsn("chdb:///abs/path") == "chdb:///abs/path"
    assert resolve_dsn("http://h:8123") == "http://h:8123"
    sink = ClickHouseSink("chdb:///./data/ch")
    sink.close()
    assert (tmp_path / "data" / "ch").is_dir()


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
    reason="needs onnxruntime-gpu and a CUDA device (pip install '.[gpu]')",
)
def test_cuda_provider_is_chosen_and_agrees_with_cpu(models):
    """On a GPU machine the runner picks CUDA first; its answers differ from CPU's only by numeric
    noise (that difference is what a noise-reference replay measures)."""
    cuda = OnnxRunner(str(models["good"]))
    cpu = OnnxRunner(str(models["good"]), providers=["CPUExecutionProvider"])
    assert cuda.providers[0] == "CUDAExecutionProvider" and cpu.providers == ["CPUExecutionProvider"]
    rows = [{"image": np.random.default_rng(i).random((1, 64), dtype=np.float32)} for i in range(64)]
    on_gpu, _ = cuda.run(rows, "probabilities", "batched")
    on_cpu, _ = cpu.run(rows, "probabilities", "batched")
    np.testing.assert_allclose(np.stack(on_gpu), np.stack(on_cpu), atol=1e-4)


class _CrashesOnAllZeros(OnnxRunner):
    """A faulty candidate (the fault is injected in the candidate itself): raises on one input."""

    def run_stacked(self, feeds, n, output, timing):
        if any((~array.reshape(n, -1).any(axis=1)).any() for array in feeds.values()):  # a row of zeros
            raise RuntimeError("kernel crashed on this input")
        return super().run_stacked(feeds, n, output, timing)


def test_a_candidate_exception_is_a_candidate_error_not_a_dead_letter(pipeline, traffic):
    from streams.replay.core import Candidate

    for cands in pipeline.replay.candidates.values():
        for cand in cands:
            runner = _CrashesOnAllZeros(str(cand.config.path))
            cands[cands.index(cand)] = Candidate(cand.config, cand.adapter, runner)
    good = json.loads(traffic[0])
    zeros = {"dtype": "float32", "shape": [1, 64], "data": [0.0] * 64}
    crash = json.dumps({**good, "request_id": "zeros", "inputs": {"pixels": zeros}}).encode()
    result = pipeline.process([crash, *traffic[1:4]])
    assert result.dead_letters == [] and result.diff_rows == 3 * 4  # the batch survives; one row each
    errors = pipeline.sink.query("SELECT DISTINCT error FROM shadowlens.request_diffs WHERE request_id = 'zeros'")
    assert {e for (e,) in errors} == {f"candidate {c.name}: RuntimeError: kernel crashed on this input"
                                      for c in pipeline.settings.candidates}  # fmt: skip
    assert pipeline.pair("digits", "digits-v2").cumulative.errors == 1


def test_after_a_broker_outage_idle_closing_waits_for_the_producers_to_flush():
    """A replay process that waited out an outage reports since when the broker is reachable;
    until partition_idle_s after that, the source is not 'drained' and a quiet partition still
    holds the watermark (the mirror SDK flushes what it buffered only after the broker returns)."""
    from streams.records import PartitionProgress, Progress
    from streams.judge.windows import SourceView

    now = 1_000_000.0
    view = SourceView()
    view.update(Progress("r", 2, now, {0: PartitionProgress(10, 10, 5_000, now - 100),
                                       1: PartitionProgress(10, 10, 9_000, now - 100)}, reachable_since=now))  # fmt: skip
    assert not view.drained(now + 1, fresh_s=5, settle_s=30)
    assert view.watermark_ms(now + 1, partition_idle_s=30) == 5_000  # both still hold it
    view.update(Progress("r", 2, now + 31, {0: PartitionProgress(10, 10, 5_000, now - 100),
                                            1: PartitionProgress(10, 10, 9_000, now - 100)}))  # fmt: skip
    assert view.drained(now + 31, fresh_s=5, settle_s=30)
    assert view.watermark_ms(now + 31, partition_idle_s=30) == 9_000  # quiet for long enough: released
    assert Progress.decode(Progress("r", 1, now, reachable_since=now).encode()).reachable_since == now


def test_late_requests_refresh_the_verdict_without_live_traffic(pipeline, traffic, models, start):
    """A backfill of requests whose windows are closed joins the cumulative evidence, and the
    verdict is judged again at the next tick (no window row), not only when live traffic closes one."""
    pipeline.process(traffic[750:])
    first = {v.candidate: v for v in pipeline.close_due(force=True)}
    assert first["digits-v2"].samples == 750
    late = TrafficGenerator(models["baseline"], rate_per_s=50, seed=99).messages(300, start=start)  # before them
    pipeline.process(late)
    refreshed = {v.candidate: v for v in pipeline.close_due()}
    assert refreshed["digits-v2"].samples == 1050 and refreshed["digits-v2-degraded"].samples == 1050
    assert pipeline.close_due() == []  # once: nothing new since
    windows = pipeline.sink.query("SELECT sum(requests) FROM shadowlens.window_stats FINAL "
                                  "WHERE candidate = 'digits-v2'")[0][0]  # fmt: skip
    assert windows == 750  # late requests are in the evidence, not in a window row


def test_producer_retry_lookups_only_for_ids_the_judge_cannot_clear(pipeline, traffic):
    """Fresh traffic costs no ClickHouse lookup (streams/judge/recent_ids.py); a producer retry is still
    found, in the same process and after a restart that lost the in-memory ids."""
    first = pipeline.process(at(traffic[:400]))
    assert first.diff_rows == 3 * 400 and pipeline.judge.lookups == 0
    retry = pipeline.process(at(traffic[:50], partition=1))  # same ids from other messages
    assert retry.duplicates == 3 * 50 and retry.diff_rows == 0
    assert pipeline.judge.lookups == 3 * 50  # exactly the retried ids were asked about
    restarted = Pipeline(pipeline.settings, pipeline.sink, replay=pipeline.replay)
    for key in pipeline.judge.pairs():
        restarted.judge.restore(key, pipeline.judge.serialized(key))
    again = restarted.process(at(traffic[100:150], partition=2) + at(traffic[400:500], first_offset=400))
    assert again.duplicates == 3 * 50 and again.diff_rows == 3 * 100
    assert restarted.judge.lookups == 3 * 50  # the stored ids were loaded once; only the retries asked
    # The same request twice within one micro-batch, nothing of it stored yet: caught in memory.
    twice = restarted.process(at(traffic[600:700] + traffic[600:610], first_offset=1000))
    assert twice.duplicates == 3 * 10 and twice.diff_rows == 3 * 100 and restarted.judge.lookups == 3 * 50
    # Batches from a replay stage that sent no id hashes (column of zeros): the judge hashes itself.
    out = restarted.replay.replay(at(traffic[:20], partition=3))
    assert all(b.columns["id_hash"].all() for b in out.batches)
    for b in out.batches:
        b.columns["id_hash"][:] = 0
    older = restarted.judge.apply(out.batches)
    assert older.duplicates == 3 * 20 and older.rows == 0
    assert pipeline.sink.diff_counts()[("digits", "digits-v2")] == 600


def test_one_apply_of_many_batches_counts_like_one_apply_per_batch(pipeline, traffic):
    """The judge counts a call's batches once per pair (concatenated): the accumulators merge
    exactly, so the pair state equals applying the same batches one call at a time."""
    outputs = [pipeline.replay.replay(at(traffic[lo : lo + 100], first_offset=lo)) for lo in range(0, 600, 100)]
    batches = [b for out in outputs for b in out.batches]
    retry = pipeline.replay.replay(at(traffic[:50], partition=1)).batches  # producer retries among them
    one_by_one = JudgeCore(pipeline.settings, pipeline.sink)
    for b in [*batches, *retry]:
        one_by_one.apply([b])
    other = ClickHouseSink(pipeline.settings.clickhouse.dsn, "shadowlens_all_at_once")
    try:
        at_once = JudgeCore(pipeline.settings, other)
        result = at_once.apply([*batches, *retry])
        assert result.duplicates == 3 * 50 and result.rows == 3 * 600
        assert set(at_once.pairs()) == set(one_by_one.pairs())
        for key in one_by_one.pairs():
            _assert_same_state(json.loads(at_once.serialized(key)), json.loads(one_by_one.serialized(key)), key)
    finally:
        other.close()


def _assert_same_state(a, b, where: str) -> None:
    """Equal, floats to 1e-12 relative: sums taken in another grouping differ in the last bits."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-12, nan_ok=True), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if not k.endswith("_wall"):  # wall-clock times of the two runs
                _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
