"""The run directory and everything written into it, never half-written.

    runs/<experiment>/<run id>/
        config.yaml       resolved config
        metrics.jsonl     one JSON object per event: {"step": s, "train/loss": ..., ...}
        events.*          TensorBoard
        checkpoints/      step_0001000.pt ...
        samples/          grid_0001000.png ...
        summary.json      final metrics, wall time, images/s

Every file is written to a temporary name in the same folder and renamed into
place, so a crash never leaves a truncated checkpoint, grid or summary. A run
directory holds one run: a new run refuses a folder that holds another's records
(:func:`records`, checked in :func:`fastdiff.checkpoint.claim_run_dir`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fastdiff.errors import ConfigError


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_torch(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def run_dir_for(cfg, resumed_run_dir: Path | None) -> Path:
    """An explicit train.run_dir; else the resumed checkpoint's run; else a new run
    under runs_root (also for a loose checkpoint: nothing is written beside it)."""
    if cfg.train.run_dir:
        return Path(cfg.train.run_dir)
    if resumed_run_dir is not None:
        return resumed_run_dir
    return new_run_dir(cfg.train.runs_root, cfg.experiment)


def make_run_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"cannot create the run directory {path} ({err.strerror}): set "
            "train.runs_root or train.run_dir to a writable folder"
        ) from None


def new_run_dir(runs_root: str, experiment: str) -> Path:
    base = Path(runs_root) / experiment / time.strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def config_yaml(cfg, parent: dict | None = None) -> str:
    """The resolved config as YAML; ``parent`` (train.init_from's checkpoint, step and
    config) is recorded under its own top-level key."""
    node = OmegaConf.to_container(OmegaConf.structured(cfg))
    node.pop("defaults", None)
    if parent is not None:
        node["parent"] = parent
    return OmegaConf.to_yaml(node)


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step_*.pt"))


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint's name (``step_0001000.pt`` -> 1000)."""
    return int(path.name.split(".")[0].split("_")[1])


def records(run_dir: Path) -> list[str]:
    """What ``run_dir`` holds of a run's records: the files a run writes, checkpoints
    (set-aside ones too) counted. Empty for a new folder or one of unrelated files."""
    # study.json: a study's folder, whose runs live in its arm folders, never at its root
    names = ("config.yaml", "metrics.jsonl", "summary.json", "study.json")
    found = [name for name in names if (run_dir / name).exists()]
    if list(run_dir.glob("events.out.tfevents.*")):
        found.append("TensorBoard events")
    saved = list((run_dir / "checkpoints").glob("step_*"))
    if saved:
        found.append(f"{len(saved)} checkpoint{'s' * (len(saved) > 1)}")
    if list((run_dir / "samples").glob("*")):
        found.append("samples")
    return found


def find_checkpoint(run_dir: Path, step: int | None = None) -> tuple[int, Path]:
    """(step, path) of a run's checkpoint at ``step``, or its latest."""
    found = {checkpoint_step(p): p for p in checkpoints(Path(run_dir))}
    if not found:
        raise ConfigError(f"{run_dir} has no checkpoints (checkpoints/step_*.pt)")
    step = step if step is not None else max(found)
    if step not in found:
        raise ConfigError(f"{run_dir} has no checkpoint for step {step}: it has {sorted(found)}")
    return step, found[step]


class MetricsLog:
    """metrics.jsonl and TensorBoard, written by the main process only. A resumed run
    (``resume_step``) first drops what was logged past that step; a run that starts
    again from step 0 drops everything, as it logs step 0 again."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        resume_step: int | None = None,
        hparams: Callable[[], dict] | None = None,
    ):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        self.last_train: dict = {}  # the last kept train/loss row, for a resumed summary
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Drop what the interrupted run logged past its last checkpoint.
            through = resume_step if resume_step > 0 else -1
            lines = [line for line in self.path.read_text().splitlines() if line]
            kept = [(x, row) for x in lines if (row := json.loads(x)).get("step", 0) <= through]
            write_text(self.path, "".join(f"{line}\n" for line, _ in kept))
            train = [row for _, row in kept if "train/loss" in row]
            self.last_train = {k: v for k, v in train[-1].items() if k != "step"} if train else {}
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir), purge_step=resume_step)
        if hparams is not None and not resume_step:
            self.tb.add_text("config", json.dumps(hparams(), indent=1, default=str))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {
            "step": step,
            **{
                k: (v if math.isfinite(v) else str(v)) if isinstance(v, float) else v
                for k, v in metrics.items()
            },
        }
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
