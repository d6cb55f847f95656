"""Shadow-replay scoring engine: pure numpy/scipy, no I/O.

diffs       per-request paired diffs (classification, regression, multi-output), errors counted with reasons
sketch      LatencySketch: mergeable DDSketch-style quantiles, 0.5 % relative accuracy, JSON-serialisable
accumulate  PairAccumulator: mergeable sufficient statistics of a (model, candidate) span
sequential  anytime-valid confidence sequences (beta-mixture martingales), quantile ranks, e-BH / BH
clusters    the independent units: sessions of one key within a gap (ClusterTracker, ClusterStats)
ratio_cs    anytime-valid CS for request-weighted rates over independent clusters (Fan / Bernoulli mixtures)
judge       JudgePolicy, judge() -> Judgement: promote / hold / rollback with reasons
divergence  PSI, KL, JS distance, Hellinger, Wasserstein, KS, chi-squared / Stuart-Maxwell on labels
simulate    vectorised calibration harness (many runs, judged at every window)
"""
