"""publish on the caller's side, without a broker: sampling, checks, strictness, the bounded
buffer, counters, Prometheus export, and behaviour when Kafka cannot be reached."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from mirror import MirrorClient, MirrorConfig, MirrorError, ModelSignature, Sampler, sample_position
from mirror.core import MirrorCore
from mirror.logs import RateLimitedLog

X = np.zeros((1, 4), np.float32)
Y = np.zeros((1, 3), np.float32)
UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: connection refused at once


def core(**settings) -> MirrorCore:
    return MirrorCore(MirrorConfig(bootstrap_servers=UNREACHABLE, **settings))


# ---------------------------------------------------------------- sampling --

def test_sampling_is_deterministic_per_key_and_close_to_the_rate():
    sampler = Sampler(default_rate=1.0, rates={"digits": 0.1})
    keys = [f"user-{i}" for i in range(20_000)]
    first = [sampler.keep("digits", k) for k in keys]
    assert first == [Sampler(rates={"digits": 0.1}).keep("digits", k) for k in keys]  # same in every process
    assert 0.09 < sum(first) / len(keys) < 0.11
    assert all(sampler.keep("other", k) for k in keys[:100])  # default rate 1.0


def test_sampling_rates_nest_so_raising_the_rate_only_adds_keys():
    keys = [f"k{i}" for i in range(5_000)]
    low = {k for k in keys if Sampler(rates={"m": 0.2}).keep("m", k)}
    high = {k for k in keys if Sampler(rates={"m": 0.5}).keep("m", k)}
    assert low <= high
    assert all((sample_position("m", k) < 0.2) == (k in low) for k in keys)


def test_rate_zero_and_bad_rates():
    assert not any(Sampler(default_rate=0.0).keep("m", f"k{i}") for i in range(1000))
    with pytest.raises(MirrorError, match="sample_rates.m"):
        Sampler(rates={"m": 1.5})


def test_sample_key_keeps_one_user_in_or_out_across_requests():
    c = core(sample_rates={"digits": 0.5})
    outcomes = {user: {c.publish(f"req-{user}-{i}", "digits", "v1", X, Y, 1.0, sample_key=user) for i in range(20)}
                for user in (f"u{j}" for j in range(50))}
    assert all(len(o) == 1 for o in outcomes.values())
    assert {True, False} == set().union(*outcomes.values())
    stats = c.stats()
    assert stats.accepted + stats.sampled_out == 1000


# ------------------------------------------------------------------ checks --

BAD_CALLS = [
    ("inputs.x", dict(inputs={"x": np.zeros(3, dtype=np.complex64)})),
    ("inputs.x", dict(inputs={"x": np.array(["a", "b"], dtype=object)})),
    ("inputs.x", dict(inputs={"x": [[1, 2], [3]]})),  # ragged list
    ("inputs", dict(inputs={})),
    ("outputs.y", dict(outputs={"y": np.zeros(2, dtype="datetime64[s]")})),
    ("latency_ms", dict(latency_ms=float("nan"))),
    ("latency_ms", dict(latency_ms=-1.0)),
    ("latency_ms", dict(latency_ms="fast")),
    ("request_id", dict(request_id="")),
    ("request_id", dict(request_id="r" * 257)),
    ("model", dict(model="")),
    ("version", dict(version=None)),
    ("label", dict(label=float("inf"))),
    ("attributes", dict(attributes=["country", "de"])),
]


def _call(c, **overrides):
    args = dict(request_id="r1", model="digits", version="v1", inputs={"x": X}, outputs={"y": Y},
                latency_ms=1.0, attributes=None, label=None)
    args.update(overrides)
    return c.publish(args.pop("request_id"), args.pop("model"), args.pop("version"), args.pop("inputs"),
                     args.pop("outputs"), args.pop("latency_ms"), args.pop("attributes"), label=args.pop("label"))


@pytest.mark.parametrize(("field", "overrides"), BAD_CALLS, ids=[f for f, _ in BAD_CALLS])
def test_strict_mode_raises_naming_the_field(field, overrides):
    with pytest.raises(MirrorError) as info:
        _call(core(strict=True), **overrides)
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")


@pytest.mark.parametrize(("field", "overrides"), BAD_CALLS, ids=[f for f, _ in BAD_CALLS])
def test_lenient_mode_counts_and_never_raises(field, overrides, caplog):
    c = core(strict=False)
    with caplog.at_level(logging.WARNING, "shadowlens.mirror"):
        assert _call(c, **overrides) is False
    stats = c.stats()
    assert stats.failed_by_reason["invalid"] == 1 and stats.accepted == 0
    assert field in caplog.text


def test_strict_is_the_documented_environment_switch(monkeypatch):
    monkeypatch.setenv("SHADOWLENS_MIRROR_STRICT", "1")
    assert MirrorConfig().strict is True
    monkeypatch.setenv("SHADOWLENS_MIRROR_STRICT", "0")
    assert MirrorConfig().strict is False


def test_lists_bare_arrays_and_attributes_are_accepted():
    c = core(strict=True)
    assert c.publish("r1", "digits", "v1", [[0.1, 0.2]], {"probs": [0.3, 0.7]}, 2, {"n": 3})
    record = c.buffer[0]
    assert set(record.inputs) == {"input"} and record.inputs["input"].dtype == np.float64
    assert record.outputs["probs"].shape == (2,)


def test_signature_checks_dtype_shape_and_names_and_casts_lists():
    sig = ModelSignature.of(inputs={"x": ("float32", (None, 4))}, outputs={"y": "float32"})
    c = core(strict=True, signatures={"digits": sig})
    assert c.publish("r1", "digits", "v1", {"x": [[1, 2, 3, 4]]}, {"y": Y}, 1.0)
    assert c.buffer[0].inputs["x"].dtype == np.float32  # the list was read as the declared dtype
    with pytest.raises(MirrorError, match=r"inputs.x: dtype is float64, the signature says float32"):
        c.publish("r2", "digits", "v1", {"x": np.zeros((1, 4))}, {"y": Y}, 1.0)
    with pytest.raises(MirrorError, match=r"inputs.x: shape is \(1, 5\), the signature says \('\*', 4\)"):
        c.publish("r3", "digits", "v1", {"x": np.zeros((1, 5), np.float32)}, {"y": Y}, 1.0)
    with pytest.raises(MirrorError, match=r"outputs.z: is not in the model's signature"):
        c.publish("r4", "digits", "v1", {"x": X}, {"z": Y}, 1.0)
    with pytest.raises(MirrorError, match=r"inputs.other: is not in the model's signature"):
        c.publish("r5", "digits", "v1", {"other": X}, {"y": Y}, 1.0)
    two = core(strict=True, signatures={"m": ModelSignature.of(inputs={"a": "float32", "b": "float32"}, outputs={})})
    with pytest.raises(MirrorError, match=r"inputs.b: is missing"):
        two.publish("r6", "m", "v1", {"a": X}, {"y": Y}, 1.0)


def test_copy_arrays_snapshots_what_the_caller_reuses():
    buf = np.zeros(3, np.float32)
    c = core(copy_arrays=True)
    c.publish("r1", "m", "v", {"x": buf}, {"y": buf}, 1.0)
    buf[:] = 7
    assert c.buffer[0].inputs["x"].tolist() == [0, 0, 0]


# ------------------------------------------------------------------ buffer --

def test_full_buffer_drops_new_records_and_counts_them():
    c = core(buffer_size=3)
    results = [c.publish(f"r{i}", "m", "v", X, Y, 1.0) for i in range(5)]
    assert results == [True, True, True, False, False]
    stats = c.stats()
    assert (stats.accepted, stats.dropped, stats.buffer_depth) == (3, 2, 3)
    assert [r.request_id for r in c.buffer] == ["r0", "r1", "r2"]  # the oldest are kept, in order


def test_client_with_broker_down_never_waits_and_counts_drops():
    with MirrorClient(bootstrap_servers=UNREACHABLE, buffer_size=100, close_timeout_s=0.5) as client:
        results = [client.publish(f"r{i}", "m", "v", {"x": X}, {"y": Y}, 1.0) for i in range(2_000)]
        stats = client.stats()
        # Beyond the 100-record buffer every call was refused at once (False) instead of waiting.
        assert results.count(False) >= 1_900
        assert stats.dropped >= 1_900 and stats.published == 0 and not stats.connected
    final = client.close()  # second close: no-op
    # dropped: what publish refused; what it took and the dead broker never got is lost to the shutdown.
    assert final.dropped == 2_000 - final.accepted and final.failed_by_reason["shutdown"] == final.accepted
    assert final.buffer_depth == 0


@pytest.mark.timeout(30)  # a close that ignored its deadline would hang here
def test_close_respects_its_deadline_when_kafka_is_down():
    client = MirrorClient(bootstrap_servers=UNREACHABLE)
    for i in range(10):
        client.publish(f"r{i}", "m", "v", X, Y, 1.0)
    stats = client.close(timeout=1.0)  # gives the buffered records up instead of waiting for Kafka
    assert stats.failed_by_reason["shutdown"] == 10 and stats.dropped == 0
    assert client.publish("late", "m", "v", X, Y, 1.0) is False and client.stats().dropped == 1  # closed


# ------------------------------------------------------------ observability --

def test_prometheus_export_in_a_caller_registry_with_unique_client_labels():
    registry = CollectorRegistry()
    a = MirrorClient(bootstrap_servers=UNREACHABLE, registry=registry, client_id="svc", close_timeout_s=0.2)
    b = MirrorClient(bootstrap_servers=UNREACHABLE, registry=registry, client_id="svc", close_timeout_s=0.2,
                     default_sample_rate=0.0)
    try:
        a.publish("r1", "m", "v", X, Y, 1.0)
        b.publish("r1", "m", "v", X, Y, 1.0)
        text = generate_latest(registry).decode()
        assert 'shadowlens_mirror_accepted_total{client="svc"} 1.0' in text
        assert 'shadowlens_mirror_sampled_out_total{client="svc-2"} 1.0' in text
        assert 'shadowlens_mirror_failed_total{client="svc",reason="invalid"} 0.0' in text
        assert "shadowlens_mirror_buffer_depth" in text and "shadowlens_mirror_dropped_total" in text
        assert a.prometheus_text() == b.prometheus_text() or "svc-2" in a.prometheus_text().decode()
    finally:
        a.close()
        b.close()


def test_private_registry_by_default():
    c = MirrorClient(bootstrap_servers=UNREACHABLE, close_timeout_s=0.2)
    try:
        assert b'shadowlens_mirror_published_total{client="shadowlens-mirror"} 0.0' in c.prometheus_text()
    finally:
        c.close()


def test_rate_limited_log_holds_back_repeats(caplog):
    log = RateLimitedLog(interval_s=0.2)
    with caplog.at_level(logging.WARNING, "shadowlens.mirror"):
        assert log.warning("k", "broker down %d", 1)
        assert not any(log.warning("k", "broker down %d", i) for i in range(100))
        assert log.warning("other", "another problem")
        time.sleep(0.25)
        assert log.warning("k", "broker down %d", 2)
    assert len(caplog.records) == 3
    assert "100 similar messages suppressed" in caplog.records[-1].getMessage()


def test_bad_configuration_raises_at_construction():
    with pytest.raises(MirrorError, match="compression"):
        MirrorConfig(compression="brotli")
    with pytest.raises(MirrorError, match="buffer_size"):
        MirrorConfig(buffer_size=0)
