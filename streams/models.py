"""Real ONNX models built locally from sklearn's bundled digits data (no model hub).

Used by the demo and the tests. The migration story they tell:
- ``baseline`` (v1): logistic regression on raw 8x8 pixel intensities 0..16, input ``pixels``.
- ``good`` (v2): retrained logistic regression that expects ``image`` scaled to 0..1 (float32):
  the adapter maps v1 requests (rename ``pixels`` -> ``image``, scale by 1/16).
- ``degraded`` (v2): same input contract, trained on a small subset with 30 % of the
  labels corrupted: a plausible bad retrain.
- ``broken`` (v2): the good model with its class weight rows permuted, i.e. a wiring bug.

``build_export_variants`` exports the ways a model can reach shadowlens that the blame rules
(streams/replay/blame.py) are about: the good model with skl2onnx's default ZipMap output (``output_probability``,
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


def _torch_classifier(layers: list[tuple[np.ndarray, np.ndarray]], scale: float):
    """A torch module computing ``softmax`` of an MLP (ReLU between layers; one layer: logistic
    regression) from scikit-learn's weights (``coef`` as (in, out)), returning ``{"probabilities": p}``
    for the input ``image`` multiplied by ``scale`` first (1.0: none)."""
    import torch

    class DigitsClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = scale
            self.layers = torch.nn.ModuleList()
            for coef, bias in layers:
                lin = torch.nn.Linear(coef.shape[0], coef.shape[1])
                with torch.no_grad():
                    lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(coef.T, dtype=np.float32)))
                    lin.bias.copy_(torch.from_numpy(np.asarray(bias, dtype=np.float32)))
                self.layers.append(lin)

        def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
            x = image * self.scale
            last = len(self.layers) - 1
            for i, layer in enumerate(self.layers):
                x = layer(x)
                if i < last:
                    x = torch.relu(x)
            return {"probabilities": torch.softmax(x, dim=1)}

    return DigitsClassifier().eval()


def build_torch_twins(out_dir: str | Path, seed: int = 0, hidden: tuple[int, ...] = (64,)) -> dict[str, Path]:
    """The same classifiers as ONNX and as torch files (no model hub: trained here, exported here):

    - ``good`` / ``good-script`` / ``good-export``: ``build_digits_models``' good v2 model (logistic
      regression on ``image`` 0..1) as ONNX (skl2onnx), as TorchScript (``torch.jit.script``, .pt)
      and as a ``torch.export`` program (.pt2, batch dim free);
    - ``mlp`` / ``mlp-trace`` / ``mlp-export``: an MLP (``hidden`` ReLU layers, scikit-learn's
      MLPClassifier, a few iterations) on the same input, as ONNX, TorchScript (``torch.jit.trace``)
      and ``torch.export``. Wider ``hidden`` layers give a GPU something to do (bench/gpu_check.sh).

    The torch modules carry scikit-learn's weights, so twins differ by float32 rounding only.
    Needs torch (the ``torch`` extra). Returns name -> path."""
    import warnings

    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    from streams.replay.runner_torch import save_exported, save_torchscript

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits_split(seed)
    n_features = data.train_x.shape[1]
    scaled = data.train_x / PIXEL_SCALE
    good = _good_model(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier(hidden_layer_sizes=hidden, max_iter=30, random_state=seed).fit(scaled, data.train_y)
    io = {"inputs": [{"name": "image", "dtype": "float32", "shape": [None, n_features]}],
          "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [None, 10]}]}  # fmt: skip
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    example = (torch.from_numpy(scaled[:4].astype(np.float32)),)
    paths = {}
    for name, model, layers in [("good", good, [(good.coef_.T, good.intercept_)]),
                                ("mlp", mlp, list(zip(mlp.coefs_, mlp.intercepts_, strict=True)))]:  # fmt: skip
        paths[name] = out / f"digits-{name}.onnx"
        paths[name].write_bytes(_to_onnx(model, "image", n_features))
        module = _torch_classifier(layers, 1.0)
        with warnings.catch_warnings():  # torch >= 2.9 calls TorchScript deprecated; it still works
            warnings.simplefilter("ignore", FutureWarning)
            if name == "good":
                paths["good-script"] = save_torchscript(torch.jit.script(module), out / "digits-good.pt", **io)
            else:
                traced = torch.jit.trace(module, example, strict=False)
                paths["mlp-trace"] = save_torchscript(traced, out / "digits-mlp.pt", **io)
        program = torch.export.export(module, example, dynamic_shapes={"image": {0: batch}})
        paths[f"{name}-export"] = save_exported(program, out / f"digits-{name}.pt2")
    return paths
