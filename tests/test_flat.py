"""The flat parameter/gradient buffer and the EMA over it."""

import pytest
import torch
from torch import nn

from fastdiff.ema import EMA
from fastdiff.flat import ALIGN, Handover, backs, flatten_


def small(fmt=torch.contiguous_format):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.SiLU(), nn.Conv2d(5, 2, 1))
    return net.to(memory_format=fmt)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_flatten_keeps_values_and_strides_and_collects_gradients(fmt):
    net = small(fmt)
    before = {k: (v.clone(), v.stride()) for k, v in net.state_dict().items()}
    flat = flatten_(net)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k][0]) and v.stride() == before[k][1]
    assert backs(flat, net)
    # every view starts on an ALIGN boundary; the padding stays zero
    assert all(p.storage_offset() % ALIGN == 0 for p in net.parameters())
    assert flat.numel() == sum(-(-p.numel() // ALIGN) * ALIGN for p in net.parameters())

    x = torch.randn(2, 3, 6, 6)
    ref = small(fmt)
    ref(x).square().sum().backward()
    for _ in range(2):  # accumulates like autograd does, into the flat buffer
        net(x).square().sum().backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, 2 * q.grad)
    expected = torch.cat([q.grad.flatten() for q in ref.parameters()]).norm() * 2
    torch.testing.assert_close(flat.grad.norm(), expected)

    # the optimizer on the flat buffer moves the model's own parameters
    torch.optim.SGD([flat], lr=0.5).step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q - 0.5 * 2 * q.grad)


def test_fused_adam_on_the_flat_buffer_matches_per_tensor_adam():
    net, ref = small(torch.channels_last), small(torch.channels_last)
    flat = flatten_(net)
    opts = [
        torch.optim.Adam([flat], lr=1e-2, fused=True),
        torch.optim.Adam(ref.parameters(), lr=1e-2, foreach=False),
    ]
    for step in range(3):
        x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(step))
        for model, opt in zip((net, ref), opts):
            model(x).square().mean().backward()
            opt.step()
        flat.grad.zero_()
        ref.zero_grad()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_ema_over_the_flat_buffer_is_the_polyak_average():
    net = small()
    flat = flatten_(net)
    ema = EMA(net, 0.9, flat)
    start = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        flat.add_(1.0)  # θ = θ0 + 1 (padding included; it is never read)
    ema.update(net)
    for p_ema, p0 in zip(ema.model.parameters(), start):
        torch.testing.assert_close(p_ema, 0.9 * p0 + 0.1 * (p0 + 1))
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_flatten_refuses_mixed_dtypes_and_the_link_check_sees_a_copy():
    net = small()
    net[2].half()
    with pytest.raises(ValueError, match="one dtype and one device"):
        flatten_(net)
    net = small()
    flat = flatten_(net)
    net[0].weight.grad = None
    assert not backs(flat, net)
    net = small()
    flat = flatten_(net)
    net[0].weight.data = net[0].weight.data.clone()
    assert not backs(flat, net)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_handover_replaces_the_flat_gradient_without_zeroing_it(fmt):
    """After release, backward, collect: the flat buffer holds exactly this backward's
    gradient (whatever it held before), and every .grad is its view again."""
    net = nn.Sequential(small(fmt), nn.Conv2d(2, 2, 1))  # the last conv stays unused
    flat = flatten_(net)
    hand = Handover(flat, net)
    x = torch.randn(2, 3, 6, 6)
    ref = nn.Sequential(small(fmt), nn.Conv2d(2, 2, 1))
    ref.load_state_dict(net.state_dict())
    used = list(ref[0].parameters())
    expected = torch.autograd.grad(ref[0](x).square().sum(), used)

    for _ in range(2):  # twice: the second time the buffer holds the first gradient
        flat.grad.fill_(7.0)
        hand.release()
        net[0](x).square().sum().backward()
        hand.collect()
        assert backs(flat, net)
        for p, g in zip(net[0].parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad, g)
        assert all(torch.count_nonzero(p.grad) == 0 for p in net[1].parameters())
