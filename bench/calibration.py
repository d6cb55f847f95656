"""Calibration table of the judge on realistic traffic (scorers/calibration.py), through the real path.

    python bench/calibration.py [--runs 500] [--procs 2] [scenario ...]

Each run: 10,000 requests judged every 250 (40 looks; the slice scenarios 14,000), default policy
(drift: min_span_s = one cycle). Prints one row per scenario with 95 % Wilson intervals; the README's
table comes from it. ``--runs 500 --procs 2`` takes about an hour on two cores.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from scipy import stats

from scorers.calibration import SCENARIOS, calibrate


def _ci(k: float, n: int) -> str:
    lo, hi = stats.binomtest(int(round(k * n)), n).proportion_ci(0.95, method="wilson")
    return f"{k:6.1%} [{lo:.1%}, {hi:.1%}]"


def _one(args):
    name, runs, seed = args
    return calibrate(name, runs=runs, seed=seed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("scenarios", nargs="*", default=list(SCENARIOS))
    a = ap.parse_args()
    chunks = max(a.procs, 1) * 2
    per = -(-a.runs // chunks)
    print(f"{'scenario':19s} {'runs':>5s}  {'ever rollback':22s} {'ever promote':22s} {'rollback<=5k':22s} "
          f"{'rollback<=10k':22s} {'promote<=10k':9s} {'median promote':>14s} {'promoted before flag':>20s} "
          f"{'flagged':>8s} {'promote->hold':>13s}")
    with ProcessPoolExecutor(a.procs) as pool:
        for name in a.scenarios:
            t = time.time()
            parts = list(pool.map(_one, [(name, per, 1000 * i + 7) for i in range(chunks)]))
            v = np.concatenate([p.verdicts for p in parts])
            fl = np.concatenate([p.flagged_at for p in parts])
            r = parts[0].__class__(name, v.shape[0], parts[0].looks, v, fl)
            print(f"{name:19s} {r.runs:5d}  {_ci(r.ever('rollback'), r.runs):22s} {_ci(r.ever('promote'), r.runs):22s} "
                  f"{_ci(r.first_within('rollback', 5_000), r.runs):22s} {_ci(r.first_within('rollback', 10_000), r.runs):22s} "
                  f"{r.first_within('promote', 10_000):9.1%} {str(r.median_promote_at()):>14s} "
                  f"{r.promoted_before_flagged():20.1%} {(r.flagged_at >= 0).mean():8.1%} {r.flip_back():13.1%}"
                  f"   ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
