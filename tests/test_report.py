"""Report criteria on synthetic runs with known numbers, plots, and a smoke study."""

import json
import subprocess
import sys

import pytest
import yaml

from fastdiff.report import (
    FAIL,
    NA,
    PASS,
    Run,
    curvature_reduction,
    evaluate,
    exploding_curvature,
    fid_band,
    fid_ratio,
    spike_count,
    write_report,
)
from tests.conftest import tiny


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
):
    path.mkdir(parents=True)
    cfg = {
        "experiment": name,
        "loss": {"weighting": weighting, "minsnr_gamma": 5.0},
        "diffusion": {"beta_schedule": schedule},
        "train": {"total_steps": total},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [
        {"step": s, "train/loss": v, "train/mse_unweighted": v}
        for s, v in (losses or {total // 2: 0.1, total: 0.09}).items()
    ]
    if mean_weight is not None:
        rows.append({"step": 0, "loss/mean_weight": mean_weight})
    rows += [
        {"step": s, "curvature/hutch_trace_mean": v, "curvature/hutch_trace_std": 1.0}
        for s, v in (traces or {}).items()
    ]
    rows += [
        {"step": s, "curvature/hutch_trace_mean_unweighted": v}
        for s, v in (unweighted or {}).items()
    ]
    rows += [{"step": s, "val/fid_milestone/fid": v} for s, v in (fids or {}).items()]
    if final_fid is not None:
        rows.append({"step": total, "eval/final/fid": final_fid})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"step": reached or total}))
    return Run.load(path)


def traces(before, inside, steps=range(2000, 10001, 1000)):
    return {s: (before if s < 6000 else inside) for s in steps}


@pytest.mark.parametrize("inside, status", [(84.0, PASS), (85.0, PASS), (86.0, FAIL)])
def test_curvature_reduction_boundary(tmp_path, inside, status):
    base = make_run(tmp_path / "a", "e5", "uniform", traces=traces(500.0, 100.0))
    treat = make_run(tmp_path / "b", "e6", "minsnr", traces=traces(1.0, inside))
    crit = curvature_reduction(base, treat)
    assert crit.status == status  # only 6k–10k counts: the early values are ignored
    assert f"{(inside - 100) / 100:+.1%}" in crit.detail


def test_criteria_windows_scale_with_shorter_runs(tmp_path):
    short = {s: (100.0 if s >= 600 else 1e6) for s in range(200, 1001, 100)}
    base = make_run(tmp_path / "a", "e5", "uniform", total=1000, traces=short)
    treat = make_run(
        tmp_path / "b", "e6", "minsnr", total=1000, traces={s: v * 0.5 for s, v in short.items()}
    )
    crit = curvature_reduction(base, treat)
    assert crit.status == PASS and "600–1000" in crit.name
    _, notes = evaluate([base, treat], "e6")
    assert any("scaled by 0.1" in n for n in notes)


def test_spike_count(tmp_path):
    base_tr = {2000: 100, 3000: 100, 4000: 100, 5000: 160, 6000: 170, 7000: 100}
    base = make_run(tmp_path / "a", "e5", "uniform", traces=base_tr)
    fewer = make_run(tmp_path / "b", "e6", "minsnr", traces={2000: 100, 3000: 151, 4000: 90})
    same = make_run(tmp_path / "c", "e6", "minsnr", traces={2000: 151, 3000: 152})
    assert spike_count(base, fewer).status == PASS  # limit 150: 1 point vs the baseline's 2
    assert spike_count(base, same).status == FAIL


@pytest.mark.parametrize(
    "treat_fid, band, improved",
    [(11.0, PASS, FAIL), (11.2, FAIL, FAIL), (9.5, PASS, PASS), (9.6, PASS, FAIL)],
)
def test_fid_band(tmp_path, treat_fid, band, improved):
    base = make_run(tmp_path / "a", "e5", "uniform", final_fid=10.0)
    treat = make_run(tmp_path / "b", "e6", "minsnr", final_fid=treat_fid)
    assert [c.status for c in fid_band(base, treat)] == [band, improved]


def test_missing_fid_is_not_evaluable_never_passed(tmp_path):
    base = make_run(tmp_path / "a", "e9a", "uniform", "cosine")
    treat = make_run(tmp_path / "b", "e9b", "minsnr", "cosine", final_fid=12.0)
    assert {c.status for c in fid_band(base, treat)} == {NA}
    assert fid_ratio(base, treat, "final").status == NA
    crits, _ = evaluate([base, treat], "e9")
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
    crit = fid_ratio(base, treat, "best")
    assert crit.status == status and word in crit.detail


def test_exploding_curvature_rule(tmp_path):
    base = make_run(
        tmp_path / "a", "e9a", "uniform", "cosine", traces={1000: 1, 2000: 10, 3000: 10}
    )
    calm = make_run(
        tmp_path / "b", "e9b", "minsnr", "cosine", traces={1000: 999, 2000: 29, 3000: 12}
    )
    wild = make_run(tmp_path / "c", "e9b", "minsnr", "cosine", traces={2000: 10, 3000: 31})
    assert exploding_curvature(base, calm).status == PASS  # step 1000 is burn-in
    assert exploding_curvature(base, wild).status == FAIL


def test_unfinished_or_nan_run_fails_completion(tmp_path):
    base = make_run(tmp_path / "a", "e9a", "uniform", "cosine", reached=4000)
    treat = make_run(
        tmp_path / "b", "e9b", "minsnr", "cosine", losses={5000: 0.1, 10000: float("nan")}
    )
    crits, _ = evaluate([base, treat], "e9")
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
    crits, notes = evaluate([base, treat], "e6")
    by_name = {c.name: c.status for c in crits}
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
    md = write_report([base, treat], tmp_path / "out")
    text = md.read_text()
    assert "MS1-e9" in text and "✅ pass" in text
    for png in ("loss.png", "curvature.png", "fid.png"):
        assert (tmp_path / "out" / png).stat().st_size > 5000
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3


def test_smoke_study_end_to_end(tmp_path):
    overrides = [o for o in tiny(tmp_path) if not o.startswith("train.runs_root")]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastdiff.study",
            "e9",
            *overrides,
            "curvature.probes=2",
            "curvature.batch_size=2",
            "curvature.t_bins=2",
            "curvature.every=3",
            "--out",
            str(tmp_path / "study"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = (tmp_path / "study" / "report" / "REPORT.md").read_text()
    assert "e9a (cosine β, uniform)" in report and "e9b (cosine β, Min-SNR γ=5)" in report
    assert "not evaluable" in report  # no FID in these runs
    assert (tmp_path / "study" / "report" / "curvature.png").exists()


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
    assert fid_ratio(base, same, "final").status == PASS
    assert all(c.status == PASS for c in fid_band(base, same)[:1])
    other = _with_provenance(treat, **change)
    for crit in [fid_ratio(base, other, "final"), *fid_band(base, other)]:
        assert crit.status == NA
        assert "FIDs computed against different references" in crit.detail and named in crit.detail
    text = write_report([base, other], tmp_path / "out", "e9").read_text()
    assert "## How FID was computed" in text and "torch-fidelity 0.4.0" in text
