"""Only matched pairs are judged, over what both runs measured; studies say what they ran."""

import json

import numpy as np
import pytest

from fastdiff import study
from fastdiff.cards import load_card
from fastdiff.report import FAIL, INCONCLUSIVE, NA, PASS, evaluate
from fastdiff.report.criteria import curvature_reduction, fid_ratio, function_params
from fastdiff.report.render import write_report
from tests.conftest import tiny
from tests.test_report import make_run, one_seed

E6, E9 = (function_params(load_card(n)) for n in ("e6", "e9"))
STEPS = range(2000, 10001, 1000)


def _pair(tmp_path, base_traces, treat_traces, reached=None, **treat):
    base = make_run(tmp_path / "a", "e5", "uniform", traces=base_traces)
    t = make_run(tmp_path / "b", "e6", "minsnr", traces=treat_traces, reached=reached, **treat)
    return base, t


def test_a_stopped_run_is_compared_over_the_steps_both_logged(tmp_path):
    """Min-SNR stopped at 7000 of 10000: its trace equals vanilla's at every step it
    logged. Over the window's steps of vanilla alone, the late drop in vanilla's trace
    would read as a change; over the common steps there is none."""
    base_tr = {s: (100.0 if s <= 7000 else 50.0) for s in STEPS}
    treat_tr = {s: 100.0 for s in STEPS if s <= 7000}
    base, treat = _pair(tmp_path, base_tr, treat_tr, reached=7000)
    crit = one_seed(curvature_reduction([(base, treat)], **E6["curvature_reduction"]))
    assert crit.estimate == pytest.approx(0.0) and crit.status == FAIL
    assert "stopped at step 7000 of 10000" in crit.detail and "≤ step 7000" in crit.detail
    _, notes = evaluate([base, treat], load_card("e6"))
    assert any("stopped at step 7000" in n and "both runs" in n for n in notes)


def test_a_stopped_runs_milestone_fid_is_no_final_fid(tmp_path):
    base = make_run(tmp_path / "a", "e9a", "uniform", "cosine", final_fid=10.0)
    treat = make_run(tmp_path / "b", "e9b", "minsnr", "cosine", fids={2000: 10.5}, reached=6500)
    crit = fid_ratio([(base, treat)], "final", **E9["fid_ratio"])
    assert crit.status == NA and "stopped at step 6500 of 10000" in crit.detail
    assert "no final FID" in crit.detail
    best = fid_ratio([(base, treat)], "best", **E9["fid_ratio"])
    assert best.status == NA


@pytest.mark.parametrize(
    "key, a, b",
    [
        (("optim", "lr"), 1e-4, 1e-3),
        (("train", "total_steps"), 30, 8),
        (("train", "batch_size"), 4, 8),
        (("train", "ema_decay"), 0.999, 0.99),
        (("data", "name"), "digits", "cifar10"),
        (("diffusion", "beta_schedule"), "cosine", "linear"),
    ],
)
def test_pairs_that_differ_beyond_the_card_are_not_evaluable(tmp_path, key, a, b):
    tr = {s: 100.0 for s in STEPS}
    base, treat = _pair(tmp_path, tr, {s: 50.0 for s in STEPS})  # −50%: would pass
    for run, value in ((base, a), (treat, b)):
        run.config.setdefault(key[0], {})[key[1]] = value
    crits, _ = evaluate([base, treat], load_card("e6"))
    assert [c.status for c in crits] == [NA]
    dotted = ".".join(key)
    assert f"{dotted} {a} vs {b}" in crits[0].detail
    text = write_report([base, treat], tmp_path / "out", "e6").read_text()
    shown = (
        (f"{a} β", f"{b} β") if key[1] == "beta_schedule" else (f"{dotted}={a}", f"{dotted}={b}")
    )
    assert all(label in text for label in shown)  # the labels show it
    assert "✅" not in text and "❌" not in text


def test_only_the_card_varies_in_a_matched_pair(tmp_path):
    tr = {s: 100.0 for s in STEPS}
    base, treat = _pair(tmp_path, tr, {s: 50.0 for s in STEPS})
    for run, kernels in ((base, "torch"), (treat, "triton")):  # implementation only
        run.config["model"] = {"kernels": kernels}
    crits, _ = evaluate([base, treat], load_card("e6"))
    assert one_seed(crits[0]).status == PASS


def test_the_e9_report_shows_only_its_card_rows_and_marks_extras(tmp_path):
    base = make_run(tmp_path / "a", "e9a", "uniform", "cosine", traces={s: 10.0 for s in STEPS})
    treat = make_run(tmp_path / "b", "e9b", "minsnr", "cosine", traces={s: 8.0 for s in STEPS})
    crits, notes = evaluate([base, treat], load_card("e9"))
    names = [c.name for c in crits]
    assert not any("lower" in n for n in names)  # "≥15% lower" is W1-E6's, not e9's
    assert not any("curvature criterion" in n or "confound" in n for n in notes)
    extras = [c for c in crits if c.origin == "fastdiff"]
    assert [c.name for c in extras] == ["no mode collapse: recall ≥ 0.8× vanilla's"]
    text = write_report([base, treat], tmp_path / "out", "e9").read_text()
    assert "no mode collapse: recall ≥ 0.8× vanilla's *(fastdiff's check" in text
    e6_notes = evaluate(
        [
            make_run(tmp_path / "c", "e5", "uniform", traces={s: 10.0 for s in STEPS}),
            make_run(
                tmp_path / "d",
                "e6",
                "minsnr",
                traces={s: 12.0 for s in STEPS},
                unweighted={s: 12.0 for s in STEPS},
                mean_weight=0.8,
            ),
        ],
        load_card("e6"),
    )[1]
    # the note names a row the report has: W1-E6's "≥15% lower" criterion
    assert any("curvature criterion (≥15% lower trace) failed" in n for n in e6_notes)


def test_a_window_of_only_nonfinite_steps_never_completes(tmp_path):
    run = make_run(tmp_path / "a", "e9a", "uniform", "cosine")
    run.rows = [
        {"step": 5000, "train/loss": None, "train/nonfinite_steps": 2500},
        {"step": 10000, "train/loss": 0.1},
    ]
    crits, _ = evaluate([run], None)
    assert crits[0].status == FAIL and "NOT finite" in crits[0].detail
    run.rows = [{"step": 10000, "train/loss": 0.1, "train/nonfinite_steps": 3}]
    assert evaluate([run], None)[0][0].status == FAIL
    run.rows = [{"step": 10000, "train/loss": 0.1, "train/nonfinite_steps": 0}]
    assert evaluate([run], None)[0][0].status == PASS


def test_seeds_that_agree_do_not_give_a_zero_width_interval(tmp_path):
    """Two seeds with the same −20% change, each measured with SE 0.05: the seeds' spread
    (0) is floored at the runs' own error, so the interval is t₁·0.05/√2 wide each way."""
    from fastdiff.stats import Measure, seed_interval

    iv = seed_interval([Measure(-0.2, 0.05), Measure(-0.2, 0.05)])
    half = 12.706204736174707 * 0.05 / 2**0.5  # Student t, 1 df, 97.5% (tables)
    assert (iv.lo, iv.hi) == pytest.approx((-0.2 - half, -0.2 + half))
    assert seed_interval([Measure(-0.1, 0.0), Measure(-0.3, 0.0)]).sd == pytest.approx(
        np.std([-0.1, -0.3], ddof=1)
    )


def test_study_folder_is_keyed_by_card_and_overrides_not_seeds():
    a = study.study_dir("e9", ["data=digits", "train.total_steps=8"])
    assert a == study.study_dir("e9", ["train.total_steps=8", "data=digits"])
    assert a != study.study_dir("e9", ["data=digits", "train.total_steps=9"])
    assert a != study.study_dir("e6", ["data=digits", "train.total_steps=8"])


def test_a_study_folder_holds_one_study(tmp_path, capsys):
    root = tmp_path / "s"
    study.claim(root, "e9", ["optim.lr=1e-4"])
    study.claim(root, "e9", ["optim.lr=1e-4"])  # the same study again: fine
    before = sorted(p.name for p in root.iterdir())
    code = study.main(
        ["e9", *tiny(tmp_path), "optim.lr=1e-3", "--out", str(root), "--launch", "false"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fastdiff: error: ") and err.count("\n") == 1
    assert "holds study e9 with overrides optim.lr=1e-4" in err
    assert sorted(p.name for p in root.iterdir()) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(study.ConfigError, match="not empty"):
        study.claim(tmp_path / "other", "e9", [])


def test_a_study_whose_runs_fail_exits_nonzero_naming_them(tmp_path, capsys):
    root = tmp_path / "s"
    code = study.main(
        ["e9", *tiny(tmp_path), "--out", str(root), "--launch", "python3 -c 'raise SystemExit(3)'"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "e9a seed 1077" in err and "e9b seed 1077" in err
    assert str(root / "logs" / "e9a-seed1077.log") in err
    assert json.loads((root / "study.json").read_text())["card"] == "e9"


@pytest.mark.parametrize("status", [INCONCLUSIVE])
def test_one_seed_never_decides_the_arms(tmp_path, status):
    base, treat = _pair(tmp_path, {s: 100.0 for s in STEPS}, {s: 50.0 for s in STEPS})
    crit = curvature_reduction([(base, treat)], **E6["curvature_reduction"])
    assert crit.pair.status == PASS and crit.status == status
    assert crit.interval is None and "--seeds 3" in crit.detail
    data = crit.as_json()
    assert data["seed_pair"]["status"] == PASS and data["arms"]["status"] == status


def test_the_fid_gap_compares_pairs_that_differ_only_in_schedule(tmp_path):
    runs = [
        make_run(tmp_path / "a", "e9a", "uniform", "cosine", final_fid=10.0),
        make_run(tmp_path / "b", "e9b", "minsnr", "cosine", final_fid=11.0),
        make_run(tmp_path / "c", "e5", "uniform", "linear", final_fid=10.0),
        make_run(tmp_path / "d", "e6", "minsnr", "linear", final_fid=10.5),
    ]
    gap = [c for c in evaluate(runs, load_card("e9"))[0] if c.name.startswith("FID gap")]
    assert one_seed(gap[0]).status == FAIL  # 1.10× − 1.05× > 0, with no FID error
    for run in runs[2:]:
        run.config["optim"] = {"lr": 1e-3}
    gap = [c for c in evaluate(runs, load_card("e9"))[0] if c.name.startswith("FID gap")]
    assert gap[0].status == NA and "optim.lr 0.001 vs None" in gap[0].detail


def test_a_study_with_a_launcher_that_does_not_exist_is_one_line(tmp_path, capsys):
    root = tmp_path / "s"
    code = study.main(["e9", *tiny(tmp_path), "--out", str(root), "--launch", "/no/python"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is not a program" in err
    assert not root.exists()


def test_a_study_folder_is_not_a_run_dir(tmp_path, capsys):
    from fastdiff import train

    root = tmp_path / "s"
    study.claim(root, "e9", [])
    before = sorted(p.name for p in root.iterdir())
    code = train.main(["quickstart", *tiny(tmp_path), f"train.run_dir={root}"])
    err = capsys.readouterr().err
    assert code == 2 and "study.json" in err
    assert sorted(p.name for p in root.iterdir()) == before
