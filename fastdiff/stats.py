"""Intervals and three-way verdicts for a card's criteria.

A criterion compares an estimate with a threshold, at two levels that answer two
questions:

- **seed pair**: what one seed's two runs measured. Its 95% interval is the runs' own
  measurement error (a normal interval from the standard error, or a t one when the SE
  comes from few terms: the curvature probe's terms paired between the arms, bootstrap
  over FID samples). It covers that seed's own value, not the arms'.
- **arms**: whether the weighting differs beyond seed-to-seed training noise: a paired
  t-interval over the per-seed values (the two arms of one seed share data order,
  timesteps, noise and init, so their difference is what varies), its spread never
  below the runs' own measurement error. One seed has no spread: never pass or fail.

At either level a criterion

- passes when the whole interval lies on the pass side of the threshold,
- fails when the whole interval lies on the fail side,
- is inconclusive otherwise, with a rough count of the seeds that would decide it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def _quantile(p: float, df: float | None = None) -> float:
    """The normal quantile, or Student's t with ``df`` degrees of freedom. scipy.stats
    is imported here, not at the top: importing it is a noticeable part of start-up
    (docs/performance.md#measurements-behind-choices-in-the-code), and every training
    process imports this module (through fastdiff.fid)."""
    from scipy import stats

    return float(stats.norm.ppf(p) if df is None else stats.t.ppf(p, df))


PASS, FAIL, INCONCLUSIVE, NA = "pass", "fail", "inconclusive", "not evaluable"
LEVEL = 0.95


@dataclass
class Measure:
    """One seed pair's value of a criterion and its within-run standard error."""

    value: float
    se: float | None = None
    detail: str = ""
    df: float | None = None  # degrees of freedom of ``se`` when it is estimated from few terms
    # A within-run interval given directly, where value ± z·se would be wrong (the
    # maximum of several noisy ratios: simultaneous over them).
    lo: float | None = None
    hi: float | None = None

    def error(self, level: float = LEVEL) -> float | None:
        """The measurement's standard error, or the one its interval implies."""
        if self.lo is not None and self.hi is not None:
            return (self.hi - self.lo) / (2 * _quantile(0.5 + level / 2))
        return self.se


@dataclass
class Interval:
    estimate: float
    lo: float
    hi: float
    method: str  # "seeds (paired t)" or "within run"
    values: list[float] = field(default_factory=list)
    sd: float | None = None  # the spread the interval came from (seeds) or the SE (within)

    @property
    def n(self) -> int:
        return len(self.values)


def t_interval(values, level: float = LEVEL) -> tuple[float, float, float, float]:
    """(mean, lo, hi, sd): the Student-t interval of the mean of ``values`` (n ≥ 2)."""
    x = np.asarray(values, float)
    n = len(x)
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = _quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half, sd


def normal_interval(
    value: float, se: float, level: float = LEVEL, df: float | None = None
) -> tuple[float, float]:
    """value ± z·se, or ± t_df·se when the SE is itself estimated from few terms."""
    z = _quantile(0.5 + level / 2, df)
    return value - z * se, value + z * se


def welch_df(variances: list[float], dfs: list[int]) -> float | None:
    """Welch–Satterthwaite degrees of freedom of a sum of independent variance
    estimates, each with its own degrees of freedom (None when the sum is 0)."""
    total = sum(variances)
    denom = sum(v * v / d for v, d in zip(variances, dfs) if d > 0)
    return None if total == 0 or denom == 0 else total * total / denom


def seed_interval(measures: list[Measure], level: float = LEVEL) -> Interval:
    """The arms' interval: paired t over the seeds' values (n ≥ 2). Each seed's value
    carries its runs' measurement error, so the seeds' spread is at least that error;
    a few seeds can still agree by chance (whole spike counts often do), and a spread of
    0 would give a zero-width interval. The spread used is the larger of the observed
    one and the runs' root-mean-square error."""
    values = [m.value for m in measures]
    mean, lo, hi, sd = t_interval(values, level)
    errors = [m.error(level) for m in measures]
    known = [e for e in errors if e is not None and math.isfinite(e)]
    floor = math.sqrt(sum(e * e for e in known) / len(known)) if known else 0.0
    if floor > sd:
        sd = floor
        half = _quantile(0.5 + level / 2, len(values) - 1) * sd / math.sqrt(len(values))
        lo, hi = mean - half, mean + half
    return Interval(mean, lo, hi, "seeds (paired t)", values=values, sd=sd)


def run_interval(m: Measure, level: float = LEVEL) -> Interval:
    """One seed pair's interval from its runs' measurement error (an unknown one gives
    (−∞, ∞): inconclusive, however the point estimate falls)."""
    if m.lo is not None and m.hi is not None:
        return Interval(m.value, m.lo, m.hi, "within run", values=[m.value], sd=m.error(level))
    if m.se is None:
        return Interval(
            m.value, -math.inf, math.inf, "within run (no standard error)", values=[m.value]
        )
    lo, hi = normal_interval(m.value, m.se, level, m.df)
    return Interval(m.value, lo, hi, "within run", values=[m.value], sd=m.se)


def interval(measures: list[Measure], level: float = LEVEL) -> Interval | None:
    """Over seeds when there are several; else the one seed pair's own interval."""
    if not measures:
        return None
    if len(measures) >= 2:
        return seed_interval(measures, level)
    return run_interval(measures[0], level)


def verdict(iv: Interval | None, threshold: float, pass_below: bool) -> str:
    """PASS / FAIL / INCONCLUSIVE for "estimate ≤ threshold passes" (``pass_below``) or
    "estimate ≥ threshold passes". The threshold itself counts as the pass side."""
    if iv is None or math.isnan(iv.lo) or math.isnan(iv.hi):
        return NA
    lo, hi = (iv.lo, iv.hi) if pass_below else (-iv.hi, -iv.lo)
    thr = threshold if pass_below else -threshold
    if hi <= thr:
        return PASS
    if lo > thr:
        return FAIL
    return INCONCLUSIVE


def seeds_needed(iv: Interval, threshold: float, level: float = LEVEL, most: int = 1000) -> int:
    """Roughly how many seeds the observed spread needs for the interval to clear the
    threshold (the t-interval's half-width below |estimate − threshold|)."""
    gap = abs(iv.estimate - threshold)
    sd = iv.sd  # a seed's spread; for one run its SE stands in for it (a lower bound)
    if sd is None:
        return 2  # no spread known: at least two seeds, to have one
    if gap == 0:
        return most
    for n in range(2, most):
        if _quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n) < gap:
            return n
    return most


# ------------------------------------------------------------------------- FID
def sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (eigh, clipped at 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_from_features(
    features: np.ndarray, mu_ref: np.ndarray, sqrt_sigma_ref: np.ndarray, tr_sigma_ref: float
) -> float:
    """FID of feature rows (n, D) against reference statistics, given √Σ_ref:
    ‖μ − μ_ref‖² + tr Σ + tr Σ_ref − 2 tr (√Σ_ref Σ √Σ_ref)^½. The last trace is the sum
    of the square roots of the eigenvalues of YᵀY/(n−1), Y = (X − μ)√Σ_ref, which are
    those of the (n, n) Gram matrix YYᵀ/(n−1) when n < D."""
    n = len(features)
    mu = features.mean(0)
    xc = features - mu
    y = xc @ sqrt_sigma_ref
    small = y @ y.T if n < y.shape[1] else y.T @ y
    eig = np.clip(np.linalg.eigvalsh(small / (n - 1)), 0, None)
    tr_sigma = float((xc * xc).sum() / (n - 1))
    return float(((mu - mu_ref) ** 2).sum() + tr_sigma + tr_sigma_ref - 2 * np.sqrt(eig).sum())


def bootstrap_fid(
    features: np.ndarray,
    mu_ref: np.ndarray,
    sigma_ref: np.ndarray,
    resamples: int = 100,
    *,
    seed: int = 0,
    level: float = LEVEL,
    root: np.ndarray | None = None,
) -> dict[str, float]:
    """FID of the generated features and its bootstrap over them: the samples are
    redrawn with replacement, the reference statistics held fixed. The interval is the
    basic bootstrap one (2·FID − upper and lower quantiles), which corrects the
    plug-in estimator's upward bias to first order; ``se`` is the resamples' std."""
    features = np.asarray(features, np.float64)
    root = sqrt_psd(np.asarray(sigma_ref, np.float64)) if root is None else root
    tr_ref = float(np.trace(sigma_ref))
    fid = frechet_from_features(features, mu_ref, root, tr_ref)
    rng = np.random.default_rng(seed)
    n = len(features)
    boots = np.array(
        [
            frechet_from_features(features[rng.integers(0, n, n)], mu_ref, root, tr_ref)
            for _ in range(resamples)
        ]
    )
    q_lo, q_hi = np.quantile(boots, [0.5 - level / 2, 0.5 + level / 2])
    # With few samples per dimension the resamples' FID sits well above the estimate (a
    # resample repeats samples: less spread, larger distance), so the corrected interval
    # can lie below the plug-in value; ``debiased`` is the centre it is built around.
    return {
        "fid": fid,
        "lo": max(2 * fid - q_hi, 0.0),  # a distance is never negative
        "hi": 2 * fid - q_lo,
        "se": float(boots.std(ddof=1)),
        "debiased": 2 * fid - float(boots.mean()),
    }
