"""Image sources that fit in memory, as uint8 tensors of shape (N, 3, H, W).

- ``digits``: scikit-learn's bundled handwritten digits (1,797 8x8 grey images,
  shipped with the package, no download), upscaled to the requested size as RGB.
- ``cifar10``: the standard CIFAR-10 python archive (``cifar-10-python.tar.gz`` or
  its extracted ``cifar-10-batches-py`` folder), training batches 1-5.

A folder of image files (``IMAGE_SUFFIXES``) is not loaded here: ``fastdiff.data.prepare``
turns it into shards first.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CIFAR_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def is_hidden(path: Path) -> bool:
    """Hidden files and folders, and macOS's zip metadata (``._img.png`` AppleDouble files,
    ``__MACOSX``): never images of the data set."""
    return path.name.startswith(".") or path.name == "__MACOSX"


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted, hidden ones left out."""
    return sorted(
        f
        for f in folder.iterdir()
        if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and not is_hidden(f)
    )


def is_image_folder(path: str | Path) -> bool:
    """Whether ``path`` holds image files, directly or in class sub-folders."""
    path = Path(path)
    if not path.is_dir():
        return False
    folders = [path, *(d for d in path.iterdir() if d.is_dir() and not is_hidden(d))]
    return any(image_files(d) for d in folders)


def cifar_help(option: str = "data.path=FILE_OR_FOLDER") -> str:
    """Where CIFAR-10 comes from, ending with the option the user passes it by."""
    return (
        "download the python version of CIFAR-10 (cifar-10-python.tar.gz) from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html and pass {option}"
    )


def load_digits(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(bunch.target).long()


def _read_cifar_batches(path: Path, names: list[str], option: str | None = None) -> list[dict]:
    """Unpickle CIFAR batches from the extracted folder or straight from the .tar.gz."""
    help_ = cifar_help(*([option] if option else []))
    if path.is_dir():
        folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} has no CIFAR-10 batch {missing[0]}: {help_}")
        return [pickle.loads((folder / n).read_bytes(), encoding="bytes") for n in names]
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in names if n not in members]
            if missing:
                raise FileNotFoundError(f"{path} has no CIFAR-10 batch {missing[0]}: {help_}")
            return [
                pickle.loads(tar.extractfile(members[n]).read(), encoding="bytes") for n in names
            ]
    except tarfile.TarError:
        raise FileNotFoundError(
            f"{path} is not a readable CIFAR-10 archive (not a tar file, or a damaged one): {help_}"
        ) from None


def load_cifar10(
    path: str | Path, names: list[str] = CIFAR_TRAIN_BATCHES, option: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``option``: how the user named ``path`` (default data.path), for the error lines."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"CIFAR-10 not found at {path}: {cifar_help(*filter(None, [option]))}"
        )
    batches = _read_cifar_batches(path, names, option)
    data = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(b[b"labels"]) for b in batches])
    return torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(labels).long()


def load_images(name: str, path: str | None, image_size: int) -> torch.Tensor:
    """The training images of data set ``name`` as uint8 (N, 3, image_size, image_size)."""
    if name == "digits":
        return load_digits(image_size)[0]
    if name == "cifar10":
        images = load_cifar10(path)[0]
        if image_size != 32:
            images = (
                F.interpolate(
                    images.float(), size=(image_size, image_size), mode="bilinear", antialias=True
                )
                .round()
                .clamp(0, 255)
            )
            images = images.to(torch.uint8)
        return images
    raise ValueError(f"unknown data set {name!r}: use digits or cifar10")
