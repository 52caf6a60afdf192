"""Only what pyproject.toml cannot say: the packages are every fastdiff subpackage, found,
plus configs/ mapped to fastdiff.shipped_configs (a folder outside fastdiff/, which find
cannot see)."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["fastdiff", "fastdiff.*"]), "fastdiff.shipped_configs"])
