"""Candidate runner on torch: TorchScript archives (``torch.jit.save``) and ``torch.export``
programs (``torch.export.save``, ``.pt2``), with the interface of streams/replay/runner.py's ``Runner``.

Never a pickled module: a file is looked at as a zip archive before torch reads it, and only a
TorchScript archive (its ``code/`` and ``constants.pkl``, read by TorchScript's own restricted
unpickler) or a PT2 archive (``archive_format``) is loaded. A PT2 archive is loaded with
``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` (every ``torch.load`` inside ``torch.export.load`` reads tensors
only) and refused when it carries custom or opaque objects (which torch would unpickle). A file
from ``torch.save(module)`` is refused with the way to export it.

**Declared inputs and outputs.** The replay core and the blame rules read a model's inputs
(names, dtypes, shapes) and outputs before any request. A ``torch.export`` program declares its
inputs (the ``forward`` arguments, their dtypes and shapes, free dims from ``Dim``) and its
outputs (a dict's keys; dtypes and shapes). A TorchScript archive declares neither dtypes nor
shapes, so it carries them in an extra file, ``shadowlens.json``, written by ``save_torchscript``
(or ``torch.jit.save(m, path, _extra_files={"shadowlens.json": ...})``)::

    {"inputs": [{"name": "image", "dtype": "float32", "shape": [null, 64]}],
     "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [null, 10]}]}

``inputs`` are ``forward``'s arguments in order; ``outputs`` name what ``forward`` returns: a dict
of tensors (its keys), a tuple (in order) or one tensor. A PT2 archive may carry the same file
to name the outputs of a program that returns a tuple or a tensor (otherwise one tensor is
``output``, a tuple ``output_0``, ``output_1``, ...).

**Device.** CUDA when ``torch.cuda.is_available()`` and the ``[replay] providers`` list does not
leave ``CUDAExecutionProvider`` out, else CPU. On CUDA a batched call's inputs are copied into
pinned (page-locked) host buffers kept between calls and sent with ``non_blocking=True``; on CPU
the module reads the numpy arrays in place (``torch.from_numpy``), nothing is pinned.

**Threads.** ``torch.set_num_threads(intra_op_threads)`` (1 by default), as onnxruntime's sessions
get one thread each: it is process-wide in torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from streams.replay.runner import ONNX_DTYPES, IOMeta, Runner

METADATA = "shadowlens.json"
_ONNX_TYPE = {dtype: name for name, dtype in ONNX_DTYPES.items()}


class TorchModelError(ValueError):
    """A file the torch runner does not load; the message is one line: what, and how to export it."""


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def archive_kind(path: str | Path) -> str:
    """``"export"`` (a PT2 archive), ``"script"`` (TorchScript); TorchModelError for anything else,
    decided from the zip's file names alone (nothing is unpickled to find out)."""
    fix = ("export it with torch.jit.script(model) + streams.replay.runner_torch.save_torchscript, or torch.export.export + "
           "torch.export.save (.pt2)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise TorchModelError(f"{path} is not a TorchScript or torch.export archive ({exc}); {fix}") from exc
    tails = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if "archive_format" in tails:
        bad = [n for n in tails if n.startswith("data/constants/") and
               Path(n).name.startswith(("custom_obj_", "opaque_obj_"))]  # fmt: skip
        if bad:
            raise TorchModelError(f"{path}: a torch.export archive with custom or opaque objects ({bad[0]}), which "
                                  "torch would unpickle; shadowlens loads tensors only: export without them")
        return "export"
    if "constants.pkl" in tails and any(t.startswith("code/") for t in tails):
        return "script"
    if "data.pkl" in tails:
        raise TorchModelError(f"{path} is a pickled object (torch.save), which shadowlens never loads (unpickling runs "
                              f"arbitrary code); {fix}")
    raise TorchModelError(f"{path} is not a TorchScript or torch.export archive; {fix}")


def save_torchscript(module, path: str | Path, inputs: Sequence[Mapping], outputs: Sequence[Mapping]) -> Path:
    """``torch.jit.save`` of ``module`` (scripted or traced) with its declared inputs and outputs
    (``[{"name", "dtype", "shape"}]``, shapes with None for free dims) in ``shadowlens.json``."""
    import torch

    meta = {"inputs": [dict(d) for d in inputs], "outputs": [dict(d) for d in outputs]}
    with warnings.catch_warnings():  # torch >= 2.9 calls TorchScript deprecated; it still saves
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(module, str(path), _extra_files={METADATA: json.dumps(meta)})
    return Path(path)


def save_exported(program, path: str | Path, outputs: Sequence[Mapping] | None = None) -> Path:
    """``torch.export.save`` of ``program``; ``outputs`` (optional) names a tuple's or a tensor's outputs."""
    import torch

    extra = {METADATA: json.dumps({"outputs": [dict(d) for d in outputs]})} if outputs else None
    torch.export.save(program, str(path), extra_files=extra)
    return Path(path)


@contextlib.contextmanager
def _weights_only():
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


class _Declared:
    """The declared inputs and outputs with onnxruntime's session methods (``get_inputs`` /
    ``get_outputs``), for code that reads a session's metadata (streams/doctor/checks.py)."""

    def __init__(self, inputs: dict[str, IOMeta], outputs: dict[str, IOMeta]):
        self._inputs, self._outputs = list(inputs.values()), list(outputs.values())

    def get_inputs(self) -> list[IOMeta]:
        return list(self._inputs)

    def get_outputs(self) -> list[IOMeta]:
        return list(self._outputs)


class TorchRunner(Runner):
    runtime = "torch"

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, intra_op_threads: int = 1,
                 device: str | None = None):  # fmt: skip
        import torch

        self.torch = torch
        self.path = Path(path)
        self.kind = archive_kind(self.path)
        if intra_op_threads:
            torch.set_num_threads(intra_op_threads)
        self.device = torch.device(device or choose_device(providers))
        self.providers = ["CUDAExecutionProvider" if self.device.type == "cuda" else "CPUExecutionProvider"]
        try:
            if self.kind == "export":
                extra = {METADATA: ""}
                with _weights_only(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    program = torch.export.load(str(self.path), extra_files=extra)
                meta = json.loads(extra[METADATA]) if extra[METADATA] else {}
                self.module = program.module().to(self.device)
                self.inputs, outputs, self._out_kind = _export_io(program, meta)
            else:
                extra = {METADATA: ""}
                with warnings.catch_warnings():  # torch >= 2.9 calls TorchScript deprecated; it still loads
                    warnings.simplefilter("ignore", FutureWarning)
                    self.module = torch.jit.load(str(self.path), map_location=self.device, _extra_files=extra)
                if not extra[METADATA]:
                    raise TorchModelError(
                        f"{self.path}: a TorchScript archive without {METADATA} (its inputs' dtypes and shapes, its "
                        "outputs' names); save it with streams.replay.runner_torch.save_torchscript(module, path, inputs, "
                        "outputs)")
                meta = json.loads(extra[METADATA])
                self.inputs, outputs, self._out_kind = _script_io(self.module, meta, self.path)
                self.module.eval()
        except TorchModelError:
            raise
        except (RuntimeError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TorchModelError(f"{self.path}: torch {torch.__version__} cannot load it ({first[:240]})") from exc
        self.outputs = outputs
        self.output_names = list(outputs)
        self._order = list(self.inputs)  # forward's positional arguments
        self.input_dtypes = {name: ONNX_DTYPES.get(m.type) for name, m in self.inputs.items()}
        self.session = _Declared(self.inputs, self.outputs)
        self._pinned: dict[str, object] = {}

    # -- calls --------------------------------------------------------------------------------
    def _pick(self, result, output: str):
        kind = self._out_kind
        if kind == "dict":
            return result[output]
        if kind == "tuple":
            return result[self.output_names.index(output)]
        return result

    def _to_numpy(self, tensor) -> np.ndarray:
        return tensor.detach().to("cpu").numpy()

    def _tensors(self, feeds: Mapping[str, np.ndarray]) -> list:
        torch = self.torch
        out = []
        for name in self._order:
            cpu = torch.from_numpy(_writable(feeds[name]))
            if self.device.type == "cuda":
                cpu = self._pin(name, cpu)
                out.append(cpu.to(self.device, non_blocking=True))
            else:
                out.append(cpu)
        return out

    def _pin(self, name: str, cpu):
        """The rows in a pinned buffer kept for the input (grown as needed): the copy to the device
        can then run asynchronously. The output's copy back synchronises before the buffer is reused."""
        buf = self._pinned.get(name)
        if buf is None or buf.shape[1:] != cpu.shape[1:] or buf.dtype != cpu.dtype or buf.shape[0] < cpu.shape[0]:
            buf = self.torch.empty(tuple(cpu.shape), dtype=cpu.dtype).pin_memory()  # grows with the largest batch
            self._pinned[name] = buf
        part = buf[: cpu.shape[0]]
        part.copy_(cpu)
        return part

    def _batch(self, feeds: Mapping[str, np.ndarray], output: str) -> np.ndarray:
        with self.torch.inference_mode():
            return self._to_numpy(self._pick(self.module(*self._tensors(feeds)), output))

    def _alone(self, feeds: Mapping[str, np.ndarray], output: str, rows) -> tuple[list, np.ndarray]:
        torch, module, device, pick = self.torch, self.module, self.device, self._pick
        rows = list(rows)
        latencies = np.empty(len(rows))
        outs = []
        on_cuda = device.type == "cuda"
        with torch.inference_mode():
            for k, i in enumerate(rows):
                # The row as a request would bring it (its own host copy), then timed: its copy to the
                # device, the call, and its output's copy back.
                row = [torch.from_numpy(np.array(feeds[name][i : i + 1], order="C")) for name in self._order]
                start = time.perf_counter()
                args = [t.to(device) for t in row] if on_cuda else row
                result = pick(module(*args), output).detach().to("cpu").numpy()
                latencies[k] = (time.perf_counter() - start) * 1e3
                outs.append(result)
        return outs, latencies


def _writable(array: np.ndarray) -> np.ndarray:
    """The array itself when torch can share its memory (writable, C-contiguous), else a copy
    (stacked requests read straight from the messages' bytes are read-only)."""
    if array.flags.writeable and array.flags.c_contiguous:
        return array
    return np.array(array, copy=True, order="C")


def choose_device(providers: Sequence[str] | None = None) -> str:
    """``cuda`` when torch sees a device and ``providers`` (onnxruntime's names, ``[replay]
    providers``) is empty or lists CUDAExecutionProvider; else ``cpu``."""
    import torch

    wanted = not providers or "CUDAExecutionProvider" in providers
    return "cuda" if wanted and torch.cuda.is_available() else "cpu"


def _meta_io(entries, where: str) -> dict[str, IOMeta]:
    out = {}
    for entry in entries or []:
        name, dtype = entry["name"], np.dtype(entry["dtype"])
        if dtype not in _ONNX_TYPE:
            raise TorchModelError(f"{where}: {name}: dtype {dtype} is none a mirrored tensor carries")
        shape = [d if isinstance(d, int) else None for d in entry.get("shape", [None])]
        out[name] = IOMeta(name, _ONNX_TYPE[dtype], shape)
    return out


def _script_io(module, meta: dict, path: Path):
    where = f"{path} {METADATA}"
    inputs = _meta_io(meta.get("inputs"), where)
    args = [a.name for a in module.forward.schema.arguments][1:]  # without self
    if list(inputs) != args:
        raise TorchModelError(f"{where}: inputs {list(inputs)}, but forward takes {args}; declare forward's arguments "
                              "in order")
    outputs = _meta_io(meta.get("outputs"), where)
    if not outputs:
        raise TorchModelError(f"{where}: no outputs declared; name what forward returns")
    returns = str(module.forward.schema.returns[0].type)
    kind = "dict" if returns.startswith("Dict") else ("tuple" if returns.startswith("Tuple") else "tensor")
    if kind == "tensor" and len(outputs) != 1:
        raise TorchModelError(f"{where}: forward returns one tensor; declare one output")
    return inputs, outputs, kind


def _export_io(program, meta: dict):
    import torch

    sig = program.graph_signature
    nodes = {n.name: n for n in program.graph.nodes}
    inputs = {}
    for name in sig.user_inputs:
        val = nodes[name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise TorchModelError(f"input {name!r} is not a tensor; shadowlens feeds tensors")
        inputs[name] = IOMeta(name, _onnx_type(val.dtype), _shape(val.shape))
    out_node = next(n for n in program.graph.nodes if n.op == "output")
    vals = [a.meta.get("val") for a in out_node.args[0]]
    spec = program.call_spec.out_spec
    declared = [d["name"] for d in (meta.get("outputs") or [])]
    if spec is not None and spec.type is dict:
        names, kind = [str(k) for k in spec.context], "dict"
    elif spec is not None and spec.type in (tuple, list):
        names, kind = declared or [f"output_{i}" for i in range(len(vals))], "tuple"
    else:
        names, kind = declared or ["output"], "tensor"
    if len(names) != len(vals):
        raise TorchModelError(f"{METADATA}: {len(names)} output names for {len(vals)} outputs")
    outputs = {}
    for name, val in zip(names, vals, strict=True):
        if isinstance(val, torch.Tensor):
            outputs[name] = IOMeta(name, _onnx_type(val.dtype), _shape(val.shape))
        else:
            outputs[name] = IOMeta(name, type(val).__name__, [])
    return inputs, outputs, kind


def _onnx_type(dtype) -> str:
    import torch

    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype if dtype != torch.bfloat16 else None
    return _ONNX_TYPE.get(np_dtype, f"tensor({str(dtype).removeprefix('torch.')})")


def _shape(shape) -> list:
    return [int(d) if isinstance(d, int) else None for d in shape]
