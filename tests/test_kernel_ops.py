"""Every custom op against torch.library.opcheck, NCHW and channels_last.

The fake implementation is what torch.compile plans with: Inductor asserts that the real
op's outputs have the fake's strides, and channels_last is the default on CUDA. So each
op's fake is checked against both of its real paths: the Triton kernels (here in the
interpreter, fp32, tiny shapes) and the torch reference that other devices run.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastdiff.kernels import use_triton
from fastdiff.kernels.groupnorm_silu import _gn_silu_bwd_op, _gn_silu_op
from fastdiff.kernels.weighted_mse import _weighted_mse_bwd_op, _weighted_mse_op

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _x(shape, layout):
    return torch.randn(shape).contiguous(memory_format=LAYOUTS[layout])


def cases(layout, device="cpu"):
    """(op, args) of every op on ``device``, with activations in ``layout``."""
    with torch.device(device):
        return _cases(layout)


def _cases(layout):
    B, C, H, W, G = 2, 6, 5, 3, 3
    x, w, b = _x((B, C, H, W), layout), torch.randn(C), torch.randn(C)
    _, mean, rstd = _gn_silu_op(x, w, b, G, 1e-5)
    # the model's prediction comes in its layout; the noise it is compared with is NCHW
    pred, target = _x((B, 3, 4, 5), layout), torch.randn(B, 3, 4, 5)
    t, table = torch.tensor([3, 900]), torch.linspace(0.1, 2.0, 1000)
    return {
        "group_norm_silu": (_gn_silu_op, (x, w, b, G, 1e-5)),
        "group_norm_silu_backward": (
            _gn_silu_bwd_op,
            (_x((B, C, H, W), layout), x, w, b, mean, rstd, G, 1e-5),
        ),
        "weighted_mse": (_weighted_mse_op, (pred, target, t, table)),
        "weighted_mse_backward": (
            _weighted_mse_bwd_op,
            (torch.randn(B), pred, target, t, table),
        ),
    }


# TRITON_INTERPRET at call time (fastdiff.kernels.use_triton): without a GPU "1" runs the
# kernels in the interpreter on host tensors; with one (conftest leaves the kernels
# compiled) they run on the device, and host tensors take the reference whatever is set.
PATHS = {"triton": "1", "reference": "0"}
# make gpu-check's GPU tests (-m gpu) include the compiled kernels' cases
PATH_PARAMS = [pytest.param("triton", marks=pytest.mark.gpu), "reference"]
CUDA = torch.cuda.is_available()
OPS = list(cases("nchw"))


def on_path(monkeypatch, path: str) -> str:
    """Make the ops take ``path``; the device to build their inputs on."""
    monkeypatch.setenv("TRITON_INTERPRET", "0" if CUDA else PATHS[path])
    device = "cuda" if CUDA and path == "triton" else "cpu"
    assert use_triton(torch.zeros(1, device=device)) == (path == "triton")
    return device


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_fake_strides_are_the_real_ones(monkeypatch, name, layout, path):
    op, args = cases(layout, on_path(monkeypatch, path))[name]
    real = _outputs(op(*args))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = _outputs(op(*(mode.from_tensor(a) if torch.is_tensor(a) else a for a in args)))
    for i, (r, f) in enumerate(zip(real, fake, strict=True)):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype), (
            f"{name} output {i} ({path}, {layout}): real {r.stride()}, fake {f.stride()}"
        )


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_opcheck(monkeypatch, name, layout, path):
    op, args = cases(layout, on_path(monkeypatch, path))[name]
    torch.library.opcheck(op, args)
