"""prepare and start-up on the inputs users actually have: --out next to or over the
source, non-square and unreadable images, a damaged first shard, a raw image folder
given as data.path. Every refusal is one line and leaves the user's files as they were."""

import hashlib
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fastdiff.data import StreamBatches, path_problem, probe_pool
from fastdiff.data.prepare import main as prepare
from fastdiff.errors import ConfigError


def png(path: Path, width: int = 8, height: int = 8, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path)
    return path


def images(folder: Path, n: int = 4) -> Path:
    for i in range(n):
        png(folder / f"img{i:03d}.png", value=10 * i)
    return folder


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under root: relative name -> (size, sha256)."""
    return {
        str(f.relative_to(root)): (f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest())
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }


def folder_prepare(src: Path, out: Path | str, *extra: str) -> int:
    return prepare(["pets", "--src", str(src), "--out", str(out), "--format", "folder", *extra])


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("fastdiff: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# 1. --force replaces only a previous output of prepare


# The reason is checked too: a folder that is not prepare's output is refused later
# anyway, and these must be refused for what they are, whatever the folder holds.


@pytest.mark.parametrize(
    ("out", "reason"),
    [
        ("imgs", "is or holds --src"),  # the source images themselves
        ("imgs/shards", "inside --src"),  # the shards would be read as images next time
        (".", "is or holds --src"),  # the cwd, which holds src
        ("", "is or holds --src"),  # the cwd by its absolute name
    ],
)
def test_out_over_or_inside_src_is_refused_untouched(tmp_path, monkeypatch, capsys, out, reason):
    images(tmp_path / "imgs")
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    out = out or str(tmp_path)
    assert folder_prepare(Path("imgs"), out, "--force") == 2
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "imgs" / "shards").exists()
    assert reason in one_error_line(capsys.readouterr().err)


def test_out_holding_src_is_refused_untouched(tmp_path, capsys):
    images(tmp_path / "proj" / "raw")
    (tmp_path / "proj" / "notes").mkdir()
    (tmp_path / "proj" / "notes" / "important.txt").write_text("do not lose")
    before = snapshot(tmp_path)
    assert folder_prepare(tmp_path / "proj" / "raw", tmp_path / "proj", "--force") == 2
    assert snapshot(tmp_path) == before
    assert "is or holds --src" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("out", [".", "..", ""])
def test_out_the_cwd_or_above_it_is_refused(tmp_path, monkeypatch, capsys, out):
    """Even when the folder is a previous output of prepare: its other files are the
    user's work, and an --out of . is a slip more often than a choice."""
    images(tmp_path / "imgs")
    work = tmp_path / "project" / "work"
    assert folder_prepare(tmp_path / "imgs", work) == 0
    (work / "train.log").write_text("log")
    (work.parent / "manifest.json").write_text((work / "manifest.json").read_text())
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    assert folder_prepare(tmp_path / "imgs", out or str(work), "--force") == 2
    assert snapshot(tmp_path) == before
    assert "current folder" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "content",
    [
        {"notes.txt": "mine"},  # not prepare's output at all
        {"manifest.json": '{"name": "my own manifest"}', "data.bin": "x"},  # another tool's
        {"manifest.json": "not json"},
    ],
)
def test_force_refuses_a_folder_that_is_not_prepares_output(tmp_path, capsys, content):
    images(tmp_path / "imgs")
    for name, text in content.items():
        (tmp_path / "out" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / name).write_text(text)
    before = snapshot(tmp_path)
    assert folder_prepare(tmp_path / "imgs", tmp_path / "out", "--force") == 2
    assert snapshot(tmp_path) == before
    assert "prepare" in one_error_line(capsys.readouterr().err)


def test_force_refuses_a_shard_its_manifest_does_not_list(tmp_path, capsys):
    """A shard-NNNNNN.tar the manifest does not list was not written by that prepare
    run: the new output might overwrite it."""
    images(tmp_path / "imgs")
    assert folder_prepare(tmp_path / "imgs", tmp_path / "out") == 0
    (tmp_path / "out" / "shard-000007.tar").write_bytes(b"someone else's")
    before = snapshot(tmp_path)
    assert folder_prepare(tmp_path / "imgs", tmp_path / "out", "--force") == 2
    assert snapshot(tmp_path) == before
    assert "shard-000007.tar" in one_error_line(capsys.readouterr().err)


def test_force_replaces_only_the_previous_output(tmp_path):
    images(tmp_path / "imgs", 4)
    out = tmp_path / "out"
    assert folder_prepare(tmp_path / "imgs", out, "--shard-size", "2") == 0  # shards 0, 1
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    (out / "README.txt").write_text("what these shards are")
    (out / ".DS_Store").write_bytes(b"\0finder")
    (out / "plots").mkdir()
    (out / "plots" / "grid.png").write_bytes(b"not ours")
    mine = {k: v for k, v in snapshot(out).items() if not k.startswith(("shard-", "manifest"))}
    src_before = snapshot(tmp_path / "imgs")

    images(tmp_path / "fewer", 1)
    assert folder_prepare(tmp_path / "fewer", out, "--shard-size", "2", "--force") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 1 and manifest["shards"] == ["shard-000000.tar"]
    after = snapshot(out)
    assert "shard-000001.tar" not in after  # the previous run's, replaced by nothing
    assert {k: v for k, v in after.items() if k in mine} == mine
    assert snapshot(tmp_path / "imgs") == src_before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_force_writes_into_an_empty_folder(tmp_path):
    images(tmp_path / "imgs")
    (tmp_path / "out").mkdir()
    assert folder_prepare(tmp_path / "imgs", tmp_path / "out", "--force") == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["count"] == 4


# 2. non-square images


def test_non_square_image_is_refused_naming_it(tmp_path, capsys):
    png(tmp_path / "imgs" / "wide.png", width=32, height=16)
    assert folder_prepare(tmp_path / "imgs", tmp_path / "out") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "wide.png" in line and "32x16" in line and "square" in line
    assert not (tmp_path / "out").exists()


def test_mixed_sizes_are_still_refused(tmp_path, capsys):
    png(tmp_path / "imgs" / "a.png", 8, 8)
    png(tmp_path / "imgs" / "b.png", 16, 16)
    assert folder_prepare(tmp_path / "imgs", tmp_path / "out") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "b.png" in line and "16x16" in line and "8x8" in line
    assert not (tmp_path / "out").exists()


# 3. files with an image suffix that are not images


def test_unreadable_files_are_skipped_warned_and_counted(tmp_path, capsys):
    src = images(tmp_path / "imgs", 2)
    (src / "._img000.png").write_bytes(b"\0\5\26\7\0\2\0\0Mac OS X        ")  # AppleDouble
    (src / "broken.png").write_bytes(b"junk, not a PNG")
    (src / "cut.png").write_bytes((src / "img000.png").read_bytes()[:40])  # truncated
    assert folder_prepare(src, tmp_path / "out") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["count"] == 2 and manifest["skipped"] == 2
    err = capsys.readouterr()
    assert "broken.png" in err.err and "cut.png" in err.err and "Traceback" not in err.err
    assert "._img000.png" not in err.err + err.out  # macOS metadata: skipped silently
    assert "skipped 2" in err.out


def test_only_unreadable_files_is_one_error_line(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.png").write_bytes(b"junk")
    assert folder_prepare(tmp_path / "imgs", tmp_path / "out") == 2
    assert "readable" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# 4. a damaged first shard at start-up


@pytest.fixture
def shards(tmp_path):
    images(tmp_path / "imgs", 8)
    assert folder_prepare(tmp_path / "imgs", tmp_path / "out", "--shard-size", "2") == 0
    return tmp_path / "out"


def test_damaged_first_shard_is_skipped_for_the_probe_pool(shards):
    first = shards / "shard-000000.tar"
    first.write_bytes(first.read_bytes()[:1500])  # cut in the middle of a member
    batches = StreamBatches(shards, 2, seed=0, hflip=False, workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pool = probe_pool(None, batches)
    assert pool.shape == (2, 3, 8, 8)
    assert [p[0, 0, 0].item() for p in pool] == [20, 30]  # shard 1's images
    assert any("shard-000000.tar" in str(w.message) for w in caught)


def test_no_readable_shard_is_one_clear_error(shards):
    for shard in shards.glob("shard-*.tar"):
        shard.write_bytes(b"not a tar file" * 100)
    batches = StreamBatches(shards, 2, seed=0, hflip=False, workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="no readable shard among 4 .*prepare"):
            probe_pool(None, batches)


# 5. a raw image folder given as data.path


@pytest.mark.parametrize("name", ["shards", "cifar10"])
def test_raw_image_folder_hint_prepares_it_into_a_new_folder(tmp_path, name):
    src = images(tmp_path / "imgs")
    problem = path_problem(SimpleNamespace(name=name, path=str(src), image_size=8))
    assert f"fastdiff.data.prepare NAME --src {src} --format folder --out " in problem
    assert f"--out {src}" not in problem and "cifar-10-python" not in problem


def test_hint_never_writes_into_a_file_or_a_folder_with_other_things(tmp_path):
    (tmp_path / "c.tar.gz").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")

    def hint(path):
        return path_problem(SimpleNamespace(name="shards", path=str(path), image_size=8))

    assert hint(tmp_path / "c.tar.gz").endswith("--out NEW_FOLDER")
    assert hint(tmp_path / "docs").endswith("--out NEW_FOLDER")
    assert hint(tmp_path / "empty").endswith(f"--out {tmp_path / 'empty'}")
