"""The replay core's whole-batch front (streams/replay/routing.py) and the caches of its hot path:
what the micro-batch code computes over columns equals what reading the messages one by one gives.

Real messages (the demo's traffic and hand-made poison), real models, the real decoders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from schemas import MAX_MESSAGE_BYTES, Tensor
from schemas.decode import Rejection, decode_for_replay
from schemas.fast_path import parse_plain_request
from streams.config import load_settings
from streams.demo import V1_TO_V2_ADAPTER, TrafficGenerator
from streams.replay.core import Inbound, ReplayCore, _letter
from streams.replay.routing import covers, route
from streams.replay.stacking import groups_by_signature


@pytest.fixture(scope="module")
def traffic(models) -> list[bytes]:
    return TrafficGenerator(models["baseline"], rate_per_s=200).messages(300)


def _core(models) -> ReplayCore:
    candidates = [
        {"name": "digits-v2", "model": "digits", "path": str(models["good"]), "adapter": V1_TO_V2_ADAPTER},
        {"name": "digits-v1-replay", "model": "digits", "path": str(models["baseline"]), "noise_reference": True},
    ]  # fmt: skip
    return ReplayCore(load_settings(overrides={"candidates": candidates}))


def _poison(traffic: list[bytes]) -> list:
    """Values the fast path declines, each for another reason: pydantic's path decides them."""
    doc = json.loads(traffic[0])
    listed = {**doc, "inputs": {"pixels": {**doc["inputs"]["pixels"], "data": Tensor.model_validate(
        doc["inputs"]["pixels"]).to_array().tolist()}}}  # fmt: skip
    return [None, b"", b"{not json", bytearray(traffic[1]), memoryview(traffic[2]), traffic[3].decode(),
            json.dumps(listed).encode(), json.dumps({**doc, "model": "unknown-model"}).encode(),
            json.dumps({**doc, "sent_at": "2026-11-27 04:50:13Z"}).encode(), b" " * (MAX_MESSAGE_BYTES + 1)]


def test_route_reads_every_message_as_decode_for_replay_does(models, traffic):
    values = traffic[:40] + _poison(traffic)
    messages = [Inbound(v, i % 3, 100 + i, "mirror") for i, v in enumerate(values)]
    by_model, letters, max_sent = route(messages, {"digits"}.__contains__, _letter)
    expected_letters, expected_sent, routed = [], {}, []
    for msg in messages:
        decoded = decode_for_replay(msg.value)
        if isinstance(decoded, Rejection):
            expected_letters.append((msg.offset, decoded.error_type))
            continue
        expected_sent[msg.partition] = max(decoded.sent_ms, expected_sent.get(msg.partition, 0))
        if decoded.model != "digits":
            expected_letters.append((msg.offset, "unknown_model"))
            continue
        routed.append((msg.offset, decoded.request_id, decoded.sent_ms))
    assert [(x.offset, x.error_type) for x in letters] == expected_letters
    assert {"oversized", "tombstone", "invalid_json", "unknown_model"} <= {x.error_type for x in letters}
    assert max_sent == expected_sent
    assert [(msg.offset, ev.request_id, ev.sent_ms) for ev, msg in by_model["digits"]] == routed
    assert len(routed) == 40 + 5  # the bytearray, memoryview, str, list-data and ' '-separated forms are valid


def test_covers_is_the_highest_offset_per_partition(traffic):
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 300):
        items = [(None, Inbound(b"", int(p), int(o))) for p, o in zip(rng.integers(0, 4, n), rng.integers(0, 10**9, n))]
        naive: dict[int, int] = {}
        for _, msg in items:
            naive[msg.partition] = max(msg.offset, naive.get(msg.partition, -1))
        assert covers(items) == naive
    assert covers([]) == {}


def test_inputs_in_another_key_order_or_row_form_share_a_group():
    def request(i: int, order: list[str], flat: bool) -> bytes:
        arrays = {"a": np.full(4 if flat else (1, 4), i, np.float32), "b": np.full((1, 2), i, np.int64)}
        return json.dumps({"request_id": f"r{i}", "model": "m", "baseline_version": "v1",
                           "sent_at": "2026-11-27T04:50:13Z", "baseline_latency_ms": 1.0,
                           "inputs": {k: Tensor.from_array(arrays[k]).model_dump() for k in order},
                           "baseline_output": {"p": Tensor.from_array(np.ones(3)).model_dump()}}).encode()  # fmt: skip

    forms = [(["a", "b"], False), (["b", "a"], True), (["a", "b"], True), (["b", "a"], False)]
    events = [(parse_plain_request(request(i, o, f)), i) for i, (o, f) in enumerate(forms)]
    events.append((parse_plain_request(request(9, ["a"], False)), 9))  # another signature: its own group
    groups = groups_by_signature(events)
    assert [[i for _, i in g] for g in groups] == [[0, 1, 2, 3], [9]]


def test_a_cached_tensor_form_does_not_let_a_wrong_length_through(traffic):
    doc = json.loads(traffic[0])
    assert parse_plain_request(traffic[0]) is not None  # (dtype, shape, byte length) now known good
    short = {**doc, "inputs": {"pixels": {**doc["inputs"]["pixels"], "data": doc["inputs"]["pixels"]["data"][:-8]}}}
    raw = json.dumps(short).encode()
    assert parse_plain_request(raw) is None
    assert isinstance(decode_for_replay(raw), Rejection)


def test_reference_latency_pairs_rows_by_request(models, traffic):
    """The noise reference's latency reaches every candidate's rows of the same request, whether the
    rows line up (the usual batch) or a request is missing from the candidate's rows."""
    core = _core(models)
    for start in (None, {0: 50}):  # {0: 50}: the candidate scores offsets from 50 only (a registry candidate)
        if start is not None:
            core.candidates["digits"][0].start = start
        out = core.replay([Inbound(v, 0, i, "mirror") for i, v in enumerate(traffic[:200])])
        ref = next(b for b in out.batches if b.candidate == "digits-v1-replay")
        cand = next(b for b in out.batches if b.candidate == "digits-v2")
        assert len(cand) == (200 if start is None else 150) and len(ref) == 200
        lat = dict(zip(ref.request_id, ref.columns["candidate_latency_ms"].tolist(), strict=True))
        want = np.array([lat[r] for r in cand.request_id])
        assert np.isfinite(want).any()
        assert np.array_equal(cand.columns["reference_latency_ms"], want, equal_nan=True)
