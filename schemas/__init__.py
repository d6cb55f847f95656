"""shadowlens contracts: events on Kafka, rows in ClickHouse, verdicts served over HTTP."""

from schemas.clickhouse import DDL_VERSION, TABLES, ddl_statements
from schemas.events import (
    SCHEMA_VERSION,
    DeadLetter,
    MetricJudgement,
    MirroredRequest,
    RequestDiff,
    SliceJudgement,
    Verdict,
    WindowStats,
    WindowSummary,
    describe_validation_error,
)
from schemas.tensors import SUPPORTED_DTYPES, Tensor, decode_tensors, encode_tensors

__all__ = [
    "DDL_VERSION",
    "SCHEMA_VERSION",
    "SUPPORTED_DTYPES",
    "TABLES",
    "DeadLetter",
    "MetricJudgement",
    "MirroredRequest",
    "RequestDiff",
    "SliceJudgement",
    "Tensor",
    "Verdict",
    "WindowStats",
    "WindowSummary",
    "ddl_statements",
    "decode_tensors",
    "describe_validation_error",
    "encode_tensors",
]
