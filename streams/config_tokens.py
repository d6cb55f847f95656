"""Bearer tokens in the config ([api] tokens, [ingest] tokens): one reading and one check for both."""

from __future__ import annotations

from typing import Any


def split_tokens(value: Any) -> Any:
    """From the environment a list is comma-separated text (SHADOWLENS_API_TOKENS=a,b)."""
    if isinstance(value, str):
        value = [t.strip() for t in value.split(",") if t.strip()]
    return value


def long_tokens(value: list[str]) -> list[str]:
    for i, token in enumerate(value):
        if len(token) < 16:
            raise ValueError(f"token {i} has {len(token)} characters; use at least 16 (e.g. openssl rand -hex 24)")
    return value


def path_safe_tokens(value: list[str]) -> list[str]:
    """``long_tokens``, and only letters, digits, '-' and '_': the token may ride in a URL path."""
    for i, token in enumerate(long_tokens(value)):
        if not token.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"token {i} has characters other than letters, digits, '-' and '_'; it rides in a URL "
                             "path (e.g. openssl rand -hex 24)")  # fmt: skip
    return value
