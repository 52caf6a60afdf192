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
