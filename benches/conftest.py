"""Every bench runs the way fastdiff trains (glibc keeps freed memory: fastdiff.hostmem),
except the diffusers peer as its users run it: it runs first, in a process nothing
has changed yet."""

import pytest

from benches._setup import SMOKE
from fastdiff.hostmem import applied, reuse_freed_memory

PRISTINE = "test_diffusers_train_step"  # its users' default allocator


def pytest_collection_modifyitems(items):
    if not SMOKE:  # stable sort: the rest keep their order
        items.sort(key=lambda item: getattr(item, "originalname", None) != PRISTINE)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Benches make an Accelerator each, AMP on or off: accelerate keeps the first
    one's ``mixed_precision`` for the process unless its state is reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


@pytest.fixture(autouse=True)
def _host_memory(request):
    if request.node.originalname != PRISTINE:
        reuse_freed_memory()
    elif applied() and not SMOKE:  # (make test's smoke run follows the tests' Trainers)
        pytest.fail(
            "fastdiff.hostmem is already in effect in this process, so the peer would not "
            "run as its users run it: run the benches in a fresh process"
        )
