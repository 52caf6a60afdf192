"""Data: CIFAR archive -> shards round trip, streaming, splitting, corruption, determinism."""

import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.data import ShardImages, ShardStream, StreamBatches, load_cifar10, make_batches
from fastdiff.data.prepare import main as prepare
from tests.cifar_fixture import sample_index, write_cifar_archive


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    archive = root / "cifar-10-python.tar.gz"
    images, labels = write_cifar_archive(archive, per_batch=20)
    out = root / "shards"
    assert prepare(["cifar10", "--src", str(archive), "--out", str(out), "--shard-size", "30"]) == 0
    return archive, out, images, labels


def test_archive_loader_reads_the_exact_format(cifar):
    archive, _, images, labels = cifar
    got, got_labels = load_cifar10(archive)
    assert np.array_equal(got.numpy(), images) and np.array_equal(got_labels.numpy(), labels)
    with tarfile.open(archive) as tar:  # and the extracted folder reads the same
        tar.extractall(archive.parent / "x", filter="data")
    got2, _ = load_cifar10(archive.parent / "x")
    assert torch.equal(got, got2)


def test_prepare_round_trips_values_labels_and_counts(cifar):
    _, out, images, labels = cifar
    ref = ShardImages(out)
    assert ref.manifest["count"] == 100 and ref.manifest["image_size"] == [32, 32]
    assert ref.manifest["shards"] == [f"shard-{i:06d}.tar" for i in range(4)]  # 30,30,30,10
    assert ref.manifest["classes"][3] == "class3" and len(ref.manifest["sha256"]) == 64
    assert len(ref) == 100 and ref[5].dtype == torch.uint8 and ref[5].shape == (3, 32, 32)
    assert np.array_equal(ref.images.numpy(), images)
    assert np.array_equal(ref.labels.numpy(), labels)


def test_prepare_refuses_to_overwrite_and_explains_missing_archive(cifar, tmp_path, capsys):
    archive, out, *_ = cifar
    assert prepare(["cifar10", "--src", str(archive), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (
        prepare(["cifar10", "--src", str(tmp_path / "nope.tar.gz"), "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err
    assert "cifar-10-python.tar.gz" in err and "fastdiff.data.prepare" in err
    assert not (tmp_path / "o").exists()


def test_prepare_folder_format(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i + (cls == "dog"), np.uint8)).save(
                tmp_path / "src" / cls / f"{i}.png"
            )
    assert (
        prepare(
            [
                "pets",
                "--src",
                str(tmp_path / "src"),
                "--out",
                str(tmp_path / "out"),
                "--format",
                "folder",
            ]
        )
        == 0
    )
    ref = ShardImages(tmp_path / "out")
    assert ref.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ref.manifest["classes"] == ["cat", "dog"] and ref[4][0, 0, 0].item() == 41


def _indices(stream_or_batches):
    return [sample_index(img) for img in stream_or_batches]


def test_two_ranks_get_equal_batches_and_disjoint_samples(cifar):
    _, out, *_ = cifar
    seen = []
    for rank in (0, 1):
        stream = ShardStream(out, 5, seed=3, rank=rank, world_size=2, shuffle_buffer=10)
        batches = list(stream)
        assert len(batches) == stream.batches_per_epoch == 10  # 100 // (5 * 2)
        seen.append({sample_index(img) for images, _, _ in batches for img in images})
    assert not seen[0] & seen[1]


def test_stream_is_deterministic_for_a_seed_and_changes_with_it(cifar):
    _, out, *_ = cifar

    def run(seed, workers):
        b = StreamBatches(out, 4, seed, hflip=False, workers=workers, shuffle_buffer=20)
        return [_indices(((b.batch(s) + 1) * 127.5).round().to(torch.uint8)) for s in range(30)]

    first = run(7, 0)
    assert first == run(7, 0)
    assert first != run(8, 0)
    assert run(7, 2) == run(7, 2)  # with worker processes too


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_stream_exactly(cifar, workers):
    """seek(k) then steps k, k+1, ... give the uninterrupted run's batches: mid-epoch
    (k odd, so the workers' turns rotate), across an epoch end, in a later epoch."""
    _, out, *_ = cifar

    def batches(start, stop):
        b = StreamBatches(out, 4, 5, workers=workers, shuffle_buffer=20)  # 25 per epoch
        b.seek(start)
        return [b.batch(s) for s in range(start, stop)]

    threads = torch.get_num_threads()
    whole = batches(0, 33)
    assert torch.get_num_threads() == threads  # the loader's one-thread section restores it
    for k in (7, 22, 28):
        for got, want in zip(batches(k, k + 5), whole[k : k + 5], strict=True):
            assert torch.equal(got, want), f"resume at {k}"


def test_corrupt_sample_and_truncated_shard_are_skipped_and_counted(cifar, tmp_path):
    _, out, *_ = cifar
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(out, bad)
    # 1) a sample whose PNG bytes are garbage
    shard = bad / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name == "00000003.png":
                data = b"\x89PNG not really"
                m.size = len(data)
            tar.addfile(m, __import__("io").BytesIO(data))
    # 2) a shard cut in the middle of a member
    cut = bad / "shard-000001.tar"
    cut.write_bytes(cut.read_bytes()[:20_000])
    b = StreamBatches(bad, 5, seed=0, hflip=False, workers=0, shuffle_buffer=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(60):
            b.batch(step)
    assert b.skipped >= 2
    assert any("skipping unreadable data" in str(w.message) for w in caught)


def test_every_shard_unreadable_stops_with_one_clear_error(cifar, tmp_path):
    """Resampled shards never run out: with none readable the stream must stop, not
    spin on skips forever."""
    _, out, *_ = cifar
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    for shard in bad.glob("*.tar"):
        shard.write_bytes(b"not a tar file" * 100)
    import signal

    class Spinning(BaseException):  # not an Exception: the reader's skip handler lets it by
        pass

    def spinning(signum, frame):
        raise Spinning("still skipping unreadable shards after 30 s")

    b = StreamBatches(bad, 5, seed=0, hflip=False, workers=0, shuffle_buffer=10)
    old = signal.signal(signal.SIGALRM, spinning)
    signal.alarm(30)  # a regression spins forever: fail it instead of hanging the suite
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(RuntimeError, match="no readable shard among .* re-run"):
                b.batch(0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_missing_manifest_and_too_few_shards(cifar, tmp_path):
    _, out, *_ = cifar
    with pytest.raises(FileNotFoundError, match="fastdiff.data.prepare"):
        ShardStream(tmp_path, 4, 0)
    with pytest.raises(ValueError, match="shard-size"):
        ShardStream(out, 1, 0, rank=0, world_size=5)


def test_training_from_shards(cifar, tmp_path):
    import json

    from fastdiff.config import compose, to_config
    from fastdiff.trainer import training_loop
    from tests.conftest import tiny

    _, out, *_ = cifar
    overrides = [o for o in tiny(tmp_path) if not o.startswith("data")]
    cfg = to_config(
        compose(
            [
                *overrides,
                "data=cifar10",
                f"data.path={out}",
                "data.workers=1",
                "curvature.enabled=true",
                "curvature.probes=2",
                "curvature.batch_size=2",
                "curvature.t_bins=2",
                "curvature.every=6",
            ]
        )
    )
    assert isinstance(
        make_batches(cfg.data, 2, 0, rank=0, world_size=1, device="cpu"), StreamBatches
    )
    summary = training_loop(cfg)
    assert summary["step"] == 6 and summary["data/skipped"] == 0
    (run_dir,) = (tmp_path / "custom").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("curvature/hutch_trace_mean" in r for r in rows)


@pytest.mark.slow
def test_two_processes_train_from_shards(cifar, tmp_path):
    """A real 2-process CPU launch (torchrun) streams from shards to the end, no hang."""
    import json

    from tests.conftest import tiny, train_cli

    _, out, *_ = cifar
    overrides = [o for o in tiny(tmp_path) if not o.startswith(("data", "train.runs"))]
    overrides += ["data=cifar10", f"data.path={out}", "data.workers=1"]
    train_cli(*overrides, f"train.run_dir={tmp_path / 'r'}", processes=2, port=29523)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["step"] == 6 and summary["data/skipped"] == 0


def test_training_from_shards_resumes_bitwise(cifar, tmp_path):
    """Stopped at step 3 (mid-epoch, odd: the two workers' turns rotate) and resumed,
    a run from shards ends with the uninterrupted run's weights, bit for bit."""
    from fastdiff.config import compose, to_config
    from fastdiff.trainer import training_loop
    from tests.conftest import tiny
    from tests.test_reliability import assert_bitwise, final_state

    _, out, *_ = cifar
    base = [o for o in tiny(tmp_path) if not o.startswith("data")]
    base += ["data=cifar10", f"data.path={out}", "data.workers=2", "train.ckpt_every=3"]

    def train(run_dir, steps, *extra):
        cfg = to_config(
            compose([*base, f"train.total_steps={steps}", f"train.run_dir={run_dir}", *extra])
        )
        return training_loop(cfg)

    train(tmp_path / "straight", 6)
    train(tmp_path / "stopped", 3)
    train(tmp_path / "stopped", 6, "train.resume=auto")
    assert_bitwise(final_state(tmp_path / "straight", 6), final_state(tmp_path / "stopped", 6))
