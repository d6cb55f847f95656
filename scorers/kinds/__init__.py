"""Output kinds (issue #22): one module per kind behind ``scorers.kinds.base.OutputKind``; a new kind
touches one module and one line of ``KINDS``. ``make_kind`` builds a candidate's kind from its config
(``kind`` and ``[candidates.kind_params]``)."""

from __future__ import annotations

from typing import Any

from scorers.kinds.base import KindDiffs, OutputKind
from scorers.kinds.classification import ClassificationKind
from scorers.kinds.embedding import EmbeddingKind
from scorers.kinds.multilabel import MultilabelKind
from scorers.kinds.ranking import RankingKind
from scorers.kinds.regression import RegressionKind

KINDS: dict[str, type] = {k.name: k for k in (ClassificationKind, RegressionKind, MultilabelKind, RankingKind,
                                              EmbeddingKind)}  # fmt: skip
KIND_NAMES: tuple[str, ...] = tuple(KINDS)


def make_kind(name: str, params: dict[str, Any] | None = None) -> OutputKind:
    """The kind ``name`` with ``params``; ValueError (one line) for an unknown kind or a bad parameter."""
    if name not in KINDS:
        raise ValueError(f"unknown output kind {name!r}; allowed: {', '.join(KIND_NAMES)}")
    return KINDS[name].from_params(params or {})


__all__ = ["KINDS", "KIND_NAMES", "KindDiffs", "OutputKind", "make_kind"]
