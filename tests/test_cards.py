"""Cards are files: any number of arms, criteria from the library, no names in code."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from fastdiff.cards import ConfigError, load_card, shipped
from fastdiff.report import INCONCLUSIVE, PASS, evaluate
from fastdiff.report_cli import main as report_main
from tests.test_report import make_run

ROOT = Path(__file__).resolve().parents[1]
STEPS = range(2000, 10001, 1000)


def _card(tmp_path, edit) -> Path:
    node = yaml.safe_load(load_card("e9").path.read_text())
    edit(node)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(node, allow_unicode=True))
    return path


def _three_arms(node):
    node["arms"]["g1"] = ["experiment=e9b", "loss.minsnr_gamma=1"]
    node["criteria"] = [{"kind": "fid_ratio", "which": "final", "band": 1.2, "pathology": 2.0}]


def test_a_new_arm_and_threshold_need_no_code(tmp_path):
    path = _card(tmp_path, _three_arms)
    base = make_run(tmp_path / "a", "e9a", "uniform", "cosine", final_fid=10.0, fid_se=0.2)
    g5 = make_run(tmp_path / "b", "e9b", "minsnr", "cosine", final_fid=10.5, fid_se=0.2)
    g1 = make_run(tmp_path / "c", "e9b", "minsnr", "cosine", final_fid=13.0, fid_se=0.2)
    g1.config["loss"]["minsnr_gamma"] = 1.0
    crits, notes = evaluate([base, g5, g1], load_card(path))
    by = {c.name: c for c in crits}
    five, one = by["final FID within 20% of vanilla (pathology at ≥2×) — e9b"], None
    one = by["final FID within 20% of vanilla (pathology at ≥2×) — g1"]
    assert five.threshold == 1.2 and five.status == INCONCLUSIVE  # one seed
    # two comparisons: each interval at 97.5% (z = 2.2414), delta method on the ratio
    for crit, fid in ((five, 10.5), (one, 13.0)):
        r = fid / 10.0
        se = r * ((0.2 / fid) ** 2 + (0.2 / 10.0) ** 2) ** 0.5
        assert crit.pair.interval == pytest.approx((r - 2.241403 * se, r + 2.241403 * se))
    assert five.pair.status == PASS and one.pair.status == "fail"
    assert any("simultaneous over the 2 comparisons" in n for n in notes)


def test_a_study_folder_reports_with_its_own_card(tmp_path, capsys):
    root = tmp_path / "study"
    root.mkdir()
    (root / "card.yaml").write_text(_card(tmp_path, _three_arms).read_text())
    make_run(root / "e9a" / "seed1077", "e9a", "uniform", "cosine", final_fid=10.0)
    make_run(root / "e9b" / "seed1077", "e9b", "minsnr", "cosine", final_fid=11.0)
    assert report_main([str(root)]) == 0
    text = (root / "report" / "REPORT.md").read_text()
    assert "within 20%" in text and "MS1-e9" in text
    assert "need e9a and g1 runs with a seed in common" in text


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda n: n.update(baseline="nope"), "baseline 'nope' is not one of its arms"),
        (lambda n: n["criteria"].append({"kind": "vibes"}), "unknown kind 'vibes'"),
        (lambda n: n["criteria"].append({"kind": "loss_ratio"}), "missing factor"),
        (lambda n: n["criteria"].append({"kind": "loss_ratio", "factor": 2, "x": 1}), "unknown x"),
        (lambda n: n["arms"].update(e9b="experiment=e9b"), "must be a list of overrides"),
        (lambda n: n["arms"].update(e9c=["loss.minsnr_gamma=2"]), "names no experiment="),
        (lambda n: n.update(seeds="many"), "seeds must be a list"),
    ],
)
def test_a_bad_card_is_one_line(tmp_path, edit, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_card(_card(tmp_path, edit))


def test_unknown_card_names_the_shipped_ones():
    with pytest.raises(ConfigError, match="unknown card 'e99': use one of .*e9"):
        load_card("e99")
    with pytest.raises(ConfigError, match="not found"):
        load_card("no/such/card.yaml")


def test_every_shipped_card_loads_and_its_arms_compose():
    names = {load_card(p).name for p in shipped()}
    assert {"e6", "e9", "e10-gamma"} <= names
    for path in shipped():
        card = load_card(path)
        assert card.varied and card.baseline in card.arms  # composes every arm


def test_no_card_names_in_the_report_or_study_code():
    out = subprocess.run(
        [
            "grep",
            "-rn",
            "-E",
            "\"e6\"|\"e9\"|'e6'|'e9'",
            "fastdiff/report",
            "fastdiff/study.py",
            "fastdiff/fused.py",
            "fastdiff/cards.py",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.stdout == ""


def test_arms_sharing_an_experiment_are_named_by_the_card(tmp_path):
    def edit(node):
        node["arms"]["g1"] = ["experiment=e9b", "loss.minsnr_gamma=1"]
        node["criteria"] = [{"kind": "completed"}, {"kind": "loss_ratio", "factor": 2.0}]

    path = _card(tmp_path, edit)
    base = make_run(tmp_path / "a", "e9a", "uniform", "cosine")
    g5 = make_run(tmp_path / "b", "e9b", "minsnr", "cosine")
    g1 = make_run(tmp_path / "c", "e9b", "minsnr", "cosine")
    g1.config["loss"]["minsnr_gamma"] = 1.0
    crits, _ = evaluate([base, g5, g1], load_card(path))
    done = sorted(c.name.split(" ")[0] for c in crits if "completed" in c.name)
    assert done == ["e9a", "e9b", "g1"]  # every arm's run, under the card's arm name
    (loss,) = [c for c in crits if c.name.startswith("no loss") and c.name.endswith("g1")]
    assert "g1 " in loss.pair.detail and "e9b" not in loss.pair.detail


def test_a_ratio_interval_stops_at_zero(tmp_path):
    base = make_run(tmp_path / "a", "e9a", "uniform", "cosine", final_fid=10.0, fid_se=8.0)
    treat = make_run(tmp_path / "b", "e9b", "minsnr", "cosine", final_fid=10.0, fid_se=8.0)
    crits, _ = evaluate([base, treat], load_card("e9"))
    (final,) = [c for c in crits if c.name.startswith("final FID")]
    assert final.pair.interval[0] == 0.0 and final.pair.interval[1] > 2


def test_a_card_criterion_without_its_runs_is_a_row_that_says_why(tmp_path):
    base = make_run(tmp_path / "a", "e9a", "uniform", "cosine", final_fid=10.0)
    treat = make_run(tmp_path / "b", "e9b", "minsnr", "cosine", final_fid=11.0)
    crits, _ = evaluate([base, treat], load_card("e9"))
    (gap,) = [c for c in crits if c.name.startswith("FID gap")]
    assert gap.status == "not evaluable" and "no e5 and e6 runs" in gap.detail
