import pytest
import torch

from fastdiff.unet import MODELS, build_model, timestep_embedding


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
