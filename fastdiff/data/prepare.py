"""Convert an image data set into WebDataset tar shards of PNGs with class labels.

    python -m fastdiff.data.prepare cifar10 --src cifar-10-python.tar.gz --out data/cifar10
    python -m fastdiff.data.prepare NAME --src DIR --format folder --out data/NAME

``folder``: square images of one size in class sub-folders (``DIR/<class>/<image>``)
or directly in DIR (label 0). A file that is not a readable image is skipped with a
warning and counted; hidden files (macOS's ``._*``) are passed over silently. Shards
hold ``--shard-size`` samples each (the last may be short) and are named
``shard-000000.tar``…; ``manifest.json`` records the count, the shard list, the image
size, the classes, the skipped files' count and a SHA-256 of the shards' contents.

The output is built in a temporary folder and moved into place, so it is never
half-written. ``--force`` replaces a previous output of prepare (its manifest and the
shards it lists) and keeps anything else in that folder; it refuses any other folder.
An ``--out`` that is, holds or lies inside ``--src``, or holds the current folder, is
refused before anything is touched.
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
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from fastdiff.data.shards import MANIFEST, SHARD_NAME, shard_name
from fastdiff.data.sources import (
    CIFAR_TRAIN_BATCHES,
    IMAGE_SUFFIXES,
    cifar_help,
    image_files,
    is_hidden,
    load_cifar10,
)
from fastdiff.errors import ConfigError, Parser, guarded


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
    """(count, classes, samples): each sample an (image HWC uint8, label) pair, or None
    for a file that is not a readable image (warned here, counted by write_shards)."""
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} is not a folder of images")
    subdirs = sorted(p for p in src.iterdir() if p.is_dir() and not is_hidden(p))
    groups = [(d.name, d) for d in subdirs] or [("0", src)]
    files = [(f, label) for label, (_, d) in enumerate(groups) for f in image_files(d)]
    if not files:
        raise FileNotFoundError(f"--src {src} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")

    def load():
        size = None
        for f, label in files:
            try:
                with Image.open(f) as image:
                    img = np.asarray(image.convert("RGB"))
            except OSError as err:  # not an image at all, or a truncated one
                why = "not an image" if isinstance(err, UnidentifiedImageError) else str(err)
                tqdm.write(f"fastdiff: warning: skipping {f}: {why}", file=sys.stderr)
                yield None
                continue
            height, width = img.shape[:2]
            if height != width:  # the UNet and the probes take square images only
                raise ConfigError(
                    f"{f} is {width}x{height}, not square: crop or resize the images to one "
                    "square size first"
                )
            if size is None:
                size = img.shape
            elif img.shape != size:
                raise ConfigError(
                    f"{f} is {width}x{height}, the others {size[1]}x{size[0]}: resize the "
                    "images to one size first"
                )
            yield img, label

    return len(files), [name for name, _ in groups], load()


def check_places(src: Path, out: Path) -> None:
    """Refuse an --out whose shards would overwrite the source, be read back as part
    of it, or land among the files of the folder the command runs in."""
    src_, out_, cwd = src.resolve(), out.resolve(), Path.cwd().resolve()
    if out_ == src_ or out_ in src_.parents:
        raise ConfigError(
            f"--out {out} is or holds --src {src}: write the shards to a folder outside it"
        )
    if src_ in out_.parents:
        raise ConfigError(
            f"--out {out} is inside --src {src}, so its shards would be read as images "
            "next time: write them to a folder outside it"
        )
    if out_ == cwd or out_ in cwd.parents:
        raise ConfigError(
            f"--out {out} is or holds the current folder: write the shards to a new folder"
        )


def previous_output(out: Path, force: bool) -> list[str]:
    """The files of an earlier prepare run in ``out`` that this run replaces (the
    manifest first): none for a new or empty folder. Anything else is refused, so
    --force never deletes a file prepare did not write."""
    if not out.exists():
        return []
    if not force:
        if (out / MANIFEST).is_file():
            raise FileExistsError(f"{out} exists: pass --force to replace the shards prepare wrote")
        raise FileExistsError(f"{out} exists and is not an output of prepare: choose a new --out")
    if not out.is_dir():
        raise FileExistsError(f"--out {out} is a file: choose a folder for the shards")
    names = {p.name for p in out.iterdir()}
    if not names:
        return []
    try:
        shards = json.loads((out / MANIFEST).read_text())["shards"]
        ours = all(isinstance(n, str) and SHARD_NAME.fullmatch(n) for n in shards)
    except (OSError, ValueError, KeyError, TypeError):
        ours = False
    if not ours or any((out / n).is_dir() for n in shards):
        raise FileExistsError(
            f"{out} is not an output of prepare (no {MANIFEST} of its shards), and --force "
            "replaces only that: choose a new --out"
        )
    strays = sorted(n for n in names if SHARD_NAME.fullmatch(n) and n not in shards)
    if strays:
        raise FileExistsError(
            f"{out / strays[0]} is not listed in {out / MANIFEST}, so prepare did not write "
            "it and might overwrite it: move it away or choose a new --out"
        )
    return [MANIFEST, *shards]


def write_shards(
    samples,
    out: Path,
    *,
    count: int,
    shard_size: int,
    classes: list[str],
    source: str,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Write ``samples`` ((image, label) pairs; None for a skipped file) as shards and
    a manifest into ``out``, replacing only a previous output of prepare there."""
    previous_output(out, force)  # refuse now, before the work
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        digest, shards, size, n, skipped = hashlib.sha256(), [], None, 0, 0
        writer = None
        for sample in tqdm(
            samples, total=count, desc=f"shards -> {out}", unit="img", disable=not progress
        ):
            if sample is None:
                skipped += 1
                continue
            img, label = sample
            if n % shard_size == 0:
                if writer is not None:
                    writer.close()
                shards.append(shard_name(len(shards)))
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
            raise ConfigError(f"no readable images to write ({skipped} files skipped)")
        manifest = {
            "count": n,
            "shards": shards,
            "shard_size": shard_size,
            "image_size": size,
            "channels": 3,
            "classes": classes,
            "source": source,
            "skipped": skipped,
            "sha256": digest.hexdigest(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        move_into_place(tmp, out, previous_output(out, force))  # checked again: minutes passed
        return manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def move_into_place(tmp: Path, out: Path, previous: list[str]) -> None:
    """Make ``tmp``'s files ``out``'s, deleting only ``previous`` (files prepare wrote)."""
    if not out.exists():
        tmp.rename(out)
        return
    # The old manifest goes first and the new one comes last: while the shards change,
    # the folder has no manifest, so a reader refuses it rather than mixing two outputs.
    for name in previous:
        (out / name).unlink(missing_ok=True)
    for file in sorted(tmp.iterdir(), key=lambda f: f.name == MANIFEST):
        file.replace(out / file.name)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
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
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a previous output of prepare in --out (other files there are kept)",
    )
    args = parser.parse_args(argv)
    return guarded(lambda: prepare(args))


def prepare(args: argparse.Namespace) -> int:
    fmt = args.format or ("cifar10" if args.name == "cifar10" else "folder")
    if args.shard_size <= 0:
        raise ConfigError(f"--shard-size must be > 0, got {args.shard_size}")
    check_places(args.src, args.out)
    previous_output(args.out, args.force)
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
        args.out,
        count=count,
        shard_size=args.shard_size,
        classes=classes,
        source=f"{fmt}:{args.src}:{args.split}",
        force=args.force,
    )
    skipped = f"; skipped {manifest['skipped']} unreadable files" if manifest["skipped"] else ""
    print(
        f"wrote {manifest['count']} images in {len(manifest['shards'])} shards "
        f"to {args.out}{skipped}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
