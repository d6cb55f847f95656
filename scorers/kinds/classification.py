"""Single-label classification (today's kind): ``scorers.diffs.classification_diffs`` behind the kind
interface. Its conventions hold unchanged (probability vectors, or logits with ``from_logits``; one
column is a binary model's positive class; rows that are not probability vectors are errors).

* ``disagree``: the top class changes (``label_flip``);
* ``severity``: |confidence delta|, the candidate's probability of the baseline's top class minus the
  baseline's own (both probabilities, so in [0, 1]; the 1e-3 sum tolerance is clipped away);
* summaries: the top-class probability (after softmax with ``from_logits``); labels: the top class;
* metrics: l1, linf, hellinger, topk_overlap and the signed confidence_delta, as in scorers.diffs.

A 1-D array is n answers of one value here too (a binary model's positive class), unlike
``classification_diffs``, which reads a 1-D array as one row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from scorers.diffs import _expand_binary, _row_problems, _softmax, classification_diffs
from scorers.kinds.base import KindDiffs
from scorers.kinds.common import as_rows, by_width, check_params, flag, integer


@dataclass(frozen=True)
class ClassificationKind:
    name: ClassVar[str] = "classification"
    disagree_doc: ClassVar[str] = "the candidate's top class differs from the baseline's"
    severity_doc: ClassVar[str] = ("|candidate's probability of the baseline's top class - the baseline's "
                                   "probability of it|")
    metric_docs: ClassVar[dict[str, str]] = {
        "l1": "sum of |candidate - baseline| over the classes, in [0, 2]",
        "linf": "largest |candidate - baseline| over the classes",
        "hellinger": "Hellinger distance of the two probability vectors, in [0, 1]",
        "topk_overlap": "share of the baseline's top_k classes also in the candidate's top_k",
        "confidence_delta": "candidate's probability of the baseline's top class minus the baseline's (signed)",
    }

    from_logits: bool = False
    top_k: int = 3

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> ClassificationKind:
        p = check_params(cls.name, params, {"from_logits": False, "top_k": 3})
        return cls(flag(cls.name, "from_logits", p["from_logits"]), integer(cls.name, "top_k", p["top_k"], 1))

    def _dense_problems(self, b: np.ndarray) -> np.ndarray:
        return _row_problems(_expand_binary(b, self.from_logits), "baseline", self.from_logits)

    def baseline_problems(self, baseline) -> dict[int, str]:
        """scorers.diffs' checks of the baseline row: finite, and a probability vector unless logits."""
        b = as_rows(baseline)
        groups = {b.shape[1]: np.arange(b.shape[0])} if isinstance(b, np.ndarray) else by_width(b)
        out: dict[int, str] = {}
        for w, ix in groups.items():
            block = b if isinstance(b, np.ndarray) else np.stack([b[i] for i in ix]).reshape(len(ix), w)
            reasons = self._dense_problems(block)
            out.update({int(ix[j]): str(reasons[j]) for j in np.flatnonzero(reasons != "")})
        return dict(sorted(out.items()))

    def _top(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """The top class's probability and index per row (NaN and -1 for an empty row)."""
        out, label = np.full(len(rows), np.nan), np.full(len(rows), -1, np.int64)
        groups = {rows.shape[1]: np.arange(rows.shape[0])} if isinstance(rows, np.ndarray) else by_width(rows)
        for w, ix in groups.items():
            if w == 0:
                continue
            block = rows if isinstance(rows, np.ndarray) else np.stack([rows[i] for i in ix]).reshape(len(ix), w)
            block = _expand_binary(block, self.from_logits)
            with np.errstate(all="ignore"):
                probs = _softmax(block) if self.from_logits else block
                out[ix], label[ix] = probs.max(axis=1), probs.argmax(axis=1)
        return out, label

    def diffs(self, baseline, candidate) -> KindDiffs:
        b, c = as_rows(baseline), as_rows(candidate)
        if len(b) != len(c):
            raise ValueError(f"baseline has {len(b)} rows, candidate {len(c)}: pair rows first")
        d = classification_diffs(b, c, from_logits=self.from_logits, top_k=self.top_k)
        b_summary, b_label = self._top(b)
        c_summary = self._top(c)[0]
        if not d.all_ok:  # some row may be an error (d.all_ok: the batch checks found none)
            bad_b = np.zeros(len(b), bool)
            bad_b[list(self.baseline_problems(b))] = True
            # The baseline's own top class, also on candidate-error rows (scorers.diffs clears it on some).
            b_summary[bad_b], b_label[bad_b] = np.nan, -1
            c_summary[~d.ok] = np.nan
        return KindDiffs(
            disagree=d.label_flip, severity=np.minimum(np.abs(d.confidence_delta), 1.0),
            baseline_summary=b_summary, candidate_summary=c_summary, baseline_label=b_label,
            candidate_label=d.candidate_label, error=d.error,
            metrics={"l1": d.l1, "linf": d.linf, "hellinger": d.hellinger, "topk_overlap": d.topk_overlap,
                     "confidence_delta": d.confidence_delta},
        )
