"""The wheel holds every module of the checkout, and imports without the checkout."""

import os
import shutil
import subprocess
import sys
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
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("fastdiff", "configs"):
        skip = shutil.ignore_patterns("__pycache__")
        shutil.copytree(ROOT / folder, src / folder, ignore=skip)
    dist = tmp_path / "dist"
    dist.mkdir()
    old = Path.cwd()
    try:  # setuptools builds the project in the current folder, as pip does
        os.chdir(src)
        wheel = dist / build_meta.build_wheel(str(dist))
    finally:
        os.chdir(old)
    names = set(zipfile.ZipFile(wheel).namelist())
    cards = {f"fastdiff/shipped_cards/{p.name}" for p in (ROOT / "configs" / "cards").glob("*")}
    missing = (modules_in_checkout() | cards) - names
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
