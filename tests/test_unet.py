import itertools

import pytest
import torch
import torch.nn.functional as F

from fastdiff.unet import (
    MODELS,
    Attention,
    Dropout,
    GroupNorm32,
    GroupNormSiLU,
    ResBlock,
    build_model,
    timestep_embedding,
)


def test_unet_cifar32_matches_the_ddpm_parameter_count():
    # Ho et al. 2020 report 35.7M parameters for the CIFAR-10 model (128 channels).
    model = build_model("unet_cifar32", 128, 0.1, 32)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(35.7e6, rel=0.005)


def test_unet_cifar32_layout():
    spec = MODELS["unet_cifar32"]
    assert spec.ch_mult == (1, 2, 2, 2) and spec.num_res_blocks == 2
    assert spec.attn_resolutions == (16,)


@pytest.mark.parametrize("name, ch, size", [("unet_tiny", 16, 8), ("unet_tiny", 16, 16)])
def test_output_shape_and_identity_init(name, ch, size):
    model = build_model(name, ch, 0.1, size)
    x = torch.randn(3, 3, size, size)
    out = model(x, torch.tensor([0, 10, 999]))
    assert out.shape == x.shape
    # The output conv starts at zero, so the initial ε prediction is exactly 0.
    assert torch.count_nonzero(out) == 0


def test_time_conditioning_reaches_the_output():
    model = build_model("unet_tiny", 16, 0.0, 8)
    torch.nn.init.normal_(model.out[1].weight, std=0.1)
    for block in model.modules():
        if hasattr(block, "conv2"):
            torch.nn.init.normal_(block.conv2.weight, std=0.1)
    x = torch.randn(1, 3, 8, 8).expand(2, -1, -1, -1)
    out = model(x, torch.tensor([1, 900]))
    assert not torch.allclose(out[0], out[1])


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 3]), 4)
    # freqs = [1, 1e-2] for dim 4 -> [sin(t), sin(t/100), cos(t), cos(t/100)]
    import math

    expected = torch.tensor(
        [[0, 0, 1, 1], [math.sin(3), math.sin(0.03), math.cos(3), math.cos(0.03)]]
    )
    torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-6)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("unet_big", 64, 0.1, 32)
    with pytest.raises(ValueError, match="multiple"):
        build_model("unet_cifar32", 48, 0.1, 32)
    with pytest.raises(ValueError, match="divisible"):
        build_model("unet_cifar32", 64, 0.1, 12)


def _randomised(model):
    """Non-zero residual branches, so every layer shapes the output."""
    torch.manual_seed(1)
    for p in model.parameters():
        if p.dim() > 1 and torch.count_nonzero(p) == 0:
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_channels_last_model_matches_the_contiguous_one():
    model = _randomised(build_model("unet_tiny", 16, 0.0, 8))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    ref = model(x, t)
    cl = model.to(memory_format=torch.channels_last)
    assert cl.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl(x, t), ref, atol=1e-5, rtol=1e-4)


def test_attention_is_softmax_qk_times_v():
    """Single-head attention against a direct einsum over the H·W tokens."""
    attn = Attention(8, 4)
    torch.nn.init.normal_(attn.proj.weight, std=0.2)
    x = torch.randn(2, 8, 4, 4)
    qkv = attn.qkv(attn.norm(x)).flatten(2)  # (B, 3C, HW)
    q, k, v = qkv[:, :8], qkv[:, 8:16], qkv[:, 16:]
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 8**0.5, dim=-1)
    h = torch.einsum("bij,bcj->bci", weights, v).reshape(2, 8, 4, 4)
    expected = x + attn.proj(h)
    for fmt in (torch.contiguous_format, torch.channels_last):
        out = attn.to(memory_format=fmt)(x.contiguous(memory_format=fmt))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_cpu_dropout_rate_scale_and_gradient(fmt):
    p = 0.1
    x = torch.rand(4, 16, 32, 32).add(1).contiguous(memory_format=fmt).requires_grad_()
    torch.manual_seed(0)
    y = Dropout(p).train()(x)
    kept = y != 0
    n = x.numel()
    # Binomial(n, 0.9): the kept fraction lies within 5 standard deviations of 0.9
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    keep = 1 - round(p * 2**16) / 2**16  # p rounded to 16 bits; the scale is exactly 1/keep
    torch.testing.assert_close(y[kept], x[kept] / keep)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / keep)
    assert y.is_contiguous(memory_format=fmt)
    # neighbouring elements are independent: no 4-periodic pattern from the 16-bit split
    flat = kept.flatten().float().view(-1, 4).mean(0)
    assert (flat - (1 - p)).abs().max() < 5 * (p * (1 - p) / (n / 4)) ** 0.5


def test_cpu_dropout_follows_the_seed_and_is_off_in_eval():
    x = torch.ones(2, 8, 4, 4)
    drop = Dropout(0.3).train()
    torch.manual_seed(5)
    a = drop(x)
    torch.manual_seed(5)
    assert torch.equal(drop(x), a)
    assert not torch.equal(drop(x), a)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


@pytest.mark.parametrize("cls", [GroupNorm32, GroupNormSiLU])
def test_group_norm_runs_in_fp32_under_cpu_autocast(cls):
    """Under bf16 autocast a bf16 activation (a conv's output) is normalised with fp32
    statistics and comes out fp32: checked against float64 arithmetic done here."""
    norm = cls(4, 16)
    torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    torch.nn.init.normal_(norm.bias, 0.0, 0.3)
    x = (torch.randn(2, 16, 8, 8) * 3 + 5).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    xg = x.double().reshape(2, 4, -1)
    xhat = (xg - xg.mean(-1, keepdim=True)) / (
        xg.var(-1, unbiased=False, keepdim=True) + norm.eps
    ).sqrt()
    expected = (
        xhat.reshape(2, 16, 8, 8) * norm.weight.double()[:, None, None]
        + norm.bias.double()[:, None, None]
    )
    if cls is GroupNormSiLU:
        expected = expected * torch.sigmoid(expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.float32
    # bf16 statistics would be off by ~1e-2 here (mean 5, values rounded to 8 bits)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


def test_stacked_time_projections_equal_each_blocks_own():
    """The UNet applies all ResBlocks' time projections as one product; each block must
    get its own rows: projecting for each block separately, with its slice of the
    stacked weights, agrees."""
    model = _randomised(build_model("unet_tiny", 16, 0.0, 8))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    stacked = model(x, t)
    w, b = model.temb_proj.weight, model.temb_proj.bias
    edges = [0, *itertools.accumulate(model.temb_sizes)]
    model.temb_proj.forward = lambda temb: torch.cat(
        [F.linear(temb, w[lo:hi], b[lo:hi]) for lo, hi in itertools.pairwise(edges)], 1
    )
    torch.testing.assert_close(stacked, model(x, t), atol=1e-6, rtol=1e-5)


def test_weights_saved_with_per_block_projections_load():
    """A state dict from when each ResBlock held its own temb_proj loads into the
    stacked projection, block rows in forward order: the same outputs."""
    model = _randomised(build_model("unet_tiny", 16, 0.0, 8))
    state = model.state_dict()
    stacked_w, stacked_b = state.pop("temb_proj.weight"), state.pop("temb_proj.bias")
    blocks = [n for n, m in model.named_modules() if isinstance(m, ResBlock)]
    lo = 0
    for name, size in zip(blocks, model.temb_sizes, strict=True):
        state[f"{name}.temb_proj.weight"] = stacked_w[lo : lo + size].clone()
        state[f"{name}.temb_proj.bias"] = stacked_b[lo : lo + size].clone()
        lo += size
    fresh = build_model("unet_tiny", 16, 0.0, 8)
    fresh.load_state_dict(state)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    torch.testing.assert_close(fresh(x, t), model(x, t))
