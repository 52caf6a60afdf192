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
