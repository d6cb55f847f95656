"""The one exception the mirror SDK raises on purpose."""

from __future__ import annotations


class MirrorError(ValueError):
    """A bad call or bad configuration, named by field, with how to fix it.

    Raised by ``publish`` only in strict mode (development); in lenient mode (production default)
    the same problem is counted as ``failed{reason="invalid"}`` and logged, never raised.
    Configuration errors (bad rates, unknown compression) raise in both modes, at construction.
    """

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}" + (f"; {fix}" if fix else ""))
