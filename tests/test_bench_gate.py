"""The benches' paired ratio and the speed regression gate, on numbers made by hand."""

import json
import math

import pytest
import scipy.stats

from benches.gate import checks
from benches.gate import main as gate
from benches.ratios import load, paired_ratio


def test_paired_ratio_cancels_a_drift_shared_by_a_round():
    # the machine slows 3× over the run; the peer stays 1.4× fastdiff in every round
    assert paired_ratio([100, 200, 300], [140, 280, 420]) == pytest.approx((1.4, 1.4, 1.4))


def test_paired_ratio_interval_over_rounds():
    # rounds' ratios 1 and 4: geometric mean 2; the t-interval (1 df) of the logs
    est, lo, hi = paired_ratio([1.0, 2.0], [1.0, 8.0])
    half = scipy.stats.t.ppf(0.975, 1) * (math.log(4) / math.sqrt(2)) / math.sqrt(2)
    assert est == pytest.approx(2.0)
    assert (lo, hi) == pytest.approx((2 * math.exp(-half), 2 * math.exp(half)))
    assert paired_ratio([1.0], [3.0]) == (pytest.approx(3.0), None, None)


def bench_json(path, ratio, overhead):
    def bench(name, **info):
        return {"name": name, "stats": {"median": 1.0}, "extra_info": info}

    data = {
        "machine_info": {},
        "benchmarks": [
            bench("test_train_step[amp-4]", vs_fastdiff={"diffusers": ratio}),
            bench("test_sampler[ddpm-50]", overhead=overhead, nfe=50),
        ],
    }
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "ratio, overhead, code, statuses",
    [
        # the step's floor is 0.75 × 1.40 = 1.05; the sampler's ceiling 1.25 × 1.08 = 1.35
        ([1.38, 1.33, 1.43], [1.10, 1.05, 1.15], 0, ("pass", "pass")),
        ([0.90, 0.85, 1.04], [1.10, 1.05, 1.15], 1, ("fail", "pass")),
        ([1.10, 1.00, 1.20], [1.10, 1.05, 1.15], 2, ("inconclusive", "pass")),
        ([1.38, 1.33, 1.43], [1.50, 1.36, 1.64], 1, ("pass", "fail")),
        ([1.38, 1.33, 1.43], [1.30, 1.20, 1.40], 2, ("pass", "inconclusive")),
        ([1.38, None, None], [1.10, 1.05, 1.15], 2, ("inconclusive", "pass")),  # one round
    ],
)
def test_gate(tmp_path, capsys, ratio, overhead, code, statuses):
    base = bench_json(tmp_path / "base.json", [1.40, 1.35, 1.45], [1.08, 1.06, 1.10])
    now = bench_json(tmp_path / "now.json", ratio, overhead)
    assert gate([str(now), "--baseline", str(base)]) == code
    rows = checks(load(now)[0], load(base)[0], 0.25)
    assert {what: status for what, status, _ in rows} == {
        "test_train_step[amp-4] diffusers / fastdiff": statuses[0],
        "test_sampler[ddpm-50] / bare forward": statuses[1],
    }
    printed = capsys.readouterr().out
    assert all(what in printed and detail in printed for what, _, detail in rows)


def test_gate_names_a_missing_file(tmp_path, capsys):
    assert gate([str(tmp_path / "nope.json")]) == 1
    assert "nope.json does not exist" in capsys.readouterr().err
