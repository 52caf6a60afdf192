"""Training data: in-memory sources, WebDataset shards, deterministic device batches.

``make_batches`` picks the path: a folder with a ``manifest.json`` (prepared by
``python -m fastdiff.data.prepare``) is streamed with WebDataset; the embedded
digits and a raw CIFAR-10 python archive are held on the device.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastdiff.data.batches import DeviceBatches, to_model_range
from fastdiff.data.shards import MANIFEST, ShardImages, ShardStream, StreamBatches, read_shard
from fastdiff.data.sources import load_cifar10, load_digits, load_images

__all__ = [
    "DeviceBatches",
    "ShardImages",
    "ShardStream",
    "StreamBatches",
    "is_sharded",
    "load_cifar10",
    "load_digits",
    "load_images",
    "make_batches",
    "probe_pool",
    "to_model_range",
]


def default_workers() -> int:
    """One loader process per core left after the trainer's, between 1 and 4."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def is_sharded(path: str | None) -> bool:
    return path is not None and (Path(path) / MANIFEST).is_file()


def make_batches(data_cfg, batch_size: int, seed: int, rank: int, world_size: int, device):
    """The run's batch source: ``batch(step)`` gives float [-1, 1] images on the device."""
    common = dict(rank=rank, world_size=world_size, hflip=data_cfg.hflip, device=device)
    if is_sharded(data_cfg.path):
        workers = default_workers() if data_cfg.workers is None else data_cfg.workers
        return StreamBatches(
            data_cfg.path,
            batch_size,
            seed,
            workers=workers,
            shuffle_buffer=data_cfg.shuffle_buffer,
            **common,
        )
    images = load_images(data_cfg.name, data_cfg.path, data_cfg.image_size)
    return DeviceBatches(images, batch_size, seed, **common)


def probe_pool(data_cfg, batches) -> torch.Tensor:
    """uint8 images the curvature probe batch is drawn from (the first shard if streamed)."""
    if isinstance(batches, DeviceBatches):
        return batches.images.cpu()
    return read_shard(batches.stream.urls[0])[0]
