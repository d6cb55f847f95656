"""Real ONNX regressors built locally from sklearn's bundled diabetes data (no model hub): the
demo's second output kind (``kind = "regression"``) and the tests'.

The migration story: ``baseline`` (v1) is a least-squares linear model of disease progression a
year on from ten standardised measurements (input ``features`` float32 [None, 10], output
``variable`` float32 [None, 1]); ``good`` (v2) is a lightly regularised retrain (Ridge, alpha 0.01),
within a few percent of the baseline on almost every request; ``boosted`` (v2) is gradient-boosted
trees, a different model that moves many predictions by more than 10 %.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DIABETES_INPUT = "features"
DIABETES_OUTPUT = "variable"  # skl2onnx's name for a regressor's output


@dataclass(frozen=True)
class DiabetesData:
    train_x: np.ndarray  # float32, (n, 10)
    train_y: np.ndarray  # float64 progression, 25..346
    holdout_x: np.ndarray
    holdout_y: np.ndarray


def load_diabetes_split(seed: int = 0) -> DiabetesData:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = x.astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(x))
    tr, ho = order[:300], order[300:]
    return DiabetesData(x[tr], y[tr], x[ho], y[ho])


def regressor_onnx(model, n_features: int, input_name: str = DIABETES_INPUT) -> bytes:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    onx = to_onnx(model, initial_types=[(input_name, FloatTensorType([None, n_features]))], target_opset=17)
    return onx.SerializeToString()


def build_diabetes_models(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Train and export ``baseline``, ``good`` and ``boosted``; name -> .onnx path. Deterministic for a seed."""
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.linear_model import LinearRegression, Ridge

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_diabetes_split(seed)
    models = {
        "baseline": LinearRegression(),
        "good": Ridge(alpha=0.01),
        "boosted": GradientBoostingRegressor(n_estimators=100, max_depth=2, random_state=seed),
    }
    paths = {}
    for name, model in models.items():
        model.fit(data.train_x, data.train_y)
        paths[name] = out / f"diabetes-{name}.onnx"
        paths[name].write_bytes(regressor_onnx(model, data.train_x.shape[1]))
    return paths
