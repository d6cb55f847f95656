"""Calibration scenarios for the output kinds: (baseline, candidate) answers for n requests where each
request disagrees with probability ``rate``, with the per-request disagreement and severity known by
construction (issue #22).

A kind is calibrated when its measured ``disagree`` equals the planted one row by row (so its rate is a
Binomial(n, rate) draw) and its ``severity`` equals the planted one; an identical candidate gives 0.
The planted severities come from how the candidate was made (labels flipped, items swapped out, an
angle turned), not from the kind's own formula, except regression's, whose severity *is* a formula.

    from scorers.kinds.simulate import scenario
    s = scenario("ranking", 20_000, 0.02)
    d = s.kind.diffs(s.baseline, s.candidate)   # d.disagree == s.disagree, d.severity ≈ s.severity

Each generator keeps agreeing rows well inside the kind's threshold and disagreeing ones well beyond
it (regression: 0.5 and 1.5 tolerances; multi-label and ranking: whole labels and items;
classification: the top two classes swapped; embeddings: at least 5 % of the way from
``min_similarity`` to 1 or to -1), so rounding never decides a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from scorers.kinds import make_kind
from scorers.kinds.base import OutputKind


@dataclass(eq=False)
class KindScenario:
    kind: OutputKind
    baseline: np.ndarray  # (n, width)
    candidate: np.ndarray  # (n, width)
    disagree: np.ndarray  # (n,) bool, planted
    severity: np.ndarray  # (n,) float64, planted
    rate: float  # the probability each row was planted to disagree with


def classification(n: int, rate: float, rng: np.random.Generator, kind, classes: int = 5) -> tuple:
    """Disagreeing rows swap the baseline's top two classes (severity: their gap); the others mix the
    baseline with the uniform distribution, which keeps its top class (severity: e * (top - 1/K))."""
    b = rng.dirichlet(np.ones(classes), n)
    flip = rng.random(n) < rate
    top = b.argmax(axis=1)
    rows = np.arange(n)
    second = np.argsort(b, axis=1)[:, -2]
    e = rng.uniform(0.0, 0.5, n)
    c = (1.0 - e[:, None]) * b + e[:, None] / classes
    swapped = b.copy()
    swapped[rows, top], swapped[rows, second] = b[rows, second], b[rows, top]
    c[flip] = swapped[flip]
    severity = np.where(flip, b[rows, top] - b[rows, second], e * (b[rows, top] - 1.0 / classes))
    if kind.from_logits:
        b, c = np.log(b), np.log(c)
    return b, c, flip, severity


def regression(n: int, rate: float, rng: np.random.Generator, kind, outputs: int = 1) -> tuple:
    """Errors of 0 to 0.5 tolerances on every output; disagreeing rows get 1.5 to 3 tolerances on one."""
    b = rng.normal(0.0, 10.0, (n, outputs))
    tol = kind.abs_tolerance + kind.rel_tolerance * np.abs(b)
    flip = rng.random(n) < rate
    err = tol * rng.uniform(0.0, 0.5, (n, outputs))
    which = rng.integers(0, outputs, n)
    rows = np.flatnonzero(flip)
    err[rows, which[rows]] = tol[rows, which[rows]] * rng.uniform(1.5, 3.0, rows.size)
    c = b + np.where(rng.random((n, outputs)) < 0.5, -err, err)
    severity = np.minimum((np.abs(c - b) / np.maximum(np.abs(b), kind.floor)).max(axis=1), 1.0)
    return b, c, flip, severity


def multilabel(n: int, rate: float, rng: np.random.Generator, kind, labels: int = 8) -> tuple:
    """Probabilities at least 10 % of the way from the threshold; disagreeing rows move 1 to 3 labels
    across it (severity: that count / L), every other label is redrawn on its own side."""
    t = kind.threshold

    def draw(on: np.ndarray) -> np.ndarray:
        u = rng.uniform(0.1, 0.9, on.shape)
        return np.where(on, t + (1.0 - t) * u, t * u)

    on_b = rng.random((n, labels)) < 0.3
    flip = rng.random(n) < rate
    flips = np.where(flip, rng.integers(1, min(3, labels) + 1, n), 0)
    order = np.argsort(rng.random((n, labels)), axis=1).argsort(axis=1)  # a random rank per label
    moved = order < flips[:, None]
    b, c = draw(on_b), draw(on_b ^ moved)
    if kind.from_logits:
        b, c = np.log(b / (1.0 - b)), np.log(c / (1.0 - c))
    return b, c, flip, flips / labels


def ranking(n: int, rate: float, rng: np.random.Generator, kind, items: int = 50) -> tuple:
    """The candidate exchanges the scores of m of the baseline's top k with m items outside it, so
    exactly m leave its list (severity m / k); disagreeing rows take the m that put overlap@k below
    min_overlap or more, the others fewer."""
    k = kind.k
    if items < 2 * k:
        raise ValueError(f"ranking scenario needs items >= 2k, got {items} items and k = {k}")
    m_min = next(m for m in range(k + 1) if k - m < kind.min_overlap * k - 1e-9)
    b = rng.random((n, items))
    flip = rng.random(n) < rate
    m = np.where(flip, rng.integers(m_min, k + 1, n), rng.integers(0, max(m_min, 1), n))
    if m_min == 0:  # every list disagrees: no row can be planted to agree
        m = rng.integers(0, k + 1, n)
        flip = np.ones(n, bool)
    order = np.argsort(-b, axis=1)
    inside, outside = order[:, :k], order[:, k:]
    pick_in = np.argsort(rng.random((n, k)), axis=1)
    pick_out = np.argsort(rng.random((n, items - k)), axis=1)
    c = b.copy()
    for r in range(k):  # the r-th exchanged pair of each row that exchanges more than r
        rows = np.flatnonzero(m > r)
        i = inside[rows, pick_in[rows, r]]
        o = outside[rows, pick_out[rows, r]]
        c[rows, i], c[rows, o] = b[rows, o], b[rows, i]
    return b, c, flip, m / k


def embedding(n: int, rate: float, rng: np.random.Generator, kind, dims: int = 16) -> tuple:
    """The candidate turns the baseline's direction by a chosen angle (and rescales it by 0.5 to 2):
    agreeing rows to a cosine between min_similarity and 1, disagreeing ones well below it."""
    s = kind.min_similarity
    b = rng.normal(0.0, 1.0, (n, dims))
    u = b / np.linalg.norm(b, axis=1, keepdims=True)
    g = rng.normal(0.0, 1.0, (n, dims))
    w = g - np.einsum("ij,ij->i", g, u)[:, None] * u
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    flip = rng.random(n) < rate
    cos = np.where(flip, s - (1.0 + s) * rng.uniform(0.05, 0.5, n), s + (1.0 - s) * rng.uniform(0.05, 1.0, n))
    sin = np.sqrt(1.0 - cos**2)
    scale = np.linalg.norm(b, axis=1) * rng.uniform(0.5, 2.0, n)
    c = scale[:, None] * (cos[:, None] * u + sin[:, None] * w)
    return b, c, flip, (1.0 - cos) / 2.0


GENERATORS = {"classification": classification, "regression": regression, "multilabel": multilabel,
              "ranking": ranking, "embedding": embedding}


def scenario(name: str, n: int, rate: float, seed: int = 0, params: dict[str, Any] | None = None,
             **shape) -> KindScenario:
    """n requests for kind ``name`` (built from ``params``), each disagreeing with probability ``rate``;
    ``shape`` sets the generator's size (classes, outputs, labels, items, dims)."""
    kind = make_kind(name, params or {})
    b, c, flip, severity = GENERATORS[name](n, rate, np.random.default_rng(seed), kind, **shape)
    return KindScenario(kind, b, c, flip, np.asarray(severity, dtype=np.float64), rate)
