"""Scaled incomplete gamma and beta integrals in log space, for where scipy's regularised ones underflow.

The mixture e-values of ``scorers.sequential`` multiply a regularised incomplete function (P, Q or I_x)
by a huge prefactor. Far in a tail the regularised value underflows to 0 (or to a denormal with a
few significant bits) while the product is an ordinary number, e.g. log G = -7.67 for "the mean is
below p0" when the sample mean is twice p0 (found by the cross-check against confseq, whose Boost
code loses the same digits). Each function below returns the *scaled* integral directly:

- ``log_scaled_lower_gamma(s, x)`` = log(gamma(s, x) e^x x^-s) = log(1F1(1; s+1; x) / s), series
  sum_k x^k / (s (s+1) ... (s+k)), which converges geometrically where P underflows (x < s);
- ``log_scaled_upper_gamma(s, x)`` = log(Gamma(s, x) e^x x^-s), by the Lentz continued fraction of
  Numerical Recipes' ``gcf``, fast where Q underflows (x > s + 1);
- ``log_scaled_lower_beta(a, b, x)`` = log(B_x(a, b) x^-a (1-x)^-b) = log(2F1(a+b, 1; a+1; x) / a),
  series sum_k prod_{j<k} (a+b+j) x / (a+1+j) / a, which converges where I_x(a, b) underflows
  (x < a / (a + b)).

All are vectorised over 1-d arrays and called only on the few elements that underflowed.
"""

from __future__ import annotations

import numpy as np

_CHUNK = 256
_MAX_TERMS = 1 << 20
_TINY = 1e-300


def _log_series(first_num, step_num, den0, x):
    """log sum_{k>=0} prod_{j<k} (first_num + j*step_num) x / (den0 + j), summed in chunks in log space."""
    first_num, den0, x = (np.asarray(v, dtype=np.float64) for v in np.broadcast_arrays(first_num, den0, x))
    log_x = np.log(x)
    total = np.zeros_like(x)          # running sum, scaled by exp(-shift)
    shift = np.zeros_like(x)
    log_term = np.zeros_like(x)       # log of the next term (k = 0: 1)
    done = np.zeros(x.shape, dtype=bool)
    j = np.arange(_CHUNK, dtype=np.float64)
    for start in range(0, _MAX_TERMS, _CHUNK):
        k = start + j
        log_ratio = np.log(first_num[:, None] + k * step_num) + log_x[:, None] - np.log(den0[:, None] + k)
        logs = log_term[:, None] + np.concatenate([np.zeros((x.size, 1)), np.cumsum(log_ratio, axis=1)[:, :-1]], 1)
        log_term = logs[:, -1] + log_ratio[:, -1]
        new_shift = np.maximum(shift, logs.max(axis=1))
        chunk = np.exp(logs - new_shift[:, None]).sum(axis=1)
        total = np.where(done, total, total * np.exp(shift - new_shift) + chunk)
        shift = np.where(done, shift, new_shift)
        # stop once the next term is negligible and the terms are shrinking (ratio < 1)
        done |= (log_term - shift < -40) & (log_ratio[:, -1] < 0)
        if done.all():
            break
    return shift + np.log(total)


def log_scaled_lower_gamma(s, x):
    """log(gamma_lower(s, x) e^x x^-s) for s > 0, x >= 0: log(1F1(1; s+1; x) / s)."""
    s = np.asarray(s, dtype=np.float64)
    return _log_series(1.0, 0.0, s + 1.0, x) - np.log(s)


def log_scaled_upper_gamma(s, x, iterations: int = 2000):
    """log(Gamma(s, x) e^x x^-s) for x > s + 1 (Lentz's continued fraction, as in NR ``gcf``)."""
    s, x = (np.asarray(v, dtype=np.float64) for v in np.broadcast_arrays(s, x))
    b = x + 1.0 - s
    c = np.full_like(b, 1.0 / _TINY)
    d = 1.0 / b
    h = d.copy()
    for i in range(1, iterations + 1):
        an = -i * (i - s)
        b = b + 2.0
        d = an * d + b
        d = np.where(np.abs(d) < _TINY, _TINY, d)
        c = b + an / c
        c = np.where(np.abs(c) < _TINY, _TINY, c)
        d = 1.0 / d
        delta = d * c
        h = h * delta
        if np.all(np.abs(delta - 1.0) < 1e-15):
            break
    # Gamma(s, x) = e^-x x^s h
    return np.log(h)


def log_scaled_lower_beta(a, b, x):
    """log(B_x(a, b) x^-a (1-x)^-b) = log(2F1(a+b, 1; a+1; x) / a), for x < a / (a + b)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return _log_series(a + b, 1.0, a + 1.0, x) - np.log(a)
