"""FLOPs per training step against a count made by hand from the layers' shapes."""

import pytest
import torch
from torch import nn

from fastdiff.flops import peak_flops, train_step_flops
from fastdiff.unet import Attention, build_model


def hand_count(name, ch, size, batch):
    """Forward FLOPs from hooks (2·MACs of every conv, linear and attention matmul); the
    backward is twice that, less the input gradients nobody needs (conv_in's, and the
    first time-embedding layer's: their inputs are data)."""
    model = build_model(name, ch, 0.0, size)
    fwd = []

    def conv(m, inp, out):
        k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        fwd.append(2 * out.numel() * k)

    def linear(m, inp, out):
        fwd.append(2 * out.numel() * m.in_features)

    def attention(m, inp, out):
        B, C, H, W = inp[0].shape
        fwd.append(2 * 2 * B * (H * W) ** 2 * C)  # QKᵀ and (softmax)·V

    for m in model.modules():
        hook = {nn.Conv2d: conv, nn.Linear: linear, Attention: attention}
        hook = hook.get(type(m))
        if hook:
            m.register_forward_hook(hook)
    model(torch.randn(batch, 3, size, size), torch.zeros(batch, dtype=torch.long))
    unneeded = 2 * batch * ch * size * size * 3 * 9 + 2 * batch * ch * 4 * ch
    return 3 * sum(fwd) - unneeded


@pytest.mark.parametrize(
    "name, ch, size, batch", [("unet_tiny", 16, 8, 2), ("unet_tiny", 8, 16, 3)]
)
def test_train_step_flops_match_the_hand_count(name, ch, size, batch):
    assert train_step_flops(name, ch, size, batch) == hand_count(name, ch, size, batch)


def test_cards_model_flops_scale_with_batch():
    one = train_step_flops("unet_cifar32", 64, 32, 1)
    assert train_step_flops("unet_cifar32", 64, 32, 4) == 4 * one
    assert 9e9 < one < 10e9  # 38.4 GFLOP per step of 4 images (README)


def test_peak_flops(monkeypatch):
    monkeypatch.delenv("FASTDIFF_PEAK_TFLOPS", raising=False)
    assert peak_flops(torch.device("cpu")) is None  # no MFU on CPUs unless told the peak
    monkeypatch.setenv("FASTDIFF_PEAK_TFLOPS", "2.5")
    assert peak_flops(torch.device("cpu")) == 2.5e12


@pytest.mark.parametrize(
    "precision, tf32, expected",
    [("bf16", True, 989e12), ("fp16", True, 989e12), ("no", True, 494e12), ("no", False, 67e12)],
)
def test_peak_flops_is_the_precisions_own(monkeypatch, precision, tf32, expected):
    """An fp32 run's MFU is against the TF32 peak (cuDNN's default for convolutions) or
    plain fp32, never the bf16 peak."""
    monkeypatch.delenv("FASTDIFF_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    assert peak_flops(torch.device("cuda"), precision) == expected
