"""Retiring a pair's verdict: how an operator clears a rollback (``shadowlens verdicts retire``).

A rollback never expires (streams/api/board.py), so something explicit must end it once the candidate
is gone or fixed. Retiring writes one more row to ClickHouse's ``verdicts`` table: a hold with
state ``retired``, the decision it replaces in ``last_decision`` and the evidence it rested on, its
first reason naming who retired it and why. It is newer than the rollback, so every reader
(a worker's board after a restart, a standalone API, the notebook) serves it instead; if the
candidate stays configured and its traffic flows, the judge's next verdict is newer still and
replaces it: retiring clears what is known, it does not silence new evidence.

Where the row goes: with an ``http://`` DSN straight into ClickHouse (standalone APIs read it at
their next refresh, a judge serving its own API within ``[api] refresh_s``); with a chDB path a
running process holds (a worker, or a standalone ``shadowlens api``), through that process's API
(``POST /v1/verdicts/{model}/{candidate}/retire``, always behind a token), found by
``<chdb path>.api.json`` as ``shadowlens query`` finds it: the process inserts the row and
publishes it to the board it serves, so gates see it on their next poll.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from datetime import UTC, datetime

from schemas import Verdict


class NothingToRetire(LookupError):
    """No verdict is stored for the pair: a 404, or a one-line error."""


class RetireFailed(RuntimeError):
    """The retirement was not written; the message is one line naming the cause and the fix."""


def who() -> str:
    """``user@host`` of the operator running the command, for the retired row's reason."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container with an arbitrary uid)
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def retirement(previous: Verdict, reason: str, by: str, now: datetime | None = None) -> Verdict:
    """The row that retires ``previous``: its evidence kept, its decision in ``last_decision``."""
    now = now or datetime.now(UTC)
    decided = previous.last_decision if previous.state == "retired" else previous.verdict
    first = (f"Hold: retired by {by} at {now.isoformat(timespec='seconds')}: {reason.strip() or 'no reason given'}. "
             f"The last decision was {decided}; a newer verdict from the judge (the candidate configured and its "
             "traffic scored) replaces this one.")  # fmt: skip
    earlier = previous.reasons[1:] if previous.state == "retired" else previous.reasons
    return previous.model_copy(update={
        "verdict": "hold", "state": "retired", "last_decision": decided, "reasons": [first, *earlier],
        "updated_at": now, "age_s": None, "requests_needed": None,
    })  # fmt: skip


def retire_pair(sink, model: str, candidate: str, reason: str, by: str, board=None) -> Verdict:
    """Write the retirement of the pair's latest stored verdict; publish it to ``board`` (the one
    this process serves) when given. Raises ``NothingToRetire``."""
    previous = sink.latest_verdict(model, candidate)
    if previous is None:
        raise NothingToRetire(f"no verdict is stored for {model}/{candidate}, so there is nothing to retire; check "
                              f"--model and --candidate (GET /v1/verdicts?all=true lists every pair)")  # fmt: skip
    row = retirement(previous, reason, by)
    sink.insert_verdicts([row])
    if board is not None:
        board.publish([row])
    return row


def retire(settings, model: str, candidate: str, reason: str, by: str, token: str | None) -> tuple[Verdict, str]:
    """The CLI's retirement: (the row written, how it went). Raises ``RetireFailed``."""
    from streams.sink import ClickHouseSink, DataPathInUse, SinkUnavailable, chdb_path, resolve_dsn

    ch = settings.clickhouse
    dsn = resolve_dsn(ch.dsn)
    try:
        sink = ClickHouseSink(dsn, ch.database, create=False)
    except DataPathInUse as exc:
        token = token or (settings.api.tokens[0] if settings.api.tokens else None)
        return _through_api(f"{chdb_path(dsn).rstrip('/')}.api.json", exc, model, candidate, reason, by, token)
    except SinkUnavailable as exc:
        raise RetireFailed(str(exc)) from exc
    path = chdb_path(dsn)
    where = f"the chDB data at /{path.lstrip('/')}" if path is not None else f"ClickHouse at {dsn.split('@')[-1]}"
    try:
        return retire_pair(sink, model, candidate, reason, by), f"written to {where}"
    except NothingToRetire as exc:
        raise RetireFailed(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - the database's first line is what helps
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise RetireFailed(f"cannot write the retirement to {where}: {first}") from exc
    finally:
        sink.close()


def _through_api(sidecar: str, locked: BaseException, model: str, candidate: str, reason: str, by: str,
                 token: str | None) -> tuple[Verdict, str]:  # fmt: skip
    import httpx

    try:
        with open(sidecar) as f:
            url = json.load(f)["url"]
    except (OSError, ValueError, KeyError):
        raise RetireFailed(f"{locked}; that process serves no API to retire through (no {sidecar}): enable its "
                           "[api], or stop it and run this command again") from None  # fmt: skip
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(f"{url}/v1/verdicts/{model}/{candidate}/retire", json={"reason": reason, "by": by},
                              headers=headers, timeout=30)  # fmt: skip
    except httpx.HTTPError as exc:
        raise RetireFailed(f"the process holding the chDB data serves its API at {url}, but it did not answer "
                           f"({exc}); is it still starting?") from None  # fmt: skip
    if response.status_code == 200:
        return Verdict.model_validate_json(response.content), f"through the API at {url}"
    try:
        detail = str(response.json().get("detail", response.text))
    except ValueError:
        detail = response.text
    if response.status_code == 401:
        raise RetireFailed(f"the API at {url} refused the token: pass one of its [api] tokens with --token or "
                           "SHADOWLENS_API_TOKEN (the config's own [api] tokens are used when set)")  # fmt: skip
    raise RetireFailed(f"the API at {url} did not retire {model}/{candidate} ({response.status_code}): "
                       f"{detail.splitlines()[0] if detail else ''}")
