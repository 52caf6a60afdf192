"""CPU tuning: host memory reuse (glibc keeps freed blocks instead of unmapping them),
and who applies it."""

import subprocess
import sys

import pytest

from fastdiff.config import compose, to_config
from tests.conftest import tiny

# Allocate and touch 256 MB, free it, allocate and touch 128 MB: resident memory (MB)
# after each.
SCRIPT = """
import os, sys, torch
from fastdiff.tuning import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory() and reuse_freed_memory()
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * page / 2**20
x = torch.ones(64 * 2**20)
touched = rss()
del x
freed = rss()
y = torch.ones(32 * 2**20)
print(touched, freed, rss())
"""


def rss_after(mode: str) -> tuple[float, float, float]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return tuple(map(float, out.stdout.split()))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_kept_and_reused_only_when_asked():
    touched, freed, again = rss_after("default")
    assert touched - freed > 200  # glibc unmapped the 256 MB block on free
    assert again - freed > 100  # and maps fresh pages for the next one
    touched, freed, again = rss_after("reuse")
    assert touched - freed < 16  # kept...
    assert again - freed < 16  # ...and the next tensor lives in it


@pytest.mark.parametrize("enabled", [True, False])
def test_the_entry_point_reuses_host_memory_on_cpu_unless_told_not_to(
    tmp_path, monkeypatch, enabled
):
    """python -m fastdiff.train applies it before training; building a Trainer (as a
    library user or a bench does) changes no process-wide setting."""
    import fastdiff.train
    import fastdiff.trainer
    import fastdiff.tuning

    calls, built = [], []
    monkeypatch.setattr(fastdiff.train, "reuse_freed_memory", lambda: calls.append("entry"))
    monkeypatch.setattr(fastdiff.tuning, "reuse_freed_memory", lambda: calls.append("tuning"))
    monkeypatch.setattr(fastdiff.trainer, "training_loop", lambda cfg: built.append(cfg) or {})
    args = tiny(tmp_path, f"train.reuse_host_memory={str(enabled).lower()}")
    assert fastdiff.train.main(args) == 0
    assert len(built) == 1 and calls == (["entry"] if enabled else [])
    calls.clear()
    fastdiff.trainer.Trainer(to_config(compose(args)))
    assert calls == []


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(True, False, "bf16"), (False, True, "bf16"), (False, False, "no")],
)
def test_amp_on_cpu_without_get_capabilities(monkeypatch, amx, avx512_bf16, expected):
    """torch 2.11, the lent GPU machines', has no torch.cpu.get_capabilities."""
    import torch

    from fastdiff.tuning import amp_precision

    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert amp_precision(True, cuda=False) == expected


CUDA = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.gpu])])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_training_mask_is_what_dropout_applies(device, layout):
    """fastdiff.fused hands each run the masks its standalone step draws: on CUDA that
    is F.dropout's Philox mask, from nothing but the generator's state and the layout."""
    import torch

    from fastdiff.tuning import Dropout, training_mask

    x = torch.randn(4, 32, 8, 8, device=device) + 10  # no zeros: y / x recovers the mask
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(7)
    y = Dropout(0.1).train()(x)
    torch.manual_seed(7)
    mask = training_mask(torch.empty_like(x), 0.1)
    assert mask.device == x.device and mask.stride() == x.stride()
    assert 0 < (mask == 0).float().mean() < 0.2
    torch.testing.assert_close(y, x * mask, rtol=0, atol=0)
