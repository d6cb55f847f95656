"""Dead letters in the replay log, summarised (``LetterLog``): the replay core (streams/replay/core.py)
adds every dead letter, and a line is written per (model, candidate, error type) a minute at most."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("shadowlens.replay")


class LetterLog:
    """Dead letters in the log, summarised: one WARNING line per (model, candidate, error type) a
    minute at most, with the count since the previous line and one example request id (the first
    of its kind at once). 1,200 dead letters a minute make one line, not 1,200; every letter is on
    the dead-letter topic and in ``shadowlens_dead_letters_total{reason}``."""

    def __init__(self, every_s: float = 60.0):
        self.every_s = every_s
        self._pending: dict[tuple, list] = {}  # key -> [count, example, reason] since the key's last line
        self._last: dict[tuple, float] = {}  # key -> monotonic time of its last line

    def add(self, key: tuple[str | None, str | None, str], example: str, reason: str) -> None:
        entry = self._pending.get(key)
        if entry is None:
            self._pending[key] = [1, example, reason]
        else:
            entry[0] += 1

    def flush(self, now: float | None = None) -> list[str]:
        """Log the keys whose minute is up (a key never logged: at once); returns the lines."""
        now = time.monotonic() if now is None else now
        lines = []
        for key in list(self._pending):
            last = self._last.get(key)
            if last is not None and now - last < self.every_s:
                continue
            count, example, reason = self._pending.pop(key)
            model, candidate, kind = key
            pair = f"{model}/{candidate}" if candidate else (model or "mirror topic")
            since = "" if last is None else f" in the last {now - last:.0f} s"
            line = f"{pair}: {count} request(s) dead-lettered as {kind}{since}, e.g. {example}: {reason[:300]}"
            log.warning("%s", line)
            lines.append(line)
            self._last[key] = now
        return lines
