"""The run directory: atomic writes, checkpoint lookup and the metrics log on resume."""

import json

import pytest

from fastdiff.config import ConfigError
from fastdiff.rundir import MetricsLog, atomic_path, find_checkpoint, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    write_text(path, "old\n")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_find_checkpoint_by_step_or_latest(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for step in (3, 12):
        (ckpts / f"step_{step:07d}.pt").write_bytes(b"")
    (ckpts / "step_0000020.pt.unreadable").write_bytes(b"")  # set aside: never picked
    assert find_checkpoint(tmp_path) == (12, ckpts / "step_0000012.pt")
    assert find_checkpoint(tmp_path, 3) == (3, ckpts / "step_0000003.pt")
    with pytest.raises(ConfigError, match=r"no checkpoint for step 5: it has \[3, 12\]"):
        find_checkpoint(tmp_path, 5)


def test_metrics_log_drops_what_was_logged_past_the_resumed_step(tmp_path):
    log = MetricsLog(tmp_path, enabled=True)
    for step in (2, 4, 6):
        log.log(step, {"train/loss": float(step), "bad": float("nan")})
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 2, "train/loss": 2.0, "bad": "nan"}  # JSON has no NaN
    resumed = MetricsLog(tmp_path, enabled=True, resume_step=4)
    resumed.log(6, {"train/loss": 60.0})
    resumed.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(2, 2.0), (4, 4.0), (6, 60.0)]
