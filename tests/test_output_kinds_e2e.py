"""Output kinds through the product (issue #22): a regression candidate through a real worker (Kafka,
chDB, the API), and every other kind through the real replay core, on ONNX models trained and
exported here (sklearn + skl2onnx); the config's checks; the doctor's hint for a model configured
with the wrong kind."""

from __future__ import annotations

import time
import uuid
import warnings
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from schemas import MirroredRequest, Tensor
from streams.config import ConfigError, load_settings
from streams.demo import DEMO_POLICY, RegressionTraffic
from streams.doctor.checks import FAIL, OK, kind_fix, load_candidates
from streams.doctor.traffic import sample_checks
from harness import WorkerProcess, free_port, produce, window_aligned_start, window_totals
from streams.models_regression import build_diabetes_models
from streams.records import DiffBatch, empty_columns
from streams.replay.core import Inbound, ReplayCore
from streams.sink import ClickHouseSink

REQUESTS = 600
TOLERANCE = {"rel_tolerance": 0.1}


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory) -> dict[str, Path]:
    return build_diabetes_models(tmp_path_factory.mktemp("diabetes"))


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def regression_config(directory: Path, bootstrap: str, topic: str, api_port: int, candidates: dict[str, Path]) -> Path:
    text = f"""
[kafka]
bootstrap = "{bootstrap}"
topic = "{topic}"
dead_letter_topic = "{topic}.dlq"
group_id = "worker-{topic}"
partitions = 2
diffs_partitions = 2
session_timeout_s = 6

[clickhouse]
dsn = "chdb:///{directory / 'chdb'}"

[windows]
size_s = 10
grace_s = 2
idle_close_s = 4

[replay]
batch_size = 250
batch_within_s = 0.3

[api]
port = {api_port}

[metrics]
port = 0
"""
    for name, path in candidates.items():
        text += f"""
[[candidates]]
name = "{name}"
model = "diabetes"
path = "{path}"
kind = "regression"
kind_params = {_toml(TOLERANCE)}
output = "variable"
baseline_output = "variable"
policy = {_toml(DEMO_POLICY)}
"""
    out = directory / "worker.toml"
    out.write_text(text)
    return out


@pytest.mark.kafka
def test_a_regression_candidate_through_the_kafka_worker_chdb_and_api(kafka_bootstrap, diabetes, tmp_path):
    topic = f"kinds-{uuid.uuid4().hex[:8]}"
    api_port = free_port()
    candidates = {"diabetes-same": diabetes["baseline"], "diabetes-boosted": diabetes["boosted"]}
    config = regression_config(tmp_path, kafka_bootstrap, topic, api_port, candidates)
    start = window_aligned_start(REQUESTS, rate_per_s=50, window_s=10)
    produce(kafka_bootstrap, topic, RegressionTraffic(diabetes["baseline"], rate_per_s=50).messages(REQUESTS, start))
    worker = WorkerProcess(config, tmp_path / "worker.log")
    api = f"http://127.0.0.1:{api_port}"
    try:
        def complete():
            totals = window_totals(api, "diabetes", list(candidates))
            return totals if all(v >= REQUESTS for v in totals.values()) else None

        assert worker.wait_for(complete, 300, "all windows to close") == dict.fromkeys(candidates, REQUESTS)
        same = httpx.get(f"{api}/v1/verdicts/diabetes/diabetes-same", timeout=5).json()
        boosted = httpx.get(f"{api}/v1/verdicts/diabetes/diabetes-boosted", timeout=5).json()
        windows = httpx.get(f"{api}/v1/windows/diabetes/diabetes-boosted", timeout=5).json()
    finally:
        worker.stop()
    flips = {v["candidate"]: {m["name"]: m for m in v["metrics"]}["label_flip_rate"] for v in (same, boosted)}
    # The identical model: no request beyond the tolerance, and nothing against a promote.
    assert flips["diabetes-same"]["estimate"] == 0.0
    assert same["kind"] == "regression" and same["verdict"] == "promote", same["reasons"]
    # Gradient-boosted trees move many predictions by more than 10 %: rolled back, in the kind's words.
    assert boosted["verdict"] == "rollback", boosted["reasons"]
    assert flips["diabetes-boosted"]["estimate"] > 0.2
    assert boosted["reasons"][0].startswith("Rollback: ") and "regression: share of requests where" in boosted["reasons"][0]
    assert "abs_tolerance + rel_tolerance" in flips["diabetes-boosted"]["detail"]
    assert {w["kind"] for w in windows} == {"regression"} and all("abs_error" in w["metrics"] for w in windows)
    assert not any(k in w["divergence"] for w in windows for k in ("chi2_labels_pvalue", "psi"))  # no labels, no [0, 1]

    sink = ClickHouseSink(f"chdb:///{tmp_path / 'chdb'}")
    try:
        rows = {c: (n, kinds, flip, p95, summary) for c, n, kinds, flip, p95, summary in sink.query(
            "SELECT candidate, count(), groupUniqArray(kind), avg(label_flip), quantile(0.95)(metrics['abs_error']), "
            "avg(candidate_confidence - metrics['candidate_value']) FROM shadowlens.request_diffs FINAL "
            "GROUP BY candidate")}  # fmt: skip
        assert set(rows) == set(candidates)
        for name, (n, kinds, flip, p95, summary) in rows.items():
            assert n == REQUESTS and kinds == ["regression"]
            assert summary == 0.0  # the summary column is the candidate's prediction (the first output)
        assert rows["diabetes-same"][2] == 0.0 and rows["diabetes-same"][3] < 1e-3  # float32 rounding only
        assert rows["diabetes-boosted"][2] == flips["diabetes-boosted"]["estimate"]
        assert rows["diabetes-boosted"][3] > 10  # progression units: tens of points off at p95
        keys = sink.query("SELECT DISTINCT arraySort(mapKeys(metrics)) FROM shadowlens.request_diffs")
        assert keys == [(["abs_error", "baseline_value", "candidate_value", "rel_error", "signed_error"],)]
    finally:
        sink.close()


# -- every other kind through the replay core ---------------------------------------------------------
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16).astype(np.float32), d.target


def _onnx(model, path: Path, zipmap_off: bool = False) -> Path:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    options = {id(model): {"zipmap": False}} if zipmap_off else None
    path.write_bytes(to_onnx(model, initial_types=[("image", FloatTensorType([None, 64]))], options=options,
                             target_opset=17).SerializeToString())  # fmt: skip
    return path


def _mirrored(model: str, baseline: Path, output: str, x: np.ndarray) -> list[Inbound]:
    """Mirrored requests answered by the real baseline model, as the replay stage reads them."""
    session = ort.InferenceSession(str(baseline), providers=["CPUExecutionProvider"])
    start = window_aligned_start(len(x), rate_per_s=50, window_s=10)
    out = []
    for i in range(len(x)):
        row = x[i : i + 1]
        t0 = time.perf_counter()
        answer = session.run([output], {"image": row})[0]
        event = MirroredRequest(
            request_id=f"{model}-{i}", model=model, baseline_version="v1", sent_at=start + timedelta(seconds=i / 50),
            inputs={"image": Tensor.from_array(row)}, baseline_output={output: Tensor.from_array(answer)},
            baseline_latency_ms=(time.perf_counter() - t0) * 1e3,
        )  # fmt: skip
        out.append(Inbound(event.model_dump_json().encode(), 0, i, "mirror"))
    return out


def _replay(tmp_path: Path, kind: str, params: dict, output: str, baseline: Path, perturbed: Path, x: np.ndarray):
    same = {"name": "same", "model": kind, "path": str(baseline), "kind": kind, "kind_params": params,
            "output": output, "baseline_output": output}
    settings = load_settings(overrides={"clickhouse": {"dsn": f"chdb:///{tmp_path / 'chdb'}"}, "candidates": [
        same, {**same, "name": "perturbed", "path": str(perturbed)}]})  # fmt: skip
    out = ReplayCore(settings).replay(_mirrored(kind, baseline, output, x))
    assert not out.dead_letters, out.dead_letters[:1]
    # Every batch crosses the wire (streams/records.py) with its kind and metrics, as between stages.
    batches = {b.candidate: DiffBatch.decode(b.encode()) for b in out.batches}
    for b in batches.values():
        assert b.kind == kind and len(b) == len(x) and not any(b.error)
        assert set(b.metrics) and all(v.shape == (len(x),) for v in b.metrics.values())
    assert batches["same"].columns["label_flip"].sum() == 0
    return batches["same"], batches["perturbed"]


def test_multilabel_candidates_through_the_replay_core(tmp_path):
    from sklearn.neural_network import MLPClassifier

    x, y = _digits()
    tags = np.stack([y >= 5, y % 2 == 0, np.isin(y, [0, 6, 8, 9])], axis=1).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = MLPClassifier(hidden_layer_sizes=(16,), max_iter=60, random_state=0).fit(x[:1000], tags[:1000])
        other = MLPClassifier(hidden_layer_sizes=(8,), max_iter=5, random_state=1).fit(x[:200], tags[:200])
    same, perturbed = _replay(tmp_path, "multilabel", {"threshold": 0.5}, "probabilities",
                              _onnx(base, tmp_path / "ml-base.onnx", True),
                              _onnx(other, tmp_path / "ml-other.onnx", True), x[1000:1300])  # fmt: skip
    assert np.all(same.metrics["hamming"] == 0)
    flips = perturbed.columns["label_flip"].astype(bool)
    assert flips.any() and np.array_equal(flips, perturbed.metrics["hamming"] > 0)
    # severity (the gated mean) is the share of the three labels that flipped
    assert np.allclose(perturbed.columns["confidence_delta"], perturbed.metrics["hamming"] / 3)


def test_ranking_candidates_through_the_replay_core(tmp_path):
    from sklearn.linear_model import LinearRegression, Ridge

    x, y = _digits()
    scores = np.eye(10)[y][:, :8]  # a score per item (8 items): a multi-target regressor ranks them
    base = LinearRegression().fit(x[:1000], scores[:1000])
    other = Ridge(alpha=30.0).fit(x[:150], scores[:150])
    same, perturbed = _replay(tmp_path, "ranking", {"k": 3, "min_overlap": 1.0}, "variable",
                              _onnx(base, tmp_path / "rank-base.onnx"), _onnx(other, tmp_path / "rank-other.onnx"),
                              x[1000:1300])  # fmt: skip
    assert np.all(same.metrics["overlap_at_k"] == 1.0)
    overlap = perturbed.metrics["overlap_at_k"]
    assert np.array_equal(perturbed.columns["label_flip"].astype(bool), overlap < 1.0) and (overlap < 1.0).any()
    assert np.allclose(perturbed.columns["confidence_delta"], 1 - overlap)


def test_embedding_candidates_through_the_replay_core(tmp_path):
    from sklearn.decomposition import PCA

    x, _ = _digits()
    base = PCA(n_components=8, random_state=0).fit(x[:1000])
    other = PCA(n_components=8, random_state=0).fit(x[:60])
    same, perturbed = _replay(tmp_path, "embedding", {"min_similarity": 0.95}, "variable",
                              _onnx(base, tmp_path / "emb-base.onnx"), _onnx(other, tmp_path / "emb-other.onnx"),
                              x[1000:1300])  # fmt: skip
    assert np.all(same.metrics["cosine_similarity"] > 0.9999)
    cos = perturbed.metrics["cosine_similarity"]
    assert np.array_equal(perturbed.columns["label_flip"].astype(bool), cos < 0.95) and (cos < 0.95).any()
    assert np.allclose(perturbed.columns["confidence_delta"], (1 - cos) / 2)


def test_an_old_diff_batch_without_kind_or_metrics_decodes_as_classification():
    batch = DiffBatch("m", "c", 0, empty_columns(2), ["a", "b"], ["v1", "v1"], ["", ""], [{}, {}])
    raw = batch.encode()
    assert b'"metrics"' not in raw and b'"kind"' not in raw  # classification batches are as before kinds
    back = DiffBatch.decode(raw)
    assert back.kind == "classification" and back.metrics == {}
    tagged = DiffBatch("m", "c", 0, empty_columns(2), ["a", "b"], ["v1", "v1"], ["", ""], [{}, {}],
                       kind="regression", metrics={"abs_error": np.array([0.5, np.nan])})  # fmt: skip
    both = DiffBatch.concat([DiffBatch.decode(tagged.encode()), tagged.take([1])])
    assert both.kind == "regression" and np.array_equal(both.metrics["abs_error"], [0.5, np.nan, np.nan],
                                                        equal_nan=True)  # fmt: skip


# -- config and doctor --------------------------------------------------------------------------------
def _settings(tmp_path: Path, path: Path, **more):
    cand = {"name": "c", "model": "m", "path": str(path), "output": "variable", "baseline_output": "variable", **more}
    return load_settings(overrides={"clickhouse": {"dsn": f"chdb:///{tmp_path / 'chdb'}"}, "candidates": [cand]})


def test_the_kind_and_its_params_are_checked_when_the_config_loads(tmp_path, diabetes):
    def refused(**more) -> str:
        with pytest.raises(ConfigError) as err:
            _settings(tmp_path, diabetes["good"], **more)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "'regresion' is not an output kind; use one of classification, regression" in refused(kind="regresion")
    assert "unknown parameter 'tolerance'" in refused(kind="regression", kind_params={"tolerance": 1})
    assert "set it in one place" in refused(from_logits=False, kind_params={"from_logits": True})
    assert "kind 'regression' has no logits" in refused(kind="regression", from_logits=True)
    cfg = _settings(tmp_path, diabetes["good"], kind="classification", kind_params={"from_logits": True}).candidates[0]
    assert cfg.from_logits is True and cfg.output_kind().from_logits is True  # either spelling says it
    assert _settings(tmp_path, diabetes["good"], kind="regression").candidates[0].output_kind().rel_tolerance == 0.01


def test_the_doctor_says_to_set_the_kind_for_a_regressor_configured_as_a_classifier(tmp_path, diabetes):
    from sklearn.linear_model import LinearRegression

    # Load time: a [None, 1] regressor configured like the README's classifier is refused; the fix names the kind.
    settings = _settings(tmp_path, diabetes["good"])
    _, checks = load_candidates(settings)
    check = kind_fix(settings.candidates[0], checks[0])
    assert check.status == FAIL and 'set candidates.c.kind = "regression"' in check.fix
    assert "\n" not in check.line()
    # Traffic: a multi-output regressor loads as a classifier, but production's outputs are negative numbers.
    x, y = _digits()
    model = _onnx(LinearRegression().fit(x, np.stack([y - 4.5, 2.0 * y], axis=1)), tmp_path / "two.onnx")
    messages = [Inbound(m.value, 0, i, "mirror") for i, m in enumerate(_mirrored("m", model, "variable", x[:40]))]
    for kind, status in (("classification", FAIL), ("regression", OK)):
        settings = _settings(tmp_path, model, kind=kind)
        candidates, loaded = load_candidates(settings)
        assert loaded[0].status == OK, loaded[0].line()
        rows = [c for c in sample_checks(settings, candidates, messages, 1) if c.what == "sample → m/c"]
        assert [c.status for c in rows] == [status], [c.line() for c in rows]
        if kind == "classification":
            assert rows[0].fix.startswith('baseline outputs are not probabilities: set candidates.c.kind = "regression"')
            assert "dead-lettered as baseline_invalid" in rows[0].detail
        else:
            assert "40 of 40 records scored" in rows[0].detail and rows[0].detail.endswith("as regression")
