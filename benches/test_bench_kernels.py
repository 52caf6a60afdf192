"""Triton kernels vs eager PyTorch on unet_cifar32's shapes (GPU only).

GroupNorm+SiLU: fused forward+backward vs the model's torch path (GroupNorm in fp32,
then SiLU). Loss: fused weighted ε-MSE forward+backward vs the eager composition (gather
weight, mse, multiply). Inputs are laid out as training lays them out: channels_last
activations and predictions, NCHW noise. ``cases`` is shared with ``benches.gpu_check``.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from benches._setup import DEVICE, SMOKE, sync
from fastdiff.diffusion import Schedule

pytestmark = pytest.mark.skipif(
    DEVICE.type != "cuda" and not SMOKE,
    reason="the kernels' speed is only meaningful on a GPU (CPU runs the interpreter)",
)

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
IMPLS = ("triton", "eager")


def gn_shapes(smoke: bool) -> list[tuple[int, int]]:
    """(C, H) of unet_cifar32 (base 64) GroupNorm inputs: 64@32, 128@16, 128@8, 128@4."""
    return [(16, 8)] if smoke else [(64, 32), (128, 16), (128, 8), (128, 4)]


def batches(smoke: bool) -> list[int]:
    return [2] if smoke else [4, 128]


def gn_inputs(batch, C, H):
    """x as training feeds it (channels_last, the activation dtype: the kernel's strided
    loads are what is measured), with fp32 affine parameters as the model keeps them."""
    x = torch.randn(batch, C, H, H, device=DEVICE, dtype=DTYPE)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(C, device=DEVICE, requires_grad=True)
    b = torch.randn(C, device=DEVICE, requires_grad=True)
    return x, w, b


def eager_group_norm_silu(x, w, b, groups):
    """The model's torch path (fastdiff.tuning.GroupNorm32): GroupNorm in fp32, as CUDA's
    autocast runs it too; CUDA's group_norm refuses bf16 x with fp32 weights."""
    return F.silu(F.group_norm(x.float(), groups, w, b))


def gn_step(batch: int, C: int, H: int, impl: str, *, smoke: bool):
    """One forward + backward of GroupNorm+SiLU, synchronised: a callable to time."""
    from fastdiff.kernels import group_norm_silu

    x, w, b = gn_inputs(batch, C, H)
    groups = 8 if smoke else 32
    fn = group_norm_silu if impl == "triton" else eager_group_norm_silu
    dy = torch.randn_like(fn(x, w, b, groups))

    def run():
        fn(x, w, b, groups).backward(dy)
        sync()

    return run


def mse_step(batch: int, impl: str, *, smoke: bool):
    """One forward + backward of the Min-SNR weighted ε-MSE, synchronised."""
    from fastdiff.kernels import weighted_mse

    size = 8 if smoke else 32
    ac = Schedule.make("linear", 1000).alphas_cumprod.float().to(DEVICE)
    w_table = (torch.clamp(ac / (1 - ac), max=5.0) / (ac / (1 - ac))).to(DEVICE)
    pred = torch.randn(batch, 3, size, size, device=DEVICE, dtype=DTYPE)
    pred = pred.contiguous(memory_format=torch.channels_last).requires_grad_()
    target = torch.randn(batch, 3, size, size, device=DEVICE, dtype=DTYPE)
    t = torch.randint(0, 1000, (batch,), device=DEVICE)

    def eager():
        mse = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        return w_table[t] * mse

    fn = (lambda: weighted_mse(pred, target, t, w_table)) if impl == "triton" else eager

    def run():
        fn().sum().backward()
        sync()

    return run


def cases(smoke: bool) -> list[tuple[str, object]]:
    """(name, make the step) of every bench, in the order gpu_check times them: each
    shape's two implementations one after the other."""
    out = []
    for batch in batches(smoke):
        for (C, H), impl in itertools.product(gn_shapes(smoke), IMPLS):
            args = (batch, C, H, impl)
            name = f"group_norm_silu-b{batch}-c{C}-h{H}-{impl}"
            out.append((name, lambda a=args: gn_step(*a, smoke=smoke)))
        for impl in IMPLS:
            out.append(
                (f"weighted_mse-b{batch}-{impl}", lambda a=(batch, impl): mse_step(*a, smoke=smoke))
            )
    return out


@pytest.mark.parametrize("batch", batches(SMOKE))
@pytest.mark.parametrize("C, H", gn_shapes(SMOKE))
@pytest.mark.parametrize("impl", IMPLS)
def test_group_norm_silu_fwd_bwd(benchmark, batch, C, H, impl):
    run = gn_step(batch, C, H, impl, smoke=SMOKE)
    run()
    benchmark.extra_info.update(bytes=2 * batch * C * H * H * DTYPE.itemsize)
    benchmark.pedantic(run, rounds=1 if SMOKE else 20, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("batch", batches(SMOKE))
@pytest.mark.parametrize("impl", IMPLS)
def test_weighted_mse_fwd_bwd(benchmark, batch, impl):
    run = mse_step(batch, impl, smoke=SMOKE)
    run()
    benchmark.pedantic(run, rounds=1 if SMOKE else 50, iterations=1, warmup_rounds=0)
