"""How much power *any* test can have on issue #21's per-execution latency case (README, calibration).

    python bench/latency_power_bound.py [--alpha 0.005]

Model (scorers.calibration ``latency_2x_exec``): request cost lognormal(0, 1), x20 spikes drawn per
execution (independent for the replayed baseline's and the candidate's run), noise lognormal(0, 0.1),
candidate 2x the baseline; the metric's null is rho = p99_c / p99_b <= 1.5 at the judge's per-metric
rollback level (default: ``JudgePolicy().rollback_alpha()``, 0.05 / 2 / 6 = 0.0042 with six
rollback-capable metrics; it was 0.005 with five, before the median's latency ratio).

At a threshold x = f * p99_b, the distributions Q with Q(c > 1.5 x) <= 1 % <= Q(b > x) are in the null.
The closest one to the truth P in KL (the reverse information projection on these two linear
constraints) is dQ*/dP = 1 / (1 + lam (X_c - p) + mu (p - X_b)), (lam, mu) maximising E_P log(...).
Any level-alpha test of the null is level alpha against Q*, and "rolled back by 10,000 requests" is an
event of the first 10,000 requests, so its probability under P is at most the Neyman-Pearson power of
P against Q* at n = 10,000, computed here by simulating the cell counts (4 million draws for the cell
probabilities, 400,000 simulated runs per side). The worst threshold bounds every test.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.optimize import minimize

from scorers.policy import JudgePolicy

P_EXCEED, MARGIN, N = 0.01, 1.5, 10_000


def factors(lam: float, mu: float) -> np.ndarray:
    """The bet's factor per cell: (both above, candidate only, baseline only, neither)."""
    p = P_EXCEED
    return np.array([1 + (lam - mu) * (1 - p), 1 + lam * (1 - p) + mu * p, 1 - lam * p - mu * (1 - p),
                     1 - lam * p + mu * p])


def best_bet(cells: np.ndarray) -> tuple[float, np.ndarray]:
    def neg(v):
        f = factors(*v)
        return 1.0 if (f <= 1e-9).any() or min(v) < 0 else -(cells * np.log(f)).sum()

    r = min((minimize(neg, x0, method="Nelder-Mead", options=dict(xatol=1e-8, fatol=1e-14))
             for x0 in ([0.3, 0.3], [1.0, 0.1], [0.1, 0.5])), key=lambda r: r.fun)
    return -r.fun, r.x


def main(alpha: float, draws: int = 4_000_000, sims: int = 400_000, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    cost = rng.lognormal(0.0, 1.0, draws)
    b = cost * np.where(rng.random(draws) < 0.01, 20.0, 1.0) * rng.lognormal(0.0, 0.1, draws)
    c = 2.0 * cost * np.where(rng.random(draws) < 0.01, 20.0, 1.0) * rng.lognormal(0.0, 0.1, draws)
    p99 = np.quantile(b, 0.99)
    worst = None
    for f in np.arange(1.1, 1.4, 0.025):
        xb, xc = b > f * p99, c > MARGIN * f * p99
        cells = np.array([np.mean(xb & xc), np.mean(xc & ~xb), np.mean(xb & ~xc), 0.0])
        cells[3] = 1.0 - cells[:3].sum()
        growth, (lam, mu) = best_bet(cells)
        f_cells = factors(lam, mu)
        q_cells = cells / f_cells
        q_cells /= q_cells.sum()
        llr = np.log(f_cells)
        under_q = rng.multinomial(N, q_cells, size=sims) @ llr
        under_p = rng.multinomial(N, cells, size=sims) @ llr
        power = float((under_p > np.quantile(under_q, 1 - alpha)).mean())
        print(f"threshold {f:.3f} x p99_b: growth {growth:.2e} nats/request, bet ({lam:.2f}, {mu:.2f}), "
              f"most powerful test's power at n={N}: {power:.3f}", flush=True)
        worst = power if worst is None else min(worst, power)
    print(f"bound on any level-{alpha:.4g} test's power within {N} requests: {worst:.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--alpha", type=float, default=JudgePolicy().rollback_alpha())
    main(ap.parse_args().alpha)
