-- A read-only ClickHouse user for analysts, Grafana and notebooks on a real server (an http:// DSN).
-- shadowlens' own checks (streams/api/analyst_sql.py) refuse what reaches outside its tables; this user
-- is the server's guarantee for every client that does not go through shadowlens: it reads the
-- shadowlens database only, cannot change a setting that lifts its caps (readonly = 1), and its
-- queries are bounded. Run it once as an admin:
--   clickhouse-client --multiquery < scripts/clickhouse/analyst_user.sql
-- then query with: shadowlens query --dsn 'http://shadowlens_analyst:<password>@host:8123' "SELECT ..."
CREATE SETTINGS PROFILE IF NOT EXISTS shadowlens_analyst_profile SETTINGS
    readonly = 1,                       -- reads only; SETTINGS clauses cannot lift the caps below
    max_result_rows = 10000 READONLY,
    result_overflow_mode = 'throw' READONLY,
    max_execution_time = 10 READONLY,
    max_memory_usage = 2147483648 READONLY,
    max_threads = 2 READONLY,
    -- A read budget, as the embedded default's ([api] analyst_rows_per_s): a query is slowed down to
    -- this many rows read a second, so analysts leave the server's cores to the worker's inserts.
    -- Size it to the server (this is 10x the embedded default, for a server with cores to spare).
    max_execution_speed = 10000000 READONLY,
    timeout_before_checking_execution_speed = 0 READONLY;

CREATE USER IF NOT EXISTS shadowlens_analyst
    IDENTIFIED WITH sha256_password BY 'change-me'   -- or: IDENTIFIED WITH sha256_hash BY '<hex>'
    SETTINGS PROFILE shadowlens_analyst_profile;

-- Only shadowlens' tables: no system.*, no other database, no table functions (readonly = 1
-- refuses file(), url(), s3() ...; without CREATE TEMPORARY TABLE there is none to run).
GRANT SELECT ON shadowlens.* TO shadowlens_analyst;
