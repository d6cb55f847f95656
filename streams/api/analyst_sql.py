"""Analyst SQL: what a query may touch, decided from the engine's own analysis, run on its own session.

An analyst's query (``POST /v1/query``, ``shadowlens query`` while a worker holds the chDB path,
the notebook) must stay inside shadowlens' tables and must never change how the worker writes.
Two layers, both the engine's, never string matching over the SQL text:

1. **The engine parses and classifies the statement** before it runs. chdb-core's
   ``classify_query`` (the analysis ``chdb.durable`` gates on) counts the statements and says
   whether one is read-only; ``EXPLAIN AST`` (the same parser, also on a ClickHouse server) gives
   the tree, which ``check`` walks: the kind of statement, every table it names (only the
   project's database), every table function (only ``numbers`` with a literal bound and
   ``values``: a subset of ``chdb.agents.safety.SAFE_TABLE_FUNCTIONS``, which also allows
   ``merge``/``loop``/``generateRandom``, able to read other databases or run unbounded), every
   scalar function that reaches outside the data (``file``, dictionaries, introspection, AI
   functions: classified by the engine's own ``system.functions`` categories plus a short list
   of "Other" ones), ``SETTINGS`` clauses, ``INTO OUTFILE``. A refusal is one line naming what
   was refused; nothing is read or executed for a refused query, so no file content can reach an
   error body.
2. **The engine enforces the caps on a session of its own.** chDB applies per-call settings with
   ``SET`` on the client's session and restores them afterwards (clickhouse-connect's chdb
   backend), and ``readonly`` cannot be lowered again: one analyst query sent with
   ``readonly = 2`` through the worker's own client left every later insert failing
   ``READONLY``. The analyst session here is a second client with its own chDB session: its caps
   (rows, bytes, seconds, memory, one thread at nice 19, a read budget in rows a second) are set
   once, then ``readonly = 1`` (not 2: level 1 also refuses any ``SETTINGS`` that would lift a
   cap, and the ``file``/``url`` table functions). Nothing of it reaches the writer's session,
   and it takes no lock the writer or the verdicts API needs: chDB runs the two sessions' queries
   concurrently.

With an ``http://`` DSN the same checks run, the caps travel with every query as settings
(HTTP has no session to leak into), and the server-side guarantee is a read-only ClickHouse user
(README: "A ClickHouse server").
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

from chdb.agents.safety import FALLBACK_KNOWN_TABLE_FUNCTIONS, NETWORK_TABLE_FUNCTIONS, SAFE_TABLE_FUNCTIONS

MAX_ROWS = 10_000
MAX_SECONDS = 10
MAX_RESULT_BYTES = 64 * 1024 * 1024
MAX_MEMORY_BYTES = 2 * 1024 * 1024 * 1024
MAX_NUMBERS = 100_000_000  # numbers(N): a bound keeps a literal table function from running for ever

# The caps, in the order they are set on the analyst session; readonly last (it freezes them).
CAPS: dict[str, Any] = {
    "max_result_rows": MAX_ROWS,
    "result_overflow_mode": "throw",
    "max_result_bytes": MAX_RESULT_BYTES,
    "max_execution_time": MAX_SECONDS,
    "max_memory_usage": MAX_MEMORY_BYTES,
    "max_threads": 1,  # an analyst takes one core at most ...
    # ... and yields it: the query's threads run at nice 19, so on a small box the worker's inserts,
    # replay and API win every contended time slice (bench_api.py --analyst: at nice 0 a 10 s query
    # halved a 2-core worker's drain rate).
    "os_thread_priority": 19,
}

# The analyst's read budget on a chDB session (it shares the worker's process and cores):
# ``max_execution_speed`` makes the engine sleep a query that reads faster than this many rows a
# second, checked from its first block (``timeout_before_checking_execution_speed`` defaults to
# 10 s: as long as the whole query may run). Nice 19 orders the threads, but a busy nice-19 query
# still shares the cores (bench_api.py --analyst before the budget: drain 90 % of alone on 2
# cores); the budget cuts the CPU a scan can take. It meters rows read, not CPU: a query that does much work per row read
# (the bench's arraySum(range(...)): ~0.3 us a row, so ~30 % of a core at 1M rows/s) still
# takes up to budget x its per-row cost; a plain scan (~15 ns a row) a few per cent. A query that
# needs more than budget x 10 s rows is cut at the 10 s cap, one line naming it. [api]
# analyst_rows_per_s sets it (0: no budget, nice 19 and one thread only).
ANALYST_ROWS_PER_S = 1_000_000


def session_caps(rows_per_s: int = ANALYST_ROWS_PER_S) -> dict[str, Any]:
    """The caps of an analyst's chDB session: ``CAPS`` and the read budget (``rows_per_s``; 0: none)."""
    budget = {"max_execution_speed": rows_per_s, "timeout_before_checking_execution_speed": 0} if rows_per_s else {}
    return {**CAPS, **budget}

ALLOWED_TABLE_FUNCTIONS = frozenset({"numbers", "values"})
assert ALLOWED_TABLE_FUNCTIONS <= SAFE_TABLE_FUNCTIONS  # chDB's own list of functions that stay in-process

# Scalar functions that read outside the data: files, other tables' structure, the host. The
# engine's categories cover the rest (BLOCKED_CATEGORIES): its "Other" bucket mixes these with
# harmless ones, so they are named here.
BLOCKED_FUNCTIONS = frozenset({
    "file", "catboostevaluate", "joinget", "joingetornull", "hascolumnintable", "getserversetting", "getmacro",
    "filesystemavailable", "filesystemcapacity", "filesystemunreserved", "hostname", "fqdn", "fullhostname",
    "getoskernelversion", "tcpport", "serveruuid", "displayname", "getclienthttpheader",
})  # fmt: skip
BLOCKED_CATEGORIES = frozenset({"AI", "Dictionary", "Embedded Dictionary", "Introspection"})
IN_FUNCTIONS = frozenset({"in", "notin", "globalin", "globalnotin", "nullin", "notnullin", "globalnullin",
                          "globalnotnullin"})  # fmt: skip
READ_STATEMENTS = {"SelectWithUnionQuery", "DescribeQuery", "ShowTables", "ShowCreateTableQuery"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class QueryRefused(ValueError):
    """The query was refused before it ran, or the engine refused it (a 400): one line."""


@dataclass
class _Node:
    kind: str
    text: str
    children: list[_Node] = field(default_factory=list)
    parent: _Node | None = None


def parse_ast_dump(dump: str) -> _Node:
    """``EXPLAIN AST`` output (one node a line, indented one space per level) as a tree. String
    literals are escaped in the dump, so a value cannot fake a line."""
    root = _Node("(root)", "")
    stack: list[tuple[int, _Node]] = [(-1, root)]
    for line in dump.splitlines():
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip(" "))
        body = re.sub(r" \(children \d+\)$", "", line.strip())
        kind, _, text = body.partition(" ")
        while stack[-1][0] >= depth:
            stack.pop()
        parent = stack[-1][1]
        node = _Node(kind, text, parent=parent)
        parent.children.append(node)
        stack.append((depth, node))
    return root


@dataclass
class Checked:
    """What the engine's analysis says the query is: the statement kind and its FORMAT clause, if any."""

    statement: str
    output_format: str | None


def check(dump: str, database: str, blocked_functions: frozenset[str] = BLOCKED_FUNCTIONS) -> Checked:
    """Walk the ``EXPLAIN AST`` tree of one statement; raise ``QueryRefused`` naming the first thing
    that is not allowed. ``blocked_functions``: lower-case names (``blocked_function_names`` adds
    the engine's categories)."""
    root = parse_ast_dump(dump)
    if len(root.children) != 1:
        raise QueryRefused("refused: send exactly one statement")
    statement = root.children[0]
    if statement.kind not in READ_STATEMENTS:
        raise QueryRefused(f"refused: {statement.kind} statements are not allowed; only SELECT / WITH, DESCRIBE, "
                           f"SHOW TABLES FROM {database} and SHOW CREATE TABLE over {database}' tables")  # fmt: skip
    output_format = None
    if statement.kind == "SelectWithUnionQuery":
        for extra in statement.children[1:]:  # after the selects: INTO OUTFILE (a literal), FORMAT (a name)
            if extra.kind == "Identifier" and _NAME.fullmatch(extra.text):
                output_format = extra.text
            elif extra.kind == "Literal":
                raise QueryRefused("refused: INTO OUTFILE writes a file on the server; read the rows from the answer")
            elif extra.kind == "Set":
                raise QueryRefused(_SETTINGS)
            else:
                raise QueryRefused(f"refused: a {extra.kind} clause after the query is not allowed")
    elif statement.kind == "ShowTables":
        # SHOW TABLES, SHOW DATABASES, SHOW SETTINGS and SHOW DICTIONARIES dump alike; only the
        # FROM names the database, so it must be there and be ours.
        if [(c.kind, c.text) for c in statement.children] != [("Identifier", database)]:
            raise QueryRefused(f"refused: SHOW lists only this project's tables: write SHOW TABLES FROM {database}")
    elif statement.kind == "ShowCreateTableQuery":
        names = [c.text for c in statement.children if c.kind == "Identifier"]
        if len(names) == 2 and names[0] != database:
            raise QueryRefused(f"refused: database {names[0]!r} is outside shadowlens' data ({database})")
    _walk(statement, database, blocked_functions)
    return Checked(statement.kind, output_format)


_EXPLAIN = "EXPLAIN AST "
_SETTINGS = ("refused: SETTINGS clauses are not allowed: the caps (rows, bytes, seconds, memory, read speed) are "
             "fixed; narrow the query instead (WHERE, LIMIT, aggregate)")  # fmt: skip


def _walk(node: _Node, database: str, blocked: frozenset[str]) -> None:
    for child in node.children:
        if child.kind == "Set":
            raise QueryRefused(_SETTINGS)
        if child.kind == "Explain":  # SELECT ... FROM (EXPLAIN ...): not an analyst's read
            raise QueryRefused("refused: EXPLAIN is not allowed through this endpoint")
        if child.kind == "TableIdentifier":
            _check_table(child.text.split(" (alias ", 1)[0], database)
        elif child.kind == "Function":
            name = child.text.split(" (alias ", 1)[0]
            if node.kind == "TableExpression":
                _check_table_function(name, child)
            elif name.lower() in blocked:
                raise QueryRefused(f"refused: function {name}() reads outside shadowlens' data (files, dictionaries, "
                                   "the host or the network)")  # fmt: skip
            elif name.lower() in IN_FUNCTIONS:
                _check_in_operand(child, database)
        _walk(child, database, blocked)


def _check_table(name: str, database: str) -> None:
    parts = name.split(".")
    if len(parts) > 2 or not all(_NAME.fullmatch(p) for p in parts):
        raise QueryRefused(f"refused: table name {name!r}: use plain names of {database}' tables")
    if len(parts) == 2 and parts[0] != database:
        raise QueryRefused(f"refused: table {name} is outside shadowlens' data: only {database}.* can be read")


def _check_table_function(name: str, node: _Node) -> None:
    lower = name.lower()
    if lower not in ALLOWED_TABLE_FUNCTIONS:
        if lower in NETWORK_TABLE_FUNCTIONS:
            what = "reaches the network"
        elif lower in FALLBACK_KNOWN_TABLE_FUNCTIONS:
            what = "reaches outside shadowlens' data"
        else:
            what = "is not allowed"
        raise QueryRefused(f"refused: table function {name}() {what}; only numbers(N) with N <= {MAX_NUMBERS:,} and "
                           "values(...) are allowed besides shadowlens' tables")  # fmt: skip
    if lower == "numbers":
        args = node.children[0].children if node.children else []
        bound = _literal_number(args[-1]) if args else None
        if len(args) not in (1, 2) or bound is None or not 0 <= bound <= MAX_NUMBERS:
            raise QueryRefused(f"refused: numbers() needs a literal count of at most {MAX_NUMBERS:,}")


def _check_in_operand(node: _Node, database: str) -> None:
    """``x IN db.table`` reads a table by name, without a TableIdentifier."""
    args = node.children[0].children if node.children else []
    if len(args) == 2 and args[1].kind == "Identifier":
        _check_table(args[1].text.split(" (alias ", 1)[0], database)


def _literal_number(node: _Node) -> float | None:
    if node.kind != "Literal":
        return None
    match = re.fullmatch(r"(?:U?Int\d+|Float\d+)_(-?[0-9.e+]+)", node.text)
    try:
        return float(match.group(1)) if match else None
    except ValueError:
        return None


def blocked_function_names(rows: list[tuple[str, str, str]]) -> frozenset[str]:
    """``BLOCKED_FUNCTIONS`` plus every function (and alias) the engine files under a blocked
    category, from ``SELECT name, alias_to, categories FROM system.functions``."""
    out = set(BLOCKED_FUNCTIONS)
    for name, alias_to, categories in rows:
        if categories in BLOCKED_CATEGORIES or alias_to.lower() in out:
            out.add(name.lower())
    return frozenset(out)


class AnalystSession:
    """A read-only client of its own over the same data: checks, then runs, an analyst's query.

    ``client``: a clickhouse-connect client used by nothing else (for chDB, ``get_client`` again
    on the same path: a new session on the engine the worker already opened)."""

    def __init__(self, client, database: str, chdb: bool, rows_per_s: int = ANALYST_ROWS_PER_S):
        self.client, self.database, self.chdb = client, database, chdb
        self._lock = threading.Lock()  # one chDB session runs one query at a time
        self._settings: dict[str, Any] = {}
        self._timeout_hint = (f" (analyst queries stop at {MAX_SECONDS} s" + (
            f" and read at most {rows_per_s:,} rows a second, [api] analyst_rows_per_s" if chdb and rows_per_s else "")
            + "; narrow the query: WHERE on time or candidate, LIMIT, aggregate)")  # fmt: skip
        if chdb:
            for name, value in session_caps(rows_per_s).items():
                self.client.command(f"SET {name} = {value!r}" if isinstance(value, str) else f"SET {name} = {value}")
            self.client.command(f"USE {database}")  # plain names are this project's tables
            self.client.command("SET readonly = 1")
            if self.client.query("SELECT getSetting('readonly')").result_rows != [(1,)]:
                raise RuntimeError("the analyst session did not become read-only")
        else:  # HTTP: no session; the caps travel with each query (the server's cores are not the worker's:
            # the read-only user's profile, scripts/clickhouse/analyst_user.sql, is where a server budget goes)
            self._settings = {**CAPS, "readonly": 1}
        try:
            rows = self.client.query("SELECT name, alias_to, categories FROM system.functions",
                                     settings=self._settings or None).result_rows  # fmt: skip
        except Exception:  # noqa: BLE001 - a server user without access to it: its grants refuse dictionaries
            rows = []
        self.blocked = blocked_function_names(rows)

    def close(self) -> None:
        self.client.close()

    def run(self, sql: str) -> dict[str, Any]:
        """Check ``sql`` and run it; {"columns", "rows"} with JSON-friendly values, or, for a query
        with a FORMAT clause, {"columns": [], "rows": [], "text": ClickHouse's output}."""
        with self._lock:
            checked = self._check(sql)
            try:
                if checked.output_format is not None:
                    text = self.client.raw_query(sql, settings=self._settings or None).decode(errors="replace")
                    return {"columns": [], "rows": [], "text": text}
                result = self.client.query(sql, settings=self._settings or None)
            except Exception as exc:  # noqa: BLE001 - the engine's message, one line
                message = engine_message(exc)
                raise QueryRefused(message + self._timeout_hint if "TIMEOUT_EXCEEDED" in message else message) from None
        rows = [[v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for v in row]
                for row in result.result_rows]  # fmt: skip
        return {"columns": list(result.column_names), "rows": rows}

    def _check(self, sql: str) -> Checked:
        if self.chdb:
            raw = self.client._backend._handle.conn._conn  # chdb-core's connection: classify_query lives there
            report = raw.classify_query(sql, self.database)
            kind = getattr(report["query_class"], "name", str(report["query_class"]))
            if kind != "UNKNOWN":
                if int(report["statement_count"]) != 1:
                    raise QueryRefused(f"refused: send exactly one statement (chdb-core counted "
                                       f"{report['statement_count']})")  # fmt: skip
                if kind != "READ_ONLY":
                    raise QueryRefused(f"refused: only reads are allowed; chdb-core classifies this statement as "
                                       f"{kind} (a write, DDL, SYSTEM, KILL, SET or INTO OUTFILE)")  # fmt: skip
            # UNKNOWN: the parser's own message comes from EXPLAIN AST below
        try:
            dump = self.client.raw_query(f"{_EXPLAIN}{sql}", settings=self._settings or None).decode()
        except Exception as exc:  # noqa: BLE001 - a syntax error: the engine's message
            message = engine_message(exc)
            if "(READONLY)" in message:  # EXPLAIN applies the statement's SETTINGS first; readonly refuses them
                raise QueryRefused(f"{_SETTINGS} ({message})") from None
            # positions in the parser's message count from the start of the statement sent, not of EXPLAIN's
            raise QueryRefused(re.sub(r"position (\d+)", lambda m: f"position {max(0, int(m[1]) - len(_EXPLAIN))}",
                                      message)) from None  # fmt: skip
        return check(dump, self.database, self.blocked)


def engine_message(exc: BaseException) -> str:
    """ClickHouse's own line (``Code: N. DB::Exception: ...``), without the wrapper's repetition."""
    text = str(exc).strip()
    line = next((x for x in text.splitlines() if "Code:" in x), text.splitlines()[0] if text else type(exc).__name__)
    line = re.sub(r"^(.*?Code: \d+\. DB::Exception: )(?:Code: \d+\. DB::Exception: )+", r"\1", line.strip())
    return line[:500]
