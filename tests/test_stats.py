"""Intervals, three-way verdicts and the FID bootstrap, against independent values."""

import math

import numpy as np
import pytest
import scipy.linalg

from fastdiff.stats import (
    FAIL,
    INCONCLUSIVE,
    NA,
    PASS,
    Interval,
    Measure,
    bootstrap_fid,
    frechet_from_features,
    interval,
    seeds_needed,
    sqrt_psd,
    t_interval,
    verdict,
)

T3_975 = 3.182446305284263  # Student t, 3 degrees of freedom, 97.5% (tables)
Z_975 = 1.959963984540054


def test_paired_t_interval_matches_the_textbook_formula():
    diffs = [0.10, -0.05, 0.20, 0.15]
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    got_mean, lo, hi, got_sd = t_interval(diffs)
    assert got_mean == pytest.approx(mean) and got_sd == pytest.approx(sd)
    assert lo == pytest.approx(mean - T3_975 * sd / 2) and hi == pytest.approx(
        mean + T3_975 * sd / 2
    )
    iv = interval([Measure(d, se=0.001) for d in diffs])
    assert iv.method == "seeds (paired t)" and iv.n == 4 and iv.lo == pytest.approx(lo)


def test_one_seed_uses_the_within_run_standard_error():
    iv = interval([Measure(-0.2, se=0.05)])
    assert iv.method == "within run"
    assert (iv.lo, iv.hi) == pytest.approx((-0.2 - Z_975 * 0.05, -0.2 + Z_975 * 0.05))
    assert interval([]) is None
    unknown = interval([Measure(-0.2)])  # no SE: only seeds can decide
    assert (unknown.lo, unknown.hi) == (-math.inf, math.inf)
    assert verdict(unknown, -0.15, pass_below=True) == INCONCLUSIVE
    assert seeds_needed(unknown, -0.15) == 2


@pytest.mark.parametrize(
    "lo, hi, below, above",
    [
        (-0.30, -0.15, PASS, INCONCLUSIVE),  # the threshold itself is the pass side
        (-0.30, -0.1499, INCONCLUSIVE, INCONCLUSIVE),
        (-0.1499, 0.2, FAIL, PASS),
        (-0.15, 0.2, INCONCLUSIVE, PASS),
        (-0.5, -0.2, PASS, FAIL),
    ],
)
def test_three_way_verdict_at_its_boundaries(lo, hi, below, above):
    iv = Interval((lo + hi) / 2, lo, hi, "seeds (paired t)", values=[0, 0])
    assert verdict(iv, -0.15, pass_below=True) == below
    assert verdict(iv, -0.15, pass_below=False) == above
    assert verdict(None, -0.15, pass_below=True) == NA
    assert verdict(Interval(0, float("nan"), 1, "x"), 0, pass_below=True) == NA


def test_seeds_needed_counts_from_the_t_quantiles():
    iv = Interval(1.0, -5, 7, "seeds (paired t)", values=[0.0, 2.0], sd=1.0)
    # t_{n-1}/sqrt(n) < 1 first at n = 7 (2.447/2.646 = 0.925; n = 6: 2.571/2.449 = 1.05)
    assert seeds_needed(iv, 0.0) == 7


def reference_frechet(mu1, s1, mu2, s2):
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


@pytest.mark.parametrize("n", [4, 60])  # fewer samples than dimensions, and more
def test_frechet_from_features_equals_the_sqrtm_formula(n):
    rng = np.random.default_rng(n)
    d = 6
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    mu_ref = rng.normal(size=d)
    a = rng.normal(size=(d, d))
    sigma_ref = a @ a.T + 0.1 * np.eye(d)
    want = reference_frechet(x.mean(0), np.cov(x, rowvar=False), mu_ref, sigma_ref)
    got = frechet_from_features(x, mu_ref, sqrt_psd(sigma_ref), float(np.trace(sigma_ref)))
    assert got == pytest.approx(want, rel=1e-6)


def test_fid_bootstrap_covers_the_true_distance_at_about_its_nominal_rate():
    """Samples from N(μ1, Σ1) against exact reference statistics (μ2, Σ2): the true FID
    is known in closed form; the 95% interval should hold it ~95% of the time."""
    rng = np.random.default_rng(0)
    d, n, trials = 3, 300, 200
    mu1, mu2 = np.array([0.3, 0.0, -0.2]), np.zeros(d)
    a = rng.normal(size=(d, d))
    s1 = a @ a.T / d + 0.5 * np.eye(d)
    s2 = np.eye(d)
    truth = reference_frechet(mu1, s1, mu2, s2)
    chol = np.linalg.cholesky(s1)
    hits = 0
    for trial in range(trials):
        x = mu1 + rng.normal(size=(n, d)) @ chol.T
        out = bootstrap_fid(x, mu2, s2, resamples=200, seed=trial)
        hits += out["lo"] <= truth <= out["hi"]
        assert 0 <= out["lo"] < out["hi"] and out["se"] > 0
        assert out["debiased"] == pytest.approx((out["lo"] + out["hi"]) / 2, abs=3 * out["se"])
    assert 0.88 <= hits / trials <= 0.99
