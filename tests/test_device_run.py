"""device-run.sh rehearsed on this CPU, as the lent GPU machine will run it: on a copy of
the tree the device tool sends (no install, no egg-info), with the bundle of
``make device-bundle``, and a Python that sees only what the machine's image has.

That Python is a bare virtual environment of this interpreter with PYTHONPATH holding
links to this environment's installs of the image's packages (torch and numpy, their
own needs, and the rest of the image's list in benches/device.py that fastdiff uses),
and nothing of what the bundle must bring: hydra, omegaconf, webdataset, torch-fidelity
and theirs come from the bundle or not at all.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benches.device import BUNDLE_LIMIT, IMAGE, image_site, normalize, write_bundle
from benches.gpu_check import PARTS

ROOT = Path(__file__).resolve().parents[1]


def test_the_bundle_is_what_the_image_lacks(tmp_path):
    sizes = write_bundle(tmp_path / "deps")
    names = {normalize(name) for name, _, _ in sizes}
    assert names == {
        "antlr4-python3-runtime",
        "braceexpand",
        "hydra-core",
        "hydra-zen",
        "omegaconf",
        "torch-fidelity",
        "webdataset",
    }
    assert not names & IMAGE
    assert sum(size for *_, size in sizes) < BUNDLE_LIMIT
    assert not [p for p in (tmp_path / "deps").rglob("*") if p.suffix in (".so", ".pyc")]
    # torch-fidelity installs a top-level tests package: first on PYTHONPATH, it would
    # stand in for the checkout's
    assert not (tmp_path / "deps" / "tests").exists()
    assert (tmp_path / "deps" / "hydra" / "__init__.py").is_file()
    assert list((tmp_path / "deps").glob("hydra_core-*.dist-info/entry_points.txt"))


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """(checkout, environment) of a stand-in for the lent machine."""
    base = tmp_path_factory.mktemp("device")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout.split("\0")
    checkout = base / "checkout"
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():  # (a file deleted in the working tree is not sent)
            (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, checkout / rel)
    write_bundle(checkout / ".deps")
    python = base / "python"
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(python)])
    if made.returncode:
        pytest.skip("this Python cannot make a virtual environment")
    image_site(base / "image-site")
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TRITON_INTERPRET", "FASTDIFF_BENCH_SMOKE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PYTEST_")}
    env |= {
        "PATH": f"{python / 'bin'}{os.pathsep}{env['PATH']}",
        "PYTHONPATH": str(base / "image-site"),
        "OMP_NUM_THREADS": "1",
    }
    return checkout, env


def test_the_bundle_is_what_brings_hydra(machine):
    checkout, env = machine
    code = "import torch, numpy, accelerate, torchvision; import hydra"
    run = dict(capture_output=True, text=True, cwd=checkout.parent, timeout=120)
    without = subprocess.run(["python3", "-c", code], env=env, **run)
    assert "No module named 'hydra'" in without.stderr  # not from this environment
    with_deps = {**env, "PYTHONPATH": f"{checkout / '.deps'}{os.pathsep}{env['PYTHONPATH']}"}
    done = subprocess.run(["python3", "-c", code], env=with_deps, **run)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_missing_package_stops_the_run_with_exit_3(machine, tmp_path):
    checkout, env = machine
    bare = tmp_path / "bare"
    shutil.copytree(checkout, bare, ignore=shutil.ignore_patterns(".deps", "__pycache__"))
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", "device-run.sh", "--cpu-rehearsal"],
        capture_output=True,
        text=True,
        env={**env, "OUT": str(out)},
        cwd=bare,
        timeout=120,
    )
    assert done.returncode == 3, done.stdout[-3000:]
    assert "import fastdiff.train: ModuleNotFoundError" in done.stdout
    assert not (out / "gpu-check.json").exists()
    assert "nothing ran" in (out / "device-run.log").read_text()


@pytest.mark.slow
def test_cpu_rehearsal_writes_every_part(machine, tmp_path):
    checkout, env = machine
    done = subprocess.run(
        ["bash", "device-run.sh", "--cpu-rehearsal"],
        capture_output=True,
        text=True,
        env={**env, "OUT": str(tmp_path)},
        cwd=checkout,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-5000:]
    assert f"python {sys.version.split()[0]} ({checkout.parent / 'python'}" in done.stdout
    assert (tmp_path / "device-run.log").read_text() == done.stdout
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    parts = result["parts"]
    assert list(parts) == list(PARTS)
    for name, part in parts.items():
        assert part["status"] == ("skipped" if name == "cuda_graphs" else "ok"), (name, part)

    summary = parts["gpu_tests"]["pytest"]["summary"]
    assert " passed" in summary and "failed" not in summary, summary
    kernels = parts["kernels"]
    for impl in ("triton", "eager"):
        assert kernels[f"group_norm_silu-b2-c16-h8-{impl}"]["median_ms"] > 0
        assert kernels[f"weighted_mse-b2-{impl}"]["median_ms"] > 0

    steps = parts["steps"]
    rows = ("b2-amp-eager", "b2-amp-eager-triton", "b2-fp32-eager", "b2-amp-compiled-triton")
    assert [k for k in steps if k not in ("status", "part_seconds")] == list(rows)
    for key in rows:
        s = steps[key]
        assert s["images_per_sec"] == pytest.approx(2 / s["seconds_per_step"])
        assert s["kernels"] == ("triton" if key.endswith("triton") else "torch")
        assert s["compiled"] == ("compiled" in key)
    assert steps["b2-fp32-eager"]["precision"] == "no"

    e9b = parts["e9b"]["run"]
    assert e9b["train/loss"] > 0
    assert sorted(e9b["fid"]) == ["eval/final/fid@8", "val/fid_milestone/fid@8"]
    assert all(math.isfinite(v) for v in e9b["fid"].values())
    assert e9b["images_per_sec"] > 0

    for k in ("K1", "K2"):
        f = parts["fused"][k]
        assert f["speedup"] == pytest.approx(f["sequential"] / f["fused"])
    for p in ("dropout0.0", "dropout0.1"):  # each run's masks are its standalone run's
        assert parts["fused_match"][p]["max_rel_diff"] < 1e-4
    comp = parts["fused_compiled"]
    assert comp["compiled"]["speedup"] == pytest.approx(
        comp["eager"]["seconds_per_step"] / comp["compiled"]["seconds_per_step"]
    )
