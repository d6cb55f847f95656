"""The doctor's Kafka checks: the worker's topics, and a sample of real traffic through the replay core.

The sample is the last records of each mirror partition, read by a consumer that belongs to no
group (``group_id=None``): it has no committed offsets to move, so the worker started afterwards
still replays every record. The records go through the real ``ReplayCore.replay`` (decoding,
adapter, input checks and casts, the candidate's session, the baseline comparison); its dead
letters (streams/replay/blame.py says whose fault each kind is) and candidate errors are reported per
candidate and reason, with the reason's own text and the fix.

Output kinds (scorers/kinds): a classification candidate whose sampled baseline outputs are no
probabilities (negative values, values outside [0, 1], rows not summing to 1) is most likely a
model of another kind configured like the README's classifier: the row says so and names the
setting (``kind = "regression"``), instead of leaving the operator to find out from a held verdict.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter, defaultdict

from streams.config import Settings
from streams.doctor.checks import FAIL, INFO, OK, Check, _clip, _first_line

SAMPLE_WAIT_S = 10.0  # a few hundred records take well under a second from a reachable broker

# The fix for each kind of dead letter, for the candidate ({name}) or the producer.
_PRODUCER = "the producer must send MirroredRequests (the mirror SDK does; schemas/mirrored_request.v1.schema.json)"
FIXES = {
    "adapter": "map the producer's inputs onto the model's with candidates.{name}.adapter (rename, cast, scale), "
               "or have the producer send what the model takes",
    "input_dtype": "add the cast the reason names to candidates.{name}.adapter, allow it with candidates.{name}.cast, "
                   "or have the producer send the model's dtype",
    "baseline_mismatch": "the producer must send baseline_output[{baseline!r}] as the baseline's probability vector, "
                         "or set candidates.{name}.baseline_output to the entry it sends",
    "baseline_invalid": "the producer's baseline_output[{baseline!r}] must be the baseline's probabilities (or logits "
                        "with candidates.{name}.from_logits = true)",
    "non_finite_input": "the producer sends NaN or infinite inputs: fix its data (the worker dead-letters them too)",
    "unknown_model": "the producers' MirroredRequest.model must match a [[candidates]] model",
    "replay_failed": "the model raised on these inputs: check the reason, the model's export and the adapter",
    "candidate_error": "the candidate fails on valid input (its verdict counts it in error_rate): check its export",
}  # fmt: skip
# Reasons (streams/replay/blame.py, scorers/diffs.py) that say an answer is numbers but no probabilities.
NOT_PROBABILITIES = ("negative values", "not a probability", "probabilities are negative", "probabilities sum to")
KIND_HINT = ("baseline outputs are not probabilities: set candidates.{name}.kind = \"regression\" if the model "
             "predicts numbers (or multilabel, ranking, embedding: README, Output kinds)")


def kind_hint(cfg, reason: str) -> str | None:
    """The fix for a classification candidate whose compared outputs are numbers but no probabilities."""
    if cfg.kind == "classification" and not cfg.from_logits and any(t in reason for t in NOT_PROBABILITIES):
        return KIND_HINT.format(name=cfg.name)
    return None


# -- Kafka: topics and a sample of the traffic ---------------------------------------------------
def _topics(settings: Settings) -> list[tuple[str, int, str, str]]:
    k = settings.kafka
    return [(k.topic, k.partitions, "mirror", "partitions"), (k.dead_letter_topic, k.partitions, "dead letters",
            "partitions"), (k.diffs_topic, k.diffs_partitions, "diffs", "diffs_partitions"),
            (k.changelog_topic, k.diffs_partitions, "changelog", "diffs_partitions")]  # fmt: skip


async def kafka_checks(settings: Settings, candidates: dict | None, sample: int) -> list[Check]:
    from aiokafka.admin import AIOKafkaAdminClient

    k = settings.kafka
    admin = AIOKafkaAdminClient(bootstrap_servers=k.bootstrap, request_timeout_ms=10000)
    try:
        await asyncio.wait_for(admin.start(), SAMPLE_WAIT_S)
        existing = set(await admin.list_topics())
        present = [t for t, *_ in _topics(settings) if t in existing]
        described = await admin.describe_topics(present) if present else []
    except Exception as exc:  # noqa: BLE001 - unreachable or refusing: one line
        return [Check("Kafka", FAIL, f"no broker answers at {k.bootstrap} ({_first_line(exc) or 'timed out'})",
                      "start one (bash scripts/kafka.sh start) or set [kafka] bootstrap / KAFKA_BOOTSTRAP")]
    finally:
        await admin.close()
    counts = {d["topic"]: len(d["partitions"]) for d in described if d["error_code"] == 0}
    checks = [Check("Kafka", OK, f"broker at {k.bootstrap} answers")]
    for topic, want, role, field in _topics(settings):
        have = counts.get(topic)
        if topic not in existing:
            checks.append(Check(f"{role} topic", OK, f"{topic}: will be created at worker start ({want} partitions)"))
        elif have == want:
            checks.append(Check(f"{role} topic", OK, f"{topic}: {have} partitions"))
        else:
            checks.append(Check(f"{role} topic", FAIL, f"{topic} has {have} partitions, [kafka] {field} says {want}",
                                f"set [kafka] {field} = {have}, or add partitions to the topic "
                                f"(kafka-topics.sh --alter --partitions {want})"))  # fmt: skip
    if candidates is None or sample <= 0:
        return checks
    if k.topic not in existing or not counts.get(k.topic):
        return [*checks, Check("sample", INFO, f"{k.topic} does not exist yet: no records yet; run doctor again once "
                                               "the producer sends")]  # fmt: skip
    messages = await _read_sample(settings, counts[k.topic], sample)
    return checks + sample_checks(settings, candidates, messages, counts[k.topic])


async def _read_sample(settings: Settings, partitions: int, n: int) -> list:
    """The last ``n / partitions`` records of each mirror partition, read without a consumer
    group: nothing is committed, the worker's group still starts where it would have."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.replay.core import Inbound

    k = settings.kafka
    consumer = AIOKafkaConsumer(bootstrap_servers=k.bootstrap, group_id=None, enable_auto_commit=False,
                                isolation_level="read_committed" if k.exactly_once else "read_uncommitted",
                                fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20)  # fmt: skip
    await consumer.start()
    out = []
    try:
        tps = [TopicPartition(k.topic, p) for p in range(partitions)]
        consumer.assign(tps)
        first, end = await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)
        per = max(1, math.ceil(n / partitions))
        for tp in tps:
            consumer.seek(tp, max(first[tp], end[tp] - per))
        pending = {tp for tp in tps if end[tp] > first[tp]}
        deadline = asyncio.get_running_loop().time() + SAMPLE_WAIT_S
        while pending and asyncio.get_running_loop().time() < deadline:
            fetched = await consumer.getmany(*pending, timeout_ms=500)
            for tp, msgs in fetched.items():
                out += [Inbound(m.value, tp.partition, m.offset, tp.topic, m.key) for m in msgs if m.offset < end[tp]]
            pending = {tp for tp in pending if await consumer.position(tp) < end[tp]}
    finally:
        await consumer.stop()
    return out


def sample_checks(settings: Settings, candidates: dict, messages: list, partitions: int) -> list[Check]:
    """The sample through the real ReplayCore: dead letters per candidate and reason, candidate errors."""
    from schemas.decode import Rejection, decode_for_replay
    from streams.replay.core import ReplayCore

    topic, total = settings.kafka.topic, len(messages)
    if not messages:
        return [Check("sample", INFO, f"{topic} holds no records yet; run doctor again once the producer sends")]
    model_of = {}
    for m in messages:
        decoded = decode_for_replay(m.value)
        if not isinstance(decoded, Rejection):
            model_of[(m.partition, m.offset)] = decoded.model
    per_model = Counter(model_of.values())
    out = ReplayCore(settings, candidates).replay(messages)
    checks = [Check("sample", OK, f"read the last {total} records of {partitions} partition(s) of {topic} "
                                  "(no consumer group: nothing consumed or committed)")]  # fmt: skip
    letters = defaultdict(list)  # (model or None, candidate or None, error_type) -> letters
    for letter in out.dead_letters:
        letters[(model_of.get((letter.partition, letter.offset)), letter.candidate, letter.error_type)].append(letter)
    # Records no candidate could take: the producer's, reported once for all candidates.
    configured = {c.model for c in settings.candidates}
    for (model, cand, kind), found in sorted(letters.items(), key=lambda kv: str(kv[0])):
        if cand is not None:
            continue
        if kind == "unknown_model":
            if model not in configured:
                checks.append(Check("sample", INFO, f"{len(found)} of {total} records are for model {model!r}, which "
                                    "no candidate shadows (fine if other workers do)"))  # fmt: skip
            continue  # a configured model whose candidates did not load: said in their rows
        checks.append(Check("sample", FAIL, f"{len(found)} of {total} records dead-lettered as {kind} before any "
                            f"candidate: {_clip(found[0].reason, 400)}", FIXES.get(kind, _PRODUCER)))  # fmt: skip
    errors = {(b.model, b.candidate): [e for e in b.error if e] for b in out.batches}
    rows = {(b.model, b.candidate): len(b) for b in out.batches}  # diff rows: the records it scored
    for cfg in settings.candidates:
        what = f"sample → {cfg.model}/{cfg.name}"
        seen = per_model.get(cfg.model, 0)
        cand = next((c for c in candidates.get(cfg.model, []) if c.config.name == cfg.name), None)
        if cand is None:
            checks.append(Check(what, INFO, "not replayed: the model does not load (above)"))
            continue
        if seen == 0:
            others = ", ".join(f"{m!r} ({n})" for m, n in per_model.most_common(3)) or "none decodes"
            checks.append(Check(what, FAIL, f"none of the {total} records is for model {cfg.model!r} (they are for "
                                f"{others})", f"the producers' MirroredRequest.model must be {cfg.model!r}, or set "
                                f"candidates.{cfg.name}.model to theirs"))  # fmt: skip
            continue
        fix_args = {"name": cfg.name, "baseline": cfg.baseline_output}
        failed = 0
        for (model, name, kind), found in sorted(letters.items(), key=lambda kv: str(kv[0])):
            if model == cfg.model and name == cfg.name:
                failed += len(found)
                fix = FIXES.get(kind, "see the reason; the producer's record or candidates.{name} is at fault")
                fix = (kind == "baseline_invalid" and kind_hint(cfg, found[0].reason)) or fix.format(**fix_args)
                checks.append(Check(what, FAIL, f"{len(found)} of {seen} records dead-lettered as {kind}: "
                                    f"{_clip(found[0].reason, 400)}", fix))  # fmt: skip
        raised = errors.get((cfg.model, cfg.name), [])
        if raised:  # candidate errors: what the model does wrong on valid input (streams/replay/blame.py, rule 1)
            failed += len(raised)
            checks.append(Check(what, FAIL, f"the model failed on {len(raised)} of {seen} records: "
                                f"{_clip(raised[0], 240)}", kind_hint(cfg, raised[0]) or FIXES["candidate_error"]))
        if not failed:  # records refused for every candidate (NaN inputs) are in the rows above
            scored = rows.get((cfg.model, cfg.name), 0)
            checks.append(Check(what, OK, f"{scored} of {seen} records scored: inputs fit, output {cfg.output!r} "
                                          f"compares with baseline_output[{cfg.baseline_output!r}] as {cfg.kind}"))
    return checks
