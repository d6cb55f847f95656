"""Simulation of the latency ratio metric alone (many runs, vectorised): the power table of
``scorers.latency``'s paired and unpaired constructions under the heavy-tailed model its docstring
states. ``python -c "from scorers.latency_simulate import latency_table; print(latency_table(200))"``.
"""

from __future__ import annotations

import math

import numpy as np

from scorers.latency import CS_SHARE, EXCEEDANCE_SHARE, UNPAIRED_SHARE, _T_SPAN, _key
from scorers.latency_exceedance import rejects_everywhere
from scorers.sequential import bernoulli_log_evalue_above, order_statistic_ranks
from scorers.sketch import ZERO_THRESHOLD_MS


def simulate_latencies(rng: np.random.Generator, n: int, k: float, *, paired: bool = True,
                       spike_p: float = 0.01, spike_x: float = 20.0, sigma: float = 1.0,
                       noise: float = 0.1, jitter_p: float = 0.0, jitter_ms: float = 0.0,
                       scale_ms: float = 1.0, spikes_per_execution: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(b, c) for n requests under the module's simulation model.

    ``jitter_p`` / ``jitter_ms``: besides that, each run of a model is delayed, with probability
    ``jitter_p``, by an exponential pause of mean ``jitter_ms`` that has nothing to do with the request
    (the scheduler, an interrupt, a page fault, another process on a loaded machine): absolute, so it
    is not scaled by ``k``, and independent between the baseline and the candidate. ``scale_ms``: the
    request cost's scale (the jitter matters where the models take about as long as it).
    ``spikes_per_execution``: the x``spike_x`` spikes hit each model's run independently (GC pauses,
    queueing) instead of belonging to the request (``scorers.calibration``'s ``latency_*_exec``).
    """
    def spikes():
        return np.where(rng.random(n) < spike_p, spike_x, 1.0)

    def cost():
        return scale_ms * rng.lognormal(0.0, sigma, n) * (1.0 if spikes_per_execution else spikes())

    def jitter():
        if jitter_p <= 0:
            return 0.0
        return np.where(rng.random(n) < jitter_p, rng.exponential(jitter_ms, n), 0.0)

    def own():  # the run's own spike, when spikes are per execution
        return spikes() if spikes_per_execution else 1.0

    lat = cost()
    b = lat * own() * rng.lognormal(0.0, noise, n) + jitter()
    c = k * (lat if paired else cost()) * own() * rng.lognormal(0.0, noise, n) + jitter()
    return b, c


def simulate_latency(k: float, *, paired: bool = True, method: str = "paired", runs: int = 500, seed: int = 0,
                     requests: int = 10_000, window: int = 250, margin: float = 1.5, q: float = 0.99,
                     alpha_rollback: float = 0.005, alpha_promote: float = 0.025, relative_accuracy: float = 0.005,
                     cs_share: float = CS_SHARE, unpaired_share: float = UNPAIRED_SHARE,
                     exceedance_share: float = EXCEEDANCE_SHARE, return_decisions: bool = False, **model) -> dict:
    """Many runs judged every ``window`` requests; returns rates of the latency metric's decisions.

    ``method``: "paired" (what ``latency_ratio_metric`` does with a ``PairedLatency``: the sign test at
    ``1 - unpaired_share`` of each side's level, intersected with the four order-statistic bounds at
    ``unpaired_share``; ``unpaired_share=0``: the sign test alone) or "unpaired" (the four
    order-statistic bounds at the whole level). ``paired``: whether the data are paired (same
    requests) or not.
    Result keys: ever_fail, ever_pass (share of runs whose metric was "fail" / "pass" at any look),
    median_fail_n / median_pass_n (requests at the first such look, among those runs); with
    ``return_decisions`` also looks (L,) and fail / pass (runs, L) boolean arrays per look.
    """
    rng = np.random.default_rng(seed)
    g = (1 + relative_accuracy) / (1 - relative_accuracy)
    lg = math.log(g)
    looks = np.arange(window, requests + 1, window)
    nl = looks.size

    def value(keys, lo, hi):  # the sketch's read-out of the order statistic with this key
        return np.clip(2.0 * g ** keys.astype(np.float64) / (1.0 + g), lo, hi)

    if method not in ("paired", "unpaired"):
        raise ValueError(f"unknown method {method!r}")
    u_share = 1.0 if method == "unpaired" else float(unpaired_share)
    e_share = 0.0 if method == "unpaired" else float(exceedance_share)
    a_re, a_pe = alpha_rollback * e_share, alpha_promote * e_share
    if u_share > 0:
        a_ru, a_pu = alpha_rollback * u_share, alpha_promote * u_share
        rc = np.array([order_statistic_ranks(int(n), q, a_ru / 2, a_pu / 2) for n in looks])
        rb = np.array([order_statistic_ranks(int(n), q, a_pu / 2, a_ru / 2) for n in looks])
    if method == "paired":
        sign = 1 - u_share - e_share  # the sign test's share of each side's level
        alpha_rollback, alpha_promote = alpha_rollback * sign, alpha_promote * sign
        span = int(math.ceil(_T_SPAN / lg))
        t_r = math.floor(math.log(margin) / lg) + 2  # rejection at t_r <=> lower bound g^(t_r-1) > margin
        t_p = math.ceil(math.log(margin) / lg) - 2  # rejection at t_p <=> upper bound g^(t_p+1) < margin
        while g ** (t_r - 2) > margin:
            t_r -= 1
        while g ** (t_p + 2) < margin:
            t_p += 1
        assert t_r <= span and -span <= t_p
        sides = {"rollback": (alpha_rollback, t_r, 0), "promote": (alpha_promote, t_p, 1)}
        cs_ranks = {s: np.array([order_statistic_ranks(int(n), q, cs_share * a / 2, cs_share * a / 2) for n in looks])
                    for s, (a, _, _) in sides.items()}

    fail = np.zeros((runs, nl), dtype=bool)
    pas = np.zeros((runs, nl), dtype=bool)
    for run in range(runs):
        b, c = simulate_latencies(rng, requests, k, paired=paired, **model)
        kb = np.ceil(np.log(np.maximum(b, ZERO_THRESHOLD_MS)) / lg).astype(np.int64)
        kc = np.ceil(np.log(np.maximum(c, ZERO_THRESHOLD_MS)) / lg).astype(np.int64)
        bmin, bmax = np.minimum.accumulate(b)[looks - 1], np.maximum.accumulate(b)[looks - 1]
        if u_share > 0:
            cmin, cmax = np.minimum.accumulate(c)[looks - 1], np.maximum.accumulate(c)[looks - 1]
            ra = relative_accuracy
            for li, n in enumerate(looks):
                (c_lo_r, c_hi_r), (b_lo_r, b_hi_r) = rc[li], rb[li]
                kcs = np.partition(kc[:n], [r - 1 for r in (c_lo_r, c_hi_r) if 1 <= r <= n])
                kbs = np.partition(kb[:n], [r - 1 for r in (b_lo_r, b_hi_r) if 1 <= r <= n])
                c_lo = value(kcs[c_lo_r - 1], cmin[li], cmax[li]) / (1 + ra) if c_lo_r >= 1 else 0.0
                c_hi = value(kcs[c_hi_r - 1], cmin[li], cmax[li]) / (1 - ra) if c_hi_r <= n else math.inf
                b_lo = value(kbs[b_lo_r - 1], bmin[li], bmax[li]) / (1 + ra) if b_lo_r >= 1 else 0.0
                b_hi = value(kbs[b_hi_r - 1], bmin[li], bmax[li]) / (1 - ra) if b_hi_r <= n else math.inf
                lo = c_lo / b_hi if b_hi > 0 and math.isfinite(b_hi) else 0.0
                hi = c_hi / b_lo if b_lo > 0 else math.inf
                fail[run, li], pas[run, li] = lo > margin, hi < margin
        if method == "unpaired":
            continue
        if e_share > 0:  # the two-sample exceedance test at the margin's offsets, every index
            for li, n in enumerate(looks):
                for side, t, a_s, out in (("rollback", t_r, a_re, fail), ("promote", t_p, a_pe, pas)):
                    if out[run, li]:
                        continue
                    bb, cc = kb[:n], kc[:n] - t
                    lo, hi = min(bb.min(), cc.min()), max(bb.max(), cc.max()) + 1

                    def above(x, lo=lo, hi=hi):
                        return np.cumsum(np.bincount(x - lo, minlength=hi - lo + 1)[::-1])[::-1].astype(float)

                    nb, nc, both = above(bb), above(cc), above(np.minimum(bb, cc))
                    up, down = (nc, nb) if side == "rollback" else (nb, nc)
                    out[run, li] = rejects_everywhere(int(n), up, down, both, np.ones(up.size, dtype=bool),
                                                      1.0 - q, math.log(1.0 / a_s))
        # paired: the baseline CS's key range per look and side, then cumulative U(a) / V(a) per look
        # over just those keys (difference arrays), then one vectorised sign test per side.
        ra = relative_accuracy
        ranges = {}
        for side, (alpha, t, shift) in sides.items():
            rr = cs_ranks[side]
            valid = (rr[:, 0] >= 1) & (rr[:, 1] <= looks)
            a_rng = np.zeros((nl, 2), dtype=np.int64)
            for li in np.flatnonzero(valid):
                n, (r_lo, r_hi) = looks[li], rr[li]
                kbs = np.partition(kb[:n], [r_lo - 1, r_hi - 1])
                b_lo = value(kbs[r_lo - 1], bmin[li], bmax[li]) / (1 + ra)
                b_hi = value(kbs[r_hi - 1], bmin[li], bmax[li]) / (1 - ra)
                a_rng[li] = (_key(b_lo, lg, up=False) + shift, _key(b_hi, lg, up=True) + shift)
            ranges[side] = (valid, a_rng)
        win = np.minimum(np.arange(requests) // window, nl - 1)
        for side, (alpha, t, shift) in sides.items():
            valid, a_rng = ranges[side]
            if not valid.any():
                continue
            w0, w1 = int(a_rng[valid, 0].min()), int(a_rng[valid, 1].max())
            size = w1 - w0 + 1
            uv = []
            for lo, hi in ((kb + 1, kc - t), (kc - t + 1, kb)):  # U: a in [kb+1, kc-t]; V: a in [kc-t+1, kb]
                lo, hi = np.maximum(lo, w0), np.minimum(hi, w1)
                ok = lo <= hi
                idx = np.concatenate([win[ok] * (size + 1) + (lo[ok] - w0), win[ok] * (size + 1) + (hi[ok] - w0 + 1)])
                wts = np.concatenate([np.ones(int(ok.sum())), -np.ones(int(ok.sum()))])
                d = np.bincount(idx, weights=wts, minlength=nl * (size + 1)).reshape(nl, size + 1)
                uv.append(np.cumsum(np.cumsum(d, axis=0), axis=1)[:, :size])
            pos, neg = uv if side == "rollback" else uv[::-1]
            li_all, a_all = [], []
            for li in np.flatnonzero(valid):
                a = np.arange(a_rng[li, 0], a_rng[li, 1] + 1) - w0
                li_all.append(np.full(a.size, li))
                a_all.append(a)
            li_all, a_all = np.concatenate(li_all), np.concatenate(a_all)
            p, m_ = pos[li_all, a_all], neg[li_all, a_all]
            ok = bernoulli_log_evalue_above(p + m_, p, 0.5) >= math.log(1.0 / ((1 - cs_share) * alpha))
            all_ok = np.ones(nl, dtype=bool)
            np.logical_and.at(all_ok, li_all, ok)
            out = fail if side == "rollback" else pas
            out[run] |= valid & all_ok  # either construction deciding decides (intersected intervals)

    def median_first(hit):
        first = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
        return int(np.median(looks[first[first >= 0]])) if (first >= 0).any() else None

    out = {"k": k, "paired": paired, "method": method, "runs": runs, "seed": seed,
           "ever_fail": float(fail.any(axis=1).mean()), "ever_pass": float(pas.any(axis=1).mean()),
           "median_fail_n": median_first(fail), "median_pass_n": median_first(pas)}
    if return_decisions:
        out.update({"looks": looks, "fail": fail, "pass": pas})
    return out


def latency_table(runs: int = 500, seed: int = 0, ks=(2.0, 1.0, 1.5), **kw) -> str:
    """The comparison table: each construction x paired / unpaired data x k."""
    rows = ["method    data      k    runs  ever_fail  ever_pass  median_n_fail  median_n_pass"]
    for method in ("unpaired", "paired"):
        for paired in (True, False):
            for k in ks:
                r = simulate_latency(k, paired=paired, method=method, runs=runs, seed=seed, **kw)
                rows.append(f"{method:9s} {'paired' if paired else 'unpaired':9s} {k:<4g} {runs:5d} "
                            f"{r['ever_fail']:9.1%} {r['ever_pass']:10.1%} {str(r['median_fail_n']):>14s} "
                            f"{str(r['median_pass_n']):>14s}")
    return "\n".join(rows)
