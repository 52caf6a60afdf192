import os
import subprocess
import sys

import pytest
import torch

# Without a GPU the kernel tests run the Triton kernels in the interpreter (Triton reads
# the variable when the kernels are defined, fastdiff.kernels.use_triton at each call).
# With one, the GPU tests must run the compiled kernels on the device, not the
# interpreter on copies in host memory.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# make test runs one pytest-xdist worker per core: each worker, and each process it
# spawns, then takes its share of the cores instead of all of them (oversubscribed
# OpenMP threads spin against each other).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = min(2, max(1, (os.cpu_count() or 2) // _WORKERS))
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
torch.set_num_threads(_THREADS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """A run makes one Accelerator per process; tests make many in one, with different
    ``mixed_precision`` (``train.amp``), which accelerate refuses once its state is set.
    The distributed state (PartialState) is kept. Reset after each test too, so that a
    module-scoped fixture that trains (set up before any test's reset) starts fresh."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def tiny(tmp_path, *extra: str) -> list[str]:
    """Overrides for a seconds-long run: 8x8 digits, unet_tiny at 16 channels."""
    return [
        "model=unet_tiny",
        "model.base_channels=16",
        "data=digits",
        "data.image_size=8",
        "train.batch_size=4",
        "train.total_steps=6",
        "train.log_every=2",
        "train.ckpt_every=3",
        "train.progress=false",
        "sampling.grid_images=4",
        "sampling.grid_nfe=2",
        "sampling.grid_every=1000",
        "eval.fid.enabled=false",
        f"train.runs_root={tmp_path}",
        *extra,
    ]


def train_cli(
    *overrides: str, processes: int = 1, port: int = 29517, threads: int | None = None
) -> subprocess.CompletedProcess:
    """``python -m fastdiff.train OVERRIDES`` in a subprocess (under torchrun for several
    processes, one thread each unless told); the run must exit 0."""
    launcher = ["torch.distributed.run", "--nproc_per_node", str(processes)]
    launcher += ["--master_port", str(port), "-m"]
    cmd = [sys.executable, "-m", *(launcher if processes > 1 else []), "fastdiff.train"]
    threads = threads or (1 if processes > 1 else None)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    done = subprocess.run([*cmd, *overrides], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def table(schedule, weighting: str, gamma: float = 5.0, prediction: str = "eps", k=None):
    """A run's weight table w(t) (T,) for ``schedule``, as fastdiff.objective builds it."""
    from fastdiff.diffusion import snr
    from fastdiff.weighting import weights

    params = {"gamma": gamma, "k": k} if weighting != "uniform" else {}
    return weights(snr(schedule.alphas_cumprod), weighting, prediction=prediction, **params)


def pytest_collection_modifyitems(config, items):
    """The slow tests first: spread over the xdist workers from the start, none of them
    is left to run alone at the end (worksteal then balances the short ones)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
