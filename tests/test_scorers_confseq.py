"""The hand-written confidence sequences of scorers/sequential.py against confseq, Howard et al.'s own
implementation of their uniform boundaries (C++ / Boost.Math, separately maintained), as the latency
sketch is checked against ddsketch.

confseq is built from PyPI by scripts/confseq.sh on first use (its isolated build pins a pybind11 that
does not compile on Python 3.11); a failed build fails this module, it does not skip it.

The correspondence, parameter by parameter (Howard et al. 2021, section 3 and Table 3):
- ``log_evalue_above`` (sub-Poisson, mixing r = e^lambda >= 1 over Gamma(a, rate a)) is confseq's
  gamma-Poisson mixture with c = 1, s = S - n p0, v = n p0, and rho = a. confseq takes rho as
  v_opt / (2 log(1/(2 alpha_opt)) + log(1 + 2 log(1/(2 alpha_opt)))), inverted below.
- ``log_evalue_below`` (r <= 1) has the closed form of confseq's gamma-exponential mixture with c = 1
  and the roles swapped: s = n p0 - S, v = S (both are Gamma(a + S) P(a + S, n p0 + a) / (n p0 + a)^(a+S)
  up to the same constant).
- ``bernoulli_log_evalue_*`` (uniform mixture over the alternative side) is confseq's one-sided
  beta-binomial mixture at p0 = 1/2 (g = h = 1/2), where its Beta(r/(g(g+h)), r/(h(g+h))) prior is
  uniform: r = 1/2, i.e. rho = r + g h = 3/4. At other p0 confseq's prior is not uniform, so only the
  p0 = 1/2 case is comparable value for value.
Tolerances: values agree to 1e-9 relative (both are double-precision special functions); bounds agree to
1e-6 relative or 5e-10 absolute (our grid refinement stops at a 2.3e-10 bracket, its conservative end).

Far in a tail the regularised incomplete functions underflow in double precision, in confseq (Boost) as
in scipy; there ``scorers.log_special`` evaluates the scaled integral directly, and it is checked against
mpmath at 40 digits instead (the cross-check against confseq is what found the underflow).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import mpmath as mp
import numpy as np
import pytest

from scipy import special

from scorers import sequential as sq

ROOT = Path(__file__).resolve().parents[1]
ALPHA_OPT = 0.05  # only enters through rho, which is inverted below; any value in (0, 0.5) works


def _load_confseq():
    try:
        return importlib.import_module("confseq.boundaries")
    except ImportError:
        pass
    built = subprocess.run(["bash", str(ROOT / "scripts" / "confseq.sh")], env={
        **os.environ, "PYTHON": sys.executable}, capture_output=True, text=True)
    if built.returncode != 0:
        pytest.fail(f"scripts/confseq.sh could not build confseq: {built.stderr.strip()[-2000:]}")
    sys.path.insert(0, str(ROOT / ".cache" / "confseq"))
    return importlib.import_module("confseq.boundaries")


B = _load_confseq()


def v_opt_for(rho: float) -> float:
    """confseq's v_opt that gives mixture parameter ``rho`` (OneSidedNormalMixture::best_rho inverted)."""
    log_inv = np.log(1.0 / (2 * ALPHA_OPT))
    return rho * (2 * log_inv + np.log(1 + 2 * log_inv))


def _grid(seed: int, size: int = 600):
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 200_000, size).astype(np.float64)
    p0 = np.exp(rng.uniform(np.log(1e-4), np.log(0.6), size))
    # S around n * p0, from far below to far above, so both tails and the crossing region are covered
    s = np.clip(np.round(n * p0 * rng.uniform(0.0, 2.5, size)), 0, n)
    return n, p0, s


def _agree(ours, theirs):
    """Equal, on points where the regularised tail is representable in double precision."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.size > 300 and np.isfinite(ours).all() and np.isfinite(theirs).all()
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9)


def test_gamma_mixture_above_is_confseqs_gamma_poisson_mixture():
    n, p0, s = _grid(1)
    v_opt = v_opt_for(sq.PRIOR_SHAPE)
    theirs = np.array([B.gamma_poisson_log_mixture(si - ni * pi, ni * pi, v_opt, 1.0, ALPHA_OPT)
                       for ni, pi, si in zip(n, p0, s)])
    ok = special.gammaincc(s + sq.PRIOR_SHAPE, n * p0 + sq.PRIOR_SHAPE) > 1e-250  # see the far-tail tests
    _agree(sq.log_evalue_above(n, s, p0)[ok], theirs[ok])


def test_gamma_mixture_below_is_confseqs_gamma_exponential_mixture_with_roles_swapped():
    n, p0, s = _grid(2)
    v_opt = v_opt_for(sq.PRIOR_SHAPE)
    theirs = np.array([B.gamma_exponential_log_mixture(ni * pi - si, si, v_opt, 1.0, ALPHA_OPT)
                       for ni, pi, si in zip(n, p0, s)])
    ok = special.gammainc(s + sq.PRIOR_SHAPE, n * p0 + sq.PRIOR_SHAPE) > 1e-250  # see the far-tail tests
    _agree(sq.log_evalue_below(n, s, p0)[ok], theirs[ok])


@pytest.mark.parametrize("side", ["above", "below"])
def test_bernoulli_mixture_is_confseqs_one_sided_beta_binomial_at_one_half(side):
    rng = np.random.default_rng(3)
    n = rng.integers(1, 50_000, 400).astype(np.float64)
    s = rng.binomial(n.astype(int), rng.uniform(0.3, 0.7, 400)).astype(np.float64)
    v_opt = v_opt_for(0.75)
    sign = 1.0 if side == "above" else -1.0
    theirs = np.array([B.beta_binomial_log_mixture(sign * (si - ni / 2), ni / 4, v_opt, 0.5, 0.5, ALPHA_OPT, True)
                       for ni, si in zip(n, s)])
    ours = (sq.bernoulli_log_evalue_above if side == "above" else sq.bernoulli_log_evalue_below)(n, s, 0.5)
    # where the regularised beta tail is a denormal Boost keeps only a few bits: compared with mpmath below
    tail = (special.betaincc if side == "above" else special.betainc)(s + 1, n - s + 1, 0.5)
    representable = tail > 1e-250
    _agree(ours[representable], theirs[representable])


@pytest.mark.parametrize("alpha", [0.05, 0.005, 1e-4])
def test_upper_bound_is_confseqs_gamma_exponential_boundary(alpha):
    """Upper bound U solves n U - S = u(S) with u confseq's gamma-exponential boundary at v = S."""
    n, _, s = _grid(4, size=200)
    s = np.maximum(s, 1.0)  # at S = 0 confseq's boundary is at v = 0, outside its domain
    v_opt = v_opt_for(sq.PRIOR_SHAPE)
    theirs = np.array([(si + B.gamma_exponential_mixture_bound(si, alpha, v_opt, 1.0, ALPHA_OPT)) / ni
                       for ni, si in zip(n, s)])
    ours = sq.upper_bound(n, s, alpha)
    inside = theirs < 1.0  # our bound is capped at 1, a mean of [0, 1] values
    assert inside.sum() > 150
    np.testing.assert_allclose(ours[inside], theirs[inside], rtol=1e-6, atol=5e-10)
    assert (ours[inside] >= theirs[inside] * (1 - 1e-12)).all()  # the conservative end of the bracket


@pytest.mark.parametrize("alpha", [0.05, 0.005, 1e-4])
def test_lower_bound_sits_on_confseqs_gamma_poisson_boundary(alpha):
    """Lower bound L solves S - n L = u(n L) with u confseq's gamma-Poisson boundary: L is where
    confseq's mixture crosses log(1/alpha), rejecting just below L and not just above."""
    n, _, s = _grid(5, size=200)
    v_opt = v_opt_for(sq.PRIOR_SHAPE)
    low = sq.lower_bound(n, s, alpha)
    checked = 0
    for ni, si, li in zip(n, s, low):
        if li <= 1e-7:
            continue  # no evidence above 0 yet: nothing to cross
        below, above = li * (1 - 1e-6), li * (1 + 1e-6)
        assert si - ni * below > B.gamma_poisson_mixture_bound(ni * below, alpha, v_opt, 1.0, ALPHA_OPT)
        assert si - ni * above < B.gamma_poisson_mixture_bound(ni * above, alpha, v_opt, 1.0, ALPHA_OPT)
        checked += 1
    assert checked > 100


# ---- far tails, where both double-precision implementations underflow: mpmath at 40 digits ----

def _mp_gamma_mixture(n, s, p0, above: bool) -> float:
    a = sq.PRIOR_SHAPE
    lam, sig = mp.mpf(n) * mp.mpf(p0), mp.mpf(s) + a
    x = lam + a
    tail = mp.gammainc(sig, x, mp.inf, regularized=True) if above else mp.gammainc(sig, 0, x, regularized=True)
    z = mp.gammainc(a, a, mp.inf, regularized=True) if above else mp.gammainc(a, 0, a, regularized=True)
    return float(lam + a * mp.log(a) - mp.loggamma(a) - mp.log(z) + mp.loggamma(sig) - sig * mp.log(x) + mp.log(tail))


def _mp_bernoulli_mixture(n, s, p0, above: bool) -> float:
    # B_x(a, b) = x^a (1-x)^b / a * 2F1(a+b, 1; a+1; x) (DLMF 8.17.8), the upper side by symmetry
    # maxterms: mpmath 1.3 (the version torch's sympy pins) gives up at its default 6,000 terms here
    f, p, terms = n - s, mp.mpf(p0), 10**6
    if above:
        return float(mp.log(p) + mp.log(mp.hyp2f1(n + 2, 1, f + 2, 1 - p, maxterms=terms) / (f + 1)))
    return float(mp.log(1 - p) + mp.log(mp.hyp2f1(n + 2, 1, s + 2, p, maxterms=terms) / (s + 1)))


mp.mp.dps = 40
FAR_TAILS = [  # (n, S, p0): sample mean far on the other side of p0, regularised tail < 1e-300
    (20_000, 1_200, 0.02), (50_000, 300, 0.05), (8_000, 0, 0.2), (100_000, 4_000, 0.0166),
    (16_392, 4_142, 0.1306), (30_000, 9_000, 0.2), (2_000, 1_900, 0.5), (37_935, 22_696, 0.5),
]


@pytest.mark.parametrize("n,s,p0", FAR_TAILS)
@pytest.mark.parametrize("above", [True, False])
def test_gamma_mixture_far_tails_against_mpmath(n, s, p0, above):
    ours = float((sq.log_evalue_above if above else sq.log_evalue_below)(n, s, p0))
    assert ours == pytest.approx(_mp_gamma_mixture(n, s, p0, above), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("n,s,p0", FAR_TAILS)
@pytest.mark.parametrize("above", [True, False])
def test_bernoulli_mixture_far_tails_against_mpmath(n, s, p0, above):
    ours = float((sq.bernoulli_log_evalue_above if above else sq.bernoulli_log_evalue_below)(n, s, p0))
    assert ours == pytest.approx(_mp_bernoulli_mixture(n, s, p0, above), rel=1e-9, abs=1e-9)
