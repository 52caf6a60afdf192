"""Checkpoints: what a run needs to continue exactly, written atomically.

A checkpoint holds the model, the EMA, the optimizer, the grad scaler, the step and
the resolved config. Every random stream (data order, flips, timesteps, noise,
dropout, probes, grid and FID sampling) is keyed by (seed, step), so the step
restores each of them exactly; a WebDataset stream restarts at the beginning of
the epoch the step falls in.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml

from fastdiff.config import ConfigError
from fastdiff.rundir import checkpoints, config_yaml, resolve_checkpoint, save_torch

log = logging.getLogger("fastdiff")

# Settings a checkpoint's weights are tied to: resuming across a change is an error.
BOUND = [("model", "name"), ("model", "base_channels"), ("data", "image_size"), ("diffusion", "T")]


def resolve_resume(cfg) -> Path | None:
    """train.resume as a checkpoint path: a file, a run dir, or ``auto`` (the latest
    checkpoint of train.run_dir, else of the newest run of this experiment)."""
    resume = cfg.train.resume
    if not resume:
        return None
    if resume != "auto":
        return resolve_checkpoint(resume)
    if cfg.train.run_dir:
        runs = [Path(cfg.train.run_dir)]
    else:
        runs = sorted((Path(cfg.train.runs_root) / cfg.experiment).glob("*"))
    runs = [r for r in runs if checkpoints(r)]
    if not runs:
        log.info("train.resume=auto: no checkpoint yet, starting from step 0")
        return None
    return checkpoints(runs[-1])[-1]


def save_checkpoint(path: Path, step: int, model, ema, optimizer, scaler, cfg) -> None:
    state = {
        "step": step,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": {"torch": torch.get_rng_state()},  # all training streams are keyed by step
        "config": config_yaml(cfg),
    }
    save_torch(state, path)


def check_compatible(saved_yaml: str, cfg, path: Path) -> None:
    saved = yaml.safe_load(saved_yaml)
    for group, key in BOUND:
        was, now = saved.get(group, {}).get(key), getattr(getattr(cfg, group), key)
        if was != now:
            raise ConfigError(
                f"checkpoint {path} was trained with {group}.{key}={was}, this "
                f"run has {now}: set {group}.{key}={was} or start a new run"
            )


def load_checkpoint(path: Path, model, ema, optimizer, scaler, cfg, device) -> int:
    """Restore everything into the given objects; returns the step to continue from."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:
        raise ConfigError(
            f"checkpoint {path} cannot be read ({type(err).__name__}): pick "
            "another one with train.resume=FILE"
        ) from None
    check_compatible(state["config"], cfg, path)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError:  # one flat parameter group since the flat buffer (fastdiff.flat)
        raise ConfigError(
            f"checkpoint {path} holds optimizer state per tensor, from a fastdiff before the "
            "flat parameter buffer: it cannot be resumed; evaluate it, or start a new run"
        ) from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if state["step"] >= cfg.train.total_steps:
        log.warning("checkpoint %s is already at step %d >= train.total_steps", path, state["step"])
    log.info("resumed from %s at step %d", path, state["step"])
    return state["step"]
