"""Slices: flag the ones confidently over the margin (e-BH), and hold a promote while a big one may be.

Two questions per slice value (e.g. ``country=de``), both on its request-weighted label flip rate
over its closed clusters (scorers.clusters: a cluster lies in one slice; scorers.ratio_cs for the
bounds), minus the noise floor when a noise run exists; a slice's share is its share of the scored
requests:

* **flagged** (rollback-side evidence): e-BH (Wang & Ramdas 2022) at ``slice_alpha`` over the
  slices' e-processes "flip rate above margin" (``scorers.sequential.log_evalue_above``). e-BH keeps
  the false discovery rate at ``slice_alpha`` under any dependence between slices. A slice once
  flagged **stays flagged** (``SliceMemory``): its e-process stopped at the look that flagged it is
  still an e-value (optional stopping), and the verdict does not forget evidence it acted on.
* **plausibly far over the margin** (promote side): a slice carrying at least ``slice_min_share``
  of the scored requests whose anytime-valid upper bound (at the promote level alpha/2, not divided: a
  promote needs *every* such slice under the bound, an intersection-union test, so a false
  promote needs the one bad slice's bound to be wrong) is not yet below ``slice_promote_factor``
  (default 2) x the margin. It holds the promote. A 5 %-of-traffic slice at 3x the margin
  therefore holds the promote until it is flagged, instead of being promoted past (measured
  before this: 317 of 320 runs). Why 2x by default: with 20 slices of 5 %, showing each one under
  1x the margin takes more than 10,000 requests even of an *identical* candidate (measured: 0 of
  500 A/A runs promoted by 10,000; 20 small samples, each with an anytime-valid bound); under 2x
  the median is 5,750. A slice between 1x and 2x does not hold the promote, but it is flagged as
  soon as the evidence shows it over 1x, and a flag withdraws a promote. Set it to 1 to hold
  every promote until each big slice is shown under the margin itself.

Slices below ``slice_min_samples`` scored requests are not flagged (too few to show), and slices
under ``slice_min_share`` never hold a promote (a 0.1 % slice would hold it for ever).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from schemas.events import SliceJudgement
from scorers import ratio_cs as rc
from scorers.accumulate import PairAccumulator
from scorers.sequential import ebh

FLIP = "label_flip_rate"


@dataclass
class SliceOutcome:
    judgements: list[SliceJudgement]  # worst first
    flagged: dict[str, float]  # "attribute=value" -> log e-value when first flagged (sticky)
    blocking: SliceJudgement | None = None  # a big slice not yet shown within the margin
    requests_needed: int | None = None  # more requests (all traffic) for the blocking slice to pass

    @property
    def failed(self) -> int:
        return len(self.flagged)


def judge_slices(acc: PairAccumulator, *, margin: float | None, alpha: float, promote_alpha: float,
                 min_samples: int, min_share: float, promote_factor: float = 1.0, noise: PairAccumulator | None = None,
                 flagged_before: dict[str, float] | None = None) -> SliceOutcome:
    flagged = dict(flagged_before or {})
    if margin is None:
        return SliceOutcome([], flagged)
    total = max(acc.clusters.flips.requests, 1)
    keys, tables = [], []
    for k, table in acc.clusters.slices.items():
        for v, t in table.items():
            if t.requests > 0:
                keys.append((k, v))
                tables.append(t)
    if not keys:
        return SliceOutcome([], flagged)
    stack = np.stack([t.t for t in tables])
    n = stack[:, :, rc.N].sum(axis=1)
    s = stack[:, :, rc.Y].sum(axis=1)
    s_alpha, p_alpha = alpha, promote_alpha
    shift_hi = shift_lo = noise_est = 0.0
    nt = None if noise is None else noise.clusters.flips
    if nt is not None and nt.requests > 0:
        # Fail only above margin + the floor's *upper* bound; pass only when the slice's upper bound
        # minus the floor's *lower* bound is below the margin (each side conservative).
        shift_hi = float(rc.upper_bound(nt, s_alpha / 2))
        shift_lo = float(rc.lower_bound(nt, p_alpha / 2))
        noise_est = nt.estimate
        s_alpha, p_alpha = s_alpha / 2, p_alpha / 2
    big_enough = n >= min_samples
    log_e = np.where(big_enough, rc.log_evalue_above(stack, margin + shift_hi), -np.inf)
    rejected = ebh(np.exp(np.minimum(log_e, 700)), s_alpha) & big_enough
    for i in np.flatnonzero(rejected):
        name = f"{keys[i][0]}={keys[i][1]}"
        flagged.setdefault(name, float(log_e[i]))
    # Promote side, per slice, undivided: the test at promote_factor x margin decides; the bounds are
    # shown (to 1/625 of their search range: two rounds of the grid search).
    shown_under = rc.rejects_below(stack, margin * promote_factor + shift_lo, p_alpha)
    gate_hi = rc.upper_bound(stack, p_alpha, rounds=2) - shift_lo
    a_disp = s_alpha / len(n)  # display lower bound: Bonferroni over the slices shown
    lo = rc.lower_bound(stack, a_disp, rounds=2) - shift_hi
    out, blocking, needed = [], None, None
    for i in np.lexsort((-(s / n), -np.where(np.isfinite(log_e), log_e, -1e9))):
        k, v = keys[i]
        is_flagged = f"{k}={v}" in flagged
        big = n[i] / total >= min_share
        dec = "fail" if is_flagged else ("pass" if shown_under[i] else "inconclusive")
        bar = margin * promote_factor
        up = min(float(gate_hi[i]), float(np.nextafter(bar, -np.inf))) if shown_under[i] else max(float(gate_hi[i]), bar)
        sj = SliceJudgement(attribute=k, value=v, metric=FLIP, estimate=float(s[i] / n[i] - noise_est),
                            lower=float(lo[i]), upper=up, samples=int(n[i]), decision=dec)
        out.append(sj)
        if dec == "inconclusive" and big:
            more = rc.requests_to_cross(tables[i], margin * promote_factor + shift_lo, p_alpha, side="upper")
            share = n[i] / total
            total_more = None if more is None else int(np.ceil(more / share))
            if blocking is None or (total_more is not None and (needed is None or total_more > needed)):
                blocking, needed = sj, total_more
    out.sort(key=lambda j: (j.decision != "fail", j.decision != "inconclusive", -(j.estimate or 0.0)))
    return SliceOutcome(out, flagged, blocking, needed)
