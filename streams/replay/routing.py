"""A micro-batch's messages decoded and routed to their model, with whole-batch bookkeeping.

The replay core's front (streams/replay/core.py): every message is decoded (``schemas.decode``:
plain requests by the fast path, anything else by pydantic, which names what is wrong), and the
per-partition figures the stage reports (latest ``sent_at``, highest offset routed to a candidate)
are computed once per micro-batch over columns, not updated message by message. A registry
candidate scores only its offsets (``in_range``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from operator import attrgetter, itemgetter

import numpy as np

from schemas import MAX_MESSAGE_BYTES
from schemas.decode import Rejection, decode_for_replay
from schemas.fast_path import parse_plain_request

_SOURCE = attrgetter("partition", "offset")
_MESSAGE = itemgetter(1)


def route(messages: Sequence, known: Callable[[str], bool], letter) -> tuple[dict[str, list], list, dict[int, int]]:
    """(requests by model as ``(decoded, message)`` pairs in arrival order, dead letters of the
    messages that cannot be decoded or name no configured model, latest ``sent_ms`` per mirror
    partition among the decoded). ``letter(message, error_type, reason)`` makes a dead letter."""
    by_model: dict[str, list] = defaultdict(list)
    letters, sent, partitions = [], [], []
    plain = parse_plain_request
    for msg in messages:
        raw = msg.value
        # What decode_for_replay does first for a bytes value within the size limit, without its
        # layers of calls; anything else (and whatever the fast path declines) takes it whole.
        decoded = plain(raw) if type(raw) is bytes and len(raw) <= MAX_MESSAGE_BYTES else None
        if decoded is None:
            decoded = decode_for_replay(raw)
            if isinstance(decoded, Rejection):
                letters.append(letter(msg, decoded.error_type, decoded.reason))
                continue
        sent.append(decoded.sent_ms)
        partitions.append(msg.partition)
        model = decoded.model
        if not known(model):
            reason = f"model: no candidate is configured for {model!r}; add one under [[candidates]]"
            letters.append(letter(msg, "unknown_model", reason))
            continue
        by_model[model].append((decoded, msg))
    return by_model, letters, _max_by(partitions, sent, 0)


def in_range(cand, groups, items, unscorable):
    """The groups, messages and unscorable letters of a micro-batch within the candidate's offsets.
    A filtered group is a new list, so ``_per_group`` computes its shared columns afresh."""
    out = []
    for group, stacked, keys in groups:
        keep = [i for i, (_, msg) in enumerate(group) if cand.scores(msg.partition, msg.offset)]
        if len(keep) == len(group):
            out.append((group, stacked, keys))
        elif keep:
            out.append(([group[i] for i in keep], {k: v[keep] for k, v in stacked.items()}, keys[keep]))
    kept_items = [(ev, msg) for ev, msg in items if cand.scores(msg.partition, msg.offset)]
    kept_letters = [letter for letter in unscorable if cand.scores(letter.partition, letter.offset)]
    return out, kept_items, kept_letters


def covers(items: Sequence) -> dict[int, int]:
    """Highest mirror offset per partition among the messages routed to a candidate."""
    if not items:
        return {}
    partition, offset = zip(*map(_SOURCE, map(_MESSAGE, items)))  # in C: no Python per message
    return _max_by(partition, offset, -1)


def _max_by(keys: Sequence[int], values: Sequence[int], floor: int) -> dict[int, int]:
    """{key: max(floor, largest value with that key)} for parallel sequences, in numpy."""
    if not keys:
        return {}
    k, v = np.asarray(keys, dtype=np.int64), np.asarray(values, dtype=np.int64)
    if k.min() == k.max():  # one partition: the usual fetch of a small consumer
        return {int(k[0]): max(int(v.max()), floor)}
    order = np.lexsort((v, k))  # by key, then value: the last of each key's run is its maximum
    k, v = k[order], v[order]
    last = np.flatnonzero(np.append(k[1:] != k[:-1], True))
    return {p: max(x, floor) for p, x in zip(k[last].tolist(), v[last].tolist(), strict=True)}
