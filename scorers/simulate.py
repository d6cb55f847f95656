"""Calibration harness for i.i.d. traffic: many simulated runs, judged at every window, vectorised.

The vectorised twin of ``judge()`` for independent requests without repeats, slices or drift
(where every request is independent evidence), so very many runs are cheap; a test checks that it
gives the same verdict as ``judge()`` at every look. Realistic traffic (repeats, drift, slices,
heavy-tailed latency) runs through the real accumulator and judge in ``scorers.calibration``.

Each run streams ``requests`` requests; after every ``window`` requests the cumulative statistics are
judged with the same bounds and the same decision rule as ``scorers.judge`` (the judge's sufficient
statistics are sums, so a run is just cumulative sums of simulated per-request values). Simulated:

* label flips ~ Bernoulli(flip_rate),
* |confidence delta| ~ Beta with mean ``abs_delta_mean`` (concentration ``abs_delta_concentration``),
* candidate errors ~ Bernoulli(error_rate),
* optionally a noise run (baseline vs baseline) of ``noise_requests`` with its own flip rate and
  |delta| mean, drawn once per run.

Metrics that are not simulated (latency ratio, paired accuracy) are taken as passing, so the alpha
split (Bonferroni over the policy's metrics) is exactly the production one. Data-quality checks and
slices are not simulated. Rerun with other settings:

    python -c "from scorers.simulate import simulate; print(simulate(flip_rate=0.03).describe())"
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scorers import ratio_cs as rc
from scorers.judge import ABS_DELTA, ERROR, FLIP, JudgePolicy


@dataclass
class SimulationResult:
    looks: np.ndarray  # (L,) cumulative requests at each look
    verdicts: np.ndarray  # (R, L) "promote" / "hold" / "rollback" at each look
    first_decision: np.ndarray  # (R,) first non-hold verdict, "hold" if none
    decided_at: np.ndarray  # (R,) requests at the first non-hold verdict, -1 if none

    @property
    def runs(self) -> int:
        return int(self.verdicts.shape[0])

    @property
    def ever_rollback_rate(self) -> float:
        """Share of runs rolled back at *any* look (stricter than acting on the first decision)."""
        return float((self.verdicts == "rollback").any(axis=1).mean())

    @property
    def ever_promote_rate(self) -> float:
        return float((self.verdicts == "promote").any(axis=1).mean())

    def first_rate(self, verdict: str, within: int | None = None) -> float:
        hit = self.first_decision == verdict
        if within is not None:
            hit &= (self.decided_at >= 0) & (self.decided_at <= within)
        return float(hit.mean())

    def describe(self) -> str:
        dec = self.decided_at[self.decided_at >= 0]
        med = int(np.median(dec)) if dec.size else None
        return (f"{self.runs} runs: first promote {self.first_rate('promote'):.2%}, first rollback "
                f"{self.first_rate('rollback'):.2%}, undecided {self.first_rate('hold'):.2%}; ever rollback "
                f"{self.ever_rollback_rate:.2%}, ever promote {self.ever_promote_rate:.2%}; median requests to "
                f"decide {med}")


def singleton_tables(n, s, sq=None) -> np.ndarray:
    """``scorers.ratio_cs`` tables (..., bins, 6) of n independent requests (clusters of one) with
    total s and sum of squares sq (= s for 0/1 outcomes)."""
    n, s = np.broadcast_arrays(np.asarray(n, dtype=np.float64), np.asarray(s, dtype=np.float64))
    sq = s if sq is None else np.broadcast_to(np.asarray(sq, dtype=np.float64), s.shape)
    t = np.zeros((*n.shape, 1, rc.N_STATS))
    t[..., 0, :] = np.stack([n, n, n, s, sq, s], axis=-1)
    return t


def _bounded_metric(table, margin, a_r, a_p, noise=None):
    """(fail, pass) boolean arrays: the tests at the margin, as ``scorers.metric_bounds.rate_metric``
    decides (with a noise run: at margin + its upper / lower bound, each at half the level)."""
    if noise is not None:
        noise_hi = rc.upper_bound(noise, a_r / 2)[..., None]
        noise_lo = rc.lower_bound(noise, a_p / 2)[..., None]
        return rc.rejects_above(table, margin + noise_hi, a_r / 2), rc.rejects_below(table, margin + noise_lo, a_p / 2)
    return rc.rejects_above(table, margin, a_r), rc.rejects_below(table, margin, a_p)


@dataclass
class RunDraws:
    """Per-request simulated values of ``runs`` runs (rows) of ``requests`` requests (columns)."""

    error: np.ndarray  # (R, N) bool
    flip: np.ndarray  # (R, N) bool, False where error
    abs_delta: np.ndarray  # (R, N) float in [0, 1], 0 where error
    noise_flip: np.ndarray  # (R, M) bool, the baseline-vs-baseline replay of each run (M may be 0)
    noise_abs_delta: np.ndarray  # (R, M)


def draw_runs(*, runs: int = 1000, requests: int = 5000, flip_rate: float = 0.0, abs_delta_mean: float = 0.0,
              abs_delta_concentration: float = 20.0, error_rate: float = 0.0, noise_requests: int = 0,
              noise_flip_rate: float = 0.0, noise_abs_delta_mean: float = 0.0, seed: int = 0) -> RunDraws:
    rng = np.random.default_rng(seed)

    def beta_draws(mean: float, size) -> np.ndarray:
        if mean <= 0:
            return np.zeros(size)
        k = abs_delta_concentration
        return rng.beta(mean * k, (1 - mean) * k, size)

    err = rng.random((runs, requests)) < error_rate
    flip = (rng.random((runs, requests)) < flip_rate) & ~err
    delta = np.where(err, 0.0, beta_draws(abs_delta_mean, (runs, requests)))
    noise_flip = rng.random((runs, noise_requests)) < noise_flip_rate
    noise_delta = beta_draws(noise_abs_delta_mean, (runs, noise_requests))
    return RunDraws(err, flip, delta, noise_flip, noise_delta)


def judge_runs(draws: RunDraws, *, window: int = 250, policy: JudgePolicy | None = None) -> SimulationResult:
    """Judge every run at every ``window`` requests with the judge's bounds and decision rule."""
    policy = policy or JudgePolicy()
    runs, requests = draws.error.shape
    looks = np.arange(window, requests + 1, window)
    margins = policy.margins()
    gating, critical = set(policy.gating_metrics()), set(policy.critical)
    a_r, a_p = policy.rollback_alpha(), policy.promote_alpha()

    def cum_at_looks(x: np.ndarray) -> np.ndarray:
        return np.cumsum(x, axis=1, dtype=np.float64)[:, looks - 1]

    errors = cum_at_looks(draws.error)
    n_req = np.broadcast_to(looks, (runs, looks.size)).astype(np.float64)
    scored = n_req - errors  # errored requests are not scored, exactly as in the accumulator
    flips = cum_at_looks(draws.flip)
    deltas = cum_at_looks(draws.abs_delta)
    deltas_sq = cum_at_looks(draws.abs_delta ** 2)
    noise_n = draws.noise_flip.shape[1]
    noise_flips = noise_deltas = None
    if noise_n:
        noise_flips = singleton_tables(noise_n, draws.noise_flip.sum(axis=1).astype(np.float64))
        noise_deltas = singleton_tables(noise_n, draws.noise_abs_delta.sum(axis=1),
                                        (draws.noise_abs_delta ** 2).sum(axis=1))

    fail = {}
    passed = {}
    if ERROR in margins:
        fail[ERROR], passed[ERROR] = _bounded_metric(singleton_tables(n_req, errors), margins[ERROR], a_r, a_p)
    if FLIP in margins:
        fail[FLIP], passed[FLIP] = _bounded_metric(singleton_tables(scored, flips), margins[FLIP], a_r, a_p,
                                                   noise_flips)
    if ABS_DELTA in margins:
        fail[ABS_DELTA], passed[ABS_DELTA] = _bounded_metric(singleton_tables(scored, deltas, deltas_sq),
                                                             margins[ABS_DELTA], a_r, a_p, noise_deltas)
    shape = n_req.shape
    no = np.zeros(shape, dtype=bool)
    yes = np.ones(shape, dtype=bool)
    any_critical = np.any([fail.get(m, no) for m in critical], axis=0) if critical else no
    any_gating = np.any([fail.get(m, no) for m in gating], axis=0) if gating else no
    all_pass = np.all([passed.get(m, yes) for m in gating], axis=0) if gating else no
    enough = scored >= policy.min_samples
    verdicts = np.where(any_critical | any_gating, "rollback",
                        np.where(all_pass & enough, "promote", "hold")).astype(object)
    decided = verdicts != "hold"
    first_idx = np.where(decided.any(axis=1), decided.argmax(axis=1), -1)
    first = np.where(first_idx >= 0, verdicts[np.arange(runs), np.maximum(first_idx, 0)], "hold")
    decided_at = np.where(first_idx >= 0, looks[np.maximum(first_idx, 0)], -1)
    return SimulationResult(looks=looks, verdicts=verdicts, first_decision=first.astype(object),
                            decided_at=decided_at)


def simulate(*, runs: int = 1000, requests: int = 5000, window: int = 250, policy: JudgePolicy | None = None,
             **draw_settings) -> SimulationResult:
    """``draw_runs`` then ``judge_runs``; ``draw_settings`` are draw_runs' keywords (flip_rate, seed, ...)."""
    return judge_runs(draw_runs(runs=runs, requests=requests, **draw_settings), window=window, policy=policy)


def synthetic_outputs(rng: np.random.Generator, n: int, *, classes: int = 10, flip_rate: float = 0.0,
                      noise_scale: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Baseline probabilities and a candidate that flips the top class of exactly the rows drawn with
    probability ``flip_rate`` and otherwise perturbs probabilities by ``noise_scale`` (log scale)."""
    b = rng.dirichlet(np.full(classes, 0.5), n)
    c = b * np.exp(noise_scale * rng.standard_normal((n, classes)))
    c /= c.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    bl, cl = b.argmax(axis=1), c.argmax(axis=1)
    top_b, top_c = c[rows, bl].copy(), c[rows, cl].copy()
    c[rows, bl], c[rows, cl] = top_c, top_b  # the perturbation alone never flips a row
    flip = rng.random(n) < flip_rate
    other = (bl + rng.integers(1, classes, n)) % classes
    r = rows[flip]
    c[r, bl[flip]], c[r, other[flip]] = c[r, other[flip]], c[r, bl[flip]].copy()
    return b, c
