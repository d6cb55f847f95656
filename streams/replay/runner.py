"""Candidate runners behind one small interface, with onnxruntime's here (``OnnxRunner``) and
torch's in streams/replay/runner_torch.py (``TorchRunner``: TorchScript and ``torch.export`` programs).

What the replay core (streams/replay/core.py) and the blame rules (streams/replay/blame.py) use of a runner,
and all a new runtime has to give (``Runner``):

- ``inputs`` / ``outputs``: name -> declared ``IOMeta`` (``.name``, ``.type`` as onnxruntime spells
  it, e.g. ``'tensor(float)'``, ``.shape`` with ints for fixed dims, anything else for free ones);
  ``input_dtypes`` (name -> numpy dtype, None for types no mirrored tensor carries),
  ``output_names``, ``providers`` (where it runs, first = used), ``runtime`` (``"onnx"``, ``"torch"``);
- ``check_row(row)``: InputShapeError naming the input when a request does not fit;
- ``run_stacked(feeds, n, output, timing)``: outputs ``(n, ...)`` and per-row latencies (ms);
- ``time_alone(feeds, output, rows)``: the latencies (ms) of the given rows, each run alone.

Devices are chosen at run time: CUDA when the runtime reports it available (the ``gpu`` extra
installs onnxruntime-gpu; torch's default wheel has CUDA), else CPU.

**Timing** (``[replay] timing``, streams/replay/core.py decides which rows are timed):

- ``batched``: one call per micro-batch; each row is attributed the batch time divided by n
  (throughput, not the latency one request would see);
- ``per_request``: one call per row over views of the stacked arrays, each timed alone: what
  production's single-request latency is compared with, at one call per row and candidate;
- ``sampled``: ``run_stacked(..., "sampled")`` is the batched call with NaN latencies, and the replay
  core times a sample of the rows alone with ``time_alone`` (the same per-row call as ``per_request``):
  outputs at batched throughput, latency from the sample.

Outputs come back as ``(n, ...)`` float arrays. A scikit-learn classifier exported with skl2onnx's
default ZipMap (``output_probability``: a sequence of maps class -> probability, one per row) is
read as the probability vector of its classes in sorted order, the order skl2onnx gives
``classes_`` and the ``zipmap=False`` export's tensor, so both exports of one model compare alike.

**Transfers.** On CUDA, ``OnnxRunner`` binds a batched call's inputs and output through
onnxruntime's IOBinding (inputs copied to the device once, the output written to host memory
directly); a ZipMap output and the per-row calls use ``session.run``. On CPU there is nothing to
bind: the session reads the numpy arrays in place, so binding is not used there. If binding fails
once, the runner logs it and uses ``session.run`` from then on (it is an optimisation, never a
reason for a candidate error).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnxruntime as ort

log = logging.getLogger("shadowlens.runner")
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
Timing = Literal["sampled", "per_request", "batched"]
RUNTIMES = ("onnx", "torch")


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """The requested providers that this onnxruntime build has, CUDA first by default."""
    available = set(ort.get_available_providers())
    wanted = list(requested) if requested else list(PREFERRED_PROVIDERS)
    chosen = [p for p in wanted if p in available]
    if "CUDAExecutionProvider" in chosen:
        _preload_cuda()
    return chosen or ["CPUExecutionProvider"]


_PRELOADED: list[bool] = []


def _preload_cuda() -> None:
    """onnxruntime-gpu's CUDA and cuDNN libraries from the nvidia-* wheels (``onnxruntime-gpu[cuda,cudnn]``,
    the ``gpu`` extra) when there are no system ones; once. Without them the session falls back to CPU
    (``OnnxRunner.providers`` says which one runs)."""
    if _PRELOADED:
        return
    _PRELOADED.append(True)
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # noqa: BLE001 - system libraries may still be found; the session says
            log.info("onnxruntime.preload_dlls: %s", exc)


class InputShapeError(ValueError):
    """A request's tensors do not fit the model's declared inputs."""


@dataclass(frozen=True)
class IOMeta:
    """A declared input or output, as onnxruntime's ``NodeArg`` describes one."""

    name: str
    type: str  # 'tensor(float)', ...
    shape: list  # ints for fixed dims, None (or a name) for free ones


class Runner:
    """What every runtime gives the replay core; subclasses implement ``_batch``, ``_alone`` and ``_join``."""

    runtime = ""
    inputs: dict
    outputs: dict
    input_dtypes: dict[str, np.dtype | None]
    output_names: list[str]
    providers: list[str]

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

    def run(self, rows: Sequence[Mapping[str, np.ndarray]], output: str, timing: Timing,
            ) -> tuple[list[np.ndarray], np.ndarray]:  # fmt: skip
        """Outputs (one array per row, without batch dim) and latencies in ms, for checked rows."""
        feeds = {name: np.concatenate([_as_batch(r[name]) for r in rows]) for name in self.inputs}
        outputs, latencies = self.run_stacked(feeds, len(rows), output, timing)
        return list(outputs), latencies

    def run_stacked(self, feeds: Mapping[str, np.ndarray], n: int, output: str, timing: Timing,
                    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Outputs ``(n, ...)`` and per-row latencies (ms) for inputs already stacked along axis 0.

        ``batched``: one call; each row is attributed the batch time divided by n. ``per_request``:
        one call per row over views of the stacked arrays, timed one by one. ``sampled``: the batched
        call, every latency NaN (the caller times the rows it samples with ``time_alone``)."""
        if timing == "per_request":
            outs, latencies = self._alone(feeds, output, range(n))
            return self._join(outs, output), latencies
        start = time.perf_counter()
        result = self._batch(feeds, output)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if timing == "sampled":
            return result, np.full(n, np.nan)
        return result, np.full(n, elapsed_ms / max(n, 1))

    def time_alone(self, feeds: Mapping[str, np.ndarray], output: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Latency (ms) of each of ``rows`` (indices into the stacked feeds), each run alone and timed
        as in ``per_request`` timing; the outputs of these runs are not kept."""
        return self._alone(feeds, output, rows)[1]

    # -- per runtime ------------------------------------------------------------------------------
    def _batch(self, feeds: Mapping[str, np.ndarray], output: str) -> np.ndarray:
        raise NotImplementedError

    def _alone(self, feeds: Mapping[str, np.ndarray], output: str, rows) -> tuple[list, np.ndarray]:
        """(raw outputs, latencies in ms) of the rows, each run alone."""
        raise NotImplementedError

    def _join(self, outs: list, output: str) -> np.ndarray:
        return np.concatenate(outs) if outs else np.zeros((0, 0))


class OnnxRunner(Runner):
    runtime = "onnx"

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
        self._names = list(self.inputs)
        # IOBinding where there is a device to bind to (see the module doc); None: session.run.
        self._binding = self.providers[0] == "CUDAExecutionProvider"

    def _zipmap(self, output: str) -> bool:
        return is_zipmap(self.outputs[output].type) if output in self.outputs else False

    def _batch(self, feeds: Mapping[str, np.ndarray], output: str) -> np.ndarray:
        zipmap = self._zipmap(output)
        if self._binding and not zipmap:
            try:
                return self._bound(feeds, output)
            except Exception as exc:  # noqa: BLE001 - an optimisation: fall back, say so once
                self._binding = False
                log.warning("onnxruntime IOBinding failed (%s: %s); using session.run from now on",
                            type(exc).__name__, str(exc)[:300])  # fmt: skip
        result = self.session.run([output], {name: feeds[name] for name in self._names})[0]
        return zipmap_rows(result) if zipmap else result

    def _bound(self, feeds: Mapping[str, np.ndarray], output: str) -> np.ndarray:
        binding = self.session.io_binding()
        for name in self._names:
            binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        binding.bind_output(output, "cpu")  # written to host memory by the provider's own copy
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def _alone(self, feeds: Mapping[str, np.ndarray], output: str, rows) -> tuple[list, np.ndarray]:
        names, run = self._names, self.session.run
        rows = list(rows)
        latencies = np.empty(len(rows))
        outs = []
        for k, i in enumerate(rows):
            row = {name: feeds[name][i : i + 1] for name in names}
            start = time.perf_counter()
            result = run([output], row)[0]
            latencies[k] = (time.perf_counter() - start) * 1e3
            outs.append(result)
        return outs, latencies

    def _join(self, outs: list, output: str) -> np.ndarray:
        if self._zipmap(output):  # one list of one map per row
            return zipmap_rows([m for maps in outs for m in maps])
        return super()._join(outs, output)


def load_runner(path, runtime: str | None = None, providers: Sequence[str] | None = None) -> Runner:
    """The runner for a model file: ``runtime`` ``"onnx"`` or ``"torch"``, None: from the suffix
    (``streams.candidate_config.infer_runtime``). ImportError (one line, the fix) when torch is not installed;
    ``streams.replay.runner_torch.TorchModelError`` (a ValueError) for a file torch does not load."""
    from streams.candidate_config import infer_runtime

    runtime = runtime or infer_runtime(path)
    if runtime == "torch":
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            raise ImportError(f"{path} runs on torch (runtime = \"torch\"), which is not installed: "
                              "pip install 'shadowlens[torch]'") from exc  # fmt: skip
        from streams.replay.runner_torch import TorchRunner

        return TorchRunner(path, providers=providers)
    if runtime != "onnx":
        raise ValueError(f"runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    return OnnxRunner(str(path), providers=providers)


def sampled_by_hash(id_hash: np.ndarray, fraction: float) -> np.ndarray:
    """Per row: whether sampled timing times it alone by its request id's hash (``id_hash``, the
    64-bit hash of ``streams.judge.recent_ids.id_hashes``): its top 53 bits below ``fraction`` of their
    range. Deterministic, so every candidate of a model, its noise reference and a redelivery time
    the same requests; a function of the id only, so the judge can tell which rows were meant to be
    timed."""
    h = np.asarray(id_hash, dtype=np.uint64)
    if fraction >= 1:
        return np.ones(h.shape, dtype=bool)
    return (h >> np.uint64(11)) < np.uint64(int(fraction * (1 << 53)))


def timed_rows(id_hash: np.ndarray, fraction: float, sent_ms: np.ndarray | None = None, window_ms: int = 0,
               min_per_window: int = 0) -> np.ndarray:  # fmt: skip
    """Indices of the rows (one stacked group of a micro-batch) that sampled timing runs alone and
    times: those ``sampled_by_hash``, plus, where a window (``sent_ms // window_ms``) has fewer
    than ``min_per_window`` of them, its rows with the next larger hashes until it has (or has no
    more rows). A function of the group's ids and sent times only: the same rows for every
    candidate that takes the same group."""
    h = np.asarray(id_hash, dtype=np.uint64)
    picked = sampled_by_hash(h, fraction)
    if min_per_window > 0 and h.size and window_ms > 0 and sent_ms is not None:
        windows = np.asarray(sent_ms, dtype=np.int64) // int(window_ms)
        one = windows[0] == windows[-1] and windows.min() == windows.max()  # the usual micro-batch
        for idx in [np.arange(h.size)] if one else [np.flatnonzero(windows == w) for w in np.unique(windows).tolist()]:
            short = min_per_window - int(picked[idx].sum())
            if short > 0:
                rest = idx[~picked[idx]]
                picked[rest[np.argsort(h[rest], kind="stable")[:short]]] = True
    return np.flatnonzero(picked)


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
