"""Convert an image data set into WebDataset tar shards of PNGs with class labels.

    python -m fastdiff.data.prepare cifar10 --src cifar-10-python.tar.gz --out data/cifar10
    python -m fastdiff.data.prepare NAME --src DIR --format folder --out data/NAME

``folder``: images in class sub-folders (``DIR/<class>/<image>``) or directly in DIR
(label 0). Shards hold ``--shard-size`` samples each (the last may be short) and are
named ``shard-000000.tar``…; ``manifest.json`` records the count, the shard list,
the image size, the classes and a SHA-256 of the shards' contents. The output is
built in a temporary folder and renamed into place, so it is never half-written.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from fastdiff.data.sources import CIFAR_TRAIN_BATCHES, cifar_help, load_cifar10

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
MANIFEST = "manifest.json"


def png_bytes(image_hwc: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_hwc).save(buf, format="PNG")
    return buf.getvalue()


def cifar10_samples(src: Path, split: str):
    names = CIFAR_TRAIN_BATCHES if split == "train" else ["test_batch"]
    images, labels = load_cifar10(src, names, option=f"--src {src}")
    classes = _cifar_classes(src)
    return (
        len(images),
        classes,
        ((img.permute(1, 2, 0).numpy(), int(y)) for img, y in zip(images, labels)),
    )


def _cifar_classes(src: Path) -> list[str]:
    from fastdiff.data.sources import _read_cifar_batches

    try:
        meta = _read_cifar_batches(src, ["batches.meta"])[0]
        return [n.decode() for n in meta[b"label_names"]]
    except FileNotFoundError:
        return [str(i) for i in range(10)]


def folder_samples(src: Path):
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} is not a folder of images")
    subdirs = sorted(p for p in src.iterdir() if p.is_dir())
    groups = [(d.name, d) for d in subdirs] or [("0", src)]
    files = [
        (f, label)
        for label, (_, d) in enumerate(groups)
        for f in sorted(d.iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise FileNotFoundError(f"--src {src} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")

    def load():
        size = None
        for f, label in files:
            img = np.asarray(Image.open(f).convert("RGB"))
            if size is None:
                size = img.shape
            elif img.shape != size:
                raise ValueError(
                    f"{f} is {img.shape[1]}x{img.shape[0]}, the others "
                    f"{size[1]}x{size[0]}: resize the images to one size first"
                )
            yield img, label

    return len(files), [name for name, _ in groups], load()


def write_shards(
    samples,
    count: int,
    out: Path,
    shard_size: int,
    classes: list[str],
    source: str,
    force: bool = False,
    progress: bool = True,
) -> dict:
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists: pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        digest, shards, size, n = hashlib.sha256(), [], None, 0
        writer = None
        for img, label in tqdm(
            samples, total=count, desc=f"shards -> {out}", unit="img", disable=not progress
        ):
            if n % shard_size == 0:
                if writer is not None:
                    writer.close()
                shards.append(f"shard-{len(shards):06d}.tar")
                writer = wds.TarWriter(str(tmp / shards[-1]))
            data = png_bytes(img)
            digest.update(data)
            digest.update(str(label).encode())
            writer.write({"__key__": f"{n:08d}", "png": data, "cls": label})
            size = size or [int(img.shape[0]), int(img.shape[1])]
            n += 1
        if writer is not None:
            writer.close()
        if n == 0:
            raise ValueError("no images to write")
        manifest = {
            "count": n,
            "shards": shards,
            "shard_size": shard_size,
            "image_size": size,
            "channels": 3,
            "classes": classes,
            "source": source,
            "sha256": digest.hexdigest(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastdiff.data.prepare",
        description="Write WebDataset shards (PNG + class label).",
    )
    parser.add_argument("name", help="data set name: cifar10, or any name with --format folder")
    parser.add_argument(
        "--src",
        type=Path,
        required=True,
        help="cifar-10-python.tar.gz or its folder; or a folder of images",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder for the shards")
    parser.add_argument(
        "--format",
        choices=["cifar10", "folder"],
        help="default: cifar10 for the name cifar10, folder otherwise",
    )
    parser.add_argument("--split", choices=["train", "test"], default="train")
    parser.add_argument("--shard-size", type=int, default=5000, help="images per shard")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = parser.parse_args(argv)
    fmt = args.format or ("cifar10" if args.name == "cifar10" else "folder")
    try:
        if args.shard_size <= 0:
            raise ValueError(f"--shard-size must be > 0, got {args.shard_size}")
        if args.out.exists() and not args.force:
            raise FileExistsError(f"{args.out} exists: pass --force to overwrite it")
        if fmt == "cifar10":
            if not args.src.exists():
                raise FileNotFoundError(
                    f"{args.src} not found: {cifar_help('--src FILE')}, then run "
                    f"python -m fastdiff.data.prepare cifar10 --src "
                    f"cifar-10-python.tar.gz --out {args.out}"
                )
            count, classes, samples = cifar10_samples(args.src, args.split)
        else:
            count, classes, samples = folder_samples(args.src)
        manifest = write_shards(
            samples,
            count,
            args.out,
            args.shard_size,
            classes,
            f"{fmt}:{args.src}:{args.split}",
            args.force,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"fastdiff.data.prepare: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {manifest['count']} images in {len(manifest['shards'])} shards to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
