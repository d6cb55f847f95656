"""Blame is exact: who is at fault when a request cannot be compared. The rules, in one place:

1. **A candidate error is only what the candidate does wrong on valid input**: an exception raised
   by the candidate's own ``session.run``, or an answer that is not a probability vector (NaN or
   infinity, negative values, a row not summing to 1; with ``from_logits``, non-finite logits),
   for a request whose inputs and baseline output are valid. It is a diff row carrying the error,
   counted in ``error_rate`` (critical: it rolls back).

2. **What the producer sent wrong is a dead letter**, never a candidate error. Its ``error_type``
   says what, its reason names the producer's field and the fix, and it counts in the pair's
   ``unscorable`` (``UNSCORABLE``): past ``max_missing_fraction`` of the traffic the verdict
   holds with blocking metric ``comparable``, so a producer's or an operator's mistake never rolls
   a candidate back.

   - ``non_finite_input``: NaN or infinity in an input tensor (for every candidate of the model);
   - ``invalid_tensor``: an input tensor carrying several rows (a mirrored request carries one);
   - ``adapter``: the request does not fit the candidate's adapter (an input it renames is
     missing) or the model's declared input shapes (letter for that candidate, ``candidate``
     names it; the other candidates still score the request);
   - ``input_dtype``: an input's dtype is not the one the model declares
     (``session.get_inputs()[i].type``) and the cast policy (rule 3) does not allow the cast, or
     the allowed cast cannot hold its values (a float beyond float32's range, an integer out of
     int32's range): numbers are never wrapped or turned into infinity;
   - ``baseline_mismatch``: ``baseline_output`` lacks the configured output, or holds another
     number of values than the candidate's output;
   - ``baseline_invalid``: the configured baseline output is not a probability vector: NaN or
     infinity, negative values, a row not summing to 1 within 1e-3, a single value outside
     [0, 1] (with ``from_logits = true``: NaN or infinity only).

   Messages that are no valid request at all (``tombstone``, ``oversized``, ``invalid_json``,
   ``too_deep``, ``invalid_schema``, ``invalid_tensor`` found while decoding,
   ``unknown_model``) are dead letters that belong to no pair: in the dead-letter metrics, in no
   verdict.

3. **A dtype that the cast policy allows is cast, and counted** (``DiffBatch.cast``, per pair:
   how many compared requests had which inputs cast). ``candidates.<name>.cast`` takes numpy's
   casting rules (``numpy.can_cast``); the adapter's explicit ``cast`` is applied before it:

   - ``"no"``: the dtype must be the model's exactly;
   - ``"safe"``: only casts that numpy calls value-preserving: to a wider type of the same kind
     (float16 -> float32 -> float64; int8 -> int16 -> int32 -> int64; uint8 -> uint16 ...;
     an unsigned integer to a wider signed one), bool to any number, an integer to a float
     whose mantissa holds it (int8/int16/uint8/uint16 -> float32; up to int32/uint32 -> float64;
     numpy also counts int64/uint64 -> float64 as safe, which rounds above 2**53). float64 ->
     float32 is not safe;
   - ``"same_kind"`` (the default): ``"safe"`` plus the casts within a kind that may round or
     overflow: float64 -> float32 (numpy's default float64 into a float32 model), float to a
     narrower float, int64 -> int32 and any integer to a narrower integer of the same
     signedness, an unsigned integer to a signed one, and any integer to any float (int64 ->
     float32 rounds above 2**24). Never a float to an integer, a number to bool, or a signed
     integer to an unsigned one. A value the cast cannot hold is an ``input_dtype`` dead letter.

4. **What the operator configured wrong is refused at start-up**, in one line (``CandidateRefused``,
   a ``ConfigError``: ``shadowlens worker`` prints it and exits with status 2), before anything
   is judged:

   - an ``output`` the model does not have (a file onnxruntime cannot load is refused by the
     worker's start-up checks, streams/doctor/checks.py);
   - an ``output`` that is not a probability vector for a classification candidate (the default kind). A
     float tensor of several values per row (probabilities, or logits with
     ``from_logits = true``) or a ZipMap output (skl2onnx's default ``output_probability``, read
     as the probabilities of the sorted classes) is one; a label tensor (int64, strings) is not,
     nor is a single float per row (a regressor's ``[None, 1]``) unless it comes from a Sigmoid
     (a binary classifier's positive-class probability) or ``from_logits = true`` says it is a
     binary classifier's logit;
   - a model input of a type no mirrored tensor carries (strings, bfloat16, sequences);
   - an adapter ``cast`` to a dtype the model's input does not take that the policy cannot cast.

**Output kinds** (``candidates.<name>.kind``, scorers/kinds): the probability-vector rules above are
classification's. For another kind, a candidate error is an answer its kind cannot compare (NaN or
infinity, another number of values than the baseline's, what the kind's own checks refuse);
``baseline_invalid`` is a baseline answer with NaN or infinity or one the kind's
``baseline_problems`` refuses (a multi-label probability outside [0, 1], an all-zero embedding);
and rule 4 refuses only an output that is no numeric tensor (a ZipMap, string labels).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from schemas import SUPPORTED_DTYPES
from scorers.diffs import PROB_NEGATIVE_TOLERANCE, PROB_SUM_TOLERANCE
from streams.config import CandidateConfig, ConfigError
from streams.replay.runner import ONNX_DTYPES, OnnxRunner, is_zipmap

# Dead letters that are the producer's (or the operator's) fault for a known pair: counted per pair
# in ``unscorable`` (data sufficiency), never as candidate errors.
UNSCORABLE = ("non_finite_input", "invalid_tensor", "adapter", "input_dtype", "baseline_mismatch", "baseline_invalid")
CAST_POLICIES = ("no", "safe", "same_kind")
# Ops that pass a tensor's values through unchanged: a Sigmoid behind them still feeds the output.
_PASS_THROUGH = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast", "CastLike", "Transpose", "Slice",
                 "Expand"}  # fmt: skip


class CandidateRefused(ConfigError):
    """A candidate that cannot be judged as configured; the message is one line: field, what, fix."""


# -- rule 4: refusals at start-up -------------------------------------------------------------------
def refusal(cfg: CandidateConfig, runner: OnnxRunner) -> str | None:
    """Why this candidate cannot be judged as configured (one line), or None."""
    where = f"candidates.{cfg.name}"
    if cfg.output not in runner.outputs:
        return f"{where}.output: {cfg.output!r} is not an output of {cfg.path} (it has {runner.output_names})"
    for name, meta in runner.inputs.items():
        if runner.input_dtypes[name] is None:
            return (f"{where}.path: {cfg.path} takes input {name!r} as {meta.type}; mirrored requests carry "
                    f"numeric tensors only ({', '.join(SUPPORTED_DTYPES)}), so shadowlens cannot replay this model")
    for name, dtype in cfg.adapter.cast.items():
        want = runner.input_dtypes.get(name)
        if want is not None and not np.can_cast(np.dtype(dtype), want, casting=cfg.cast):
            return (f"{where}.adapter.cast.{name}: {dtype}, but the model's input {name!r} takes {want} and "
                    f"{where}.cast = {cfg.cast!r} does not cast {dtype} to {want}; cast to {want}")
    return output_problem(cfg, runner) if cfg.kind == "classification" else kind_output_problem(cfg, runner)


def kind_output_problem(cfg: CandidateConfig, runner: OnnxRunner) -> str | None:
    """Why the configured output cannot be compared as the candidate's (non-classification) kind:
    every other kind compares numbers per request, so the output must be a numeric tensor, not a
    ZipMap or a tensor of class labels (strings)."""
    meta = runner.outputs[cfg.output]
    numeric = meta.type.startswith("tensor(") and "string" not in meta.type
    if numeric:
        return None
    return (f"candidates.{cfg.name}.output: {cfg.output!r} is a {meta.type} value, not numbers per request: kind "
            f"{cfg.kind!r} compares numeric tensors; set output to the model's numeric output")


def output_problem(cfg: CandidateConfig, runner: OnnxRunner) -> str | None:
    """Why the configured output is not a probability vector (one line naming it and the fix), or None."""
    meta = runner.outputs[cfg.output]
    if is_zipmap(meta.type):
        return None
    shape = _shape_text(meta.shape)
    element = meta.type[len("tensor("):-1] if meta.type.startswith("tensor(") else meta.type
    head = f"candidates.{cfg.name}.output: {cfg.output!r} is a {shape} {element} " + (
        "tensor" if meta.type.startswith("tensor(") else "value")
    fix = ("set output to the classifier's probabilities, e.g. skl2onnx's output_probability ('probabilities' when "
           "exported with zipmap=False), or to its logits with from_logits = true; or, for a model that is no "
           "classifier, its kind, e.g. kind = \"regression\"")
    dtype = ONNX_DTYPES.get(meta.type)
    floats = dtype.kind == "f" if dtype is not None else meta.type.startswith("tensor(") and "float" in meta.type
    if not floats:
        what = "class labels" if (dtype is not None or "string" in meta.type) else "not numbers per class"
        return f"{head} ({what}), not a probability vector, and kind is 'classification' ({fix})"
    dims = list(meta.shape) if isinstance(meta.shape, list | tuple) else []
    if not dims:
        return f"{head}, not a probability vector per request, and kind is 'classification' ({fix})"
    single = len(dims) == 1 or (len(dims) == 2 and dims[-1] == 1)
    if single and not cfg.from_logits and not _fed_by_sigmoid(cfg.path, cfg.output):
        return (f"{head}, not a probability vector, and kind is 'classification' ({fix}; one value per "
                "request is a binary classifier's probability only when a Sigmoid computes it)")
    return None


def _shape_text(shape) -> str:
    if not isinstance(shape, list | tuple):
        return "[?]"
    return "[" + ", ".join(str(d) if isinstance(d, int) else "None" for d in shape) + "]"


def _fed_by_sigmoid(path, output: str) -> bool:
    """Whether a Sigmoid computes ``output`` (through ops that pass values through unchanged)."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - onnxruntime read it; what it computes then cannot be told: trust the config
        return True
    producer = {out: node for node in graph.node for out in node.output}
    name = output
    for _ in range(64):
        node = producer.get(name)
        if node is None:
            return False
        if node.op_type in ("Sigmoid", "HardSigmoid"):
            return True
        if node.op_type not in _PASS_THROUGH or not node.input:
            return False
        name = node.input[0]
    return False


# -- rule 3: the cast policy ------------------------------------------------------------------------
@dataclass
class Conformed:
    """A group's model inputs in the dtypes the model takes, or why they cannot be."""

    feeds: dict[str, np.ndarray]
    refused: str = ""  # the group's dtypes cannot be fed (its requests share them): reason, else ""
    bad_rows: dict[int, str] = field(default_factory=dict)  # row -> reason: values the allowed cast cannot hold
    cast: str = ""  # what was cast, e.g. "pixels float64->float32" ("" nothing)


def conform_inputs(feeds: Mapping[str, np.ndarray], cfg: CandidateConfig, dtypes: Mapping[str, np.dtype | None],
                   ) -> Conformed:  # fmt: skip
    """Cast a group's adapted inputs (one row per request along axis 0) to the dtypes the model
    declares, as ``cfg.cast`` allows (see rule 3). Reasons name the producer's field (the name
    before the adapter's rename) and the fix."""
    source = {new: old for old, new in cfg.adapter.rename.items()}
    out = dict(feeds)
    bad: dict[int, str] = {}
    casts = []
    for name, want in dtypes.items():
        array = feeds.get(name)
        if array is None or want is None or array.dtype == want:
            continue
        have, where = array.dtype, f"inputs.{source.get(name, name)}"
        if not np.can_cast(have, want, casting=cfg.cast):
            return Conformed(dict(feeds), refused=_dtype_reason(cfg, where, name, have, want))
        with np.errstate(over="ignore", invalid="ignore"):  # what does not fit is found below, per row
            cast = array.astype(want)
        for i in np.flatnonzero(_not_held(array, cast)).tolist():
            bad.setdefault(i, f"{where}: values of this {have} request do not fit the model's {want} input "
                              f"{name!r} (the {cfg.cast!r} cast would {'overflow' if want.kind == 'f' else 'wrap'}); "
                              f"the producer must send values a {want} holds")  # fmt: skip
        out[name] = cast
        casts.append(f"{source.get(name, name)} {have}->{want}")
    return Conformed(out, "", bad, ", ".join(casts))


def _dtype_reason(cfg: CandidateConfig, where: str, name: str, have: np.dtype, want: np.dtype) -> str:
    where_cfg = f"candidates.{cfg.name}"
    other = ""
    if cfg.cast != "same_kind" and np.can_cast(have, want, casting="same_kind"):
        other = f", or {where_cfg}.cast = \"same_kind\""
    return (f"{where}: {have}, but the model's input {name!r} takes {want} and {where_cfg}.cast = {cfg.cast!r} does "
            f"not cast {have} to {want}; the producer should send {want} (array.astype('{want}') before "
            f"publishing), or set {where_cfg}.adapter.cast = {{ {name} = \"{want}\" }}{other}")


def _not_held(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Per row: the cast lost a value's magnitude (a finite float became infinite, an integer out of range)."""
    n = before.shape[0]
    b, a = before.reshape(n, -1), after.reshape(n, -1)
    if a.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            return (~np.isfinite(a) & np.isfinite(b.astype(np.float64, copy=False))).any(axis=1)
    if a.dtype.kind in "iu" and b.dtype.kind in "iu":
        info = np.iinfo(a.dtype)
        return ((b < info.min) | (b > info.max)).any(axis=1)
    return np.zeros(n, dtype=bool)


# -- rule 2: the baseline output ------------------------------------------------------------------
def baseline_check_key(cfg: CandidateConfig) -> tuple:
    """What ``baseline_problems`` depends on besides the rows: candidates that share it share the check."""
    return cfg.kind, cfg.from_logits, tuple(sorted((k, repr(v)) for k, v in cfg.kind_params.items()))


def baseline_problems(rows: np.ndarray, cfg: CandidateConfig, skip: Mapping[int, object] | None = None,
                      ) -> dict[int, str]:  # fmt: skip
    """Row -> what is wrong with the candidate's baseline output (a ``baseline_invalid`` letter's
    reason without the fix, see ``baseline_invalid_reason``). Classification: no probability vector
    (no finite logits with ``from_logits``); another kind: NaN or infinity, and what the kind's own
    ``baseline_problems`` refuses. Rows in ``skip`` (already dead letters, NaN-filled) are not
    looked at. The same for every candidate with the same ``baseline_check_key``: once a group."""
    if cfg.kind == "classification":
        return _probability_problems(rows, cfg.baseline_output, cfg.from_logits, skip)
    out = _probability_problems(rows, cfg.baseline_output, True, skip)  # True: the finiteness check only
    where = f"baseline_output.{cfg.baseline_output}"
    for i, text in cfg.output_kind().baseline_problems(rows).items():
        if i not in out and i not in (skip or {}):
            out[i] = text if text.startswith(where) else f"{where}: {text}"
    return out


def _probability_problems(rows: np.ndarray, name: str, from_logits: bool, skip: Mapping[int, object] | None = None,
                          ) -> dict[int, str]:  # fmt: skip
    n = rows.shape[0]
    out: dict[int, str] = {}
    if not n or not rows.shape[1]:
        return out
    skip = skip or {}
    where = f"baseline_output.{name}"
    finite = np.isfinite(rows).all(axis=1)
    if skip:
        finite[list(skip)] = True  # their NaN fill is not the producer's
    for i in np.flatnonzero(~finite).tolist():
        bad = int(rows.shape[1] - np.count_nonzero(np.isfinite(rows[i])))
        out[i] = f"{where}: {bad} of {rows.shape[1]} values are NaN or infinite"
    if from_logits:
        return out
    with np.errstate(invalid="ignore"):
        if rows.shape[1] == 1:
            p = rows[:, 0]
            wrong = finite & ((p < -PROB_NEGATIVE_TOLERANCE) | (p > 1 + PROB_NEGATIVE_TOLERANCE))
            texts = {i: f"{where}: {p[i]:.4g} is outside [0, 1], not a probability"
                     for i in np.flatnonzero(wrong).tolist()}  # fmt: skip
        else:
            neg = finite & (rows < -PROB_NEGATIVE_TOLERANCE).any(axis=1)
            sums = rows.sum(axis=1)
            off = finite & ~neg & (np.abs(sums - 1.0) > PROB_SUM_TOLERANCE)
            texts = {i: f"{where}: negative values (smallest {rows[i].min():.4g}), not a probability vector"
                     for i in np.flatnonzero(neg).tolist()}  # fmt: skip
            texts.update({i: f"{where}: values sum to {sums[i]:.4g}, not 1: not a probability vector"
                          for i in np.flatnonzero(off).tolist()})  # fmt: skip
    for i, text in texts.items():
        if i not in skip:
            out[i] = text
    return out


def baseline_invalid_reason(problem: str, cfg: CandidateConfig) -> str:
    """A ``baseline_invalid`` letter's reason: the problem and the fix."""
    if cfg.kind != "classification":
        return (f"{problem}; the producer must send the baseline's own {cfg.kind} output, or fix "
                f"candidates.{cfg.name}.baseline_output (or its kind)")  # fmt: skip
    if cfg.from_logits:
        return (f"{problem}; the producer must send the baseline's finite logits, or fix "
                f"candidates.{cfg.name}.baseline_output")  # fmt: skip
    return (f"{problem}; the producer must send the baseline's probabilities, or fix candidates.{cfg.name}."
            "baseline_output (from_logits = true when the baseline and the candidate both answer logits)")
