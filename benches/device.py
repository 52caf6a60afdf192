"""The lent GPU machine's image, the bundle fastdiff needs on it, and the check run first.

    python -m benches.device bundle [--out .deps]   # make device-bundle
    python -m benches.device versions               # device-run.sh's first steps
    python -m benches.device imports

The image (the device tool's KINDS.md) has Python 3.12, torch 2.11 and triton 3.6 and
reaches no package registry. What fastdiff needs beyond it is pure Python, so the
bundle is those distributions copied from this environment, files and dist-info, into
one folder that travels with the working tree (carried as ``.deps``, put on
PYTHONPATH). Stdlib only at import time: ``imports`` must report a missing package,
not be one.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import platform
import re
import shutil
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Python packages in the image 'cuda' of nvidia-h100-x1 and nvidia-h200, as the device
# tool's KINDS.md lists them (read on a machine there on 2026-11-17).
IMAGE = frozenset(
    """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl
    meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions
    nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
    nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
    nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
    nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
    onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx
    optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
    portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo
    pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov
    pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
    requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
    seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
    tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
    torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
    typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
    xarray xxhash yarl zipp
    """.split()
)
IMAGE_PYTHON = "3.12.3"
CARRY_LIMIT = 64 * 2**20  # what one device call carries, the working tree included
BUNDLE_LIMIT = 32 * 2**20  # the bundle's share of it


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(dist_requires: list[str], env: dict):
    from packaging.requirements import Requirement

    for line in dist_requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
            yield req


def image_environment() -> dict:
    from packaging.markers import default_environment

    major_minor = ".".join(IMAGE_PYTHON.split(".")[:2])
    return default_environment() | {
        "python_version": major_minor,
        "python_full_version": IMAGE_PYTHON,
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
    }


def project_requirements() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def bundle_dists() -> list[metadata.Distribution]:
    """The distributions fastdiff needs that the image lacks, as installed here: the
    project's requirements and theirs, stopping at the image's own packages (the image
    brings what they need)."""
    env = image_environment()
    found: dict[str, metadata.Distribution] = {}
    todo = list(_requirements(project_requirements(), env))
    while todo:
        req = todo.pop()
        name = normalize(req.name)
        if name in IMAGE or name in found:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            msg = f"benches.device: {req.name} is not installed here: make install"
            raise SystemExit(msg) from None
        if not req.specifier.contains(dist.version, prereleases=True):
            raise SystemExit(f"benches.device: {req.name} {dist.version} does not satisfy {req}")
        found[name] = dist
        todo.extend(_requirements(dist.requires, env))
    return sorted(found.values(), key=lambda d: normalize(d.metadata["Name"]))


def dist_files(dist: metadata.Distribution) -> list[tuple[str, Path]]:
    """(path in site-packages, file here) of a distribution's installed files, without
    compiled bytecode (Python 3.12 writes its own), scripts outside site-packages, and
    top-level names of this repository's (torch-fidelity installs its own ``tests``,
    which on PYTHONPATH before the checkout would hide fastdiff's)."""
    out = []
    for f in dist.files or []:
        if f.parts[0] == ".." or "__pycache__" in f.parts or f.suffix == ".pyc":
            continue
        if (ROOT / f.parts[0]).exists() and not f.parts[0].endswith(".dist-info"):
            continue
        out.append((str(f), Path(dist.locate_file(f))))
    return out


def write_bundle(out: Path) -> list[tuple[str, str, int]]:
    """Copy every bundled distribution into ``out`` (emptied first); (name, version,
    bytes) of each. Refuses compiled extensions: they were built for this Python."""
    dists = bundle_dists()
    binary = [
        f"{d.metadata['Name']}: {rel}"
        for d in dists
        for rel, _ in dist_files(d)
        if rel.endswith((".so", ".pyd", ".dylib"))
    ]
    if binary:
        raise SystemExit(f"benches.device: not pure Python, cannot travel: {binary[0]}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    sizes = []
    for d in dists:
        total = 0
        for rel, src in dist_files(d):
            if not src.is_file():
                continue
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
            total += dest.stat().st_size
        sizes.append((d.metadata["Name"], d.version, total))
    size = sum(s for *_, s in sizes)
    if size > BUNDLE_LIMIT:
        raise SystemExit(
            f"benches.device: the bundle is {size / 2**20:.1f} MiB, over its "
            f"{BUNDLE_LIMIT / 2**20:.0f} MiB share of a device call's {CARRY_LIMIT / 2**20:.0f}"
        )
    return sizes


# ------------------------------------------------------------------- on the device
def modules() -> list[str]:
    """Every module device-run.sh's parts import: all of fastdiff, and the benches and
    test set-up that gpu_check runs."""
    import fastdiff

    names = [
        m.name
        for m in pkgutil.walk_packages(fastdiff.__path__, "fastdiff.")
        if not m.name.endswith("__main__")
    ]
    extra = ["benches.gpu_check", "benches.test_bench_kernels", "benches.test_bench_fused"]
    return ["fastdiff", *names, *extra, "tests.conftest", "pytest"]


def print_versions() -> int:
    """Python, torch (with its CUDA) and triton, and the device torch sees."""
    print(f"python {platform.python_version()} ({sys.executable})", flush=True)
    try:
        import torch
        import triton
    except Exception:
        traceback.print_exc()
        return 3
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
    print(f"device: {device}", flush=True)
    return 0


def check_imports() -> int:
    """Import every module; 3 if one fails (device-run.sh's exit), naming each."""
    t0, failed, names = time.perf_counter(), [], modules()
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:
            failed.append(name)
            print(f"import {name}: {type(err).__name__}: {err}", flush=True)
    print(
        f"imported {len(names) - len(failed)} of {len(names)} modules in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 3 if failed else 0


# ------------------------------------------------------------------- rehearsal
def image_site(dest: Path) -> list[str]:
    """Fill ``dest`` with links to this environment's installs of the image's packages,
    and of what they need here, but of nothing the bundle brings: on PYTHONPATH beside
    the bundle, a stand-in for the image's site-packages. The names linked."""
    here = {normalize(d.metadata["Name"]): d for d in metadata.distributions()}
    bundled = {normalize(d.metadata["Name"]) for d in bundle_dists()}
    env = image_environment() | {"python_version": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    keep: dict[str, metadata.Distribution] = {}
    todo = sorted(IMAGE & here.keys())
    while todo:
        name = todo.pop()
        if name in keep or name in bundled or name not in here:
            continue
        keep[name] = here[name]
        todo.extend(normalize(r.name) for r in _requirements(here[name].requires, env))
    top: dict[str, str] = {}  # top-level entry of site-packages -> its distribution
    for name, dist in keep.items():
        for rel, _ in dist_files(dist):
            first = rel.split("/")[0]
            if not first.endswith(".pth"):
                top.setdefault(first, name)
    dest.mkdir(parents=True, exist_ok=True)
    for entry in top:
        site = Path(keep[top[entry]].locate_file(entry))
        if site.exists():
            (dest / entry).symlink_to(site)
    return sorted(keep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.device", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bundle = sub.add_parser("bundle", help="copy what the image lacks into --out")
    bundle.add_argument("--out", type=Path, default=ROOT / ".deps")
    sub.add_parser("versions", help="print Python's, torch's and triton's versions")
    sub.add_parser("imports", help="import every module device-run.sh runs (exit 3)")
    args = parser.parse_args(argv)
    if args.command == "versions":
        return print_versions()
    if args.command == "imports":
        return check_imports()
    sizes = write_bundle(args.out)
    for name, version, size in sizes:
        print(f"{name} {version}: {size / 2**20:.2f} MiB")
    total = sum(s for *_, s in sizes)
    print(f"wrote {args.out}: {len(sizes)} distributions, {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
