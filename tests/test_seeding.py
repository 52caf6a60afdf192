"""Named random streams: a pure function of (seed, stream, counters), independent of
each other and of call order."""

import hashlib

import torch

from fastdiff.seeding import stream_generator, stream_seed


def test_stream_seed_is_the_documented_hash():
    key = b"1077:noise:42"
    want = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
    assert stream_seed(1077, "noise", 42) == want
    assert 0 <= want < 2**63  # a valid torch seed


def test_streams_differ_by_seed_name_and_counter_and_not_by_order():
    seeds = {
        stream_seed(s, name, *c)
        for s in (1077, 2077)
        for name in ("noise", "timesteps", "dropout")
        for c in ((), (0,), (1,), (0, 1), (1, 0))
    }
    assert len(seeds) == 2 * 3 * 5
    # step 12 of a stream is the same whether or not other streams were drawn before
    first = torch.randn(4, generator=stream_generator(1077, "noise", 12))
    torch.randn(100, generator=stream_generator(1077, "timesteps", 12))
    again = torch.randn(4, generator=stream_generator(1077, "noise", 12))
    assert torch.equal(first, again)
    other = torch.randn(4, generator=stream_generator(1077, "noise", 13))
    assert not torch.equal(first, other)
