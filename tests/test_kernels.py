"""Every kernel, forward and backward, against its torch reference.

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set in conftest),
in float32 with tiny and odd shapes. bf16/fp16 and speed need a GPU: marked, skipped here.
"""

import os
import subprocess
import sys

import pytest
import torch

from fastdiff.diffusion import Schedule
from fastdiff.kernels import (
    group_norm_silu,
    group_norm_silu_reference,
    reference_only,
    use_triton,
    weighted_mse,
    weighted_mse_reference,
)
from fastdiff.kernels.groupnorm_silu import group_norm_silu_fwd_triton
from fastdiff.kernels.weighted_mse import weighted_mse_fwd_triton
from fastdiff.unet import build_model
from fastdiff.weighting import FAMILIES
from tests.conftest import table

# Per-dtype tolerances, in one place (fp32 on the interpreter; half types on a GPU).
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Where a test launches a kernel itself: the interpreter takes host tensors, the compiled
# kernels (conftest asks for them where there is a GPU) device ones.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check(actual, expected, dtype, what):
    torch.testing.assert_close(
        actual.float(), expected.float(), **TOL[dtype], msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the compiled kernels")
def test_the_interpreter_path_is_what_runs_here():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert use_triton(torch.zeros(1))


def test_a_gpu_machine_runs_the_compiled_kernels():
    """tests/conftest.py asks for the interpreter only where there is no CUDA device."""
    code = (
        "import os, torch; torch.cuda.is_available = lambda: True; "
        "import tests.conftest; print(os.environ.get('TRITON_INTERPRET'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["None"]


@GPU
@pytest.mark.gpu
def test_the_gpu_tests_run_compiled_kernels():
    from triton.runtime.interpreter import InterpretedFunction

    from fastdiff.kernels.groupnorm_silu import _fwd_apply_kernel

    assert os.environ.get("TRITON_INTERPRET") != "1"
    assert not isinstance(_fwd_apply_kernel, InterpretedFunction)


GN_SHAPES = [
    # (B, C, H, W, groups)
    (1, 4, 3, 5, 1),  # batch 1, one group
    (2, 6, 5, 3, 3),  # channels not a power of two
    (3, 32, 8, 8, 8),
    (2, 16, 33, 35, 4),  # H*W > the block: the kernel loops over the plane
]


@pytest.mark.parametrize("B, C, H, W, groups", GN_SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_group_norm_silu_forward_and_backward(B, C, H, W, groups, layout):
    dtype = torch.float32
    x = torch.randn(B, C, H, W) * 2 + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(C), torch.randn(C)
    leaves = [v.clone().requires_grad_(True) for v in (x, weight, bias)]
    ref_leaves = [v.clone().requires_grad_(True) for v in (x, weight, bias)]
    y = group_norm_silu(*leaves, groups)
    y_ref = group_norm_silu_reference(*ref_leaves, groups, 1e-5)
    check(y, y_ref, dtype, "forward")
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(y_ref)
    y.backward(dy)
    y_ref.backward(dy)
    for name, a, b in zip(("dx", "dweight", "dbias"), leaves, ref_leaves):
        check(a.grad, b.grad, dtype, name)


def test_group_norm_silu_stats_are_per_group():
    with torch.device(KERNEL_DEVICE):
        x = torch.zeros(1, 4, 2, 2)
        x[:, 2:] = 10.0  # group 1 is constant 10: normalised to 0, SiLU(β) out
        y, mean, rstd = group_norm_silu_fwd_triton(x, torch.ones(4), torch.zeros(4), 2, 1e-5)
    assert mean.tolist() == [[0.0, 10.0]]
    assert torch.all(y == 0)


def test_group_norm_silu_rejects_bad_groups():
    with pytest.raises(ValueError, match="divisible"):
        group_norm_silu(torch.zeros(1, 6, 2, 2), torch.ones(6), torch.zeros(6), 4)


MSE_SHAPES = [(1, 3, 4, 4), (5, 3, 7, 9), (2, 3, 32, 32)]  # the last spans several blocks


# Every family the registry has runs fused (the kernel reads its table): each on the
# smallest shape, and Min-SNR on every shape, schedule and layout
CASES = [(MSE_SHAPES[0], f, "cosine", "nchw") for f in sorted(FAMILIES)] + [
    (shape, "minsnr", schedule, layout)
    for shape in MSE_SHAPES
    for schedule in ("linear", "cosine")
    for layout in ("nchw", "channels_last")
]


@pytest.mark.parametrize("shape, weighting, schedule, layout", CASES)
def test_weighted_mse_forward_and_backward(shape, weighting, schedule, layout):
    prediction = "v" if weighting in ("maxsnr", "debiased") else "eps"
    w = table(Schedule.make(schedule, 1000), weighting, prediction=prediction, k=1.0).float()
    B = shape[0]
    t = torch.tensor([0, 999, 1, 500, 250][:B])  # both ends of the schedule: SNR huge / ~0
    pred, target = torch.randn(shape), torch.randn(shape)  # the noise stays NCHW in training
    if layout == "channels_last":
        pred = pred.contiguous(memory_format=torch.channels_last)
    p1, p2 = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    loss = weighted_mse(p1, target, t, w)
    ref = weighted_mse_reference(p2, target, t, w)
    assert loss.shape == (B,) and loss.dtype == torch.float32
    check(loss, ref, torch.float32, "loss")
    g = torch.randn(B)
    loss.backward(g)
    ref.backward(g)
    check(p1.grad, p2.grad, torch.float32, "grad")
    assert p1.grad.stride() == pred.stride()


def test_weighted_mse_value_computed_by_hand():
    # sample 0 at t=2 (w 0.25), mean 1² = 1; sample 1 at t=0 (w 3), mean 2² = 4
    with torch.device(KERNEL_DEVICE):
        w = torch.tensor([3.0, 7.0, 0.25])
        pred = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
        loss = weighted_mse_fwd_triton(pred, torch.zeros_like(pred), torch.tensor([2, 0]), w)
    assert loss.tolist() == pytest.approx([0.25, 12.0], rel=1e-6)


def test_weighted_mse_rejects_bad_arguments():
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="weight table"):
        weighted_mse(x, x, torch.tensor([0, 1]), torch.ones(2, 3))
    with pytest.raises(ValueError, match="weight table"):
        weighted_mse(x, x, torch.tensor([0]), torch.ones(4))


def _unet_grads(kernels):
    torch.manual_seed(0)
    model = build_model("unet_tiny", 8, 0.0, 8, kernels=kernels)  # the interpreter is slow
    for p in model.parameters():  # leave the zero-init so every block matters
        torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else None
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([3, 700])
    w = table(Schedule.make("linear", 1000), "minsnr").float()
    out = model(x, t)
    loss_fn = weighted_mse if kernels == "triton" else weighted_mse_reference
    loss_fn(
        out, torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), t, w
    ).sum().backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def test_unet_gradients_with_triton_kernels_match_torch():
    out_k, grads_k = _unet_grads("triton")
    out_t, grads_t = _unet_grads("torch")
    check(out_k, out_t, torch.float32, "unet output")
    for name in grads_t:
        torch.testing.assert_close(
            grads_k[name],
            grads_t[name],
            atol=1e-4,
            rtol=1e-3,
            msg=lambda m, n=name: f"grad of {n}: {m}",
        )


def test_reference_only_switches_modules_to_plain_torch(monkeypatch):
    import fastdiff.kernels.groupnorm_silu as gn

    calls = []
    real = gn.group_norm_silu_fwd_triton
    monkeypatch.setattr(gn, "group_norm_silu_fwd_triton", lambda *a: calls.append(1) or real(*a))
    model = build_model("unet_tiny", 16, 0.0, 8, kernels="triton")
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([5])
    model(x, t)
    n = len(calls)
    assert n > 0
    with reference_only():
        model(x, t)
    assert len(calls) == n


def test_compile_fullgraph_of_unet_and_loss_matches_eager():
    torch._dynamo.reset()
    model = build_model("unet_tiny", 8, 0.0, 8, kernels="triton")
    w = table(Schedule.make("cosine", 1000), "minsnr").float()
    x, noise = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    t = torch.tensor([10, 900])

    def step(x, t, noise):
        return weighted_mse(model(x, t), noise, t, w)

    eager = step(x, t, noise)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, t, noise)
    check(compiled, eager, torch.float32, "compiled loss")


@GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_in_half_precision_on_gpu(dtype):
    x = torch.randn(4, 128, 16, 16, device="cuda", dtype=dtype)
    w = torch.randn(128, device="cuda")
    b = torch.randn(128, device="cuda")
    check(
        group_norm_silu(x, w, b, 32),
        group_norm_silu_reference(x.float(), w, b, 32, 1e-5),
        dtype,
        "gn forward",
    )
    w = table(Schedule.make("linear", 1000), "minsnr").float().cuda()
    t = torch.randint(0, 1000, (4,), device="cuda")
    pred, target = (
        torch.randn(4, 3, 32, 32, device="cuda", dtype=dtype),
        torch.randn(4, 3, 32, 32, device="cuda", dtype=dtype),
    )
    check(
        weighted_mse(pred, target, t, w),
        weighted_mse_reference(pred.float(), target.float(), t, w),
        dtype,
        "loss",
    )


@pytest.mark.parametrize("variant", ["model.kernels=triton", "train.compile=true"])
def test_training_step_agrees_with_the_eager_torch_path(tmp_path, variant):
    """Fused kernels (interpreter) and the compiled step (aot_eager backend here: inductor's
    C++ build takes minutes on CPU) give the eager torch path's losses."""
    from fastdiff.config import compose, to_config
    from fastdiff.trainer import Trainer
    from tests.conftest import tiny

    def losses(*extra):
        torch._dynamo.reset()
        cfg = to_config(
            compose(
                tiny(
                    tmp_path,
                    "loss=minsnr",
                    "train.compile_backend=aot_eager",
                    "train.batch_size=1",  # the interpreter runs a program per (sample, channel)
                    "model.base_channels=8",
                    *extra,
                )
            )
        )
        trainer = Trainer(cfg)  # two steps: the second sees the first one's update
        return torch.stack([trainer.train_step(s).loss for s in range(2)])

    check(losses(variant), losses(), torch.float32, variant)


def test_cpu_reference_path_of_the_op_has_correct_gradients(monkeypatch):
    """Without the interpreter, CPU tensors take the ops' torch reference (forward and
    backward): it must match plain autograd too."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not use_triton(torch.zeros(1))
    x = torch.randn(2, 6, 5, 3).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(6), torch.randn(6)
    leaves = [v.clone().requires_grad_(True) for v in (x, w, b)]
    ref = [v.clone().requires_grad_(True) for v in (x, w, b)]
    dy = torch.randn(2, 6, 5, 3)
    group_norm_silu(*leaves, 3).backward(dy)
    group_norm_silu_reference(*ref, 3, 1e-5).backward(dy)
    for name, a, r in zip(("dx", "dweight", "dbias"), leaves, ref):
        check(a.grad, r.grad, torch.float32, name)
