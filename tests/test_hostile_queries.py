"""Analyst SQL that tries to leave shadowlens' data, lift its caps or stall ingestion: refused, on real parts.

The first tests run each hostile query against a real chDB data path through
``ClickHouseSink.readonly_query`` (what the API calls); the last one fires them at a live worker's
``POST /v1/query`` while mirrored requests stream through real Kafka, and checks that every one is
a clear 400, that nothing outside the data was read or written, and that ingestion went on with
exact counts. What is allowed and why: streams/api/analyst_sql.py.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import UTC, datetime

import httpx
import pytest

from schemas import Verdict
from streams.api.analyst_sql import ANALYST_ROWS_PER_S, MAX_ROWS, QueryRefused, check
from streams.config import ApiConfig
from streams.sink import ClickHouseSink

SECRET = "shadowlens-hostile-query-secret-line"

# (query, a fragment of the one-line refusal). Each one reaches outside the data, writes, lifts a
# cap or runs more than one statement; the fragments name what was refused.
HOSTILE = [
    ("SELECT * FROM file('{secret}', 'LineAsString')", "table function file()"),
    ("SELECT * FROM file('../../../../{secret}', 'LineAsString')", "table function file()"),
    ("SELECT file('{secret}')", "function file()"),
    ("SeLeCt FiLe('{secret}')", "function FiLe()"),
    ("SELECT * FROM /* a */ `file` /* b */ ('{secret}', 'LineAsString')", "table function file()"),
    ("SELECT * FROM \"file\"('{secret}', 'LineAsString')", "table function file()"),
    ("WITH x AS (SELECT * FROM file('{secret}', 'LineAsString')) SELECT * FROM x", "table function file()"),
    ("SELECT * FROM (SELECT * FROM (SELECT * FROM file('{secret}', 'LineAsString')))", "table function file()"),
    ("SELECT count() FROM request_diffs WHERE request_id IN (SELECT * FROM file('{secret}', 'LineAsString'))",
     "table function file()"),
    ("SELECT * FROM view(SELECT * FROM file('{secret}', 'LineAsString'))", "table function view()"),
    ("INSERT INTO FUNCTION file('{out}', 'CSV') SELECT 1", "only reads are allowed"),
    ("SELECT 1 INTO OUTFILE '{out}'", "only reads are allowed"),
    ("SELECT * FROM url('http://127.0.0.1:{port}/', 'LineAsString')", "url() reaches the network"),
    ("SELECT * FROM s3('http://127.0.0.1:{port}/b/k', 'CSV')", "s3() reaches the network"),
    ("SELECT * FROM remote('127.0.0.1:{port}', system.one)", "remote() reaches the network"),
    ("SELECT * FROM mysql('127.0.0.1:{port}', 'db', 't', 'u', 'p')", "mysql() reaches the network"),
    ("SELECT * FROM postgresql('127.0.0.1:{port}', 'db', 't', 'u', 'p')", "postgresql() reaches the network"),
    ("SELECT * FROM executable('cat {secret}', 'TSV', 'x String')", "executable() reaches outside"),
    ("SELECT * FROM merge('system', '.*')", "table function merge()"),
    ("SELECT * FROM generateRandom('a UInt8')", "table function generateRandom()"),
    ("SELECT * FROM dictionary('d')", "table function dictionary()"),
    ("SELECT dictGet('d', 'x', 1)", "function dictGet()"),
    ("SELECT hostName()", "function hostName()"),
    ("SELECT * FROM system.disks", "system.disks is outside"),
    ("SELECT * FROM `system`.`processes`", "system.processes is outside"),
    ("SELECT name FROM system.tables", "system.tables is outside"),
    ("SELECT * FROM information_schema.tables", "information_schema.tables is outside"),
    ("SELECT 1 WHERE 1 IN system.one", "system.one is outside"),
    ("SHOW CREATE TABLE system.tables", "'system' is outside"),
    ("SHOW PROCESSLIST", "not allowed"),
    ("SHOW DATABASES", "SHOW TABLES FROM shadowlens"),
    ("EXPLAIN SELECT 1", "not allowed"),
    ("INSERT INTO shadowlens.verdicts SELECT * FROM shadowlens.verdicts", "only reads are allowed"),
    ("OPTIMIZE TABLE shadowlens.request_diffs FINAL", "only reads are allowed"),
    ("ALTER TABLE shadowlens.request_diffs DELETE WHERE 1", "only reads are allowed"),
    ("DROP TABLE shadowlens.verdicts", "only reads are allowed"),
    ("CREATE TABLE shadowlens.x (a UInt8) ENGINE = Memory", "only reads are allowed"),
    ("SYSTEM STOP MERGES", "only reads are allowed"),
    ("KILL QUERY WHERE 1", "only reads are allowed"),
    ("SET readonly = 0", "only reads are allowed"),
    ("SELECT 1; INSERT INTO shadowlens.verdicts SELECT * FROM shadowlens.verdicts", "exactly one statement"),
    ("SELECT 1; SELECT 2", "exactly one statement"),
    ("SELECT * FROM numbers(100) SETTINGS max_result_rows = 0, max_execution_time = 40", "SETTINGS"),
    ("SELECT * FROM (SELECT * FROM numbers(10) SETTINGS max_threads = 64)", "SETTINGS"),
    ("SELECT count() FROM request_diffs SETTINGS max_execution_speed = 0", "SETTINGS"),  # the read budget
    ("SELECT count() FROM request_diffs SETTINGS timeout_before_checking_execution_speed = 10", "SETTINGS"),
    ("SELECT count() FROM numbers(1000000000000)", "numbers() needs a literal count"),
    ("SELECT count() FROM numbers(toUInt64(1e12))", "numbers() needs a literal count"),
    ("SELECT * FROM numbers(20000)", "Limit for result exceeded"),  # the engine's cap, not lifted
    ("SELEC 1", "Syntax error: failed at position 7"),
]


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("host") / "secret.txt"
    path.write_text(SECRET + "\n")
    return path


@pytest.fixture(scope="module")
def listener():
    """A TCP port on this machine that counts connections: url()/s3()/remote() must never reach it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    accepted: list[tuple] = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, addr = server.accept()
            except OSError:
                continue
            accepted.append(addr)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join(2)
    server.close()


def hostile_queries(secret_file, out_path, port) -> list[tuple[str, str]]:
    return [(q.format(secret=secret_file, out=out_path, port=port), why) for q, why in HOSTILE]


@pytest.fixture
def sink(tmp_path):
    sink = ClickHouseSink(f"chdb:///{tmp_path / 'chdb'}")
    now = datetime.now(UTC)
    sink.insert_verdicts([Verdict(model="digits", candidate="v2", verdict="rollback", reasons=["r."], metrics=[],
                                  samples=10, window_start=now, window_end=now, updated_at=now)])  # fmt: skip
    yield sink
    sink.close()


def test_each_hostile_query_is_refused_in_one_line_and_reaches_nothing(sink, secret_file, listener, tmp_path):
    port, accepted = listener
    out = tmp_path / "written.csv"
    for sql, why in hostile_queries(secret_file, out, port):
        with pytest.raises(QueryRefused) as refused:
            sink.readonly_query(sql)
        message = str(refused.value)
        assert why in message, (sql, message)
        assert "\n" not in message and SECRET not in message, (sql, message)
    assert not out.exists() and accepted == []


def test_reads_of_the_project_tables_work_within_the_caps(sink):
    assert sink.readonly_query("SELECT verdict FROM shadowlens.verdicts")["rows"] == [["rollback"]]
    assert sink.readonly_query("SELECT count() AS n FROM verdicts") == {"columns": ["n"], "rows": [[1]]}
    with_cte = "WITH v AS (SELECT model, verdict FROM verdicts) SELECT model FROM v WHERE verdict = 'rollback'"
    assert sink.readonly_query(with_cte)["rows"] == [["digits"]]
    assert ["request_diffs"] in sink.readonly_query("SHOW TABLES FROM shadowlens")["rows"]
    assert ["model", "LowCardinality(String)"] == sink.readonly_query("DESCRIBE shadowlens.verdicts")["rows"][0][:2]
    assert "CREATE TABLE" in sink.readonly_query("SHOW CREATE TABLE verdicts")["rows"][0][0]
    assert sink.readonly_query("SELECT sum(number) FROM numbers(100)")["rows"] == [[4950]]
    assert sink.readonly_query("SELECT * FROM values('x UInt8', 1, 2)")["rows"] == [[1], [2]]
    assert len(sink.readonly_query(f"SELECT number FROM numbers({MAX_ROWS})")["rows"]) == MAX_ROWS
    assert "Row 1:" in sink.readonly_query("SELECT 1 AS one FORMAT Vertical")["text"]
    # A string that only looks like a table function or a refused name is data, not a call.
    assert sink.readonly_query("SELECT 'file(/etc/passwd) system.tables' AS s")["rows"] == [
        ["file(/etc/passwd) system.tables"]]


def test_refused_queries_leave_the_writer_untouched(sink):
    """An analyst's refused write once left the worker's own chDB session read-only (every later
    insert failed READONLY until a restart): the analyst session is a session of its own."""
    for sql in ("INSERT INTO shadowlens.verdicts SELECT * FROM shadowlens.verdicts", "OPTIMIZE TABLE verdicts",
                "SELECT * FROM numbers(20000)", "SELECT 1 SETTINGS readonly = 0"):  # fmt: skip
        with pytest.raises(QueryRefused):
            sink.readonly_query(sql)
    assert sink.query("SELECT getSetting('readonly'), getSetting('max_result_rows')") == [(0, 0)]
    now = datetime.now(UTC)
    sink.insert_verdicts([Verdict(model="digits", candidate="v3", verdict="hold", reasons=["h."], metrics=[],
                                  samples=1, window_start=now, window_end=now, updated_at=now)])  # fmt: skip
    assert sink.query("SELECT count() FROM shadowlens.verdicts") == [(2,)]
    # ... and the analyst session itself cannot be talked out of its caps.
    assert sink.readonly_query("SELECT getSetting('readonly'), getSetting('max_threads'), "
                               "getSetting('max_execution_speed')")["rows"] == [[1, 1, ANALYST_ROWS_PER_S]]  # fmt: skip
    assert ApiConfig().analyst_rows_per_s == ANALYST_ROWS_PER_S  # [api] analyst_rows_per_s: the same default


def test_the_read_budget_is_enforced_by_the_engine_and_cannot_be_lifted(tmp_path):
    """``[api] analyst_rows_per_s``: the engine sleeps an analyst's read down to the budget
    (``max_execution_speed``), so a query that needs longer than the 10 s cap at that speed is cut
    there, in one line naming the cap; the same query answers without a budget, and on the writer's
    session. ``readonly = 1`` refuses lifting it, even on the session's own client."""
    budgeted = ClickHouseSink(f"chdb:///{tmp_path / 'chdb'}", analyst_rows_per_s=10_000)
    try:
        budgeted.client.command("CREATE TABLE shadowlens.scan_probe (n UInt64) ENGINE = MergeTree ORDER BY n")
        budgeted.client.command("INSERT INTO shadowlens.scan_probe SELECT number FROM numbers(1000000)")
        scan = "SELECT count() FROM scan_probe WHERE n % 7 = 1"  # 1,000,000 rows: 100 s at 10,000 rows/s
        assert budgeted.query(scan.replace("scan_probe", "shadowlens.scan_probe")) == [(142857,)]
        with pytest.raises(QueryRefused) as cut:
            budgeted.readonly_query(scan)
        message = str(cut.value)  # the engine's line, and which caps an analyst ran into
        assert "Timeout exceeded" in message and "10,000 rows a second, [api] analyst_rows_per_s" in message
        assert "\n" not in message
        session = budgeted._analyst_session()
        for sql in ("SET max_execution_speed = 0", "SET timeout_before_checking_execution_speed = 100"):
            with pytest.raises(Exception, match="READONLY"):
                session.client.command(sql)
        assert budgeted.readonly_query("SELECT getSetting('max_execution_speed')")["rows"] == [[10_000]]
    finally:
        budgeted.close()
    unbudgeted = ClickHouseSink(f"chdb:///{tmp_path / 'chdb'}", create=False, analyst_rows_per_s=0)
    try:
        assert unbudgeted.readonly_query("SELECT count() FROM scan_probe WHERE n % 7 = 1")["rows"] == [[142857]]
    finally:
        unbudgeted.close()


def test_the_tree_check_alone_refuses_what_the_engine_would_also_refuse():
    """``check`` on EXPLAIN AST dumps (the layer that also guards an http:// server): a SETTINGS
    node, an INTO OUTFILE literal, an odd table name."""
    settings = "SelectWithUnionQuery (children 1)\n ExpressionList (children 1)\n  SelectQuery (children 2)\n" \
               "   ExpressionList (children 1)\n    Literal UInt64_1\n   Set\n"  # fmt: skip
    with pytest.raises(QueryRefused, match="SETTINGS"):
        check(settings, "shadowlens")
    outfile = "SelectWithUnionQuery (children 2)\n ExpressionList (children 1)\n  SelectQuery (children 1)\n" \
              "   ExpressionList (children 1)\n    Literal UInt64_1\n Literal \\'/tmp/x\\'\n"  # fmt: skip
    with pytest.raises(QueryRefused, match="INTO OUTFILE"):
        check(outfile, "shadowlens")
    dotted = "SelectWithUnionQuery (children 1)\n ExpressionList (children 1)\n  SelectQuery (children 2)\n" \
             "   ExpressionList (children 1)\n    Asterisk\n   TablesInSelectQuery (children 1)\n" \
             "    TablesInSelectQueryElement (children 1)\n     TableExpression (children 1)\n" \
             "      TableIdentifier shadowlens.a.b c\n"  # fmt: skip
    with pytest.raises(QueryRefused, match="table name"):
        check(dotted, "shadowlens")


# -- on a live worker, while requests stream -----------------------------------------------------
TOKEN = "hostile-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REQUESTS = 3000
# About 30 s of CPU on one core: the 10 s cap ends it.
LONG_QUERY = "SELECT count() FROM numbers(100000000) WHERE NOT ignore(arraySum(range(number % 3000)))"


@pytest.mark.kafka
def test_hostile_queries_on_a_live_worker_while_requests_stream(kafka_bootstrap, new_topic, tmp_path, secret_file,
                                                                listener):  # fmt: skip
    from streams.demo import TrafficGenerator
    from harness import WorkerProcess, free_port, produce, window_aligned_start, write_worker_config
    from streams.models import build_digits_models

    port, accepted = listener
    models = build_digits_models(tmp_path / "models")
    topic = new_topic("hostile", partitions=2)
    api_port = free_port()
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, topic, api_port,
                                 window_s=5, idle_close_s=2, partitions=2, api={"tokens": [TOKEN]})  # fmt: skip
    worker = WorkerProcess(config, tmp_path / "worker.log")
    api = f"http://127.0.0.1:{api_port}"
    out = tmp_path / "written.csv"
    try:
        worker.wait_for(lambda: httpx.get(f"{api}/readyz", timeout=5).status_code == 200, 60, "the API")
        start = window_aligned_start(REQUESTS, rate_per_s=200, window_s=5)
        messages = TrafficGenerator(models["baseline"], rate_per_s=200).messages(REQUESTS, start=start)

        def stream():  # six bursts over ~6 s, while the queries below run
            for i in range(0, REQUESTS, REQUESTS // 6):
                produce(kafka_bootstrap, topic, messages[i : i + REQUESTS // 6])
                time.sleep(1)

        producer = threading.Thread(target=stream)
        producer.start()
        long_done = threading.Event()
        long_answer: dict = {}

        def long_read():
            long_answer["r"] = httpx.post(f"{api}/v1/query", json={"sql": LONG_QUERY}, headers=AUTH, timeout=60)
            long_done.set()

        threading.Thread(target=long_read, daemon=True).start()
        time.sleep(1.0)
        # A long analyst read holds nothing the windows endpoint or the verdicts need.
        windows = httpx.get(f"{api}/v1/windows/digits/digits-v2", headers=AUTH, timeout=30)
        verdict = httpx.get(f"{api}/v1/verdicts/digits/digits-v2", headers=AUTH, timeout=30)
        assert windows.status_code == 200 and verdict.status_code == 200
        assert not long_done.is_set(), "the windows read waited for the analyst's query"
        for sql, why in hostile_queries(secret_file, out, port):
            answer = httpx.post(f"{api}/v1/query", json={"sql": sql}, headers=AUTH, timeout=30)
            assert answer.status_code == 400, (sql, answer.status_code, answer.text)
            detail = answer.json()["detail"]
            assert why in detail and "\n" not in detail and SECRET not in answer.text, (sql, detail)
        assert httpx.post(f"{api}/v1/query", json={"sql": "SELECT 1"}, timeout=10).status_code == 401
        producer.join()
        assert long_done.wait(30)
        assert long_answer["r"].status_code == 400 and "Timeout exceeded" in long_answer["r"].json()["detail"]

        def counted():
            got = httpx.post(f"{api}/v1/query", headers=AUTH, timeout=30, json={
                "sql": "SELECT count() FROM request_diffs FINAL WHERE candidate = 'digits-v2'"}).json()
            return got if got["rows"] == [[REQUESTS]] else None

        worker.wait_for(counted, 120, "every request to be scored once")
        assert worker.alive and "READONLY" not in worker.log_path.read_text()
    finally:
        worker.stop()
    assert not out.exists() and accepted == []
    sink = ClickHouseSink(f"chdb:///{tmp_path / 'chdb'}", create=False)
    try:
        assert sink.diff_counts() == {("digits", "digits-v2"): REQUESTS}
    finally:
        sink.close()
    assert not os.path.exists(str(out))
