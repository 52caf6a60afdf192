"""Cards a user writes, run end to end as tiny studies: no code changes between them."""

import json
import subprocess
import sys

import pytest
import yaml

from fastdiff.cards import load_card
from tests.conftest import tiny


def study(tmp_path, card, *extra):
    overrides = [o for o in tiny(tmp_path) if not o.startswith("train.runs_root")]
    overrides.append("train.amp=false")  # the fused arms' pass in fp32, as standalone
    cmd = [
        sys.executable,
        "-m",
        "fastdiff.study",
        str(card),
        *overrides,
        "curvature.probes=2",
        "curvature.batch_size=2",
        "curvature.t_bins=2",
        "curvature.every=3",
        *extra,
        "--launch",  # one process per run, without accelerate's launcher start-up
        sys.executable,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (root,) = (tmp_path / "runs" / "study").iterdir()
    return root, json.loads((root / "report" / "report.json").read_text())


@pytest.mark.slow
def test_a_copied_card_with_a_third_arm_and_a_new_threshold(tmp_path):
    """The issue's acceptance: e9's card copied, an arm added (e9b plus γ = 1 under its old
    name), one threshold changed; two seeds. Every criterion is judged for both treatment
    arms against the baseline, at the new threshold, with simultaneous intervals."""
    node = yaml.safe_load(load_card("e9").path.read_text())
    node["name"], node["title"] = "mine", "e9 with a γ = 1 arm"
    node["arms"]["g1"] = ["experiment=e9b", "loss.minsnr_gamma=1"]
    for c in node["criteria"]:
        if c["kind"] == "loss_ratio":
            c["factor"] = 1.5
    card = tmp_path / "mine.yaml"
    card.write_text(yaml.safe_dump(node, allow_unicode=True))
    root, verdicts = study(tmp_path, card, "--seeds", "2", "--fused")  # one process, K = 6
    runs = sorted(str(p.relative_to(root)) for p in root.glob("*/seed*"))
    assert runs == [f"{a}/seed{s}" for a in ("e9a", "e9b", "g1") for s in (1077, 2077)]
    g1 = yaml.safe_load((root / "g1" / "seed1077" / "config.yaml").read_text())
    assert g1["loss"]["gamma"] == 1.0
    by_arm = {}
    for c in verdicts["criteria"]:
        for arm in ("e9b", "g1"):
            if c["name"].endswith(f"— {arm}"):
                by_arm.setdefault(arm, []).append(c)
    assert by_arm and len(by_arm["e9b"]) == len(by_arm["g1"]) > 3
    loss = [c for c in by_arm["g1"] if "loss" in c["name"] and c["threshold"] is not None]
    assert loss and all(c["threshold"] == 1.5 for c in loss)
    judged = [c for c in by_arm["g1"] if c["interval"] is not None]
    assert judged and all(c["n_seeds"] == 2 for c in judged)
    report = (root / "report" / "REPORT.md").read_text()
    assert "simultaneous over the 2 comparisons" in report
    assert "γ=1" in report and "γ=5" in report


@pytest.mark.slow
def test_the_zero_terminal_snr_example_card_runs_as_a_tiny_study(tmp_path):
    """configs/cards/ms1_e10_snr.yaml: v-prediction vanilla against v-prediction Min-SNR
    under cosine with SNR(T) = 0, trained, sampled and reported."""
    # curvature off: its probes are covered by the copied card's study above
    root, verdicts = study(
        tmp_path, "e10-snr", "--fused", "--seeds", "1", "curvature.enabled=false"
    )
    for arm in ("vanilla_v", "minsnr_v"):
        cfg = yaml.safe_load((root / arm / "seed1077" / "config.yaml").read_text())
        assert cfg["loss"]["prediction"] == "v" and cfg["diffusion"]["zero_terminal_snr"]
        summary = json.loads((root / arm / "seed1077" / "summary.json").read_text())
        assert summary["step"] == 6
        assert list((root / arm / "seed1077").glob("**/*.png"))  # the EMA grid
    assert verdicts["card"] == "e10-snr"
    completed = [c for c in verdicts["criteria"] if "completed" in c["name"]]
    assert completed and all(c["status"] == "pass" for c in completed)


@pytest.mark.parametrize(
    "arm, says",
    [
        (["experiment=e9b", "loss.weighting=soft_minsrn"], "unknown loss.weighting 'soft_minsrn'"),
        (["experiment=e9a", "loss.prediction=eps", "diffusion.zero_terminal_snr=true"], "use loss"),
    ],
)
def test_a_bad_arm_is_one_line_naming_the_arm(tmp_path, capsys, arm, says):
    from fastdiff.study import main

    node = yaml.safe_load(load_card("e9").path.read_text())
    node["arms"]["mine"] = arm
    card = tmp_path / "bad.yaml"
    card.write_text(yaml.safe_dump(node, allow_unicode=True))
    argv = [str(card), "data=digits", "--out", str(tmp_path / "s"), "--launch", sys.executable]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "arm 'mine' of e9" in err and says in err
    assert not (tmp_path / "s").exists()  # refused before anything was made
