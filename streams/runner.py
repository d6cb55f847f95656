"""Candidate runner on onnxruntime, execution providers chosen at run time.

CUDA is used when onnxruntime reports it available (the ``gpu`` extra installs onnxruntime-gpu),
else CPU. ``timing="per_request"`` runs rows one by one so the candidate latency is comparable
with production's single-request latency; ``"batched"`` runs the micro-batch at once (higher
throughput) and attributes the batch time evenly to its rows.
"""

from __future__ import annotations

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
        self.output_names = [o.name for o in self.session.get_outputs()]

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
        if timing == "batched":
            start = time.perf_counter()
            result = self.session.run([output], {name: feeds[name] for name in names})[0]
            elapsed_ms = (time.perf_counter() - start) * 1e3
            return result, np.full(n, elapsed_ms / max(n, 1))
        run = self.session.run
        latencies = np.empty(n)
        outs = []
        for i in range(n):
            row = {name: feeds[name][i : i + 1] for name in names}
            start = time.perf_counter()
            result = run([output], row)[0]
            latencies[i] = (time.perf_counter() - start) * 1e3
            outs.append(result)
        return np.concatenate(outs), latencies


def _as_batch(array: np.ndarray) -> np.ndarray:
    # A request tensor of shape (64,) and (1, 64) both mean one row of 64 features.
    return array if array.ndim >= 2 else array[None, ...]
