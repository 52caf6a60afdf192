"""Triton kernels vs eager PyTorch on unet_cifar32's shapes (GPU only).

GroupNorm+SiLU: fused forward+backward vs F.group_norm + F.silu. Loss: fused weighted
ε-MSE forward+backward vs the eager composition (gather weight, mse, multiply).
"""

import pytest
import torch
import torch.nn.functional as F

from benches._setup import DEVICE, SMOKE, sync
from fastdiff.diffusion import Schedule

pytestmark = pytest.mark.skipif(
    DEVICE.type != "cuda" and not SMOKE,
    reason="the kernels' speed is only meaningful on a GPU (CPU runs the interpreter)",
)

# (C, H) of unet_cifar32 (base 64) GroupNorm inputs: 64@32, 128@16, 128@8, 128@4
SHAPES = [(16, 8)] if SMOKE else [(64, 32), (128, 16), (128, 8), (128, 4)]
BATCHES = [2] if SMOKE else [4, 128]
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def _gn_inputs(batch, C, H):
    x = torch.randn(batch, C, H, H, device=DEVICE, dtype=DTYPE, requires_grad=True)
    w = torch.randn(C, device=DEVICE, requires_grad=True)
    b = torch.randn(C, device=DEVICE, requires_grad=True)
    return x, w, b


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("C, H", SHAPES)
@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_group_norm_silu_fwd_bwd(benchmark, batch, C, H, impl):
    from fastdiff.kernels import group_norm_silu

    x, w, b = _gn_inputs(batch, C, H)
    groups = 8 if SMOKE else 32
    fn = (
        (lambda: group_norm_silu(x, w, b, groups))
        if impl == "triton"
        else (lambda: F.silu(F.group_norm(x, groups, w, b)))
    )
    dy = torch.randn_like(x)

    def run():
        fn().backward(dy)
        sync()

    run()
    benchmark.extra_info.update(bytes=2 * x.numel() * x.element_size())
    benchmark.pedantic(run, rounds=1 if SMOKE else 20, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_weighted_mse_fwd_bwd(benchmark, batch, impl):
    from fastdiff.kernels import weighted_mse

    size = 8 if SMOKE else 32
    ac = Schedule.make("linear", 1000).alphas_cumprod.float().to(DEVICE)
    w_table = (torch.clamp(ac / (1 - ac), max=5.0) / (ac / (1 - ac))).to(DEVICE)
    pred = torch.randn(batch, 3, size, size, device=DEVICE, dtype=DTYPE, requires_grad=True)
    target = torch.randn_like(pred)
    t = torch.randint(0, 1000, (batch,), device=DEVICE)

    def eager():
        mse = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        return w_table[t] * mse

    fn = (lambda: weighted_mse(pred, target, t, ac)) if impl == "triton" else eager

    def run():
        fn().sum().backward()
        sync()

    run()
    benchmark.pedantic(run, rounds=1 if SMOKE else 50, iterations=1, warmup_rounds=0)
