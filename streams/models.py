"""Real ONNX models built locally from sklearn's bundled digits data (no model hub).

Used by the demo and the tests. The migration story they tell:
- ``baseline`` (v1): logistic regression on raw 8x8 pixel intensities 0..16, input ``pixels``.
- ``good`` (v2): retrained logistic regression that expects ``image`` scaled to 0..1 (float32):
  the adapter maps v1 requests (rename ``pixels`` -> ``image``, scale by 1/16).
- ``degraded`` (v2): same input contract, trained on a small subset with 30 % of the
  labels corrupted: a plausible bad retrain.
- ``broken`` (v2): the good model with its class weight rows permuted, i.e. a wiring bug.

``build_export_variants`` exports the ways a model can reach shadowlens that the blame rules
(streams/blame.py) are about: the good model with skl2onnx's default ZipMap output (``output_probability``,
a sequence of maps class -> probability, besides the ``output_label`` tensor), and a regression
model on the same input (``variable``, a ``[None, 1]`` float tensor: not a classifier).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

PIXEL_SCALE = 16.0  # digits pixels are integers 0..16


@dataclass(frozen=True)
class DigitsData:
    train_x: np.ndarray  # raw pixels, float32 0..16
    train_y: np.ndarray
    holdout_x: np.ndarray
    holdout_y: np.ndarray


def load_digits_split(seed: int = 0) -> DigitsData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    half = len(x) // 2
    tr, ho = order[:half], order[half:]
    return DigitsData(x[tr], y[tr], x[ho], y[ho])


def _to_onnx(model, input_name: str, n_features: int, zipmap: bool = False) -> bytes:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    onx = to_onnx(
        model,
        initial_types=[(input_name, FloatTensorType([None, n_features]))],
        # zipmap=False: a plain probability tensor, not a list of dicts (skl2onnx's default)
        options=None if zipmap or not hasattr(model, "classes_") else {id(model): {"zipmap": False}},
        target_opset=17,
    )
    return onx.SerializeToString()


def _good_model(data: DigitsData):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000, C=1.0).fit(data.train_x / PIXEL_SCALE, data.train_y)


def build_export_variants(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """The good v2 model exported with skl2onnx's default ZipMap (``good-zipmap``: outputs
    ``output_label`` and ``output_probability``), and a regression model on the same ``image``
    input (``regression``: output ``variable`` [None, 1]); name -> .onnx path. The same seed gives
    ``good-zipmap`` the weights of ``build_digits_models``' ``good``."""
    from sklearn.linear_model import LinearRegression

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits_split(seed)
    n_features = data.train_x.shape[1]
    regression = LinearRegression().fit(data.train_x / PIXEL_SCALE, data.train_y.astype(np.float64))
    paths = {"good-zipmap": out / "digits-good-zipmap.onnx", "regression": out / "digits-regression.onnx"}
    paths["good-zipmap"].write_bytes(_to_onnx(_good_model(data), "image", n_features, zipmap=True))
    paths["regression"].write_bytes(_to_onnx(regression, "image", n_features))
    return paths


def build_digits_models(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Train and export the four models; returns name -> .onnx path. Deterministic for a seed."""
    from sklearn.linear_model import LogisticRegression

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits_split(seed)
    n_features = data.train_x.shape[1]
    rng = np.random.default_rng(seed + 1)

    baseline = LogisticRegression(max_iter=2000, C=0.05).fit(data.train_x, data.train_y)

    scaled = data.train_x / PIXEL_SCALE
    good = _good_model(data)

    subset = rng.choice(len(scaled), size=400, replace=False)
    noisy_y = data.train_y[subset].copy()
    corrupt = rng.random(len(subset)) < 0.3
    noisy_y[corrupt] = rng.integers(0, 10, size=int(corrupt.sum()))
    degraded = LogisticRegression(max_iter=2000, C=0.05).fit(scaled[subset], noisy_y)

    broken = LogisticRegression(max_iter=2000, C=1.0).fit(scaled, data.train_y)
    perm = np.roll(np.arange(broken.coef_.shape[0]), 3)  # every class answers as another one
    broken.coef_ = broken.coef_[perm].copy()
    broken.intercept_ = broken.intercept_[perm].copy()

    paths = {}
    for name, model, input_name in [
        ("baseline", baseline, "pixels"),
        ("good", good, "image"),
        ("degraded", degraded, "image"),
        ("broken", broken, "image"),
    ]:
        path = out / f"digits-{name}.onnx"
        path.write_bytes(_to_onnx(model, input_name, n_features))
        paths[name] = path
    return paths
