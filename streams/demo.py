"""``shadowlens demo``: the whole pipeline on one machine with no servers.

Builds real ONNX models from sklearn's digits, mirrors held-out digits as production traffic
(the baseline model really answers each request and is timed), and pushes the serialized
messages through the replay and judge cores the Kafka worker runs (``Pipeline``), into chDB.

Two output kinds are judged side by side: the digits classifiers, and regressors of sklearn's
diabetes data (``kind = "regression"``, streams/models_regression.py) with half as many requests,
whose disagreement is a prediction more than 10 % away from the baseline's.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import onnxruntime as ort

from schemas import MirroredRequest, Tensor
from streams.config import Settings, load_settings
from streams.heap import tune_collector
from streams.models import PIXEL_SCALE, build_digits_models, load_digits_split
from streams.models_regression import DIABETES_INPUT, DIABETES_OUTPUT, build_diabetes_models, load_diabetes_split
from streams.pipeline import EMBEDDED_CHUNK, Pipeline
from streams.sink import ClickHouseSink

COUNTRIES = ("de", "fr", "us", "jp", "br")
DEVICES = ("ios", "android", "web")
V1_TO_V2_ADAPTER = {
    "rename": {"pixels": "image"},
    "cast": {"image": "float32"},
    "scale": {"image": 1.0 / PIXEL_SCALE},
}
DEMO_POLICY = {
    "label_flip_rate_margin": 0.05,
    "abs_confidence_delta_margin": 0.10,
    "latency_quantile": 0.95,
    "latency_p99_ratio_margin": 1.5,
    "accuracy_drop_margin": 0.02,
    "min_samples": 300,
    # Event time runs at 50 requests a second here: a retry burst is within 2 s (scorers.clusters;
    # production's default gap is 60 s), and clusters close 2 s of event time after their last request.
    "cluster_gap_s": 2.0,
}
# The regression candidates disagree where a prediction is more than 10 % off the baseline's.
DIABETES_KIND_PARAMS = {"rel_tolerance": 0.10}


def demo_settings(data_dir: Path, models: dict[str, Path], window_s: float = 20.0,
                  regressors: dict[str, Path] | None = None) -> Settings:  # fmt: skip
    """Settings for the digits migration: v1 baseline, v2 good and degraded candidates; with
    ``regressors`` (``build_diabetes_models``) the diabetes regression migration beside it."""
    candidates = [
        {"name": "digits-v2", "model": "digits", "path": str(models["good"]), "adapter": V1_TO_V2_ADAPTER,
         "policy": DEMO_POLICY},
        {"name": "digits-v2-degraded", "model": "digits", "path": str(models["degraded"]),
         "adapter": V1_TO_V2_ADAPTER, "policy": DEMO_POLICY},
        # The baseline replayed through the same path measures the noise floor (no model change).
        {"name": "digits-v1-replay", "model": "digits", "path": str(models["baseline"]), "noise_reference": True,
         "policy": DEMO_POLICY},
    ]  # fmt: skip
    if regressors is not None:
        regression = {"model": "diabetes", "kind": "regression", "kind_params": DIABETES_KIND_PARAMS,
                      "output": DIABETES_OUTPUT, "baseline_output": DIABETES_OUTPUT, "policy": DEMO_POLICY}
        candidates += [
            {"name": "diabetes-v2", "path": str(regressors["good"]), **regression},
            {"name": "diabetes-v2-boosted", "path": str(regressors["boosted"]), **regression},
            {"name": "diabetes-v1-replay", "path": str(regressors["baseline"]), "noise_reference": True, **regression},
        ]  # fmt: skip
    return load_settings(
        overrides={
            "clickhouse": {"dsn": f"chdb:///{(data_dir / 'chdb').resolve()}"},
            "windows": {"size_s": window_s, "grace_s": 0.0, "idle_close_s": 3600.0},
            "replay": {"batch_size": 256},
            "candidates": candidates,
        }
    )


def _baseline_session(path: Path) -> ort.InferenceSession:
    """Production's model as the demo's traffic runs it: one thread, CPU, each request timed alone."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class TrafficGenerator:
    """Held-out digits with small pixel noise, answered and timed by the real baseline model."""

    baseline_path: Path
    seed: int = 7
    rate_per_s: float = 50.0  # event-time spacing of the mirrored requests

    def __post_init__(self):
        self.data = load_digits_split()
        self.session = _baseline_session(self.baseline_path)

    def messages(self, n: int, start: datetime | None = None) -> list[bytes]:
        rng = np.random.default_rng(self.seed)
        start = start or datetime.now(UTC) - timedelta(seconds=n / self.rate_per_s)
        idx = rng.integers(0, len(self.data.holdout_x), size=n)
        pixels = np.clip(self.data.holdout_x[idx] + rng.normal(0, 0.5, size=(n, 64)), 0, PIXEL_SCALE)
        pixels = pixels.astype(np.float32)
        out = []
        for i in range(n):
            row = pixels[i : i + 1]
            t0 = time.perf_counter()
            probs = self.session.run(["probabilities"], {"pixels": row})[0]
            latency_ms = (time.perf_counter() - t0) * 1e3
            event = MirroredRequest(
                request_id=str(uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | i)),
                model="digits", baseline_version="v1", sent_at=start + timedelta(seconds=i / self.rate_per_s),
                inputs={"pixels": Tensor.from_array(row)}, baseline_output={"probabilities": Tensor.from_array(probs)},
                baseline_latency_ms=latency_ms, label=int(self.data.holdout_y[idx[i]]),
                attributes={"country": COUNTRIES[i % len(COUNTRIES)], "device": DEVICES[(i // 5) % len(DEVICES)]},
            )  # fmt: skip
            out.append(event.model_dump_json().encode())
        return out


@dataclass
class RegressionTraffic:
    """Held-out diabetes measurements with small noise, answered and timed by the real baseline regressor."""

    baseline_path: Path
    seed: int = 11
    rate_per_s: float = 25.0

    def __post_init__(self):
        self.data = load_diabetes_split()
        self.session = _baseline_session(self.baseline_path)

    def messages(self, n: int, start: datetime | None = None) -> list[bytes]:
        rng = np.random.default_rng(self.seed)
        start = start or datetime.now(UTC) - timedelta(seconds=n / self.rate_per_s)
        idx = rng.integers(0, len(self.data.holdout_x), size=n)
        x = (self.data.holdout_x[idx] + rng.normal(0, 0.005, size=(n, self.data.holdout_x.shape[1]))).astype(np.float32)
        out = []
        for i in range(n):
            row = x[i : i + 1]
            t0 = time.perf_counter()
            y = self.session.run([DIABETES_OUTPUT], {DIABETES_INPUT: row})[0]
            latency_ms = (time.perf_counter() - t0) * 1e3
            event = MirroredRequest(
                request_id=str(uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | i)), model="diabetes",
                baseline_version="v1", sent_at=start + timedelta(seconds=i / self.rate_per_s),
                inputs={DIABETES_INPUT: Tensor.from_array(row)}, baseline_output={DIABETES_OUTPUT: Tensor.from_array(y)},
                baseline_latency_ms=latency_ms, label=float(self.data.holdout_y[idx[i]]),
                attributes={"country": COUNTRIES[i % len(COUNTRIES)]},
            )  # fmt: skip
            out.append(event.model_dump_json().encode())
        return out


def run_demo(data_dir: Path, requests: int = 6000, progress: bool = True,
             tune_gc: bool = True) -> tuple[Pipeline, dict]:  # fmt: skip
    """Build models, mirror traffic, replay it; returns the pipeline and figures. ``tune_gc``:
    tune this process's cycle collector as a worker does (``streams.heap``; off when the caller
    is not a process of its own, e.g. a test)."""
    from tqdm import tqdm

    started = time.perf_counter()
    data_dir.mkdir(parents=True, exist_ok=True)
    models = build_digits_models(data_dir / "models")
    regressors = build_diabetes_models(data_dir / "models")
    settings = demo_settings(data_dir, models, regressors=regressors)
    sink = ClickHouseSink(settings.clickhouse.dsn, settings.clickhouse.database, settings.clickhouse.retention_days)
    digits = TrafficGenerator(models["baseline"]).messages(requests)
    # Half as many regression requests over the same event time, interleaved: two digits, one diabetes.
    diabetes = RegressionTraffic(regressors["baseline"]).messages(requests // 2)
    messages = [m for i, d in enumerate(digits) for m in ([d, diabetes[i // 2]] if i % 2 and i // 2 < len(diabetes)
                                                          else [d])]  # fmt: skip
    pipeline = Pipeline(settings, sink)
    if tune_gc:
        tune_collector()  # as the worker does once its models are loaded
    batch = max(settings.replay.batch_size, EMBEDDED_CHUNK)
    dead = 0
    with tqdm(total=len(messages), unit="req", desc="replaying", disable=not progress) as bar:
        for lo in range(0, len(messages), batch):
            # The in-process source is one partition; a message's offset is its index.
            result = pipeline.process(messages[lo : lo + batch])
            dead += len(result.dead_letters)
            pipeline.close_due()
            bar.update(len(messages[lo : lo + batch]))
    pipeline.close_due(force=True)  # end of input: close the last window and judge
    figures = {"requests": len(messages), "dead_letters": dead, "wall_s": time.perf_counter() - started,
               "by_model": {"digits": len(digits), "diabetes": len(diabetes)}}
    return pipeline, figures
