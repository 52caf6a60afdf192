"""The wheel holds every module of the checkout, and imports without the checkout."""

import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def modules_in_checkout() -> set[str]:
    """Every module path the wheel must hold: fastdiff/**."""
    return {str(p.relative_to(ROOT)) for p in (ROOT / "fastdiff").rglob("*.py")}


@pytest.mark.slow
def test_the_wheel_holds_and_imports_every_module(tmp_path):
    from setuptools import build_meta

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("fastdiff", "configs"):
        skip = shutil.ignore_patterns("__pycache__")
        shutil.copytree(ROOT / folder, src / folder, ignore=skip)
    dist = tmp_path / "dist"
    dist.mkdir()
    old = Path.cwd()
    try:  # setuptools builds the project in the current folder, as pip does
        os.chdir(src)
        # setuptools warns that configs/'s data folders are not packages, with a warning
        # class local to a function, which an xdist worker cannot send back: keep it here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wheel = dist / build_meta.build_wheel(str(dist))
    finally:
        os.chdir(old)
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {
        f"fastdiff/shipped_configs/{p.relative_to(ROOT / 'configs')}"
        for p in (ROOT / "configs").rglob("*.yaml")
    }
    missing = (modules_in_checkout() | configs) - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    modules = sorted(
        m[: -len(".py")].replace("/", ".").removesuffix(".__init__")
        for m in modules_in_checkout()
        if not m.endswith("__main__.py")
    )
    code = (
        f"import sys, importlib; sys.path.insert(0, {str(site)!r}); "
        f"mods = {modules!r}; [importlib.import_module(m) for m in mods]; "
        "from fastdiff.cards import load_card; assert load_card('e9').arms; "
        "import fastdiff; print(fastdiff.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(site))
    # From an empty folder, as a user of the installed wheel: the cards, an experiment's
    # config, a --config path at a card's path, and a short run.
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    e9_yaml = "configs/study/MS1_min_snr/e9/e9b_minsnr_cosine_gamma5_10k.yaml"
    # the quick ones in one interpreter (each would pay torch's import again)
    quick = (
        "import sys; from fastdiff.cli import main; from fastdiff.train import main as train; "
        "assert main(['cards']) == 0; assert train(['e9b', '--cfg', 'job']) == 0; "
        f"assert train(['--config', {e9_yaml!r}, '--cfg', 'job']) == 0"
    )
    for argv, says in (
        (["-c", quick], ("e10-gamma", "weighting: minsnr", "beta_schedule: cosine")),
        (["-m", "fastdiff.cli", "train", "quickstart", *TINY], ("done",)),
        (["-m", "fastdiff.cli", "study", "e9", "data=digits", *TINY, *NO_PROBE], ("report:",)),
    ):
        run = subprocess.run(
            [sys.executable, *argv],
            capture_output=True,
            text=True,
            cwd=empty,
            env=env,
            timeout=300,
        )
        assert run.returncode == 0, (argv, run.stderr[-2000:])
        assert all(x in run.stdout + run.stderr for x in says), argv


NO_PROBE = ["model=unet_tiny", "curvature.enabled=false", "--fused", "--launch", sys.executable]
TINY = [
    "model.base_channels=16",
    "data.image_size=8",
    "train.total_steps=2",
    "train.log_every=1",
    "train.progress=false",
    "sampling.grid_images=4",
    "sampling.grid_nfe=2",
    "eval.fid.enabled=false",
]
