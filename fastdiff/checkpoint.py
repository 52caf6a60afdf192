"""Checkpoints: what a run needs to continue exactly, written atomically.

A checkpoint holds the model, the EMA, the optimizer, the grad scaler, the step, the
resolved config, the process count, the run's progress so far (time, images,
segments), the open log window's sums (so the first log after a resume averages the
same steps as without one) and the periodic jobs a signal cut short at its step
(redone on resume). Every random stream (data order, flips, timesteps, noise, dropout,
probes, grid and FID sampling) is keyed by (seed, step), so the step restores each
of them exactly; a WebDataset stream restarts at the beginning of the epoch the
step falls in.

Resuming continues the same arm or refuses: the settings that define what is
trained (:data:`DEFINING`) must equal the checkpoint's. Starting a new run from
other weights on purpose is ``train.init_from``. A run directory holds one run
(:func:`claim_run_dir`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf

from fastdiff.config import Config, dotted
from fastdiff.errors import ConfigError
from fastdiff.rundir import checkpoints, records, save_torch
from fastdiff.weighting import canonical_loss

log = logging.getLogger("fastdiff")

# What the weights' shapes are tied to: even train.init_from needs these to match.
ARCHITECTURE = ["model.name", "model.base_channels", "data.image_size"]
# What defines the arm a run trains: resuming across a change of any is refused.
# Cadences, eval and curvature settings, total_steps and implementation switches
# (kernels, channels_last, compile) may differ: they do not change what is trained.
DEFINING = [
    *ARCHITECTURE,
    "model.dropout",
    "diffusion.beta_schedule",
    "diffusion.T",
    "loss.prediction",
    "loss.weighting",
    "loss.gamma",
    "loss.k",
    "diffusion.zero_terminal_snr",
    "sampling.spacing",  # not trained, but a card axis: one run's grids use one spacing
    "optim.name",
    "optim.lr",
    "optim.beta1",
    "optim.beta2",
    "optim.weight_decay",
    "train.batch_size",
    "train.seed",
    "train.amp",
    "train.grad_clip",
    "train.ema_decay",
    "data.name",
    "data.path",
    "data.hflip",
]
UNREADABLE_SUFFIX = ".unreadable"  # a broken checkpoint is kept under this name


def _get(node, dotted_key: str):
    for part in dotted_key.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
    return node


@dataclass
class Checkpoint:
    """A checkpoint file read into host memory once."""

    path: Path
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @cached_property
    def config(self) -> dict:
        return yaml.safe_load(self.state["config"])

    def release_weights(self) -> None:
        """Drop the tensors once restored; the run keeps only the record (step, config,
        progress) for the rest of its life, not a second copy of model and optimizer."""
        kept = ("step", "config", "progress", "window", "pending_jobs")
        self.state = {k: self.state[k] for k in kept if k in self.state}

    @property
    def progress(self) -> dict:
        """Time, images and segments of the run up to this checkpoint."""
        return self.state.get("progress") or {}

    @property
    def window(self) -> dict | None:
        """The open log window's sums (:meth:`fastdiff.window.Window.state`); None in
        checkpoints written before they carried it."""
        return self.state.get("window")

    @property
    def pending_jobs(self) -> list[str]:
        """Periodic jobs due at this step that a signal cut short: redone on resume."""
        return list(self.state.get("pending_jobs") or [])

    @property
    def run_dir(self) -> Path | None:
        """The run directory holding this checkpoint; None for a loose file."""
        run = self.path.parent.parent
        if self.path.parent.name == "checkpoints" and (run / "config.yaml").is_file():
            return run
        return None


class Unreadable(ConfigError):
    pass


def read_checkpoint(path: Path) -> Checkpoint:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "step" not in state or "config" not in state:
            raise ValueError("not a fastdiff checkpoint")
    except Exception as err:
        raise Unreadable(
            f"checkpoint {path} cannot be read ({type(err).__name__}): pick "
            "another one with train.resume=FILE"
        ) from None
    return Checkpoint(Path(path), state)


def _newest_readable(run_dir: Path, set_aside: bool) -> Checkpoint | None:
    """The run's newest checkpoint that loads. With ``set_aside`` (the main process),
    unreadable newer ones are renamed with UNREADABLE_SUFFIX, so they are kept for
    inspection and not picked again, with a warning naming them."""
    for path in reversed(checkpoints(run_dir)):
        try:
            return read_checkpoint(path)
        except Unreadable:
            if set_aside:
                log.warning(
                    "checkpoint %s cannot be read: set aside as %s%s, using the one before",
                    path,
                    path.name,
                    UNREADABLE_SUFFIX,
                )
                path.rename(path.with_name(path.name + UNREADABLE_SUFFIX))
    return None


def resolve_resume(cfg, is_main: bool = True) -> Checkpoint | None:
    """train.resume read as a checkpoint: a file (must load), a run dir, or ``auto``
    (train.run_dir, else the newest run of this experiment with a checkpoint). For a
    run dir or auto, an unreadable newest checkpoint falls back to the one before."""
    resume = cfg.train.resume
    if not resume:
        return None
    path = Path(resume)
    if resume != "auto" and not path.is_dir():
        return read_checkpoint(path)
    if resume != "auto":
        runs = [path]
    elif cfg.train.run_dir:
        runs = [Path(cfg.train.run_dir)]
    else:
        runs = sorted((Path(cfg.train.runs_root) / cfg.experiment).glob("*"))
    runs = [r for r in runs if checkpoints(r)]
    if not runs:
        if resume != "auto":
            raise ConfigError(f"train.resume={resume} has no checkpoints/step_*.pt")
        log.info("train.resume=auto: no checkpoint yet, starting from step 0")
        return None
    found = _newest_readable(runs[-1], set_aside=is_main)
    if found is None:
        raise ConfigError(
            f"no checkpoint of {runs[-1]} can be read (all set aside as *{UNREADABLE_SUFFIX}): "
            "start a new run"
        )
    return found


def changed_settings(saved: dict, cfg, keys: list[str]) -> list[str]:
    """'key=was (this run: now)' for each of ``keys`` that differs. A record written before
    a setting existed has its default, and the old name loss.minsnr_gamma reads as gamma."""
    defaults = OmegaConf.to_container(OmegaConf.structured(Config))
    flat = canonical_loss(dict(dotted(OmegaConf.to_container(OmegaConf.merge(defaults, saved)))))
    out = []
    for key in keys:
        was, now = flat.get(key), _get(cfg, key)
        if was != now:
            out.append(f"{key}={was} (this run: {now})")
    return out


def check_resumable(ckpt: Checkpoint, cfg, processes: int) -> None:
    """Refuse (one line naming every changed key) when the run would continue as
    another arm than the checkpoint's."""
    check_architecture(ckpt, cfg)
    changed = changed_settings(ckpt.config, cfg, DEFINING)
    was = ckpt.state.get("processes")
    if was is not None and was != processes:
        changed.append(f"processes={was} (this run: {processes})")
    if changed:
        raise ConfigError(
            f"checkpoint {ckpt.path} trained another arm: {'; '.join(changed)}. Resume "
            "with its settings, or start a new run from its weights with "
            f"train.init_from={ckpt.path}"
        )


def check_architecture(ckpt: Checkpoint, cfg) -> None:
    changed = changed_settings(ckpt.config, cfg, ARCHITECTURE)
    if changed:
        raise ConfigError(
            f"checkpoint {ckpt.path} holds weights of another shape: {'; '.join(changed)}"
        )


def save_checkpoint(
    path: Path,
    step: int,
    model,
    ema,
    *,
    optimizer,
    scaler,
    config: str,
    processes: int,
    progress: dict,
    window: dict,
    pending_jobs: list[str],
) -> None:
    """``config``: the run's config.yaml text (with its parent record, if any)."""
    state = {
        "step": step,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "config": config,
        "processes": processes,
        "progress": progress,
        "window": window,
        "pending_jobs": pending_jobs,
    }
    save_torch(state, path)


def restore(
    ckpt: Checkpoint, model, ema, optimizer, *, scaler, device, weights_only: bool = False
) -> None:
    """Load the checkpoint's state into the given objects (all of them, or with
    ``weights_only`` the model and EMA, for train.init_from with a fresh optimizer)."""
    state = ckpt.state
    per_block = any(k.endswith(".temb_proj.weight") for k in state["model"])
    model.load_state_dict(state["model"])  # (per-block time projections load stacked)
    ema.load_state_dict(state["ema"])
    if weights_only:
        return
    if per_block:  # the flat buffer's order changed with the stacked projection
        raise ConfigError(
            f"checkpoint {ckpt.path} was saved when each ResBlock held its own time "
            "projection: its optimizer state does not fit today's parameter layout; start "
            f"a new run from its weights with train.init_from={ckpt.path}"
        )
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError:  # one flat parameter group since the flat buffer (fastdiff.flat)
        raise ConfigError(
            f"checkpoint {ckpt.path} holds optimizer state per tensor, from a fastdiff before "
            "the flat parameter buffer: it cannot be resumed; evaluate it, or start a new run"
        ) from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def start_from(cfg, resumed, parent, *, model, ema, optimizer, scaler, device) -> dict | None:
    """Load the resumed checkpoint (everything) or train.init_from's weights (and,
    with train.init_keep_optimizer, its moments at this run's hyperparameters).
    Returns the parent record config.yaml keeps (carried over when a child resumes)."""
    if resumed is not None:
        restore(resumed, model, ema, optimizer, scaler=scaler, device=device)
        resumed.release_weights()
        return resumed.config.get("parent")
    if parent is None:
        return None
    keep = cfg.train.init_keep_optimizer
    restore(parent, model, ema, optimizer, scaler=scaler, device=device, weights_only=not keep)
    parent.release_weights()
    o = cfg.optim
    optimizer.set_hyperparameters(o.lr, (o.beta1, o.beta2), o.weight_decay)
    kept = "kept" if keep else "fresh"
    log.info(
        "new run from the weights of %s (step %d), optimizer %s", parent.path, parent.step, kept
    )
    return {
        "checkpoint": str(parent.path.resolve()),
        "step": parent.step,
        "optimizer": kept,
        "config": parent.config,
    }


def check_start(cfg, resumed: Checkpoint | None, parent: Checkpoint | None, processes: int):
    """Before any set-up: a resume of another arm or a parent of another architecture
    is refused, and a finished run is left alone (:class:`fastdiff.stopping.Finished`)."""
    from fastdiff.stopping import Finished

    if resumed is not None:
        check_resumable(resumed, cfg, processes)
        total = cfg.train.total_steps
        redo = resumed.step == total and resumed.pending_jobs  # e.g. a final FID cut short
        if resumed.step >= total and not redo:
            raise Finished(
                resumed.step,
                f"{resumed.run_dir or resumed.path} is already at step {resumed.step} of "
                f"train.total_steps={cfg.train.total_steps}: nothing to do (raise "
                "train.total_steps to train on)",
            )
    if parent is not None:
        check_architecture(parent, cfg)


def claim_run_dir(cfg, resumed: Checkpoint | None, run_dir: Path) -> bool:
    """A run directory holds one run. Before anything is written, refuse (one line) a
    run that would write into a folder holding another run's records: a new run, or a
    resume from a checkpoint outside the folder. ``train.resume=auto`` of a run that
    never checkpointed starts it again from step 0 if its config.yaml is of this arm;
    returns True then (its metrics are dropped, not logged twice)."""
    found = records(run_dir)
    if not found:
        return False
    if resumed is not None:
        if resumed.path.resolve().parent == (run_dir / "checkpoints").resolve():
            return False
        raise ConfigError(
            f"{run_dir} already holds a run ({', '.join(found)}): checkpoint {resumed.path} "
            "continues in its own run directory, or with train.run_dir= an empty folder"
        )
    saved = run_dir / "config.yaml"
    if cfg.train.resume != "auto" or not saved.is_file() or checkpoints(run_dir):
        raise ConfigError(
            f"{run_dir} already holds a run ({', '.join(found)}): continue it with "
            f"train.resume=auto train.run_dir={run_dir}, or give a new run another "
            "train.run_dir"
        )
    config = yaml.safe_load(saved.read_text()) or {}
    changed = changed_settings(config, cfg, DEFINING)
    if config.get("parent") is not None:
        changed.append(f"train.init_from={config['parent'].get('checkpoint')} (this run: none)")
    if changed:
        raise ConfigError(
            f"{run_dir} holds a run of another arm that never checkpointed: "
            f"{'; '.join(changed)}. Give this run another train.run_dir"
        )
    log.info("train.resume=auto: %s has no checkpoint yet: starting it again from step 0", run_dir)
    return True
