"""make gpu-check's script, at the tests' shapes on this CPU, so that it still runs
when a session is next lent a GPU."""

import json
import math

import pytest

from benches.gpu_check import main


@pytest.mark.slow
def test_gpu_check_smoke_writes_every_asked_part(tmp_path):
    out = tmp_path / "gpu-check.json"
    parts = "steps,e9b,fused,fused_match,fused_compiled"
    assert main(["--smoke", "--parts", parts, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["parts"]) == set(parts.split(","))
    steps = result["parts"]["steps"]
    for key in ("b2-fp32-eager", "b2-amp-eager"):
        s = steps[key]
        assert s["seconds_per_step"] > 0
        assert s["images_per_sec"] == pytest.approx(2 / s["seconds_per_step"])
    assert steps["b2-fp32-eager"]["precision"] == "no"
    e9b = result["parts"]["e9b"]
    assert e9b["status"] == "ok" and e9b["train/loss"] > 0
    assert sorted(e9b["fid"]) == [
        "eval/final/fid@20",
        "val/fid_milestone/fid@10",
        "val/fid_milestone/fid@20",
    ]
    assert all(math.isfinite(v) for v in e9b["fid"].values())
    fused = result["parts"]["fused"]
    assert fused["status"] == "ok"
    for k in ("K1", "K2"):
        assert fused[k]["speedup"] == pytest.approx(fused[k]["sequential"] / fused[k]["fused"])
    match = result["parts"]["fused_match"]
    assert match["status"] == "ok"
    for p in ("dropout0.0", "dropout0.1"):  # on CPU equal to rounding either way
        assert match[p]["max_rel_diff"] < 1e-4
    comp = result["parts"]["fused_compiled"]
    assert comp["status"] == "ok" and comp["compiled"] > 0
    assert comp["speedup"] == pytest.approx(comp["eager"] / comp["compiled"])


def test_gpu_check_unknown_part_is_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["--parts", "steps,warp"])
    assert "unknown part 'warp'" in capsys.readouterr().err
