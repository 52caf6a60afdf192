"""Deterministic batches from an in-memory image set, resident on the device.

The batch of every (step, rank) is a pure function of (seed, step, rank): epoch e
is a fixed permutation of the data set seeded by (seed, e), each rank takes its
own slice of every global batch, and the flips of a step are seeded by
(seed, step, rank). So two runs with the same seed see the same images step for
step (the paired-run property), a resumed run continues the exact stream, and
ranks never overlap within an epoch.
"""

from __future__ import annotations

import torch

from fastdiff.seeding import stream_generator


class DeviceBatches:
    skipped = 0  # in-memory data has nothing to skip

    def close(self) -> None:
        """(Nothing to stop: the batches are slices of one tensor.)"""

    def __init__(
        self,
        images: torch.Tensor,
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        hflip: bool = False,
        device: str | torch.device = "cpu",
    ):
        global_batch = batch_size * world_size
        if images.shape[0] < global_batch:
            raise ValueError(
                f"the data set has {images.shape[0]} images, fewer than one global "
                f"batch ({batch_size} x {world_size} processes): lower "
                "train.batch_size"
            )
        self.images = images.to(device)  # uint8 (N, 3, H, W)
        self.batch_size, self.seed, self.rank, self.hflip = batch_size, seed, rank, hflip
        self.world_size = world_size
        self.steps_per_epoch = images.shape[0] // global_batch
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = stream_generator(self.seed, "data", epoch)
            self._perm = torch.randperm(self.images.shape[0], generator=g).to(self.images.device)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.steps_per_epoch)
        start = (pos * self.world_size + self.rank) * self.batch_size
        return self._permutation(epoch)[start : start + self.batch_size]

    def seek(self, step: int) -> None:
        """Nothing to do: every batch is a pure function of the step."""

    def batch(self, step: int) -> torch.Tensor:
        """Images of this rank at ``step``, float in [-1, 1], scaled on the device."""
        return to_model_range(
            self.images[self.indices(step)],
            self.seed,
            step,
            self.rank,
            hflip=self.hflip,
            world_size=self.world_size,
        )


def to_model_range(
    images: torch.Tensor, seed: int, step: int, rank: int, *, hflip: bool, world_size: int = 1
) -> torch.Tensor:
    """uint8 (B, C, H, W) on the device -> float [-1, 1], with the step's random flips
    (drawn for the global batch and sliced, like the timesteps and noise)."""
    x = images.float().div_(127.5).sub_(1)
    if hflip:
        B = x.shape[0]
        g = stream_generator(seed, "flip", step)
        coins = torch.rand(B * world_size, generator=g)[rank * B : (rank + 1) * B]
        flip = (coins < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x
