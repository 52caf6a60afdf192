"""Benches that run in the pytest process run the way fastdiff trains (glibc keeps
freed memory: fastdiff.tuning). The train-step benches run each step in a fresh
worker process (benches/_worker.py), where the peer keeps its users' allocator."""

import pytest

from fastdiff.tuning import reuse_freed_memory


@pytest.fixture(autouse=True)
def _host_memory():
    reuse_freed_memory()
