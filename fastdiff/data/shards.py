"""Streaming from WebDataset shards, and an ordered map-style view of them.

Training stream, per (rank, worker):
  shards[rank::world]             split by node: ranks read disjoint shards
  → resampled shard choice         from a generator keyed by (seed, rank, worker, epoch)
  → tar → samples                  WebDataset's tarfile_to_samples; a corrupt shard or
                                   sample is skipped, warned, counted
  → shuffle buffer → PNG → uint8 CHW
  → fixed number of batches        epoch length fixed per rank: uneven shards never hang
The loader pins host memory; scaling to [-1, 1] and flips happen on the device.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import warnings
from itertools import islice
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from fastdiff.data.batches import to_model_range
from fastdiff.data.sources import is_image_folder
from fastdiff.errors import ConfigError
from fastdiff.seeding import stream_seed

MANIFEST = "manifest.json"
SHARD_NAME = re.compile(r"shard-\d{6}\.tar")  # shard_name's output, and nothing else


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def prepare_hint(path: str | Path | None) -> str:
    """The command that makes shards for ``data.path=path``. A folder of images is
    prepared into a new folder, never into itself; otherwise CIFAR-10 from its archive."""
    if path is not None and is_image_folder(path):
        return (
            f"make shards of its images with: python -m fastdiff.data.prepare NAME "
            f"--src {path} --format folder --out NEW_FOLDER, then pass data.path=NEW_FOLDER"
        )
    # prepare refuses to write into a folder that holds anything else
    fresh = path is None or not Path(path).exists()
    fresh = fresh or (Path(path).is_dir() and not any(Path(path).iterdir()))
    out = (path or "data/cifar10") if fresh else "NEW_FOLDER"
    return (
        "prepare shards with: python -m fastdiff.data.prepare cifar10 "
        f"--src cifar-10-python.tar.gz --out {out}"
    )


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {MANIFEST}: {prepare_hint(path)}")
    manifest = json.loads(file.read_text())
    missing = [s for s in manifest["shards"] if not (path / s).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path / missing[0]} is listed in {MANIFEST} but missing: "
            "re-run python -m fastdiff.data.prepare with --force"
        )
    return manifest


def decode_png(data: bytes) -> torch.Tensor:
    """PNG bytes -> uint8 (3, H, W), through libpng (torchvision): faster than PIL
    (docs/performance.md#measurements-behind-choices-in-the-code)."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_png as tv_decode_png

    return tv_decode_png(
        torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB
    )


def read_shard(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of one shard, in order: uint8 (N, 3, H, W) and labels (N,)."""
    samples = list(wds.tarfile_to_samples()([{"url": str(path)}]))
    return (
        torch.stack([decode_png(s["png"]) for s in samples]),
        torch.tensor([int(s["cls"]) for s in samples]),
    )


def first_readable_shard(urls: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of the first shard in ``urls`` that reads whole. A damaged one is
    skipped with a warning, as the training stream skips it."""
    for url in urls:
        try:
            return read_shard(url)
        except Exception as exn:  # truncated tar, corrupt PNG: whatever the stream skips
            warnings.warn(
                f"skipping unreadable shard {url}: {type(exn).__name__}: {exn}", stacklevel=2
            )
    raise ConfigError(
        f"no readable shard among {len(urls)} in {Path(urls[0]).parent}: "
        "re-run python -m fastdiff.data.prepare with --force"
    )


class _Skips:
    """Counts what a worker skipped; the count rides along with each batch."""

    def __init__(self):
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        warnings.warn(f"skipping unreadable data: {type(exn).__name__}: {exn}", stacklevel=2)
        return True  # keep going


class ShardStream(IterableDataset):
    """Yields (images uint8 (B, 3, H, W), labels (B,), skipped since last batch)."""

    def __init__(
        self,
        path: str | Path,
        batch_size: int,
        seed: int,
        rank: int = 0,
        *,
        world_size: int = 1,
        shuffle_buffer: int = 2000,
    ):
        self.path = Path(path)
        manifest = read_manifest(self.path)
        urls = [str(self.path / s) for s in manifest["shards"]]
        if len(urls) < world_size:
            raise ValueError(
                f"{path} has {len(urls)} shards for {world_size} processes: "
                "re-run prepare with a smaller --shard-size"
            )
        self.urls = urls[rank::world_size]  # split by node
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_epoch = manifest["count"] // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{path} has {manifest['count']} images, fewer than one global "
                f"batch of {batch_size} x {world_size}: lower train.batch_size"
            )
        self.epoch = 0
        self.skip = 0  # batches of this epoch already trained on (set by a resume)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)

        # The DataLoader takes its i-th batch from worker i % W. Batch j of the epoch
        # belongs to the stream ("role") j % W; after a resume at batch k, worker w plays
        # role (w + k) % W, so the epoch goes on exactly where it stopped.
        role = (worker + self.skip) % workers

        def share(batches: int) -> int:  # how many of the first `batches` are this role's
            return batches // workers + (role < batches % workers)

        skip = share(self.skip)  # already trained on: passed over undecoded
        n = share(self.batches_per_epoch) - skip
        rng = random.Random(stream_seed(self.seed, "shards", self.rank, role, self.epoch))
        skips = _Skips()

        def shard_urls():
            while True:  # resampled: any number of batches from any number of shards
                yield {"url": rng.choice(self.urls)}

        def decode(samples):
            for sample in samples:
                try:
                    yield decode_png(sample["png"]), int(sample["cls"])
                except Exception as exn:  # a truncated or corrupt sample
                    skips(exn)

        def batches(samples):
            reported = 0
            while True:
                chunk = list(islice(samples, self.batch_size))
                if len(chunk) < self.batch_size:
                    return
                images, labels = zip(*chunk)
                yield torch.stack(images), torch.tensor(labels), skips.count - reported
                reported = skips.count

        def read(urls):
            """WebDataset's own stages: tar members grouped into samples by key."""
            failures = [0]  # in a row: every shard unreadable must not spin forever

            def handler(exn: Exception) -> bool:  # an unreadable or truncated shard
                skips(exn)
                failures[0] += 1
                if failures[0] >= 3 * len(self.urls) + 10:
                    raise RuntimeError(
                        f"no readable shard among {len(self.urls)} in "
                        f"{self.path}: re-run fastdiff.data.prepare"
                    ) from exn
                return True

            for sample in wds.tarfile_to_samples(handler=handler)(urls):
                failures[0] = 0
                yield sample

        samples = read(shard_urls())
        samples = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 200), rng=rng)(
            samples
        )
        samples = islice(samples, skip * self.batch_size, None)
        yield from islice(batches(decode(samples)), n)


class StreamBatches:
    """Device batches from a :class:`ShardStream`, with the interface of DeviceBatches."""

    def __init__(
        self,
        path: str | Path,
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        hflip: bool = True,
        device="cpu",
        workers: int = 2,
        shuffle_buffer: int = 2000,
    ):
        self.stream = ShardStream(
            path, batch_size, seed, rank, world_size=world_size, shuffle_buffer=shuffle_buffer
        )
        self.device = torch.device(device)
        self.loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )
        self.seed, self.rank, self.world_size, self.hflip = seed, rank, world_size, hflip
        self.skipped = 0
        self._it = None

    def __len__(self) -> int:
        return self.stream.batches_per_epoch

    def seek(self, step: int) -> None:
        """Continue at ``step`` exactly: the batches already trained on in its epoch are
        read and passed over without decoding. (Exact unless a corrupt sample was
        skipped before ``step`` in this epoch: then later batches shift by that sample.)"""
        self.stream.epoch, self.stream.skip = divmod(step, len(self))
        self.close()

    def close(self) -> None:
        """Stop the loader's workers now. Left to the garbage collector, an iterator in
        a reference cycle (a finished Trainer) was measured to hold up the first
        collection after it for long, per iterator
        (docs/performance.md#measurements-behind-choices-in-the-code)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def batch(self, step: int) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            images, _, skipped = next(self._it)
        except StopIteration:
            self.stream.epoch += 1
            self.stream.skip = 0
            self.close()
            self._it = iter(self.loader)
            images, _, skipped = next(self._it)
        self.skipped += skipped
        with self._host_threads():
            return to_model_range(
                images.to(self.device, non_blocking=True),
                self.seed,
                step,
                self.rank,
                hflip=self.hflip,
                world_size=self.world_size,
            )

    @contextlib.contextmanager
    def _host_threads(self):
        """Scale and flip on one thread when the workers share this CPU: a 0.4 MB batch
        gains nothing from two OpenMP threads, and their spin-waits take the workers'
        cores: with one thread the loader measured faster on 2 cores with 2 workers
        (docs/performance.md#measurements-behind-choices-in-the-code)."""
        if self.device.type != "cpu" or not self.loader.num_workers:
            yield
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


class ShardImages(Dataset):
    """Ordered, finite, map-style view of prepared shards: uint8 (3, H, W), no flips.

    The reference side for FID statistics; loads every image once into memory.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        parts = [read_shard(self.path / name) for name in self.manifest["shards"]]
        self.images = torch.cat([images for images, _ in parts])
        self.labels = torch.cat([labels for _, labels in parts])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]
