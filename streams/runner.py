"""Candidate runner on onnxruntime, execution providers chosen at run time.

CUDA is used when onnxruntime reports it available (the ``gpu`` extra installs onnxruntime-gpu),
else CPU. ``timing="per_request"`` runs rows one by one so the candidate latency is comparable
with production's single-request latency; ``"batched"`` runs the micro-batch at once (higher
throughput) and attributes the batch time evenly to its rows.

Outputs come back as ``(n, ...)`` float arrays. A scikit-learn classifier exported with skl2onnx's
default ZipMap (``output_probability``: a sequence of maps class -> probability, one per row) is
read as the probability vector of its classes in sorted order, the order skl2onnx gives
``classes_`` and the ``zipmap=False`` export's tensor, so both exports of one model compare alike.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import onnxruntime as ort

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """The requested providers that this onnxruntime build has, CUDA first by default."""
    available = set(ort.get_available_providers())
    wanted = list(requested) if requested else list(PREFERRED_PROVIDERS)
    chosen = [p for p in wanted if p in available]
    return chosen or ["CPUExecutionProvider"]


class InputShapeError(ValueError):
    """A request's tensors do not fit the model's declared inputs."""


class OnnxRunner:
    def __init__(self, path: str, providers: Sequence[str] | None = None, intra_op_threads: int = 1):
        options = ort.SessionOptions()
        # One thread per session: the worker runs several candidates and the machine may be small;
        # parallelism comes from micro-batching, not from fighting over cores.
        options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(path, sess_options=options, providers=choose_providers(providers))
        self.providers = self.session.get_providers()
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        # What each input takes ('tensor(float)' -> float32; None: no numpy dtype, e.g. strings).
        self.input_dtypes = {name: onnx_dtype(meta.type) for name, meta in self.inputs.items()}
        self.outputs = {o.name: o for o in self.session.get_outputs()}
        self.output_names = list(self.outputs)

    def check_row(self, row: Mapping[str, np.ndarray]) -> None:
        """Raise InputShapeError naming the input when one request cannot be fed to the model.

        A row is one request: its tensors carry the batch dimension of 1 or omit it.
        """
        for name, meta in self.inputs.items():
            if name not in row:
                raise InputShapeError(f"inputs.{name}: the candidate needs it; the request has {sorted(row)}")
            want = [d if isinstance(d, int) else None for d in meta.shape[1:]]
            got = list(_as_batch(row[name]).shape[1:])
            if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got, strict=True)):
                raise InputShapeError(
                    f"inputs.{name}: shape {list(row[name].shape)} does not fit the model's {list(meta.shape)}"
                )

    def run(
        self, rows: Sequence[Mapping[str, np.ndarray]], output: str, timing: Literal["per_request", "batched"]
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Outputs (one array per row, without batch dim) and latencies in ms, for checked rows."""
        feeds = {name: np.concatenate([_as_batch(r[name]) for r in rows]) for name in self.inputs}
        outputs, latencies = self.run_stacked(feeds, len(rows), output, timing)
        return list(outputs), latencies

    def run_stacked(
        self, feeds: Mapping[str, np.ndarray], n: int, output: str, timing: Literal["per_request", "batched"]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Outputs ``(n, ...)`` and per-row latencies (ms) for inputs already stacked along axis 0.

        ``batched``: one ``session.run``; each row is attributed the batch time divided by n
        (throughput, not the latency one request would see). ``per_request``: one run per row over
        views of the stacked arrays, timed one by one, comparable with production's latency.
        """
        names = list(self.inputs)
        zipmap = is_zipmap(self.outputs[output].type) if output in self.outputs else False
        if timing == "batched":
            start = time.perf_counter()
            result = self.session.run([output], {name: feeds[name] for name in names})[0]
            elapsed_ms = (time.perf_counter() - start) * 1e3
            return (zipmap_rows(result) if zipmap else result), np.full(n, elapsed_ms / max(n, 1))
        run = self.session.run
        latencies = np.empty(n)
        outs = []
        for i in range(n):
            row = {name: feeds[name][i : i + 1] for name in names}
            start = time.perf_counter()
            result = run([output], row)[0]
            latencies[i] = (time.perf_counter() - start) * 1e3
            outs.append(result)
        if zipmap:  # one list of one map per row
            return zipmap_rows([m for maps in outs for m in maps]), latencies
        return np.concatenate(outs), latencies


# ONNX tensor element types that a mirrored tensor (schemas.SUPPORTED_DTYPES) can carry.
ONNX_DTYPES = {
    "tensor(float)": np.dtype("float32"), "tensor(double)": np.dtype("float64"), "tensor(float16)": np.dtype("float16"),
    "tensor(int8)": np.dtype("int8"), "tensor(int16)": np.dtype("int16"), "tensor(int32)": np.dtype("int32"),
    "tensor(int64)": np.dtype("int64"), "tensor(uint8)": np.dtype("uint8"), "tensor(uint16)": np.dtype("uint16"),
    "tensor(uint32)": np.dtype("uint32"), "tensor(uint64)": np.dtype("uint64"), "tensor(bool)": np.dtype("bool"),
}  # fmt: skip


def onnx_dtype(onnx_type: str) -> np.dtype | None:
    """numpy's dtype for an onnxruntime type string ('tensor(float)' -> float32); None for types no
    mirrored tensor carries (strings, bfloat16, sequences, maps)."""
    return ONNX_DTYPES.get(onnx_type)


_ZIPMAP = re.compile(r"seq\(map\((int64|string),tensor\((float|double)\)\)\)")


def is_zipmap(onnx_type: str) -> bool:
    """A ZipMap output: a sequence of maps class -> float probability, e.g. 'seq(map(int64,tensor(float)))'."""
    return _ZIPMAP.fullmatch(onnx_type.replace(" ", "")) is not None


def zipmap_rows(maps: Sequence[Mapping]) -> np.ndarray:
    """A ZipMap output (one map class -> probability per row) as an ``(n, classes)`` float64 array,
    classes in sorted order (skl2onnx's ``classes_`` order: numbers ascending, strings lexically).
    A row whose classes differ from the first row's raises KeyError / ValueError (the candidate's)."""
    if not len(maps):
        return np.zeros((0, 0))
    keys = sorted(maps[0])
    rows = [[m[k] for k in keys] for m in maps]
    if any(len(m) != len(keys) for m in maps):
        raise ValueError(f"ZipMap rows have different classes (first row: {keys[:10]})")
    return np.asarray(rows, dtype=np.float64)


def _as_batch(array: np.ndarray) -> np.ndarray:
    # A request tensor of shape (64,) and (1, 64) both mean one row of 64 features.
    return array if array.ndim >= 2 else array[None, ...]
