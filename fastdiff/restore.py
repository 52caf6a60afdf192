"""A finished run brought back for measuring: its model from a checkpoint, its data.

``python -m fastdiff.eval`` and ``python -m fastdiff.curvature`` measure a run after the
fact. Both rebuild what :class:`fastdiff.trainer.Trainer` built, through the same calls,
so that any run the trainer can train (any data set, kernels, memory layout) can be
measured, and measured on what the trainer measured.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastdiff.data import make_batches
from fastdiff.unet import UNet, build_model

# "ema": the weights samples and FID are of; "model": the raw weights training
# differentiates, which the curvature probe measures.
WEIGHTS = ("ema", "model")


def model_from_checkpoint(
    cfg, path: str | Path, which: str = "ema", device: str | torch.device = "cpu"
) -> UNet:
    """The run's model with the ``which`` weights of checkpoint ``path``, on ``device``
    in the run's memory layout, in eval mode."""
    if which not in WEIGHTS:
        raise ValueError(f"which must be one of {WEIGHTS}, got {which!r}")
    m = cfg.model
    model = build_model(m.name, m.base_channels, m.dropout, cfg.data.image_size, m.kernels)
    model.load_state_dict(torch.load(path, map_location="cpu")[which])
    model = model.to(device)
    if m.channels_last:  # as trained; the Taylor probe's convolutions prefer it too
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def host_batches(cfg):
    """The run's batch source as the trainer makes it, for one process on the host.
    Nothing is drawn from it: FID's reference set and the curvature probe's pool of
    images come from it (:func:`fastdiff.fid.build_evaluator`,
    :func:`fastdiff.data.probe_pool`), as they do in the run."""
    return make_batches(cfg.data, cfg.train.batch_size, cfg.train.seed, 0, 1, "cpu")
