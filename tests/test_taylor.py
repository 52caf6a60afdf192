"""Second-order Taylor mode against autograd: every rule, then vᵀHv of the whole UNet."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastdiff.curvature import CurvatureProbe
from fastdiff.flat import flatten_
from fastdiff.objective import Objective
from fastdiff.taylor import (
    Jet,
    conv2d,
    group_norm,
    linear_layer,
    probe_conv,
    silu,
    softmax,
    unet_jet,
    vhv_taylor,
)
from fastdiff.unet import build_model

D = {"dtype": torch.float64}  # the rules are exact: compare in float64 to 1e-9


K = 2  # probes, for the tests that batch them


def series(f, *jets):
    """(y₀, y₁, y₂) of y(ε) = f(x(ε)) for x(ε) = c0 + ε c1 + ε² c2, by nested jvp in ε."""

    def y(eps):
        return f(*(j.c0 + eps * j.c1 + eps**2 * j.c2 for j in jets))

    def dy(eps):
        return jvp(y, (eps,), (torch.ones((), **D),))[1]

    zero = torch.zeros((), **D)
    return f(*(j.c0 for j in jets)), dy(zero), jvp(dy, (zero,), (torch.ones((), **D),))[1] / 2


def rand_jet(*shape, moving=True):
    """A random jet; a parameter (moving linearly, θ + εv) has c2 = 0."""
    c2 = torch.randn(shape, **D) if moving else torch.zeros(shape, **D)
    return Jet(torch.randn(shape, **D), torch.randn(shape, **D), c2)


def check(got: Jet, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_silu_and_softmax_rules():
    torch.manual_seed(0)
    x = rand_jet(3, 7)
    check(silu(x), series(F.silu, x))
    check(softmax(x), series(lambda a: torch.softmax(a, -1), x))


def test_group_norm_rule_with_moving_scale_and_shift():
    torch.manual_seed(1)
    x, g, b = rand_jet(2, 6, 3, 3), rand_jet(6, moving=False), rand_jet(6, moving=False)
    check(
        group_norm(x, Jet(g.c0, g.c1), Jet(b.c0, b.c1), groups=3, eps=1e-5),
        series(lambda a, w, c: F.group_norm(a, 3, w, c, 1e-5), x, g, b),
    )


def test_conv_and_linear_rules():
    torch.manual_seed(2)
    x, w, b = rand_jet(2, 3, 5, 5), rand_jet(4, 3, 3, 3, moving=False), rand_jet(4, moving=False)
    want = series(lambda a, k, c: F.conv2d(a, k, c, 2, 1), x, w, b)
    check(conv2d(x, Jet(w.c0, w.c1), Jet(b.c0, b.c1), stride=2, padding=1), want)
    x, w, b = rand_jet(5, 3), rand_jet(4, 3, moving=False), rand_jet(4, moving=False)
    check(linear_layer(x, Jet(w.c0, w.c1), Jet(b.c0, b.c1)), series(F.linear, x, w, b))


@pytest.mark.parametrize("x_varies", [True, False])
def test_probe_conv_batches_per_probe_into_a_foldable_layout(x_varies):
    """Under vmap, probe k's input meets probe k's weights, and the result folds into the
    batch as a channels_last view (the layout the next convolution wants)."""
    torch.manual_seed(6)
    x = torch.randn(3, 2, 4, 5, 5, **D) if x_varies else torch.randn(2, 4, 5, 5, **D)
    w = torch.randn(3, 6, 4, 3, 3, **D)
    out = vmap(lambda a, k: probe_conv(a, k, [1, 1], [1, 1]), in_dims=(0 if x_varies else None, 0))(
        x, w
    )
    for k in range(3):
        want = F.conv2d(x[k] if x_varies else x, w[k], None, 1, 1)
        torch.testing.assert_close(out[k], want, rtol=1e-12, atol=1e-12)
    assert out.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    assert out.flatten(0, 1).data_ptr() == out.data_ptr()


def test_rules_batched_with_vmap_equal_probe_by_probe():
    """The batching of every rule (cat, convolutions, GroupNorm, attention's matmuls):
    one probe at a time vs K under vmap, through the tiny UNet."""
    model = _model()
    params = {k: p.detach() for k, p in model.named_parameters()}
    g = torch.Generator().manual_seed(7)
    vs = {k: torch.randn(K, *p.shape, generator=g, **D) for k, p in params.items()}
    x, t = torch.randn(2, 3, 8, 8, generator=g, **D), torch.tensor([3, 900])

    def out(v):
        return tuple(unet_jet(model, {k: Jet(p, v[k]) for k, p in params.items()}, x, t))

    batched = vmap(out)(vs)
    for i in range(K):
        for got, want in zip(batched, out({k: v[i] for k, v in vs.items()}), strict=True):
            torch.testing.assert_close(got if got.dim() == want.dim() else got[i], want)


def _model():
    torch.manual_seed(3)
    model = build_model("unet_tiny", 16, 0.1, 8).eval().double()
    for p in model.parameters():  # the zero-initialised output convs would hide terms
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("channels_last", [False, True])
def test_unet_vhv_equals_double_backward(channels_last):
    model = _model()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(4)
    x_t = torch.randn(3, 3, 8, 8, generator=g, **D)
    noise = torch.randn(3, 3, 8, 8, generator=g, **D)
    t, weight = torch.tensor([5, 500, 990]), torch.tensor([1.0, 0.5, 2.0], **D)
    params = dict(model.named_parameters())
    vs = {
        k: torch.randint(0, 2, (K, *p.shape), generator=g).double() * 2 - 1
        for k, p in params.items()
    }

    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
        loss = (weight * (model(x_t, t) - noise).square().flatten(1).mean(1)).mean()
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    expected = []
    for i in range(K):  # explicit double backward, probe by probe
        dot = sum((gr * vs[k][i]).sum() for gr, k in zip(grads, params))
        hv = torch.autograd.grad(dot, list(params.values()), retain_graph=True)
        expected.append(sum((h * vs[k][i]).sum() for h, k in zip(hv, params)))

    detached = {k: p.detach() for k, p in params.items()}
    got = vmap(lambda v: vhv_taylor(model, detached, v, x_t, t=t, target=noise, weight=weight))(vs)
    torch.testing.assert_close(got, torch.stack(expected).detach(), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_probe_uses_taylor_for_the_unet_and_agrees_with_jvp(prediction):
    """On the model as the trainer holds it: channels_last, parameters in a flat buffer;
    per sample, for every prediction target (the residual is out − target either way)."""
    model = _model().float().to(memory_format=torch.channels_last)
    flatten_(model)
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.randn(2, 3, 8, 8, generator=g)
    ac = torch.linspace(0.999, 0.01, 1000)
    args = (x0, torch.tensor([10, 700]), noise)
    objective = Objective(ac, torch.rand(1000) + 0.5, prediction=prediction)
    kw = {"objective": objective, "probes": 6 if prediction == "eps" else 2, "seed": 0}
    taylor = CurvatureProbe(*args, **kw, method="auto")
    jvp_ = CurvatureProbe(*args, **kw, method="jvp")
    assert taylor._taylor(model) and not jvp_._taylor(model)
    assert torch.equal(taylor.target, objective.target(x0, noise, torch.tensor([10, 700])))
    a, b = taylor.trace(model), jvp_.trace(model)
    torch.testing.assert_close(a.values, b.values, rtol=1e-3, atol=1e-3)
    per_a, per_b = taylor.per_sample(model), jvp_.per_sample(model)
    torch.testing.assert_close(per_a, per_b, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="curvature.method=jvp"):
        CurvatureProbe(*args, **kw, method="taylor").trace(torch.nn.Linear(2, 2))
