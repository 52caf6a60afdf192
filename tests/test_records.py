"""A run's records say what happened: one run per run directory, a resumed run logs
what an uninterrupted one logs, a window with no finite step logs no loss, a signal
during a sample grid stops it at once, and the messages name what is there."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastdiff.jobs as jobs_mod
import fastdiff.objective as objective_mod
from fastdiff.config import ConfigError, compose, to_config
from fastdiff.rundir import find_checkpoint
from fastdiff.stopping import EXIT_PREEMPTED, Diverged, Finished, JobInterrupted, Preempted, Signals
from fastdiff.train import main as train_main
from fastdiff.trainer import training_loop
from tests.conftest import tiny


def run(root, *overrides):
    return training_loop(to_config(compose(tiny(root, *overrides))))


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``folder``: (size, SHA-256), by relative name."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def logged(run_dir: Path) -> dict[int, dict]:
    """What each log step recorded about training (timing keys left out)."""
    return {
        r["step"]: {k: v for k, v in r.items() if not k.startswith("perf/")}
        for r in rows(run_dir)
        if "train/loss" in r
    }


def fail_at(monkeypatch, call: int, effect) -> None:
    """Apply ``effect`` to the ``call``-th training loss (1-based), once."""
    real, calls = objective_mod.weighted_mse, []

    def hooked(*args):
        calls.append(1)
        return effect(real(*args)) if len(calls) == call else real(*args)

    monkeypatch.setattr(objective_mod, "weighted_mse", hooked)


def die(out):
    raise KeyboardInterrupt("killed before its first checkpoint")


def sigterm(out):
    os.kill(os.getpid(), signal.SIGTERM)
    return out


def no_checkpoint_run(root: Path, monkeypatch, run_dir: Path) -> None:
    """A run killed at step 4, before its first checkpoint: config.yaml and metrics."""
    fail_at(monkeypatch, 4, die)
    with pytest.raises(KeyboardInterrupt):
        run(root, "train.ckpt_every=1000", f"train.run_dir={run_dir}")
    monkeypatch.undo()
    assert not list(run_dir.glob("checkpoints/*")) and (run_dir / "metrics.jsonl").is_file()


# ------------------------------------------------------------ one run, one dir
def test_a_new_run_into_another_runs_dir_is_refused_and_touches_nothing(tmp_path, capsys):
    run_dir = tmp_path / "R"
    run(tmp_path, "train.total_steps=10", "train.ckpt_every=2", f"train.run_dir={run_dir}")
    before = snapshot(run_dir)
    second = ["train.total_steps=4", "train.ckpt_every=2", "train.seed=5"]
    with pytest.raises(ConfigError, match=f"{run_dir} already holds a run"):
        run(tmp_path, *second, f"train.run_dir={run_dir}")
    assert train_main(tiny(tmp_path, *second, f"train.run_dir={run_dir}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.resume=auto" in err[0], err
    assert snapshot(run_dir) == before


def test_resume_auto_of_another_arm_without_checkpoints_is_refused(tmp_path, monkeypatch):
    run_dir = tmp_path / "R"
    no_checkpoint_run(tmp_path, monkeypatch, run_dir)
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match=r"another arm.*train.seed=1077 \(this run: 5\)"):
        run(tmp_path, "train.seed=5", "train.resume=auto", f"train.run_dir={run_dir}")
    assert snapshot(run_dir) == before


def test_resume_auto_without_checkpoints_starts_again_without_duplicate_steps(
    tmp_path, monkeypatch
):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(tmp_path, f"train.run_dir={straight}")
    no_checkpoint_run(tmp_path, monkeypatch, stopped)
    run(tmp_path, "train.resume=auto", f"train.run_dir={stopped}")
    assert [r["step"] for r in rows(stopped)] == [r["step"] for r in rows(straight)] == [0, 2, 4, 6]
    assert logged(stopped) == logged(straight)


def test_pruning_keeps_this_runs_checkpoints(tmp_path):
    """Resumed from an older checkpoint, the run prunes among the steps it has reached;
    the newer checkpoints in the folder are not its to delete, nor a reason to delete its own."""
    run_dir = tmp_path / "R"
    every = ["train.ckpt_every=2", f"train.run_dir={run_dir}"]
    run(tmp_path, "train.total_steps=10", "train.keep_checkpoints=5", *every)
    ckpts = run_dir / "checkpoints"
    newer = {k: v for k, v in snapshot(ckpts).items() if k > "step_0000006.pt"}
    run(tmp_path, "train.total_steps=6", f"train.resume={ckpts / 'step_0000002.pt'}", *every)
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == [f"step_{s:07d}.pt" for s in (2, 4, 6, 8, 10)]
    assert sorted(newer) == ["step_0000008.pt", "step_0000010.pt"]
    assert {k: snapshot(ckpts)[k] for k in newer} == newer


# ------------------------------------------------------------ the open window
def test_a_resumed_run_logs_what_the_uninterrupted_run_logs(tmp_path, monkeypatch):
    """Stopped by a signal at step 3 (not a log step), resumed: every later log step
    reads as in the uninterrupted run, to 1e-7."""
    common = ["train.total_steps=8", "train.log_every=4", "train.ckpt_every=1000"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(tmp_path, *common, f"train.run_dir={straight}")
    fail_at(monkeypatch, 3, sigterm)
    with pytest.raises(Preempted) as stop:
        run(tmp_path, *common, f"train.run_dir={stopped}")
    assert stop.value.step == 3
    monkeypatch.undo()
    run(tmp_path, *common, "train.resume=auto", f"train.run_dir={stopped}")
    want, got = logged(straight), logged(stopped)
    assert sorted(got) == sorted(want) == [4, 8]
    for step, row in want.items():
        assert got[step].keys() == row.keys()
        for key, value in row.items():
            assert got[step][key] == pytest.approx(value, abs=1e-7), (step, key)


def test_a_checkpoint_without_the_open_window_still_resumes(tmp_path, monkeypatch):
    common = ["train.total_steps=8", "train.log_every=4", "train.ckpt_every=1000"]
    run_dir = tmp_path / "R"
    fail_at(monkeypatch, 3, sigterm)
    with pytest.raises(Preempted):
        run(tmp_path, *common, f"train.run_dir={run_dir}")
    monkeypatch.undo()
    path = run_dir / "checkpoints" / "step_0000003.pt"
    state = torch.load(path, weights_only=False)
    state.pop("window")  # as written before checkpoints carried it
    torch.save(state, path)
    assert run(tmp_path, *common, "train.resume=auto", f"train.run_dir={run_dir}")["step"] == 8
    assert sorted(logged(run_dir)) == [4, 8]


def test_a_window_of_only_nonfinite_steps_logs_no_loss(tmp_path, monkeypatch):
    real = objective_mod.weighted_mse
    monkeypatch.setattr(objective_mod, "weighted_mse", lambda *args: real(*args) * float("nan"))
    run_dir = tmp_path / "R"
    run(tmp_path, "train.total_steps=2", "train.on_nonfinite=skip", f"train.run_dir={run_dir}")
    (row,) = logged(run_dir).values()
    assert row["train/nonfinite_steps"] == 2
    for key in ("train/loss", "train/mse_unweighted", "train/grad_norm"):
        assert math.isnan(float(row[key])), (key, row[key])


# ------------------------------------------------------------------- signals
def test_a_second_signal_stops_a_job_at_once_and_a_step_at_its_end(capfd):
    signals = Signals()
    with signals.caught():
        os.kill(os.getpid(), signal.SIGTERM)  # acknowledged, recorded, nothing raised
        assert signals.received == signal.SIGTERM
        with pytest.raises(JobInterrupted), signals.job():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)  # outside a job: a step finishes first
    assert signals.hard
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 3 and err[0].startswith("fastdiff: SIGTERM: stopping"), err


def test_a_grid_cut_short_at_the_last_step_is_made_on_resume(tmp_path, monkeypatch):
    run_dir = tmp_path / "R"
    common = ["train.total_steps=2", "sampling.grid_every=2", f"train.run_dir={run_dir}"]
    real = jobs_mod.sample

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs_mod, "sample", signalled)
    with pytest.raises(Preempted, match="step 2"):
        run(tmp_path, *common)
    monkeypatch.undo()
    assert not list(run_dir.glob("samples/grid_*"))
    assert (run_dir / "checkpoints" / "step_0000002.pt").is_file()
    assert run(tmp_path, *common, "train.resume=auto")["step"] == 2
    assert (run_dir / "samples" / "grid_0000002.png").is_file()
    with pytest.raises(Finished):  # and nothing is left to redo
        run(tmp_path, *common, "train.resume=auto")


@pytest.mark.slow
def test_sigterm_during_a_ddpm_grid_exits_75_within_10_s_and_resumes(tmp_path):
    run_dir = tmp_path / "R"
    common = [
        "train.total_steps=4",
        "sampling.grid_every=2",
        "sampling.grid_sampler=ddpm",
        "sampling.grid_images=64",
        f"train.run_dir={run_dir}",
    ]
    cmd = [sys.executable, "-m", "fastdiff.train", *tiny(tmp_path, *common)]
    proc = subprocess.Popen([*cmd, "sampling.grid_nfe=200"], stderr=subprocess.PIPE, text=True)
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"step": 2' in metrics.read_text()):
        time.sleep(0.05)
    time.sleep(0.3)  # the grid of step 2 runs right after its log line
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED and time.time() - sent < 10, err[-2000:]
    assert "fastdiff: SIGTERM: stopping" in err
    assert not list(run_dir.glob("samples/grid_*"))
    state = torch.load(run_dir / "checkpoints" / "step_0000002.pt", weights_only=False)
    assert state["pending_jobs"] == ["save_grid"]
    assert run(tmp_path, *common, "train.resume=auto", "sampling.grid_nfe=2")["step"] == 4
    assert (run_dir / "samples" / "grid_0000002.png").is_file()


# ------------------------------------------------------------------ messages
def test_find_checkpoint_of_a_run_without_any_says_so(tmp_path):
    with pytest.raises(ConfigError) as err:
        find_checkpoint(tmp_path)
    assert "has no checkpoints" in str(err.value) and "None" not in str(err.value)


def test_a_divergence_names_the_last_good_checkpoint_or_says_there_is_none(tmp_path, monkeypatch):
    nan = lambda out: out * float("nan")  # noqa: E731
    fail_at(monkeypatch, 2, nan)
    with pytest.raises(Diverged) as err:
        run(tmp_path, "train.ckpt_every=1000", f"train.run_dir={tmp_path / 'early'}")
    assert "no checkpoint" in str(err.value) and "is in" not in str(err.value)
    assert not (tmp_path / "early" / "checkpoints").exists()
    fail_at(monkeypatch, 5, nan)
    with pytest.raises(Diverged) as err:
        run(tmp_path, f"train.run_dir={tmp_path / 'late'}")
    assert str(tmp_path / "late" / "checkpoints" / "step_0000003.pt") in str(err.value)
