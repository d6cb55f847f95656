"""``shadowlens doctor``: check a config against the real things before any traffic counts.

A newcomer's first worker used to fail late and loudly: a candidate output the model lacks, a
file that is not ONNX, a producer whose tensors do not fit the model, a port or a chDB folder
taken. The doctor checks each of them and prints one row per check (✓, ✗ with the fix, or – for
"nothing to check yet"); ``startup_checks`` runs the static ones when a worker starts, before a
topic, a consumer or a database is created, so a mistake there is one line and exit code 2.

Here: the models (loaded by the worker's own ``Candidate.load``, which refuses an output that is
no probability vector), the API and metrics ports, the database. streams/doctor/traffic.py: the
topics, and a sample of the mirror topic's records through the real replay core, read without
consuming them.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import socket
from collections import defaultdict
from dataclasses import dataclass

from streams.config import ConfigError, Settings

OK, FAIL, INFO = "ok", "fail", "info"
MARKS = {OK: ("✓", "green"), FAIL: ("✗", "red"), INFO: ("–", "yellow")}


@dataclass
class Check:
    what: str
    status: str  # OK, FAIL or INFO
    detail: str
    fix: str = ""

    def line(self) -> str:
        """The check as one operator line: the cause, then the fix."""
        return f"{self.detail}; {self.fix}" if self.fix else self.detail


def run_doctor(settings: Settings, sample: int = 200, role: str = "all") -> list[Check]:
    """Every check, in the order an operator fixes things: files, local resources, Kafka, traffic."""
    _quiet_clients()
    checks: list[Check] = []
    candidates: dict[str, list] = {}
    if role in ("replay", "all"):
        candidates, model_checks = load_candidates(settings)
        checks += [kind_fix(cfg, c) for cfg, c in zip(settings.candidates, model_checks, strict=True)]
    checks += port_checks(settings, role)
    if role in ("judge", "all"):
        checks.append(database_check(settings))
    from streams.doctor.traffic import kafka_checks

    checks += asyncio.run(kafka_checks(settings, candidates if role != "judge" else None, sample))
    if role in ("replay", "all"):  # what the registry holds beside the config (issue #23)
        from streams.doctor.registry import registry_checks

        checks += asyncio.run(registry_checks(settings))
    return checks


def startup_checks(settings: Settings, role: str) -> dict[str, list] | None:
    """What a worker checks before it creates anything: the chDB path is free and writable (judge),
    every candidate loads with its output (replay). Raises one-line errors (ConfigError,
    streams.sink.SinkUnavailable); returns the loaded candidates by model for ``ReplayCore``."""
    from streams.sink import SinkUnavailable

    if role in ("judge", "all"):
        from streams.sink import chdb_path, data_path_in_use, resolve_dsn

        path = chdb_path(resolve_dsn(settings.clickhouse.dsn))
        if path is not None and (in_use := data_path_in_use(path)) is not None:
            raise in_use  # the same line as opening it would give, before Kafka is touched
        check = database_check(settings, reach=False)  # a server is waited for, not refused
        if check.status == FAIL:
            raise SinkUnavailable(check.line())
    if role not in ("replay", "all"):
        return None
    candidates, checks = load_candidates(settings)
    failed = [c for c in checks if c.status == FAIL]
    if failed:
        more = f" ({len(failed) - 1} more candidate(s) fail too; `shadowlens doctor` lists them)"
        raise ConfigError(failed[0].line() + (more if len(failed) > 1 else ""))
    return candidates


# -- models ------------------------------------------------------------------------------------
def load_candidates(settings: Settings) -> tuple[dict[str, list], list[Check]]:
    """Each candidate through ``Candidate.load`` (the worker's own loader and output check)."""
    from streams.replay.core import Candidate

    loaded: dict[str, list] = defaultdict(list)
    checks = []
    for cfg in settings.candidates:
        what = f"model {cfg.model}/{cfg.name}"
        try:
            cand = Candidate.load(cfg, settings.replay.providers)
        except Exception as exc:
            if not (isinstance(exc, ValueError) or _from_onnxruntime(exc)):
                raise  # not the file's or the config's fault: a bug, with its traceback
            checks.append(Check(what, FAIL, *model_failure(cfg, exc)))
            continue
        loaded[cfg.model].append(cand)
        session = cand.runner.session
        outputs = {o.name: o for o in session.get_outputs()}
        inputs = ", ".join(_describe_io(i) for i in session.get_inputs())
        checks.append(Check(what, OK, f"{cfg.path.name} loads ({cand.runner.providers[0]}): inputs {inputs}; "
                                      f"output {_describe_io(outputs[cfg.output])}"))  # fmt: skip
    return dict(loaded), checks


def model_failure(cfg, exc: BaseException) -> tuple[str, str]:
    """(cause, fix) for a candidate that does not load."""
    if _from_onnxruntime(exc):  # onnxruntime's own exception, not turned into a refusal by Candidate.load
        cause, fix = file_problem(cfg.path, exc)
        return f"candidates.{cfg.name}.path: {cause}", fix
    # Candidate.load's own refusal (streams.replay.blame.CandidateRefused): one line, its fix included
    text = _first_line(exc) or type(exc).__name__
    return text, (f"set candidates.{cfg.name}.output to one of them" if "is not an output of" in text else "")


def kind_fix(cfg, check: Check) -> Check:
    """The doctor's row for a classification candidate refused for an output of numbers that are no
    probabilities: it names the output kind that compares them (the worker's start-up line keeps
    the refusal's own fix)."""
    if (check.status == FAIL and not check.fix and cfg.kind == "classification"
            and "not a probability vector" in check.detail and "float tensor" in check.detail):  # fmt: skip
        check.fix = (f"if the model predicts numbers, set candidates.{cfg.name}.kind = \"regression\" (or "
                     "multilabel, ranking, embedding: README, Output kinds)")
    return check


def file_problem(path, exc: BaseException) -> tuple[str, str]:
    """(cause, fix) for a file onnxruntime cannot load."""
    text = _first_line(exc)
    detail = text.split("failed:", 1)[-1].strip() if "failed:" in text else text
    if "INVALID_PROTOBUF" in text or "Protobuf parsing failed" in text:
        return (f"{path} is not an ONNX model (onnxruntime: {detail})",
                "point it at the .onnx file exported from the model (skl2onnx, torch.onnx.export, tf2onnx)")
    if "NO_SUCHFILE" in text or "doesn't exist" in text:
        return f"{path}: no such file", "build the model or fix the path"
    import onnxruntime

    return (f"onnxruntime {onnxruntime.__version__} cannot load {path} ({_clip(detail, 240)})",
            "re-export it with an opset this onnxruntime supports, or upgrade onnxruntime")


def onnx_load_problem(exc: BaseException) -> str | None:
    """One line (cause; fix) for onnxruntime's failure to load a file, or None for any other
    exception (``shadowlens init`` on a .npy). The file is the one onnxruntime names."""
    if not _from_onnxruntime(exc):
        return None
    found = re.search(r"Load model from (.+?) failed", _first_line(exc))
    cause, fix = file_problem(found.group(1) if found else "the model file", exc)
    return f"{cause}; {fix}"


def _from_onnxruntime(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("onnxruntime")


def _describe_io(arg) -> str:
    shape = ",".join("?" if not isinstance(d, int) else str(d) for d in (arg.shape or []))
    return f"{arg.name} {_ORT_TYPES.get(arg.type, arg.type)}[{shape}]"


_ORT_TYPES = {f"tensor({k})": v for k, v in {"float": "float32", "double": "float64", "float16": "float16",
              "int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8",
              "bool": "bool", "string": "string"}.items()}  # fmt: skip


# -- local resources -----------------------------------------------------------------------------
def port_checks(settings: Settings, role: str = "all") -> list[Check]:
    checks = []
    api, metrics = settings.api, settings.metrics
    if api.enabled and role in ("judge", "all"):
        checks.append(_port_check("API port", api.host, api.port, "set [api] port (env SHADOWLENS_API__PORT) to a "
                                  "free port, or stop the process that uses it (a worker already running?)"))
    if metrics.enabled:
        if metrics.port == 0:
            checks.append(Check("metrics port", OK, f"{metrics.host}: any free port (0), logged at start"))
        else:
            checks.append(_port_check("metrics port", metrics.host, metrics.port, "set [metrics] port (env "
                                      "SHADOWLENS_METRICS__PORT) to a free port, 0 for any, or stop the process that "
                                      "uses it; several replay processes on one box: worker --processes N"))
    return checks


def port_free(host: str, port: int) -> OSError | None:
    """None when a server could listen on host:port now (bound as the worker binds, then released)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc
    return None


def _port_check(what: str, host: str, port: int, fix: str) -> Check:
    exc = port_free(host, port)
    if exc is None:
        return Check(what, OK, f"{host}:{port} is free")
    return Check(what, FAIL, f"{host}:{port} is not available ({exc.strerror or exc})", fix)


def database_check(settings: Settings, reach: bool = True) -> Check:
    """chDB: the path is held by no other process and can be written. A server: it answers
    (``reach``), as clickhouse-connect connects, without the worker's retries."""
    from streams.sink import _chdb_holder, _explain_open_failure, chdb_path, resolve_dsn

    dsn = resolve_dsn(settings.clickhouse.dsn)
    path = chdb_path(dsn)
    if path is not None:
        holder = _chdb_holder(path)
        if holder is not None:
            return Check("chDB path", FAIL, f"{path} is in use by process {holder} (a worker?); chDB allows one "
                         "process per data path", "stop that process, query through its API (shadowlens query "
                         "does), or use a ClickHouse server (an http:// DSN) to share the data")  # fmt: skip
        existing = path
        while not os.path.exists(existing):
            existing = os.path.dirname(existing) or "."
        if not os.access(existing, os.W_OK):
            return Check("chDB path", FAIL, f"cannot write {existing} (no permission) to keep chDB data at {path}",
                         "set [clickhouse] dsn (env SHADOWLENS_CLICKHOUSE_DSN) to a writable folder")  # fmt: skip
        state = "free" if os.path.isdir(path) else "will be created at worker start"
        return Check("chDB path", OK, f"{path}: {state}")
    where = dsn.split("@")[-1]
    if not reach:
        return Check("ClickHouse", OK, f"{where} (reached at start; an outage is waited out)")
    import clickhouse_connect

    try:
        client = clickhouse_connect.get_client(dsn=dsn, connect_timeout=5, send_receive_timeout=10)
        version = client.server_version
        client.close()
    except Exception as exc:  # noqa: BLE001 - translated into one line
        return Check("ClickHouse", FAIL, _first_line(_explain_open_failure(dsn, None, exc)))
    return Check("ClickHouse", OK, f"{where} answers (server {version})")


# -- output ------------------------------------------------------------------------------------
def render(checks: list[Check], console=None) -> None:
    """A table of the checks; off a terminal each row stays on one line (logs, grep)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for col in ("", "check", "result"):
        table.add_column(col, overflow="fold")
    for c in checks:
        mark, colour = MARKS[c.status]
        result = Text(c.detail)
        if c.fix:
            result.append(" → fix: ", style="bold").append(c.fix)
        table.add_row(Text(mark, style=colour), c.what, result)
    if console.is_terminal:
        console.print(table)
    else:  # logs and grep: a row per line, never wrapped into the next, no padding after it
        wide = Console(width=100_000, file=io.StringIO(), color_system=None)
        wide.print(table)
        console.out("\n".join(line.rstrip() for line in wide.file.getvalue().splitlines()), highlight=False)
    failed = sum(c.status == FAIL for c in checks)
    if failed:
        console.print(f"{failed} problem(s): fix the ✗ rows and run doctor again", style="red", highlight=False)
    else:
        console.print("all checks passed", style="green", highlight=False)


def _quiet_clients() -> None:
    # aiokafka logs each failed connection at ERROR and urllib3 each retry at WARNING; a check says
    # the cause once, in its row. The replay core's dead-letter warnings are the rows themselves.
    for name, level in (("aiokafka", logging.CRITICAL), ("urllib3", logging.ERROR),
                        ("clickhouse_connect", logging.CRITICAL), ("shadowlens.replay", logging.ERROR)):  # fmt: skip
        logging.getLogger(name).setLevel(level)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:(") + " …"
