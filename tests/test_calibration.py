"""The report's verdicts on simulated paired studies with a known truth
(fastdiff.report.calibration; docs/statistics.md has the full table)."""

import pytest

from fastdiff.report.calibration import binomial_limit, calibrate

REPS = 20  # per scenario and seed count; docs/statistics.md uses 200


@pytest.fixture(scope="module")
def cells():
    return calibrate(REPS, seed=7)  # not the seed of the docs' table: a held-out draw


def test_no_criterion_gives_wrong_verdicts_beyond_5_percent(cells):
    for c in cells:
        name = f"{c.scenario.criterion} / {c.scenario.name} / {c.n_seeds} seeds"
        assert c.arms_wrong <= binomial_limit(0.05, REPS) * REPS, f"arms of {name}"
        if c.pair_known:
            limit = binomial_limit(0.05, c.pair_known) * c.pair_known
            assert c.pair_wrong <= limit, f"seed pair of {name}"


def test_one_seed_never_decides_the_arms(cells):
    assert all(c.arms_decided == 0 for c in cells if c.n_seeds == 1)


def at_least_90(covered: int, n: int) -> bool:
    """Coverage not below 90% beyond binomial error (two standard errors): a 95%
    interval shows under 90% in 80 draws about 2% of the time, and this checks ~30
    scenarios; the 200-replicate table in docs/statistics.md is ≥ 90% throughout."""
    return covered / n >= 0.90 - 2 * (0.9 * 0.1 / n) ** 0.5


def test_intervals_hold_what_their_verdicts_claim(cells):
    """The arms' interval holds the arms' truth (2+ seeds), the seed pair's holds that
    seed's noise-free value; pooled over seed counts per scenario."""
    scenarios = {(c.scenario.criterion, c.scenario.name) for c in cells}
    for key in scenarios:
        mine = [c for c in cells if (c.scenario.criterion, c.scenario.name) == key]
        arms = [c for c in mine if c.n_seeds > 1]
        covered, n = sum(c.arms_covered for c in arms), REPS * len(arms)
        assert at_least_90(covered, n), f"arms of {key}: {covered}/{n}"
        known = sum(c.pair_known for c in mine)
        if known:
            covered = sum(c.pair_covered for c in mine)
            assert at_least_90(covered, known), f"seed pair of {key}: {covered}/{known}"
