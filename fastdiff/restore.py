"""A run's model as the trainer builds it, and a finished run brought back for measuring.

``python -m fastdiff.eval`` and ``python -m fastdiff.curvature`` measure a run after the
fact. Both rebuild what :class:`fastdiff.trainer.Trainer` built, through the same calls
(:func:`model_of`), so that any run the trainer can train (any data set, kernels,
memory layout) can be measured, and measured on what the trainer measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from fastdiff.config import Config, load_run_config
from fastdiff.data import make_batches
from fastdiff.errors import ConfigError
from fastdiff.rundir import find_checkpoint
from fastdiff.unet import UNet, build_model

# "ema": the weights samples and FID are of; "model": the raw weights training
# differentiates, which the curvature probe measures.
WEIGHTS = ("ema", "model")


def model_of(cfg: Config, device: str | torch.device = "cpu") -> UNet:
    """The run's model, freshly initialised, on ``device`` in the run's memory layout."""
    m = cfg.model
    model = build_model(m.name, m.base_channels, m.dropout, cfg.data.image_size, kernels=m.kernels)
    model = model.to(device)
    if m.channels_last:  # as trained; the Taylor probe's convolutions prefer it too
        model = model.to(memory_format=torch.channels_last)
    return model


@dataclass
class SavedRun:
    """A run directory's config and one of its checkpoints. The model is built on first
    use, so a command can check its input against the config before paying for it."""

    cfg: Config
    step: int
    checkpoint: Path
    weights: str = "ema"
    device: str | torch.device = "cpu"

    @cached_property
    def model(self) -> UNet:
        """The run's model with the checkpoint's ``weights``, in eval mode."""
        model = model_of(self.cfg, self.device)
        state = torch.load(self.checkpoint, map_location="cpu")[self.weights]
        model.load_state_dict(state)
        return model.eval()

    def host_batches(self):
        """The run's batch source as the trainer makes it, for one process on the host.
        Nothing is drawn from it: FID's reference set and the curvature probe's pool of
        images come from it (:func:`fastdiff.fid.build_evaluator`,
        :func:`fastdiff.data.probe_pool`), as they do in the run."""
        t = self.cfg.train
        return make_batches(self.cfg.data, t.batch_size, t.seed, rank=0, world_size=1, device="cpu")


def load_run(
    run_dir: str | Path,
    step: int | None = None,
    weights: str = "ema",
    device: str | torch.device = "cpu",
) -> SavedRun:
    """Run ``run_dir`` at checkpoint ``step`` (None: the latest), its model to carry the
    ``weights`` saved there ("ema" or "model"). Bad input raises ConfigError."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    cfg = load_run_config(run_dir)
    step, path = find_checkpoint(Path(run_dir), step)
    return SavedRun(cfg, step, path, weights=weights, device=device)
