"""What the replay stage hands the judge stage over Kafka: columnar diff batches and progress.

Two record types travel on the internal diffs topic, told apart by the ``shadowlens-type`` header:

- ``diffs``: one :class:`DiffBatch`, every diff row of one micro-batch for one (model, candidate)
  pair, column by column. The record key is the pair, so one pair's batches land on one partition
  in order and one judge owns the pair. Many rows per record: the per-record cost of Kafka and of
  decoding is paid once per micro-batch, not per request.
- ``progress``: one :class:`Progress`, how far a replay process has read each mirror partition
  it owns (position, high watermark, latest ``sent_at``). It is sent to *every* partition of the
  diffs topic after the diff batches it covers were acknowledged, so a judge that reads a
  progress record on partition j has already been offered every diff row that partition gets from
  below that position. That is what lets the judge close windows on the minimum watermark over
  all mirror partitions, whichever replay process read them.

Wire format of a diff batch (versioned by a magic): ``b"SLD1" + u32 header length + JSON header +
raw little-endian column buffers``. Strings and attribute maps are in the JSON header; numbers are
numpy buffers, so encoding and decoding are a few memcpys per column. The header's ``columns``
lists the buffers that follow as ``[name, dtype]`` pairs, in order; a batch without it (written
before the list existed) carries exactly ``LEGACY_LAYOUT``. Columns a batch lacks decode as zeros,
columns a decoder does not know are skipped.

The candidate's output kind (scorers/kinds) travels as the header's ``kind`` (absent: an older
writer, ``"classification"``), and the kind's own per-request metrics as ``metrics``: a list of
``[name, "<f8"]`` whose buffers follow the numeric columns, in order (absent: no metrics). The
gated columns keep their names whatever the kind (streams/replay/columns.py says what each holds).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import msgspec
import numpy as np

MAGIC = b"SLD1"
TYPE_HEADER = "shadowlens-type"

# Numeric columns and their wire dtypes (little-endian).
NUMERIC = {
    "sent_ms": "<i8",
    "baseline_label": "<i4",
    "candidate_label": "<i4",
    "label_flip": "|u1",
    "confidence_delta": "<f8",
    "l1": "<f8",
    "linf": "<f8",
    "hellinger": "<f8",
    "topk_overlap": "<f8",
    "baseline_confidence": "<f8",
    "candidate_confidence": "<f8",
    "baseline_latency_ms": "<f8",
    "candidate_latency_ms": "<f8",
    "label": "<f8",  # NaN: no label
    "reference_latency_ms": "<f8",  # the replayed baseline's latency on the same request; NaN or 0: none
    "source_partition": "<i4",
    "source_offset": "<i8",
    # Cluster keys (scorers/clusters.py), so the judge can tell dependent requests from independent
    # ones (0: unknown).
    # input_hash: 64-bit fingerprint of the request's decoded inputs (names, dtypes, row shapes,
    # bytes), the same for every candidate and request id; never 0 for a replayed request.
    "input_hash": "<u8",
    # sample_hash: 64-bit hash of the record's explicit sample_key (never the Kafka message key);
    # 0 when the request came without one.
    "sample_hash": "<u8",
    # id_hash: streams.judge.recent_ids.id_hashes of request_id, made once per request by the replay
    # stage (which scales out) rather than per candidate by the judge; 0: not sent (the judge makes it).
    "id_hash": "<u8",
}
# What a batch written before the header listed its columns carries, in this order.
LEGACY_LAYOUT = tuple((name, NUMERIC[name]) for name in (
    "sent_ms", "baseline_label", "candidate_label", "label_flip", "confidence_delta", "l1", "linf", "hellinger",
    "topk_overlap", "baseline_confidence", "candidate_confidence", "baseline_latency_ms", "candidate_latency_ms",
    "label", "source_partition", "source_offset",
))  # fmt: skip
STRINGS = ("request_id", "baseline_version", "error")
METRIC_DTYPE = "<f8"  # every kind metric travels as little-endian float64


@dataclass
class DiffBatch:
    """Diff rows of one (model, candidate) pair, as columns. ``error[i] == ""`` when row i scored."""

    model: str
    candidate: str
    scored_ms: int
    columns: dict[str, np.ndarray]
    request_id: list[str]
    baseline_version: list[str]
    error: list[str]
    attributes: list[dict[str, str]]
    top_k: int = 3
    # Requests routed to this candidate in the micro-batch, dead letters included (sample-ratio
    # check), and the highest mirror offset per partition among them (redelivery check): a batch
    # whose rows were all dead-lettered still says which messages it stands for.
    routed: int = 0
    covers: dict[int, int] = field(default_factory=dict)
    # Requests routed to the candidate that could not be compared, by dead-letter error type
    # (streams.replay.blame.UNSCORABLE: "baseline_mismatch", "baseline_invalid", "input_dtype", "adapter",
    # "non_finite_input", "invalid_tensor"): the payload's or the config's fault, not the candidate's.
    unscorable: dict[str, int] = field(default_factory=dict)
    unscorable_ms: list[int] = field(default_factory=list)  # their sent_at: their windows open and close
    # Rows of this batch whose inputs the candidate's cast policy cast to the model's dtypes, by what
    # was cast (e.g. {"pixels float64->float32": 250}); each row counts once. Like ``unscorable``,
    # per batch: ``concat`` leaves it to the caller.
    cast: dict[str, int] = field(default_factory=dict)
    # The candidate's output kind (scorers.kinds) and its own per-request metrics (float64, NaN on
    # error), name -> (n,) array: the diff rows' typed ``metrics`` map beside the common columns.
    kind: str = "classification"
    metrics: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.request_id)

    @property
    def key(self) -> bytes:
        return f"{self.model}/{self.candidate}".encode()

    def take(self, index: np.ndarray | list[int]) -> DiffBatch:
        idx = np.asarray(index, dtype=np.int64)
        pick = idx.tolist()
        return DiffBatch(
            self.model, self.candidate, self.scored_ms, {k: v[idx] for k, v in self.columns.items()},
            [self.request_id[i] for i in pick], [self.baseline_version[i] for i in pick],
            [self.error[i] for i in pick], [self.attributes[i] for i in pick], self.top_k, self.routed,
            dict(self.covers), dict(self.unscorable), list(self.unscorable_ms), dict(self.cast), self.kind,
            {k: v[idx] for k, v in self.metrics.items()},
        )  # fmt: skip

    @classmethod
    def concat(cls, parts: list[DiffBatch]) -> DiffBatch:
        """The rows of several batches of one pair, in order, as one batch; ``routed`` summed,
        ``covers``, the unscorable counts and ``cast`` left to the caller. The replay core joins a
        candidate's groups with it; the judge counts a call's batches of a pair at once (the
        accumulators merge exactly, so one update on the concatenation equals one per batch)."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return DiffBatch(
            first.model, first.candidate, parts[-1].scored_ms,
            {k: np.concatenate([p.columns[k] for p in parts]) for k in first.columns},
            [r for p in parts for r in p.request_id], [v for p in parts for v in p.baseline_version],
            [e for p in parts for e in p.error], [a for p in parts for a in p.attributes], first.top_k,
            sum(p.routed for p in parts), kind=first.kind, metrics=_concat_metrics(parts),
        )  # fmt: skip

    def encode(self, shared: dict | None = None) -> bytes:
        """The batch's bytes. ``shared``: a dict kept over the encoding of one micro-batch's batches,
        whose candidates share their request lists (streams/replay/core.py): each list is then
        written as JSON once and reused (``msgspec.Raw``: the same bytes)."""
        header = {
            "model": self.model, "candidate": self.candidate, "scored_ms": self.scored_ms, "n": len(self),
            "top_k": self.top_k, "request_id": _json_once(self.request_id, shared),
            "baseline_version": _json_once(self.baseline_version, shared),
            "error": self.error, "attributes": _json_once(self.attributes, shared), "routed": self.routed,
            "covers": {str(p): o for p, o in self.covers.items()}, "unscorable": self.unscorable,
            "unscorable_ms": self.unscorable_ms, "cast": self.cast,
            "columns": [[name, dt] for name, dt in NUMERIC.items()],
        }  # fmt: skip
        if self.kind != "classification":
            header["kind"] = self.kind
        if self.metrics:
            header["metrics"] = [[name, METRIC_DTYPE] for name in self.metrics]
        head = msgspec.json.encode(header)  # the same JSON as json.dumps (ints, strings), ~9x faster
        buffers = [np.ascontiguousarray(self.columns[name], dtype=dt).tobytes() for name, dt in NUMERIC.items()]
        buffers += [np.ascontiguousarray(v, dtype=METRIC_DTYPE).tobytes() for v in self.metrics.values()]
        return b"".join([MAGIC, struct.pack("<I", len(head)), head, *buffers])

    @classmethod
    def decode(cls, raw: bytes) -> DiffBatch:
        if raw[:4] != MAGIC:
            raise ValueError(f"not a shadowlens diff batch (magic {raw[:4]!r}, want {MAGIC!r})")
        (head_len,) = struct.unpack_from("<I", raw, 4)
        header = msgspec.json.decode(raw[8 : 8 + head_len])
        n = int(header["n"])
        offset = 8 + head_len
        layout = header.get("columns")
        layout = LEGACY_LAYOUT if layout is None else [(str(name), str(dt)) for name, dt in layout]
        columns = {}
        for name, dt in layout:
            dtype = np.dtype(dt)
            if dtype.kind not in "biuf":
                raise ValueError(f"diff batch column {name!r}: dtype {dt!r} is not numeric")
            if name in NUMERIC:
                want = np.dtype(NUMERIC[name]).newbyteorder("=")
                columns[name] = np.frombuffer(raw, dtype=dtype, count=n, offset=offset).astype(want)
            offset += n * dtype.itemsize
        for name, dt in NUMERIC.items():  # a column the writer did not have yet: 0 (unknown)
            if name not in columns:
                columns[name] = np.zeros(n, dtype=np.dtype(dt).newbyteorder("="))
        metrics = {}
        for name, dt in header.get("metrics") or []:
            dtype = np.dtype(str(dt))
            if dtype.kind != "f":
                raise ValueError(f"diff batch metric {name!r}: dtype {dt!r} is not a float")
            metrics[str(name)] = np.frombuffer(raw, dtype=dtype, count=n, offset=offset).astype(np.float64)
            offset += n * dtype.itemsize
        if offset != len(raw):
            raise ValueError(f"diff batch of {len(raw)} bytes, expected {offset}")
        return cls(
            header["model"], header["candidate"], int(header["scored_ms"]), columns, header["request_id"],
            header["baseline_version"], header["error"], header["attributes"], int(header.get("top_k", 3)),
            int(header.get("routed", n)), {int(p): int(o) for p, o in header.get("covers", {}).items()},
            {str(k): int(v) for k, v in header.get("unscorable", {}).items()},
            [int(t) for t in header.get("unscorable_ms", [])],
            {str(k): int(v) for k, v in header.get("cast", {}).items()},
            str(header.get("kind", "classification")), metrics,
        )  # fmt: skip


def _json_once(values: list, shared: dict | None):
    """``values`` as it is (no ``shared``), or its JSON, encoded once per list object. The cache
    holds the list itself, so its id cannot be reused by another list while the cache lives."""
    if shared is None:
        return values
    hit = shared.get(id(values))
    if hit is None:
        hit = shared[id(values)] = (values, msgspec.Raw(msgspec.json.encode(values)))
    return hit[1]


def _concat_metrics(parts: list[DiffBatch]) -> dict[str, np.ndarray]:
    """The parts' metrics, row for row; a name some part lacks is NaN in its rows (a pair's parts
    come from one kind, so in practice every part has the same names)."""
    names = list(dict.fromkeys(name for p in parts for name in p.metrics))
    return {name: np.concatenate([p.metrics.get(name, np.full(len(p), np.nan)) for p in parts]) for name in names}


def empty_columns(n: int) -> dict[str, np.ndarray]:
    cols = {name: np.zeros(n, dtype=np.dtype(dt).newbyteorder("=")) for name, dt in NUMERIC.items()}
    cols["reference_latency_ms"][:] = np.nan
    return cols


@dataclass
class PartitionProgress:
    """How far one mirror partition has been read and handed over by a replay process."""

    position: int  # next offset to read: everything below is handed over (diff rows or dead letters)
    highwater: int  # the partition's end offset when last fetched (-1 unknown)
    max_sent_ms: int  # latest sent_at among handed-over messages (0 none yet)
    advanced_wall: float  # wall time the position last moved

    @property
    def caught_up(self) -> bool:
        return self.highwater >= 0 and self.position >= self.highwater


@dataclass
class Progress:
    """A replay process's report for the mirror partitions it owns."""

    replica: str
    mirror_partitions: int  # how many partitions the mirror topic has
    wall: float  # when the report was made
    partitions: dict[int, PartitionProgress] = field(default_factory=dict)
    # Since when this process reaches the broker without interruption (0: since it started). After
    # a broker outage, producers flush what they buffered: "drained" means nothing until they could.
    reachable_since: float = 0.0

    def encode(self) -> bytes:
        return json.dumps({
            "replica": self.replica, "mirror_partitions": self.mirror_partitions, "wall": self.wall,
            "reachable_since": self.reachable_since,
            "partitions": {str(p): [v.position, v.highwater, v.max_sent_ms, v.advanced_wall]
                           for p, v in self.partitions.items()},
        }).encode()  # fmt: skip

    @classmethod
    def decode(cls, raw: bytes) -> Progress:
        d = json.loads(raw)
        parts = {int(p): PartitionProgress(int(a), int(b), int(c), float(w)) for p, (a, b, c, w) in d["partitions"].items()}
        return cls(d["replica"], int(d["mirror_partitions"]), float(d["wall"]), parts,
                   float(d.get("reachable_since", 0.0)))
