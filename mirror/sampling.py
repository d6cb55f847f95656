"""Deterministic sampling: a key is always in or always out for a given model and rate.

Why a hash of (model, key) rather than ``random()``: a user sampled in keeps being mirrored,
so per-user comparisons and sessions stay whole; and every process of a service agrees.
blake2b is in the standard library, stable across runs and platforms (unlike ``hash()``),
and costs well under a microsecond for short keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from mirror.errors import MirrorError

_SPACE = 1 << 64


def _threshold(model: str, rate: float) -> int:
    if not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise MirrorError(f"sample_rates.{model}" if model else "default_sample_rate",
                          f"{rate!r} is not a rate", "use a number between 0.0 and 1.0")
    return int(rate * _SPACE)


def sample_position(model: str, key: str) -> float:
    """Where ``key`` falls in [0, 1) for ``model``; it is sampled in when this is below the rate."""
    return _hash64(model, key) / _SPACE


def _hash64(model: str, key: str) -> int:
    digest = hashlib.blake2b(f"{model}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Sampler:
    """Per-model sampling rates with a default; rates can change while running."""

    def __init__(self, default_rate: float = 1.0, rates: Mapping[str, float] | None = None) -> None:
        self._default = _threshold("", default_rate)
        self._thresholds: dict[str, int] = {}
        for model, rate in (rates or {}).items():
            self.set_rate(model, rate)

    def set_rate(self, model: str, rate: float) -> None:
        self._thresholds[model] = _threshold(model, rate)

    def rate(self, model: str) -> float:
        return self._thresholds.get(model, self._default) / _SPACE

    def keep(self, model: str, key: str) -> bool:
        threshold = self._thresholds.get(model, self._default)
        if threshold >= _SPACE:  # rate 1.0: skip the hash on the hot path
            return True
        if threshold <= 0:
            return False
        return _hash64(model, key) < threshold
