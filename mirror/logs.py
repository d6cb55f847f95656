"""Rate-limited warnings: an outage must not turn into a log line per mirrored request."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("shadowlens.mirror")


class RateLimitedLog:
    """At most one line per ``key`` per ``interval_s``; the next line says how many were held back.

    Not locked: two threads racing may both log once, which is harmless.
    """

    def __init__(self, interval_s: float = 10.0, log: logging.Logger = logger) -> None:
        self._interval = interval_s
        self._log = log
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> bool:
        """Log ``message % args`` unless ``key`` logged within the interval. Returns whether it logged."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._suppressed.pop(key, 0)
        if held:
            message += " (%d similar messages suppressed)"
            args = (*args, held)
        self._log.warning(message, *args)
        return True


class _RateLimitFilter(logging.Filter):
    """Lets one record per (logger, message template) through per interval."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        key = (record.name, record.msg)
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            return False
        self._last[key] = now
        return True


# aiokafka logs an ERROR per reconnect attempt (every ~100 ms) while the broker is down;
# filters on a logger do not apply to its children, so each module logger is named here.
_KAFKA_LOGGERS = ("aiokafka", "aiokafka.cluster", "aiokafka.conn", "aiokafka.helpers",
                  "aiokafka.producer.producer", "aiokafka.producer.sender")
_kafka_filter: _RateLimitFilter | None = None


def rate_limit_kafka_logs(interval_s: float) -> None:
    """Rate-limit aiokafka's own log lines process-wide (idempotent; the shortest interval wins)."""
    global _kafka_filter
    if _kafka_filter is None:
        _kafka_filter = _RateLimitFilter(interval_s)
        for name in _KAFKA_LOGGERS:
            logging.getLogger(name).addFilter(_kafka_filter)
    else:
        _kafka_filter.interval_s = min(_kafka_filter.interval_s, interval_s)
