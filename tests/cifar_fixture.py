"""A small archive in CIFAR-10's exact python format, with synthetic images.

Image i has its index written into its first two pixels (i % 256, i // 256) so a
test can tell which sample it is holding after a round trip.
"""

import io
import pickle
import tarfile

import numpy as np


def make_cifar_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    idx = np.arange(n)
    images[:, 0, 0, 0] = idx % 256
    images[:, 0, 0, 1] = idx // 256
    return images, rng.integers(0, 10, size=n)


def sample_index(image_chw) -> int:
    return int(image_chw[0, 0, 0]) + 256 * int(image_chw[0, 0, 1])


def write_cifar_archive(path, per_batch: int = 20, seed: int = 0):
    """cifar-10-python.tar.gz with data_batch_1..5, test_batch and batches.meta."""
    images, labels = make_cifar_images(per_batch * 6, seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    with tarfile.open(path, "w:gz") as tar:

        def add(name, obj):
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for k, name in enumerate(names):
            sl = slice(k * per_batch, (k + 1) * per_batch)
            add(
                name,
                {
                    b"batch_label": name.encode(),
                    b"labels": labels[sl].tolist(),
                    b"data": images[sl].reshape(per_batch, -1),
                    b"filenames": [f"{i}.png".encode() for i in range(per_batch)],
                },
            )
        add(
            "batches.meta",
            {
                b"label_names": [f"class{i}".encode() for i in range(10)],
                b"num_cases_per_batch": per_batch,
                b"num_vis": 3072,
            },
        )
    n_train = per_batch * 5
    return images[:n_train], labels[:n_train]
