"""Named, independent random streams.

Each source of randomness (data order, flips, timesteps, noise, dropout,
sampling, probes) gets its own generator whose seed is a hash of
(run seed, stream name, counters). Two runs that differ only in loss weighting
therefore draw identical batches, timesteps and noise at every step, and a
resumed run redraws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib

import torch


def stream_seed(seed: int, stream: str, *counters: int) -> int:
    key = ":".join([str(seed), stream, *map(str, counters)]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def stream_generator(
    seed: int, stream: str, *counters: int, device: str | torch.device = "cpu"
) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(seed, stream, *counters))
    return g


def step_draws(
    seed: int, step: int, rank: int, world_size: int, *, batch: int, shape, T: int, device
):
    """This rank's slice of a training step's timesteps (B,) and noise (B, C, H, W).

    Drawn for the global batch and sliced, so N processes at batch B see what one
    process at batch N·B sees (tested), each stream from its own generator."""
    gen_device = device if device.type == "cuda" else "cpu"
    rows = slice(rank * batch, (rank + 1) * batch)
    g = stream_generator(seed, "timesteps", step, device=gen_device)
    t = torch.randint(0, T, (batch * world_size,), generator=g, device=gen_device)[rows]
    g = stream_generator(seed, "noise", step, device=gen_device)
    noise = torch.randn((batch * world_size, *shape), generator=g, device=gen_device)[rows]
    return t.to(device), noise.to(device)
