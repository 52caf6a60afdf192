"""A Fréchet distance for the embedded digits, computable on any machine.

Inception weights cannot be had on a machine without downloads, so FID would be "not
evaluable" on every CPU run of the embedded digits. This module trains a small CNN
classifier on those digits (deterministic, a few seconds on 2 CPU cores), caches its
weights under ``~/.cache/fastdiff/extractors`` and registers it with torch-fidelity as
the feature extractor ``fastdiff-digits``: the same ``calculate_metrics`` path then
computes FD, KID and precision/recall on its 64-dimensional penultimate features.
Numbers on this extractor are an FD of digits, not an FID: they compare runs of one
study, not papers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("fastdiff")

NAME = "fastdiff-digits"
LAYER = "64"
DIM = 64
SIZE = 16  # images are resized to SIZE x SIZE grey before the network
RESIZE = f"bilinear-{SIZE}-grey"
VERSION = 1  # bump when the network or its training changes: a new cache file
TRAIN_STEPS = 400


class DigitsCNN(nn.Module):
    """conv 16 → pool → conv 32 → pool → fc 64 (the features) → fc 10 (the classes)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * (SIZE // 4) ** 2, DIM)
        self.head = nn.Linear(DIM, 10)

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) → float (N, 1, SIZE, SIZE) in [0, 1]."""
        x = x.float().mean(1, keepdim=True) / 255
        if x.shape[-1] != SIZE:
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_digits_cnn(seed: int = 0, steps: int = TRAIN_STEPS) -> DigitsCNN:
    """Trained on all 1,797 embedded digits, with one-pixel shifts so features do not
    hinge on exact placement. Deterministic for a seed (CPU, fixed order)."""
    from fastdiff.data.sources import load_digits

    images, labels = load_digits(SIZE)
    x = DigitsCNN.prepare(images)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
        batch = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(model(batch), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def default_path() -> Path:
    return Path.home() / ".cache" / "fastdiff" / "extractors" / f"digits-cnn-v{VERSION}.pt"


def ensure_weights(path: Path | None = None) -> Path:
    """The extractor's weights file, trained and written (atomically) on first use."""
    from fastdiff.rundir import save_torch

    path = Path(path or default_path())
    if not path.is_file():
        log.info("training the digits feature extractor once (a few seconds): %s", path)
        save_torch(train_digits_cnn().state_dict(), path)
    return path


def _extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class FeatureExtractorDigits(FeatureExtractorBase):
        """torch-fidelity's interface over :class:`DigitsCNN`: uint8 in, (features,) out."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            self.net = DigitsCNN()
            if feature_extractor_weights_path is None:
                raise ValueError(f"{NAME} needs feature_extractor_weights_path")
            state = torch.load(feature_extractor_weights_path, map_location="cpu")
            self.net.load_state_dict(state)

        @staticmethod
        def get_provided_features_list():
            return (LAYER,)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return LAYER

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8)

        def forward(self, x):
            if not (torch.is_tensor(x) and x.dtype == torch.uint8):
                raise ValueError("expected uint8 images")
            device = next(self.net.parameters()).device
            return (self.net.features(DigitsCNN.prepare(x.to(device))),)

    return FeatureExtractorDigits


def register() -> None:
    """Make ``fastdiff-digits`` known to torch-fidelity (once per process)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(NAME, _extractor_class())
