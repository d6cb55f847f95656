"""Blame is exact (streams/replay/blame.py): a candidate's error is only what the candidate raises or answers
wrong on valid input. What the producer sent wrong is a dead letter counted in ``unscorable``; what
the operator configured wrong is refused at start-up in one line. All on real parts: ONNX models
trained and exported here (sklearn + skl2onnx), chDB, and for the SDK path the mirror SDK, a real
broker and a real worker process."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from mirror import MirrorClient
from schemas import MirroredRequest, Tensor
from streams.replay.adapter import AdapterConfig
from streams.replay.blame import UNSCORABLE, CandidateRefused, conform_inputs
from streams.config import CandidateConfig, load_settings
from streams.demo import DEMO_POLICY, TrafficGenerator, demo_settings
from harness import (
    WorkerProcess, consume_all, free_port, window_aligned_start, window_totals, write_worker_config,
)  # fmt: skip
from streams.models import PIXEL_SCALE, build_digits_models, build_export_variants, load_digits_split
from streams.pipeline import Pipeline
from streams.records import DiffBatch
from streams.replay.core import Candidate, Inbound, ReplayCore
from streams.replay.runner import OnnxRunner
from streams.sink import ClickHouseSink

# v1 traffic (raw pixels 0..16) to v2 models (``image`` 0..1), with no explicit cast: the cast
# policy decides what happens to a float64 input.
SCALE_ONLY = {"rename": {"pixels": "image"}, "scale": {"image": 1.0 / PIXEL_SCALE}}
WITH_CAST = {**SCALE_ONLY, "cast": {"image": "float32"}}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("models")
    return {**build_digits_models(out), **build_export_variants(out)}


@pytest.fixture(scope="module")
def start() -> datetime:
    return window_aligned_start(2000, rate_per_s=100, window_s=10)


def traffic(models, n: int, start: datetime, dtype=np.float32, seed: int = 3) -> list[bytes]:
    """Held-out digits answered and timed by the real baseline model; pixels mirrored as ``dtype``."""
    data = load_digits_split()
    session = ort.InferenceSession(str(models["baseline"]), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(data.holdout_x), size=n)
    out = []
    for i in range(n):
        pixels = data.holdout_x[idx[i] : idx[i] + 1]
        t0 = time.perf_counter()
        probs = session.run(["probabilities"], {"pixels": pixels})[0]
        latency_ms = (time.perf_counter() - t0) * 1e3
        out.append(MirroredRequest(
            request_id=f"r{seed}-{i}", model="digits", baseline_version="v1",
            sent_at=start + timedelta(seconds=i / 100),
            inputs={"pixels": Tensor.from_array(pixels.astype(dtype))},
            baseline_output={"probabilities": Tensor.from_array(probs)}, baseline_latency_ms=latency_ms,
            label=int(data.holdout_y[idx[i]]), attributes={"country": ("de", "fr")[i % 2]},
        ).model_dump_json().encode())  # fmt: skip
    return out


def settings_for(tmp_path: Path, candidates: list[dict], window_s: float = 10):
    for c in candidates:
        c.setdefault("model", "digits")
        c.setdefault("policy", DEMO_POLICY)
        c["path"] = str(c["path"])
    return load_settings(overrides={
        "clickhouse": {"dsn": f"chdb:///{(tmp_path / 'chdb').resolve()}"},
        "windows": {"size_s": window_s, "grace_s": 0.0, "idle_close_s": 3600.0},
        "candidates": candidates,
    })  # fmt: skip


def run_pipeline(settings, messages: list[bytes], chunk: int = 500):
    """Replay and judge every message in chunks; (pipeline, results, verdicts by candidate). The sink stays open."""
    sink = ClickHouseSink(settings.clickhouse.dsn, settings.clickhouse.database)
    pipeline = Pipeline(settings, sink)
    results = [pipeline.process(messages[lo : lo + chunk]) for lo in range(0, len(messages), chunk)]
    verdicts = {v.candidate: v for v in pipeline.close_due(force=True)}
    return pipeline, results, verdicts


def metric(verdict, name: str):
    return next(m for m in verdict.metrics if m.name == name)


# -- cast policy -----------------------------------------------------------------------------------
def test_float64_inputs_are_cast_as_the_policy_allows_and_never_blamed_on_the_candidate(models, tmp_path, start):
    settings = settings_for(tmp_path, [
        {"name": "v2", "path": models["good"], "adapter": SCALE_ONLY},  # cast = "same_kind", the default
        {"name": "v2-safe", "path": models["good"], "adapter": SCALE_ONLY, "cast": "safe"},
        {"name": "v2-no", "path": models["good"], "adapter": SCALE_ONLY, "cast": "no"},
        {"name": "v2-explicit", "path": models["good"], "adapter": WITH_CAST, "cast": "no"},  # the adapter casts
    ])  # fmt: skip
    assert settings.candidates[0].cast == "same_kind"
    messages = traffic(models, 2000, start, dtype=np.float64)
    pipeline, results, verdicts = run_pipeline(settings, messages)
    try:
        cast = sum((sum(r.cast.get(("digits", "v2"), {}).values()) for r in results), 0)
        assert cast == 2000 and {k for r in results for k in r.cast.get(("digits", "v2"), {})} == {
            "pixels float64->float32"}  # fmt: skip
        assert not any(("digits", "v2-explicit") in r.cast for r in results)  # nothing left for the policy
        letters = [d for r in results for d in r.dead_letters]
        assert {d.candidate for d in letters} == {"v2-safe", "v2-no"}
        assert {d.error_type for d in letters} == {"input_dtype"} and len(letters) == 2 * 2000
        no = next(d for d in letters if d.candidate == "v2-no")
        assert "inputs.pixels: float64, but the model's input 'image' takes float32" in no.reason, no.reason
        assert "candidates.v2-no.cast = 'no'" in no.reason and 'candidates.v2-no.cast = "same_kind"' in no.reason
        assert "astype('float32')" in no.reason
        for name in ("v2", "v2-explicit"):
            pair = pipeline.pair("digits", name)
            assert pair.cumulative.errors == 0 and pair.unscorable == {}
            assert verdicts[name].verdict != "rollback" and metric(verdicts[name], "error_rate").estimate == 0
            assert verdicts[name].samples == 2000
        # The verdict's data section says what was cast (the producer's dtype, scored after the cast).
        assert verdicts["v2"].cast == {"pixels float64->float32": 2000} and verdicts["v2-explicit"].cast == {}
        for name in ("v2-safe", "v2-no"):  # the producer's dtype: unscorable, never the candidate's error
            pair = pipeline.pair("digits", name)
            assert pair.unscorable == {"input_dtype": 2000} and pair.cumulative.errors == 0
            v = verdicts[name]
            assert v.verdict == "hold" and v.blocking_metric == "comparable" and v.unscorable == 2000, v.reasons
            assert "input_dtype 2000" in v.reasons[0]
        # The v2 candidate and its explicitly cast twin answered the same requests alike.
        rows = pipeline.sink.query(
            "SELECT candidate, sum(label_flip), round(sum(l1_distance), 6) FROM shadowlens.request_diffs "
            "WHERE candidate IN ('v2', 'v2-explicit') GROUP BY candidate")  # fmt: skip
        assert len({(flips, l1) for _, flips, l1 in rows}) == 1
    finally:
        pipeline.sink.close()


def test_the_cast_policies_are_numpys_rules_and_a_value_is_never_wrapped_or_overflowed():
    """What each policy allows (README / streams/replay/blame.py rule 3), on arrays, and values the allowed
    cast cannot hold: letters for those requests only."""
    def cfg(policy: str) -> CandidateConfig:
        return CandidateConfig.model_construct(name="c", cast=policy, adapter=AdapterConfig())

    allowed = {  # (from, to): policies that cast it
        ("float64", "float32"): {"same_kind"}, ("float32", "float64"): {"safe", "same_kind"},
        ("int64", "float32"): {"same_kind"}, ("int64", "float64"): {"safe", "same_kind"},
        ("uint8", "float32"): {"safe", "same_kind"}, ("int64", "int32"): {"same_kind"},
        ("uint64", "int64"): {"same_kind"}, ("bool", "float32"): {"safe", "same_kind"},
        ("int32", "float32"): {"same_kind"}, ("uint8", "int8"): {"same_kind"},
        ("uint8", "int16"): {"safe", "same_kind"},
        ("float32", "int32"): set(), ("int8", "uint8"): set(), ("int64", "uint64"): set(), ("int64", "bool"): set(),
    }  # fmt: skip
    for (have, want), policies in allowed.items():
        for policy in ("no", "safe", "same_kind"):
            fit = conform_inputs({"x": np.ones((2, 3), dtype=have)}, cfg(policy), {"x": np.dtype(want)})
            assert (not fit.refused) == (policy in policies), (have, want, policy, fit.refused)
            if not fit.refused:
                assert fit.feeds["x"].dtype == want and fit.cast == f"x {have}->{want}"
    big = np.array([[1.0, 2.0], [1e300, 0.0], [3.0, -1e39]], dtype=np.float64)
    fit = conform_inputs({"x": big}, cfg("same_kind"), {"x": np.dtype("float32")})
    assert sorted(fit.bad_rows) == [1, 2] and "do not fit the model's float32 input" in fit.bad_rows[1]
    ids = np.array([[7], [2**40], [-(2**35)]], dtype=np.int64)
    fit = conform_inputs({"x": ids}, cfg("same_kind"), {"x": np.dtype("int32")})
    assert sorted(fit.bad_rows) == [1, 2] and fit.feeds["x"][0, 0] == 7
    same = conform_inputs({"x": np.ones((1, 2), np.float32)}, cfg("no"), {"x": np.dtype("float32")})
    assert not same.refused and same.cast == ""


def test_a_value_the_cast_cannot_hold_is_a_dead_letter_for_that_request_only(models, tmp_path, start):
    settings = settings_for(tmp_path, [{"name": "v2", "path": models["good"], "adapter": SCALE_ONLY}])
    messages = traffic(models, 20, start, dtype=np.float64)
    huge = json.loads(messages[3])
    huge["inputs"]["pixels"] = Tensor.from_array(np.full((1, 64), 1e300)).model_dump()  # beyond float32
    messages[3] = json.dumps(huge).encode()
    pipeline, (result,), _ = run_pipeline(settings, messages)
    try:
        assert [(d.error_type, d.candidate, d.offset) for d in result.dead_letters] == [("input_dtype", "v2", 3)]
        assert "inputs.pixels" in result.dead_letters[0].reason
        assert result.diff_rows == 19 and result.cast == {("digits", "v2"): {"pixels float64->float32": 19}}
        assert pipeline.pair("digits", "v2").unscorable == {"input_dtype": 1}
    finally:
        pipeline.sink.close()


# -- what the candidate answers --------------------------------------------------------------------
def test_a_zipmap_classifier_is_judged_like_its_zipmap_false_twin(models, tmp_path, start):
    for timing in ("per_request", "batched"):  # the runner reads the maps either way
        plain, zipmap = OnnxRunner(str(models["good"])), OnnxRunner(str(models["good-zipmap"]))
        x = {"image": (load_digits_split().holdout_x[:40] / PIXEL_SCALE).astype(np.float32)}
        a, _ = plain.run_stacked(x, 40, "probabilities", timing)
        b, _ = zipmap.run_stacked(x, 40, "output_probability", timing)
        assert b.shape == (40, 10) and np.array_equal(a.astype(np.float64), b)
    settings = settings_for(tmp_path, [
        {"name": "plain", "path": models["good"], "adapter": WITH_CAST},
        {"name": "zipmap", "path": models["good-zipmap"], "adapter": WITH_CAST, "output": "output_probability"},
    ])  # fmt: skip
    pipeline, results, verdicts = run_pipeline(settings, traffic(models, 1500, start))
    try:
        assert not [d for r in results for d in r.dead_letters]
        rows = pipeline.sink.query(
            "SELECT candidate, request_id, baseline_label, candidate_label, label_flip, confidence_delta, l1_distance, "
            "error FROM shadowlens.request_diffs FINAL ORDER BY request_id")  # fmt: skip
        by = {c: {r[1]: r[2:] for r in rows if r[0] == c} for c in ("plain", "zipmap")}
        assert len(by["zipmap"]) == 1500 and by["zipmap"] == by["plain"]
        p, z = verdicts["plain"], verdicts["zipmap"]
        assert (z.verdict, z.samples, z.blocking_metric) == (p.verdict, p.samples, p.blocking_metric)
        # Every metric but latency (timed, so never equal twice) is the same.
        assert [(m.name, m.estimate, m.decision) for m in z.metrics if not m.name.startswith("latency")] == [
            (m.name, m.estimate, m.decision) for m in p.metrics if not m.name.startswith("latency")]  # fmt: skip
        assert metric(z, "error_rate").estimate == 0
    finally:
        pipeline.sink.close()


def _single_output_model(path: Path, sigmoid: bool) -> Path:
    """x [None, 64] -> MatMul -> (Sigmoid) -> y [None, 1]: a binary classifier's probability, or not."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((64, 1), 0.01, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z" if sigmoid else "y0"])]
    nodes += [helper.make_node("Sigmoid", ["z"], ["y0"])] if sigmoid else []
    nodes += [helper.make_node("Identity", ["y0"], ["y"])]  # a pass-through op in between
    graph = helper.make_graph(nodes, "single", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])], [w])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_outputs_that_are_not_probability_vectors_are_refused_when_the_candidate_loads(models, tmp_path):
    def load(path, **more) -> str | None:
        cfg = CandidateConfig(name="c", model="digits", path=path, **more)
        try:
            Candidate.load(cfg, None)
        except CandidateRefused as exc:
            assert "\n" not in str(exc)
            return str(exc)
        return None

    regression = load(models["regression"], output="variable")
    assert regression is not None and regression.startswith(
        "candidates.c.output: 'variable' is a [None, 1] float tensor, not a probability vector, and kind is "
        "'classification' (set output to the classifier's probabilities, e.g. skl2onnx's output_probability")
    assert 'kind = "regression"' in regression
    labels = load(models["good-zipmap"], output="output_label")
    assert labels is not None and "'output_label' is a [None] int64 tensor (class labels)" in labels
    assert "not an output" in load(models["good"], output="nope")
    assert load(models["good-zipmap"], output="output_probability") is None
    assert load(models["good"], output="probabilities") is None
    assert load(models["regression"], output="variable", from_logits=True) is None  # the operator says: a logit
    assert load(_single_output_model(tmp_path / "sigmoid.onnx", True), output="y") is None
    assert "[None, 1] float tensor" in load(_single_output_model(tmp_path / "linear.onnx", False), output="y")
    cast = load(models["good"], adapter={"cast": {"image": "float64"}}, cast="no")
    assert cast is not None and cast.startswith("candidates.c.adapter.cast.image: float64, but the model's input")
    # The replay core loads every candidate: one refused, none replays.
    settings = settings_for(tmp_path, [
        {"name": "v2", "path": models["good"], "adapter": WITH_CAST},
        {"name": "reg", "path": models["regression"], "output": "variable"},
    ])  # fmt: skip
    with pytest.raises(CandidateRefused, match="candidates.reg.output"):
        ReplayCore(settings)


@pytest.mark.kafka
def test_the_worker_refuses_a_regression_model_in_one_line(kafka_bootstrap, models, tmp_path):
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-reg": models["regression"]},
                                 f"blame-refuse-{uuid.uuid4().hex[:8]}", free_port(),
                                 extra={"digits-reg": {"output": "variable"}})  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "streams.cli", "worker", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("config error", "error"))]
    assert errors == proc.stderr.strip().splitlines()[-1:] == [
        "config error: candidates.digits-reg.output: 'variable' is a [None, 1] float tensor, not a probability "
        "vector, and kind is 'classification' (set output to the classifier's probabilities, e.g. skl2onnx's "
        "output_probability ('probabilities' when exported with zipmap=False), or to its logits with from_logits = "
        "true; or, for a model that is no classifier, its kind, e.g. kind = \"regression\"; one value per request "
        "is a binary classifier's probability only when a Sigmoid computes it)"
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


# -- what the producer sends as the baseline's answer and inputs ------------------------------------
def _with_baseline(message: bytes, values) -> bytes:
    event = json.loads(message)
    event["baseline_output"]["probabilities"] = Tensor.from_array(np.asarray([values], dtype=np.float32)).model_dump()
    return json.dumps(event).encode()


def test_an_invalid_baseline_output_is_a_dead_letter_and_windows_sum_to_the_verdict(models, tmp_path, start):
    settings = demo_settings(tmp_path, models, window_s=10)
    messages = TrafficGenerator(models["baseline"], rate_per_s=50).messages(1500, start=start)
    nan, neg, off, bad_input = range(0, 400, 10), range(5, 100, 10), range(7, 100, 10), range(401, 406)
    for i in nan:
        messages[i] = _with_baseline(messages[i], [np.nan] + [0.1] * 9)
    for i in neg:  # a regressor's answer sent as probabilities
        messages[i] = _with_baseline(messages[i], [-2.5] + [0.35] * 9)
    for i in off:
        messages[i] = _with_baseline(messages[i], [0.5] * 10)
    for i in bad_input:
        event = json.loads(messages[i])
        event["inputs"]["pixels"] = {"dtype": "float32", "shape": [1, 64], "data": [float("inf")] * 64}
        messages[i] = json.dumps(event).encode()
    invalid = len(nan) + len(neg) + len(off)
    pipeline, results, verdicts = run_pipeline(settings, messages)
    try:
        letters = [d for r in results for d in r.dead_letters]
        names = [c.name for c in settings.candidates]
        for name in names:
            mine = [d for d in letters if d.candidate == name]
            assert len(mine) == invalid and {d.error_type for d in mine} == {"baseline_invalid"}
            pair = pipeline.pair("digits", name)
            assert pair.unscorable == {"baseline_invalid": invalid, "non_finite_input": len(bad_input)}
            assert pair.cumulative.errors == 0  # none of it is the candidate's
            v = verdicts[name]
            assert v.unscorable == invalid + len(bad_input) and metric(v, "error_rate").estimate == 0
            assert v.blocking_metric != "sample_ratio"  # dead-lettered requests are still routed requests
        reasons = {d.reason.split(";")[0] for d in letters if d.candidate == "digits-v2"}
        assert "baseline_output.probabilities: 1 of 10 values are NaN or infinite" in reasons
        assert "baseline_output.probabilities: negative values (smallest -2.5), not a probability vector" in reasons
        assert "baseline_output.probabilities: values sum to 5, not 1: not a probability vector" in reasons
        assert all("candidates.digits-v2.baseline_output" in d.reason for d in letters if d.candidate == "digits-v2")
        assert [d.candidate for d in letters if d.error_type == "non_finite_input"] == [None] * len(bad_input)
        # Windows count exactly the compared requests: their sums equal the verdict's samples.
        sums = dict((c, (r, e)) for c, r, e in pipeline.sink.query(
            "SELECT candidate, sum(requests), sum(errors) FROM shadowlens.window_stats FINAL GROUP BY candidate"))
        scored = 1500 - invalid - len(bad_input)
        assert sums == {name: (scored, 0) for name in names}
        assert {verdicts[name].samples for name in names} == {scored}
        assert pipeline.sink.query("SELECT count() FROM shadowlens.request_diffs WHERE error != ''") == [(0,)]
        assert verdicts["digits-v2-degraded"].verdict == "rollback"  # its own flips still roll it back
    finally:
        pipeline.sink.close()


def test_with_from_logits_only_non_finite_baselines_are_invalid(models, tmp_path, start):
    settings = settings_for(tmp_path, [
        {"name": "v2", "path": models["good"], "adapter": WITH_CAST, "from_logits": True}])
    messages = traffic(models, 10, start)
    messages[1] = _with_baseline(messages[1], [-2.5] + [3.0] * 9)  # logits: fine
    messages[2] = _with_baseline(messages[2], [np.inf] + [3.0] * 9)
    pipeline, (result,), _ = run_pipeline(settings, messages)
    try:
        assert [(d.error_type, d.offset) for d in result.dead_letters] == [("baseline_invalid", 2)]
        assert "finite logits" in result.dead_letters[0].reason
    finally:
        pipeline.sink.close()


def test_dead_letters_are_logged_once_a_minute_per_candidate_and_reason(models, tmp_path, start, caplog):
    settings = demo_settings(tmp_path, models, window_s=10)
    messages = TrafficGenerator(models["baseline"], rate_per_s=50).messages(600, start=start)
    for i in range(0, 600, 3):
        messages[i] = _with_baseline(messages[i], [np.nan] * 10)
    sink = ClickHouseSink(settings.clickhouse.dsn, settings.clickhouse.database)
    try:
        pipeline = Pipeline(settings, sink)
        with caplog.at_level(logging.WARNING, logger="shadowlens.replay"):
            for lo in range(0, 600, 200):
                pipeline.process(messages[lo : lo + 200])
            lines = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
            # 200 letters per candidate: one line each so far, at the first batch, with an example request id
            assert len(lines) == 3, lines
            for name in (c.name for c in settings.candidates):
                (line,) = [x for x in lines if x.startswith(f"digits/{name}: ")]
                assert "request(s) dead-lettered as baseline_invalid, e.g. request " in line
                assert "baseline_output.probabilities: 10 of 10 values are NaN or infinite" in line
            caplog.clear()
            since = len([i for i in range(0, 600, 3) if i >= 200])  # the letters after the first line
            later = pipeline.replay.letter_log.flush(now=time.monotonic() + 61)  # a minute on: the summary
            assert len(later) == 3 and all(f" {since} request(s) dead-lettered as baseline_invalid in the last " in x
                                           for x in later), later  # fmt: skip
            assert pipeline.replay.letter_log.flush(now=time.monotonic() + 62) == []  # nothing new
        assert not [r for r in caplog.records if "dead letter (" in r.getMessage()]
    finally:
        sink.close()


def test_unscorable_covers_every_producer_fault_of_a_known_pair():
    assert set(UNSCORABLE) == {"non_finite_input", "invalid_tensor", "adapter", "input_dtype", "baseline_mismatch",
                               "baseline_invalid"}  # fmt: skip


# -- the SDK path, end to end ----------------------------------------------------------------------
@pytest.mark.kafka
def test_float64_through_the_mirror_sdk_into_a_real_worker(kafka_bootstrap, models, tmp_path):
    """numpy's default float64 pixels, published with the mirror SDK to a float32 model: cast by
    default (never a rollback, no error), dead letters ``input_dtype`` with ``cast = "no"`` (a hold
    on ``comparable``, never a rollback); the log summarises them instead of a line per message."""
    requests = 1200
    topic = f"blame-sdk-{uuid.uuid4().hex[:8]}"
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    same_model = {"digits-v2": models["good"], "digits-v2-strict": models["good"]}
    config = write_worker_config(tmp_path, kafka_bootstrap, same_model, topic, api_port, window_s=10,
                                 extra={"digits-v2-strict": {"cast": "no"}})  # fmt: skip
    text = config.read_text()
    explicit = 'cast = { image = "float32" }, '
    assert text.count(explicit) == 2
    config.write_text(text.replace(explicit, ""))  # no explicit cast: the policy decides
    worker = WorkerProcess(config, tmp_path / "worker.log")
    mirror = None
    try:
        worker.wait_for(lambda: httpx.get(f"{api}/healthz", timeout=2).status_code == 200, 60, "the worker API")
        mirror = MirrorClient(bootstrap_servers=kafka_bootstrap, topic=topic, close_timeout_s=15)
        data = load_digits_split()
        session = ort.InferenceSession(str(models["baseline"]), providers=["CPUExecutionProvider"])
        for i in range(requests):
            pixels = np.asarray([data.holdout_x[i % len(data.holdout_x)].tolist()])  # float64, numpy's default
            assert pixels.dtype == np.float64
            t0 = time.perf_counter()
            (probs,) = session.run(["probabilities"], {"pixels": pixels.astype(np.float32)})
            mirror.publish(f"sdk-{i}", "digits", "v1", {"pixels": pixels}, {"probabilities": probs},
                           latency_ms=(time.perf_counter() - t0) * 1e3, attributes={"country": "de"})  # fmt: skip
        stats = mirror.close()
        assert (stats.published, stats.dropped, stats.failed) == (requests, 0, 0), stats

        def judged():
            v2 = httpx.get(f"{api}/v1/verdicts/digits/digits-v2", timeout=5).json()
            strict = httpx.get(f"{api}/v1/verdicts/digits/digits-v2-strict", timeout=5).json()
            done = v2["state"] == "judged" and v2["samples"] == requests and strict["unscorable"] == requests
            return (v2, strict) if done else None

        v2, strict = worker.wait_for(judged, 120, "both verdicts over every mirrored request")
        assert window_totals(api, "digits", ["digits-v2"]) == {"digits-v2": requests}
        assert v2["verdict"] != "rollback", v2["reasons"]
        errors = next(m for m in v2["metrics"] if m["name"] == "error_rate")
        assert errors["estimate"] == 0 and v2["unscorable"] == 0
        assert strict["verdict"] == "hold" and strict["blocking_metric"] == "comparable", strict["reasons"]
        assert "input_dtype" in strict["reasons"][0]
        assert next(m for m in strict["metrics"] if m["name"] == "error_rate")["estimate"] is None

        letters = [json.loads(m) for m in consume_all(kafka_bootstrap, f"{topic}.dlq", expect=requests)]
        assert len(letters) == requests
        assert {(d["error_type"], d["candidate"]) for d in letters} == {("input_dtype", "digits-v2-strict")}
        assert "inputs.pixels: float64, but the model's input 'image' takes float32" in letters[0]["reason"]
    finally:
        if mirror is not None:
            mirror.close()
        worker.stop()
    log = worker.log_path.read_text()
    summaries = [line for line in log.splitlines() if "dead-lettered as input_dtype" in line]
    assert 1 <= len(summaries) <= 2, summaries  # the first at once, then one a minute at most
    assert "digits/digits-v2-strict: " in summaries[0] and "e.g. request sdk-" in summaries[0]
    assert "dead letter (" not in log  # no line per message


def test_cast_counts_travel_with_the_diff_batch(models, tmp_path, start):
    """What the judge reads off the diffs topic: DiffBatch.cast survives encode/decode and take()."""
    settings = settings_for(tmp_path, [{"name": "v2", "path": models["good"], "adapter": SCALE_ONLY}])
    core = ReplayCore(settings)
    out = core.replay([Inbound(m, 0, i) for i, m in enumerate(traffic(models, 30, start, dtype=np.float64))])
    (batch,) = out.batches
    assert batch.cast == {"pixels float64->float32": 30} and len(batch) == 30
    again = DiffBatch.decode(batch.encode())
    assert again.cast == batch.cast and again.take([0, 1]).cast == batch.cast
