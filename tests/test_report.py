"""Report criteria on synthetic runs with known numbers, plots, and a smoke study."""

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch
import yaml

from fastdiff.cards import load_card
from fastdiff.report import (
    FAIL,
    INCONCLUSIVE,
    NA,
    PASS,
    Run,
    curvature_reduction,
    evaluate,
    exploding_curvature,
    fid_band,
    fid_ratio,
    spike_count,
)
from fastdiff.report.criteria import function_params, recall_kept
from fastdiff.report.plots import paired_ratios
from fastdiff.report.render import write_report
from tests.conftest import tiny

E6, E9 = (function_params(load_card(n)) for n in ("e6", "e9"))


def make_run(
    path,
    name,
    weighting,
    schedule="linear",
    total=10_000,
    traces=None,
    fids=None,
    final_fid=None,
    losses=None,
    mean_weight=None,
    unweighted=None,
    reached=None,
    seed=1077,
    trace_se=0.0,
    fid_se=0.0,
):
    """A run with known numbers. Standard errors default to 0, so an interval is its
    point and the verdict is the threshold test; pass None to log none."""
    path.mkdir(parents=True)
    cfg = {
        "experiment": name,
        "loss": {"weighting": weighting, "minsnr_gamma": 5.0},
        "diffusion": {"beta_schedule": schedule},
        "train": {"total_steps": total, "seed": seed},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [
        {"step": s, "train/loss": v, "train/mse_unweighted": v}
        for s, v in (losses or {total // 2: 0.1, total: 0.09}).items()
    ]
    if mean_weight is not None:
        rows.append({"step": 0, "loss/mean_weight": mean_weight})
    se = {} if trace_se is None else {"curvature/hutch_trace_stderr_total": trace_se}
    rows += [
        {"step": s, "curvature/hutch_trace_mean": v, "curvature/hutch_trace_std": 1.0, **se}
        for s, v in (traces or {}).items()
    ]
    se = {} if trace_se is None else {"curvature/hutch_trace_stderr_total_unweighted": trace_se}
    rows += [
        {"step": s, "curvature/hutch_trace_mean_unweighted": v, **se}
        for s, v in (unweighted or {}).items()
    ]
    rows += [{"step": s, "val/fid_milestone/fid": v} for s, v in (fids or {}).items()]
    if final_fid is not None:
        se = {} if fid_se is None else {"eval/final/fid_se": fid_se}
        rows.append({"step": total, "eval/final/fid": final_fid, **se})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"step": reached or total}))
    return Run.load(path)


def one_seed(crit):
    """A one-seed criterion's seed-pair level: its arms' verdict is never pass or fail."""
    if crit.pair is None:
        assert crit.status == NA, crit
        return crit
    assert crit.status == INCONCLUSIVE and "one seed" in crit.detail
    assert crit.pair.seeds == crit.seeds
    return crit.pair


def traces(before, inside, steps=range(2000, 10001, 1000)):
    return {s: (before if s < 6000 else inside) for s in steps}


@pytest.mark.parametrize("inside, status", [(84.0, PASS), (85.0, PASS), (86.0, FAIL)])
def test_curvature_reduction_boundary(tmp_path, inside, status):
    base = make_run(tmp_path / "a", "e5", "uniform", traces=traces(500.0, 100.0))
    treat = make_run(tmp_path / "b", "e6", "minsnr", traces=traces(1.0, inside))
    crit = one_seed(curvature_reduction([(base, treat)], **E6["curvature_reduction"]))
    assert crit.status == status  # only 6k–10k counts: the early values are ignored
    assert f"{(inside - 100) / 100:+.1%}" in crit.detail


def test_criteria_windows_scale_with_shorter_runs(tmp_path):
    short = {s: (100.0 if s >= 600 else 1e6) for s in range(200, 1001, 100)}
    base = make_run(tmp_path / "a", "e5", "uniform", total=1000, traces=short)
    treat = make_run(
        tmp_path / "b", "e6", "minsnr", total=1000, traces={s: v * 0.5 for s, v in short.items()}
    )
    crit = one_seed(curvature_reduction([(base, treat)], **E6["curvature_reduction"]))
    assert crit.status == PASS and "600–1000" in crit.name
    _, notes = evaluate([base, treat], load_card("e6"))
    assert any("scaled by 0.1" in n for n in notes)


def test_spike_count(tmp_path):
    base_tr = {2000: 100, 3000: 100, 4000: 100, 5000: 160, 6000: 170, 7000: 100}
    base = make_run(tmp_path / "a", "e5", "uniform", traces=base_tr)
    calm_after = {5000: 100, 6000: 100, 7000: 100}  # the arms are compared at common steps
    fewer = make_run(
        tmp_path / "b", "e6", "minsnr", traces={2000: 100, 3000: 151, 4000: 90, **calm_after}
    )
    same = make_run(
        tmp_path / "c", "e6", "minsnr", traces={2000: 151, 3000: 152, 4000: 100, **calm_after}
    )
    # limit 150, probe error 0. 1 spike against the baseline's 2, which come in one run
    # of 2 steps: variance (1² + ½) + (2² + ½) = 6, compound Poisson with Jeffreys' ½
    one = one_seed(spike_count([(base, fewer)], **E6["spike_count"]))
    assert one.status == INCONCLUSIVE and one.estimate == -1
    assert one.interval == pytest.approx((-1 - 1.959964 * 6**0.5, -1 + 1.959964 * 6**0.5))
    assert one_seed(spike_count([(base, same)], **E6["spike_count"])).status == INCONCLUSIVE
    steps = [2000 + 100 * i for i in range(40)]
    calm = make_run(tmp_path / "e", "e6", "minsnr", traces={s: 100 for s in steps})
    # 15 spikes of 40 points, scattered: 15 events, variance 15 + ½ + ½ (calm's zero):
    # −15 ± 1.96·4 = [−22.8, −7.2], all below −0.5
    scattered = {s: (200 if i % 2 and i < 30 else 100) for i, s in enumerate(steps)}
    spiky = make_run(tmp_path / "d", "e5", "uniform", traces=scattered)
    crit = one_seed(spike_count([(spiky, calm)], **E6["spike_count"]))
    assert crit.status == PASS
    assert crit.interval == pytest.approx((-15 - 1.959964 * 4, -15 + 1.959964 * 4))
    assert one_seed(spike_count([(calm, spiky)], **E6["spike_count"])).status == FAIL
    # the same 15 spikes in one burst are one event of 15: −15 ± 1.96·√226 straddles
    in_one = {s: (200 if i >= 25 else 100) for i, s in enumerate(steps)}
    burst = make_run(tmp_path / "f", "e5", "uniform", traces=in_one)
    crit = one_seed(spike_count([(burst, calm)], **E6["spike_count"]))
    assert crit.status == INCONCLUSIVE and crit.estimate == -15
    assert crit.interval[1] == pytest.approx(-15 + 1.959964 * 226**0.5)
    # no spikes in either run is not a zero-width "not fewer": ±1.96·√(½ + ½)
    quiet = make_run(tmp_path / "g", "e5", "uniform", traces={s: 100 for s in steps})
    crit = one_seed(spike_count([(quiet, calm)], **E6["spike_count"]))
    assert crit.status == INCONCLUSIVE and crit.interval == pytest.approx((-1.959964, 1.959964))


def test_spike_count_remeasures_the_probe():
    """K=2 vectors, B=1 sample. The baseline's terms agree (limit 1.5 × 100, exactly);
    Min-SNR's one point has terms 140 and 170, mean 155, a spike. Resampling the two
    vectors gives means 140, 155, 155, 170 with chance ¼ each: a spike 3 times in 4, so
    the count's measurement variance is ¾·¼."""
    flat = np.array([[100.0], [100.0]])
    base = _probe_run("e5", "uniform", {s: flat for s in range(2000, 10001, 1000)})
    treat = _probe_run("e6", "minsnr", {3000: np.array([[140.0], [170.0]])})
    crit = one_seed(spike_count([(base, treat)], **E6["spike_count"], reps=40_000))
    assert crit.estimate == 1
    se = (1.5 + 0.5 + 3 / 16) ** 0.5
    assert crit.interval == pytest.approx((1 - 1.959964 * se, 1 + 1.959964 * se), rel=3e-3)
    assert "re-measured over its 2 vectors and 1 samples, paired" in crit.detail


def test_spike_count_pairs_the_arms_shared_probe_error():
    """Both arms' probe matrices are their trace times one shared (K, 1) matrix: any
    resampling of the vectors scales every point and the limit alike, so no point
    crosses it and the measurement part is 0. Without the terms the runs' errors can
    only be taken as independent, and the interval widens."""
    shared = np.array([[0.5], [1.0], [1.0], [1.5]])
    steps = range(2000, 10001, 500)
    base = _probe_run("e5", "uniform", {s: 100 * shared for s in steps})
    spikes = {s: (160 if i % 3 == 0 else 100) * shared for i, s in enumerate(steps)}
    treat = _probe_run("e6", "minsnr", spikes)
    paired = one_seed(spike_count([(base, treat)], **E6["spike_count"]))
    n = sum(i % 3 == 0 for i, _ in enumerate(steps))  # 6 isolated spikes
    assert paired.estimate == n
    assert paired.interval[1] - n == pytest.approx(1.959964 * (n + 0.5 + 0.5) ** 0.5)
    for run in (base, treat):
        run.rows = [{k: v for k, v in r.items() if not isinstance(v, list)} for r in run.rows]
    unpaired = one_seed(spike_count([(base, treat)], **E6["spike_count"]))
    assert "shared within each run" in unpaired.detail
    assert unpaired.interval[1] - n > 1.2 * (paired.interval[1] - n)


@pytest.mark.parametrize(
    "treat_fid, band, improved",
    [(11.0, PASS, FAIL), (11.2, FAIL, FAIL), (9.5, PASS, PASS), (9.6, PASS, FAIL)],
)
def test_fid_band(tmp_path, treat_fid, band, improved):
    base = make_run(tmp_path / "a", "e5", "uniform", final_fid=10.0)
    treat = make_run(tmp_path / "b", "e6", "minsnr", final_fid=treat_fid)
    assert [one_seed(c).status for c in fid_band([(base, treat)], **E6["fid_band"])] == [
        band,
        improved,
    ]


def test_missing_fid_is_not_evaluable_never_passed(tmp_path):
    base = make_run(tmp_path / "a", "e9a", "uniform", "cosine")
    treat = make_run(tmp_path / "b", "e9b", "minsnr", "cosine", final_fid=12.0)
    assert {one_seed(c).status for c in fid_band([(base, treat)], **E6["fid_band"])} == {NA}
    assert one_seed(fid_ratio([(base, treat)], "final", **E9["fid_ratio"])).status == NA
    crits, _ = evaluate([base, treat], load_card("e9"))
    assert all(c.status != PASS for c in crits if "FID" in c.name)


@pytest.mark.parametrize(
    "treat_fid, status, word",
    [(13.0, PASS, "within band"), (13.1, FAIL, "outside band"), (20.0, FAIL, "PATHOLOGY")],
)
def test_e9_fid_ratio(tmp_path, treat_fid, status, word):
    base = make_run(tmp_path / "a", "e9a", "uniform", "cosine", fids={2000: 30.0}, final_fid=10.0)
    treat = make_run(
        tmp_path / "b", "e9b", "minsnr", "cosine", fids={2000: 40.0}, final_fid=treat_fid
    )
    crit = one_seed(fid_ratio([(base, treat)], "best", **E9["fid_ratio"]))
    assert crit.status == status and word in crit.detail


def test_exploding_curvature_rule(tmp_path):
    base = make_run(
        tmp_path / "a", "e9a", "uniform", "cosine", traces={1000: 1, 2000: 10, 3000: 10}
    )
    calm = make_run(
        tmp_path / "b", "e9b", "minsnr", "cosine", traces={1000: 999, 2000: 29, 3000: 12}
    )
    wild = make_run(tmp_path / "c", "e9b", "minsnr", "cosine", traces={2000: 10, 3000: 31})
    assert (
        one_seed(exploding_curvature([(base, calm)], **E9["exploding_curvature"])).status == PASS
    )  # step 1000 is burn-in
    assert one_seed(exploding_curvature([(base, wild)], **E9["exploding_curvature"])).status == FAIL


def _with_bands(run, bands):
    """Per-timestep-band traces {band: {step: value}} (standard error 0) added to a run."""
    for band, values in bands.items():
        run.rows += [
            {
                "step": s,
                f"curvature/hutch/{band}/trace_mean": v,
                f"curvature/hutch/{band}/trace_stderr_total": 0.0,
            }
            for s, v in values.items()
        ]
    return run


def test_exploding_curvature_by_timestep_band(tmp_path):
    """A blow-up confined to one band, which the whole trace hides: 4× in t250-499
    against the total's 27/15 = 1.8×."""
    flat = {1000: 10.0, 2000: 10.0, 3000: 10.0}
    base = make_run(tmp_path / "a", "e9a", "uniform", "cosine", traces=flat)
    base = _with_bands(base, {"t0-249": flat, "t250-499": {1000: 5.0, 2000: 5.0, 3000: 5.0}})
    treat = make_run(tmp_path / "b", "e9b", "minsnr", "cosine", traces={2000: 12, 3000: 18})
    band_hit = {1000: 99.0, 2000: 5.0, 3000: 20.0}  # step 1000 is burn-in
    wild = _with_bands(treat, {"t0-249": {2000: 12.0, 3000: 11.0}, "t250-499": band_hit})
    rule = E9["exploding_curvature"]
    assert one_seed(exploding_curvature([(base, wild)], **rule)).status == PASS
    crit = one_seed(exploding_curvature([(base, wild)], **rule, bands=True))
    assert crit.status == FAIL and crit.estimate == pytest.approx(4.0)
    assert "band t250-499 at step 3000" in crit.detail and "2 bands" in crit.detail
    calm_bands = {"t0-249": {2000: 12.0, 3000: 11.0}, "t250-499": {2000: 5.0, 3000: 14.0}}
    calm = _with_bands(make_run(tmp_path / "c", "e9b", "minsnr", "cosine"), calm_bands)
    calm_crit = one_seed(exploding_curvature([(base, calm)], **rule, bands=True))
    assert calm_crit.status == PASS and calm_crit.estimate == pytest.approx(14 / 5)
    bare = make_run(tmp_path / "d", "e9b", "minsnr", "cosine", traces=flat)
    assert one_seed(exploding_curvature([(base, bare)], **rule, bands=True)).status == NA
    names = [c.name for c in evaluate([base, wild], load_card("e9"))[0]]
    assert any(n.startswith("no SNR band with exploding curvature") for n in names)


def test_unfinished_or_nan_run_fails_completion(tmp_path):
    base = make_run(tmp_path / "a", "e9a", "uniform", "cosine", reached=4000)
    treat = make_run(
        tmp_path / "b", "e9b", "minsnr", "cosine", losses={5000: 0.1, 10000: float("nan")}
    )
    crits, _ = evaluate([base, treat], load_card("e9"))
    done = [c for c in crits if "completed" in c.name]
    assert [c.status for c in done] == [FAIL, FAIL]


def test_confound_sentence_when_the_verdict_is_only_the_weight(tmp_path):
    base = make_run(tmp_path / "a", "e5", "uniform", traces=traces(100.0, 100.0))
    treat = make_run(
        tmp_path / "b",
        "e6",
        "minsnr",
        traces=traces(80.0, 80.0),
        mean_weight=0.8,
        unweighted=traces(100.0, 100.0),
    )
    crits, notes = evaluate([base, treat], load_card("e6"))
    by_name = {c.name: one_seed(c).status for c in crits}
    assert by_name["mean curvature/hutch_trace_mean over steps 6000–10000 ≥15% lower"] == PASS
    assert by_name["mean unweighted trace over steps 6000–10000 ≥15% lower"] == FAIL
    assert any("does not survive" in n for n in notes)


def test_report_files_and_plots(tmp_path):
    base = make_run(
        tmp_path / "a",
        "e9a",
        "uniform",
        "cosine",
        traces=traces(50.0, 40.0),
        fids={2000: 30.0, 4000: 20.0},
        final_fid=15.0,
    )
    treat = make_run(
        tmp_path / "b",
        "e9b",
        "minsnr",
        "cosine",
        traces=traces(45.0, 30.0),
        fids={2000: 31.0, 4000: 21.0},
        final_fid=16.0,
    )
    for run in (base, treat):
        stats = {
            k: {"mean_intensity": [0.2, 0.3], "contrast": [0.4, 0.5]}
            for k in ("samples", "training")
        }
        (run.path / "samples").mkdir()
        (run.path / "samples" / "stats_0010000.json").write_text(json.dumps(stats))
    md = write_report([base, treat], tmp_path / "out")
    text = md.read_text()
    assert "MS1-e9" in text and "✅ pass" in text
    pngs = ("loss.png", "curvature.png", "curvature_ratio.png", "fid.png", "weights.png")
    for png in pngs + ("sample_stats.png",):
        assert (tmp_path / "out" / png).stat().st_size > 5000
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6
    # real Markdown: the criteria table with its header, code spans, no literal backticks
    assert "<th>criterion</th>" in html and "<code>" in html and "`" not in html
    verdicts = json.loads((tmp_path / "out" / "report.json").read_text())
    assert verdicts["card"] == "e9"
    for crit in verdicts["criteria"]:
        assert crit["status"] in {PASS, FAIL, INCONCLUSIVE, NA}
        assert {"name", "estimate", "interval", "n_seeds", "values", "threshold"} <= set(crit)


@pytest.mark.slow
def test_smoke_study_with_seeds_end_to_end_and_rerun(tmp_path):
    """The card's one seed, then --seeds 2 into the same default folder: the second
    command trains only seed 2077 and reports both seeds."""
    overrides = [o for o in tiny(tmp_path) if not o.startswith("train.runs_root")]
    cmd = [
        sys.executable,
        "-m",
        "fastdiff.study",
        "e9",
        *overrides,
        "curvature.probes=2",
        "curvature.batch_size=2",
        "curvature.t_bins=2",
        "curvature.every=3",
        "--launch",  # one process per arm, without accelerate's launcher start-up
        sys.executable,
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (root,) = (tmp_path / "runs" / "study").iterdir()  # keyed by card and overrides
    summaries = {p: p.read_bytes() for p in root.glob("*/seed*/summary.json")}
    assert len(summaries) == 2
    one = json.loads((root / "report" / "report.json").read_text())
    exploding = [c for c in one["criteria"] if c["name"].startswith("no exploding")][0]
    assert exploding["n_seeds"] == 1 and exploding["status"] in {INCONCLUSIVE, NA}
    out = subprocess.run(
        [*cmd, "--seeds", "2"], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("nothing to do") == 2  # seed 1077's runs are finished
    assert {p: p.read_bytes() for p in summaries} == summaries
    runs = sorted(str(p.relative_to(root)) for p in root.glob("*/seed*"))
    assert runs == ["e9a/seed1077", "e9a/seed2077", "e9b/seed1077", "e9b/seed2077"]
    assert (root / "logs" / "e9b-seed2077.log").stat().st_size > 0
    report = (root / "report" / "REPORT.md").read_text()
    assert "e9a (cosine β, uniform)" in report and "e9b (cosine β, Min-SNR γ=5)" in report
    assert "not evaluable" in report  # no FID in these runs
    assert (root / "report" / "curvature.png").exists()
    assert (root / "report" / "loss_by_snr.png").exists()
    verdicts = json.loads((root / "report" / "report.json").read_text())
    exploding = [c for c in verdicts["criteria"] if c["name"].startswith("no exploding")]
    assert exploding[0]["n_seeds"] == 2 and exploding[0]["method"] == "seeds (paired t)"
    assert exploding[0]["seed_pair"]["seeds"] == [1077]
    assert all(c["status"] in {PASS, FAIL, INCONCLUSIVE, NA} for c in verdicts["criteria"])


def _with_provenance(run, **changes):
    provenance = {
        "extractor": "inception-v3-compat",
        "layer": "2048",
        "resize": "tf1x-bilinear-299",
        "weights_sha256": "a" * 64,
        "torch_fidelity": "0.4.0",
        "reference": {"data_sha256": "d" * 16, "count": 50000},
        "sampler": "ddpm",
        "nfe": 50,
        "milestone_samples": 5000,
        "final_samples": 10000,
        "seed": 0,
    }
    summary = {**run.summary, "fid_provenance": {**provenance, **changes}}
    (run.path / "summary.json").write_text(json.dumps(summary))
    return Run.load(run.path)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"weights_sha256": "b" * 64}, "weights_sha256"),
        ({"reference": {"stats_file": "ref.npz", "stats_sha256": "e" * 64}}, "reference"),
        ({"nfe": 20}, "nfe"),
    ],
)
def test_fids_of_different_provenance_are_not_compared(tmp_path, change, named):
    base = _with_provenance(make_run(tmp_path / "a", "e9a", "uniform", "cosine", final_fid=10.0))
    treat = make_run(tmp_path / "b", "e9b", "minsnr", "cosine", final_fid=10.5)
    same = _with_provenance(treat)
    assert one_seed(fid_ratio([(base, same)], "final", **E9["fid_ratio"])).status == PASS
    assert all(one_seed(c).status == PASS for c in fid_band([(base, same)], **E6["fid_band"])[:1])
    other = _with_provenance(treat, **change)
    for crit in [
        one_seed(fid_ratio([(base, other)], "final", **E9["fid_ratio"])),
        *fid_band([(base, other)], **E6["fid_band"]),
    ]:
        assert crit.status == NA
        assert "FIDs computed against different references" in crit.detail and named in crit.detail
    text = write_report([base, other], tmp_path / "out", "e9").read_text()
    assert "## How FID was computed" in text and "torch-fidelity 0.4.0" in text


T2_975 = 4.302652729911275  # Student t, 2 degrees of freedom, 97.5% (tables)


def _seeded_pairs(tmp_path, treat_inside, base_inside=100.0, trace_se=0.0):
    pairs = []
    for seed, inside in zip((1, 2, 3), treat_inside):
        base = make_run(
            tmp_path / f"a{seed}",
            "e5",
            "uniform",
            traces=traces(500.0, base_inside),
            seed=seed,
            trace_se=trace_se,
        )
        treat = make_run(
            tmp_path / f"b{seed}",
            "e6",
            "minsnr",
            traces=traces(1.0, inside),
            seed=seed,
            trace_se=trace_se,
        )
        pairs.append((base, treat))
    return pairs


def test_seeds_give_a_paired_t_interval(tmp_path):
    pairs = _seeded_pairs(tmp_path, (70.0, 75.0, 80.0))
    crit = curvature_reduction(pairs, **E6["curvature_reduction"])
    changes = [-0.30, -0.25, -0.20]
    mean = sum(changes) / 3
    sd = (sum((c - mean) ** 2 for c in changes) / 2) ** 0.5
    half = T2_975 * sd / 3**0.5
    assert crit.estimate == pytest.approx(mean)
    assert crit.interval == pytest.approx((mean - half, mean + half))
    assert crit.method == "seeds (paired t)" and crit.seeds == [1, 2, 3]
    assert crit.values == pytest.approx(changes)
    # −0.25 ± 0.124: [−0.374, −0.126] straddles −15%
    assert crit.status == INCONCLUSIVE and "seeds would decide it" in crit.detail
    tight = curvature_reduction(
        _seeded_pairs(tmp_path / "t", (70.0, 71.0, 72.0)), **E6["curvature_reduction"]
    )
    assert tight.status == PASS  # [−0.315, −0.255]
    worse = curvature_reduction(
        _seeded_pairs(tmp_path / "w", (95.0, 96.0, 97.0)), **E6["curvature_reduction"]
    )
    assert worse.status == FAIL


def test_one_seed_uses_the_logged_standard_errors(tmp_path):
    (pair,) = _seeded_pairs(tmp_path, (80.0,), trace_se=1.0)[:1]
    crit = one_seed(curvature_reduction([pair], **E6["curvature_reduction"]))
    # 5 probe steps in 6k–10k, each SE 1. The probe reuses its batch and vectors, so the
    # steps' errors are shared: the window's SE is 1, not 1/√5. Δ = −20%, delta method.
    se = (1.0**2 + 0.8**2) ** 0.5 / 100
    assert crit.interval == pytest.approx((-0.2 - 1.959964 * se, -0.2 + 1.959964 * se), rel=1e-5)
    assert crit.status == PASS  # [−0.225, −0.175]
    # SE 4 a step: [−0.300, −0.100] straddles −15% (as independent steps, SE 4/√5 would
    # have made it [−0.245, −0.155], a pass the probe's shared errors do not support)
    shared = one_seed(
        curvature_reduction(
            [_seeded_pairs(tmp_path / "s", (80.0,), trace_se=4.0)[0]], **E6["curvature_reduction"]
        )
    )
    assert shared.status == INCONCLUSIVE
    noisy = one_seed(
        curvature_reduction(
            [_seeded_pairs(tmp_path / "n", (80.0,), trace_se=12.0)[0]], **E6["curvature_reduction"]
        )
    )
    assert noisy.status == INCONCLUSIVE
    unknown = one_seed(
        curvature_reduction(
            [_seeded_pairs(tmp_path / "u", (80.0,), trace_se=None)[0]], **E6["curvature_reduction"]
        )
    )
    assert unknown.status == INCONCLUSIVE and "no standard error" in unknown.detail


def _probe_run(name, weighting, steps):
    """An in-memory run whose probe steps log what RunProbes logs for (K, B) matrices."""
    from pathlib import Path

    from fastdiff.curvature import summarize

    rows = [
        {
            "step": s,
            **{
                f"curvature/hutch_trace_{k}": v
                for k, v in summarize(
                    torch.as_tensor(m), torch.ones(m.shape[1]), terms=True
                ).items()
            },
        }
        for s, m in steps.items()
    ]
    cfg = {
        "experiment": name,
        "loss": {"weighting": weighting},
        "diffusion": {"beta_schedule": "linear"},
        "train": {"total_steps": 10_000, "seed": 1},
    }
    return Run(Path(name), cfg, rows, {})


def test_one_seed_pairs_the_arms_over_their_shared_probe_terms():
    # K=2 probe vectors x B=3 samples, one step in the window; the arms share both
    base = np.array([[9.0, 10.0, 11.0], [9.0, 12.0, 15.0]])  # probes 10, 12; samples 9, 11, 13
    treat = np.array([[7.0, 8.0, 9.0], [7.0, 9.0, 11.0]])  # probes 8, 9; samples 7, 8.5, 10
    crit = one_seed(
        curvature_reduction(
            [
                (
                    _probe_run("e5", "uniform", {8000: base}),
                    _probe_run("e6", "minsnr", {8000: treat}),
                )
            ],
            **E6["curvature_reduction"],
        )
    )
    r = 8.5 / 11
    zp = [(8 - r * 10) / 11, (9 - r * 12) / 11]
    zs = [(7 - r * 9) / 11, (8.5 - r * 11) / 11, (10 - r * 13) / 11]
    vp = np.var(zp, ddof=1) / 2
    vs = np.var(zs, ddof=1) / 3
    df = (vp + vs) ** 2 / (vp**2 / 1 + vs**2 / 2)
    half = scipy.stats.t.ppf(0.975, df) * (vp + vs) ** 0.5
    assert crit.estimate == pytest.approx(8.5 / 11 - 1)
    assert crit.interval == pytest.approx((r - 1 - half, r - 1 + half), rel=1e-9)
    assert "paired over 2 probe vectors and 3 samples" in crit.detail


def test_curvature_ratio_plot_pairs_each_probe_step():
    """The per-step ratio the plot draws: at 8000 the hand-computed paired interval of
    the test above; at 9000 no terms, so the runs' SEs as independent; the baseline's
    negative trace at 7000 has no ratio."""
    base_m = np.array([[9.0, 10.0, 11.0], [9.0, 12.0, 15.0]])
    treat_m = np.array([[7.0, 8.0, 9.0], [7.0, 9.0, 11.0]])
    base = _probe_run("e5", "uniform", {7000: -base_m, 8000: base_m, 9000: base_m})
    treat = _probe_run("e6", "minsnr", {7000: treat_m, 8000: treat_m, 9000: treat_m})
    for run in (base, treat):
        run.rows[2] = {k: v for k, v in run.rows[2].items() if not isinstance(v, list)}
    steps, ratio, lo, hi = paired_ratios(base, treat, "curvature/hutch_trace_mean")
    r = 8.5 / 11
    zp = [(8 - r * 10) / 11, (9 - r * 12) / 11]
    zs = [(7 - r * 9) / 11, (8.5 - r * 11) / 11, (10 - r * 13) / 11]
    vp, vs = np.var(zp, ddof=1) / 2, np.var(zs, ddof=1) / 3
    half = scipy.stats.t.ppf(0.975, (vp + vs) ** 2 / (vp**2 / 1 + vs**2 / 2)) * (vp + vs) ** 0.5
    assert list(steps) == [8000, 9000] and ratio == pytest.approx([r, r])
    assert (lo[0], hi[0]) == pytest.approx((r - half, r + half), rel=1e-9)
    # unpaired: SEs from summarize() (probes and samples in quadrature), independent
    se_t = np.hypot(np.std([8, 9], ddof=1) / 2**0.5, np.std([7, 8.5, 10], ddof=1) / 3**0.5)
    se_b = np.hypot(np.std([10, 12], ddof=1) / 2**0.5, np.std([9, 11, 13], ddof=1) / 3**0.5)
    se = r * np.hypot(se_t / 8.5, se_b / 11)
    assert (lo[1], hi[1]) == pytest.approx((r - 1.959964 * se, r + 1.959964 * se), rel=1e-6)


@pytest.mark.parametrize("shared", [0.0, 0.9])
def test_one_seed_interval_covers_the_true_change(shared):
    """Runs whose probes reuse their vectors and samples at every step, each arm with a
    sample effect and a probe-by-sample effect that arms share to ``shared``: the 95%
    interval of the change must hold the true −20% about 95% of the time, with the
    probe terms (paired) and without them (the per-step SEs only)."""
    rng = np.random.default_rng(0)
    K, B, steps = 16, 8, range(6000, 10001, 500)

    def arm(mean, g0, u0):
        g = np.exp(0.5 * (shared * g0 + (1 - shared**2) ** 0.5 * rng.standard_normal(B)))
        u = 0.6 * (shared * u0 + (1 - shared**2) ** 0.5 * rng.standard_normal((K, B)))
        return {
            s: mean * (1 + 0.002 * i) * g * (1 + u + 0.05 * rng.standard_normal((K, B)))
            for i, s in enumerate(steps)
        }

    hits, widths = {"paired": 0, "per-step": 0}, {"paired": [], "per-step": []}
    reps = 200
    for _ in range(reps):
        g0, u0 = rng.standard_normal(B), rng.standard_normal((K, B))
        pair = (
            _probe_run("e5", "uniform", arm(100.0, g0, u0)),
            _probe_run("e6", "minsnr", arm(80.0, g0, u0)),
        )
        for how in hits:
            if how == "per-step":
                for run in pair:
                    run.rows = [
                        {k: v for k, v in row.items() if not isinstance(v, list)}
                        for row in run.rows
                    ]
            lo, hi = one_seed(curvature_reduction([pair], **E6["curvature_reduction"])).interval
            hits[how] += lo <= -0.2 <= hi
            widths[how].append(hi - lo)
    assert hits["paired"] / reps >= 0.88  # independent steps' SEs gave 0.52 and 0.83 here
    assert hits["per-step"] / reps >= 0.88
    if shared:  # pairing is what makes shared errors cancel
        assert np.median(widths["paired"]) < 0.6 * np.median(widths["per-step"])


def test_report_groups_runs_into_arms_and_pairs_them_by_seed(tmp_path):
    pairs = _seeded_pairs(tmp_path, (70.0, 71.0, 72.0))
    runs = [r for pair in pairs for r in pair][:-1]  # seed 3's Min-SNR run is missing
    write_report(runs, tmp_path / "out", "e6")
    verdicts = json.loads((tmp_path / "out" / "report.json").read_text())
    (card,) = [
        c
        for c in verdicts["criteria"]
        if c["name"].startswith("mean curvature/") and c["name"].endswith("lower")
    ]
    assert card["n_seeds"] == 2 and card["seeds"] == [1, 2]
    assert card["status"] in {PASS, INCONCLUSIVE}
    assert card["interval"][0] < card["estimate"] < card["interval"][1]


def test_study_seeds_argument():
    from fastdiff.study import parse_seeds

    assert parse_seeds("3") == [1077, 2077, 3077]
    assert parse_seeds("1077,2001") == [1077, 2001] and parse_seeds("5,") == [5]
    for bad, message in (("1077", "write --seeds 1077,"), ("x", "a count"), ("4,4", "each once")):
        with pytest.raises(Exception, match=message):
            parse_seeds(bad)


def test_the_cards_thresholds_are_read_from_the_card_file(tmp_path):
    """evaluate() takes every threshold from the card: a final FID ratio of 1.2 is within
    e9's 30% band, and outside a 10% one in a copy of the card that says so."""
    base = make_run(tmp_path / "a", "e9a", "uniform", "cosine", final_fid=10.0)
    treat = make_run(tmp_path / "b", "e9b", "minsnr", "cosine", final_fid=12.0)

    def final_ratio(card):
        crits, _ = evaluate([base, treat], load_card(card))
        (crit,) = [c for c in crits if c.name.startswith("final FID within")]
        return crit

    assert "within 30%" in final_ratio("e9").name
    text = load_card("e9").path.read_text().replace("band: 1.3", "band: 1.1")
    (tmp_path / "mine.yaml").write_text(text)
    crit = final_ratio(str(tmp_path / "mine.yaml"))
    assert "within 10%" in crit.name and crit.estimate == pytest.approx(1.2)
    assert crit.threshold == pytest.approx(1.1)


def test_a_run_without_fid_says_why_in_the_report(tmp_path):
    base = make_run(tmp_path / "a", "e9a", "uniform", "cosine")
    treat = make_run(tmp_path / "b", "e9b", "minsnr", "cosine")
    why = "its sampling (500,000 UNet evaluations ...) would be 694x this run's training"
    (treat.path / "summary.json").write_text(json.dumps({"step": 10_000, "fid_off": why}))
    treat = Run.load(treat.path)
    for crit in [
        one_seed(fid_ratio([(base, treat)], "final", **E9["fid_ratio"])),
        recall_kept([(base, treat)], 0.8),
    ]:
        assert crit.status == NA and crit.detail == f"FID was off in {treat.name}: {why}"
    # with no record of why, the plain "no final FID"
    assert "no final FID" in one_seed(fid_ratio([(base, base)], "final", **E9["fid_ratio"])).detail


def test_spike_count_interval_covers_the_expected_difference():
    """Runs whose trace wanders (AR(1) in log, correlation 0.7 from one probe step to the
    next, so spikes come in runs) and whose probe reuses one set of vectors and samples:
    the 95% interval must hold the expected count difference (from 3000 fresh pairs)
    about 95% of the time. The Poisson √(nt + nb) held it 71% of the time here."""
    rng = np.random.default_rng(1)
    K, B, steps = 16, 8, range(2000, 10001, 500)

    def pair():
        g, u = np.exp(0.3 * rng.standard_normal(B)), 0.4 * rng.standard_normal((K, B))
        arms = []
        for level in (100.0, 85.0):
            x = np.zeros(len(steps))
            for i in range(1, len(x)):
                x[i] = 0.7 * x[i - 1] + 0.51**0.5 * rng.standard_normal()
            arms.append({s: level * np.exp(0.35 * x[i]) * g * (1 + u) for i, s in enumerate(steps)})
        return arms

    def difference(base, treat):
        vb, vt = (np.array([m.mean() for m in arm.values()]) for arm in (base, treat))
        limit = 1.5 * np.median(vb)
        return int((vt > limit).sum() - (vb > limit).sum())

    expected = np.mean([difference(*pair()) for _ in range(3000)])
    reps, hits = 150, 0
    for _ in range(reps):
        base, treat = pair()
        runs = (_probe_run("e5", "uniform", base), _probe_run("e6", "minsnr", treat))
        lo, hi = one_seed(spike_count([runs], **E6["spike_count"], reps=400)).interval
        hits += lo <= expected <= hi
    assert hits / reps >= 0.9


def test_with_a_card_every_treatment_arm_pairs_with_the_baseline(tmp_path):
    """The ratio plot's pairs follow the card's arms, not uniform against weighted."""
    from fastdiff.report.runs import pairs_of

    base = make_run(tmp_path / "a", "e9a", "uniform", "cosine")
    g5 = make_run(tmp_path / "b", "e9b", "minsnr", "cosine")
    x0 = make_run(tmp_path / "c", "e9a", "uniform", "cosine")
    for run, name in ((base, "vanilla"), (g5, "g5"), (x0, "x0_plain")):
        run.arm_name = name
    pairs = pairs_of([base, g5, x0], baseline="vanilla")
    assert [(b.name, t.name) for b, t in pairs] == [("vanilla", "g5"), ("vanilla", "x0_plain")]
    assert x0.label.startswith("x0_plain (")
