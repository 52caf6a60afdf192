"""Training data: in-memory sources, WebDataset shards, deterministic device batches.

``make_batches`` picks the path: a folder with a ``manifest.json`` (prepared by
``python -m fastdiff.data.prepare``) is streamed with WebDataset; the embedded
digits and a raw CIFAR-10 python archive are held on the device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastdiff.data.batches import DeviceBatches, to_model_range
from fastdiff.data.shards import (
    MANIFEST,
    ShardImages,
    ShardStream,
    StreamBatches,
    first_readable_shard,
    prepare_hint,
)
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


def path_problem(data_cfg) -> str | None:
    """What is wrong with data.path for this data set (None: nothing), as one line that
    says what to do: missing, not prepared, or shards of another image size."""
    if data_cfg.name not in ("cifar10", "shards"):
        return None
    path = data_cfg.path
    if path is None or not Path(path).exists():
        where = "is not set" if path is None else f"={path} does not exist"
        return (
            f"data={data_cfg.name} needs data.path, which {where}: {prepare_hint(path)}, "
            "or use data=digits"
        )
    manifest = Path(path) / MANIFEST
    raw = Path(path).is_dir() and not manifest.exists() and list(Path(path).glob("*batch*"))
    if (data_cfg.name == "shards" or (Path(path).is_dir() and not raw)) and not manifest.is_file():
        return f"data.path={path} has no {MANIFEST}: {prepare_hint(path)}"
    if manifest.is_file():
        size = json.loads(manifest.read_text())["image_size"][0]
        if size != data_cfg.image_size:
            return (
                f"the shards in {path} are {size}x{size} but data.image_size="
                f"{data_cfg.image_size}: set data.image_size={size}"
            )
    return None


def default_workers() -> int:
    """One loader process per core left after the trainer's, between 1 and 4."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def is_sharded(path: str | None) -> bool:
    return path is not None and (Path(path) / MANIFEST).is_file()


def make_batches(data_cfg, batch_size: int, seed: int, *, rank: int, world_size: int, device):
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
    """uint8 images the curvature probe batch is drawn from (if streamed, the first of
    this rank's shards that reads whole)."""
    if isinstance(batches, DeviceBatches):
        return batches.images.cpu()
    return first_readable_shard(batches.stream.urls)[0]
