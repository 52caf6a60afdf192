"""Runs that survive: exact resume, atomic checkpoints, preemption, divergence, bad
checkpoints, and several processes."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastdiff.objective as objective_mod
import fastdiff.rundir as rundir
from fastdiff.config import ConfigError, compose, to_config
from fastdiff.stopping import EXIT_PREEMPTED, Diverged
from fastdiff.trainer import training_loop
from tests.conftest import tiny, train_cli

ROOT = Path(__file__).resolve().parents[1]


def run(root, *overrides):
    cfg = to_config(compose(tiny(root, *overrides)))
    return training_loop(cfg), cfg


def only_run(root, experiment="custom"):
    (path,) = (Path(root) / experiment).iterdir()
    return path


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_state(run_dir, step):
    return torch.load(run_dir / "checkpoints" / f"step_{step:07d}.pt", weights_only=False)


def assert_bitwise(a, b):
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"


def test_resume_is_bitwise_and_metrics_are_not_duplicated(tmp_path):
    run(tmp_path / "a", "train.total_steps=8", "train.log_every=2", "train.ckpt_every=4")
    straight = only_run(tmp_path / "a")
    run(tmp_path / "b", "train.total_steps=4", "train.log_every=2", "train.ckpt_every=4")
    first = only_run(tmp_path / "b")
    # the interrupted run had logged past its checkpoint: that line must go
    with (first / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 5, "train/loss": 123.0}) + "\n")
    run(
        tmp_path / "b",
        "train.total_steps=8",
        "train.log_every=2",
        "train.ckpt_every=4",
        "train.resume=auto",
        f"train.run_dir={first}",
    )
    assert_bitwise(final_state(straight, 8), final_state(first, 8))
    train_rows = lambda d: [(r["step"], r["train/loss"]) for r in rows(d) if "train/loss" in r]  # noqa: E731
    assert train_rows(first) == train_rows(straight)


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path):
    summary, _ = run(tmp_path, "train.resume=auto", "train.total_steps=2")
    assert summary["step"] == 2


def test_crash_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    real = torch.save
    calls = []

    def dying_save(obj, path, *a, **k):
        calls.append(path)
        if obj["step"] == 6:
            Path(path).write_bytes(b"half a checkpoint")
            raise KeyboardInterrupt("killed mid-write")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(rundir.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "train.total_steps=6")
    run_dir = only_run(tmp_path)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_0000003.pt"]
    assert final_state(run_dir, 3)["step"] == 3  # still loadable


@pytest.mark.slow
def test_sigterm_checkpoints_exits_and_resumes_to_the_same_weights(tmp_path):
    base = tiny(tmp_path, "train.total_steps=60", "train.ckpt_every=1000", "train.log_every=5")
    cmd = [sys.executable, "-m", "fastdiff.train", *base]
    proc = subprocess.Popen(
        [*cmd, f"train.run_dir={tmp_path / 'stopped'}"], stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 3
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["preempted"] and 0 < summary["step"] < 60
    assert (tmp_path / "stopped" / "checkpoints" / f"step_{summary['step']:07d}.pt").exists()
    train_cli(*base, f"train.run_dir={tmp_path / 'stopped'}", "train.resume=auto")
    train_cli(*base, f"train.run_dir={tmp_path / 'straight'}")
    assert_bitwise(final_state(tmp_path / "stopped", 60), final_state(tmp_path / "straight", 60))


def nan_at(monkeypatch, bad_call):
    real = objective_mod.weighted_mse
    calls = []

    def poisoned(*args):
        calls.append(1)
        out = real(*args)
        return out * float("nan") if len(calls) == bad_call else out

    monkeypatch.setattr(objective_mod, "weighted_mse", poisoned)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    nan_at(monkeypatch, 5)
    with pytest.raises(Diverged) as err:
        run(tmp_path, "train.total_steps=9", "train.log_every=3", "train.ckpt_every=3")
    assert err.value.step == 5 and err.value.exit_code != 0
    run_dir = only_run(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["diverged"] and summary["step"] == 5
    assert summary["train/loss"] == pytest.approx(summary["train/loss"])  # last finite, not NaN
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_0000003.pt"]


def test_nan_is_skipped_without_touching_the_weights(tmp_path, monkeypatch):
    nan_at(monkeypatch, 5)
    summary, _ = run(
        tmp_path, "train.total_steps=6", "train.log_every=3", "train.on_nonfinite=skip"
    )
    run_dir = only_run(tmp_path)
    logged = {r["step"]: r for r in rows(run_dir) if "train/loss" in r}
    assert logged[6]["train/nonfinite_steps"] == 1 and logged[3]["train/nonfinite_steps"] == 0
    state = final_state(run_dir, 6)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert summary["step"] == 6 and not summary["diverged"]


def test_checkpoint_from_another_model_is_one_clear_error(tmp_path):
    run(tmp_path / "a", "train.total_steps=3")
    with pytest.raises(
        ConfigError, match=r"weights of another shape: model.base_channels=16 \(this run: 24\)"
    ):
        run(tmp_path / "b", "model.base_channels=24", f"train.resume={only_run(tmp_path / 'a')}")


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    common = [o for o in tiny(tmp_path) if not o.startswith(("train.batch_size", "train.runs"))]
    # fp32: bf16 convolutions round differently at batch 2 and batch 4
    common += ["model.dropout=0", "train.amp=false", "train.total_steps=4", "train.ckpt_every=4"]
    train_cli(*common, "train.batch_size=2", f"train.run_dir={tmp_path / 'two'}", processes=2)
    train_cli(*common, "train.batch_size=4", f"train.run_dir={tmp_path / 'one'}", threads=1)
    a, b = final_state(tmp_path / "two", 4), final_state(tmp_path / "one", 4)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2
    assert len([r for r in rows(tmp_path / "two") if "train/loss" in r]) == 2  # logged once


def test_checkpoint_with_per_tensor_optimizer_state_is_one_clear_error(tmp_path):
    run(tmp_path / "a", "train.total_steps=3")
    ckpt = only_run(tmp_path / "a") / "checkpoints" / "step_0000003.pt"
    state = torch.load(ckpt, weights_only=False)
    per_tensor = torch.optim.Adam(torch.nn.Linear(2, 2).parameters())  # two groups' worth
    state["optimizer"] = per_tensor.state_dict()
    torch.save(state, ckpt)
    with pytest.raises(ConfigError, match="optimizer state per tensor"):
        run(tmp_path / "b", f"train.resume={ckpt}")
