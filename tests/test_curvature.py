"""Hutchinson trace against exact traces."""

import torch

from fastdiff.curvature import hutchinson_trace


def test_diagonal_hessian_is_exact_for_every_rademacher_probe():
    # L(x) = ½ Σ d_i x_i²: H = diag(d), and vᵀHv = Σ d_i v_i² = tr(H) for v ∈ {±1}ⁿ.
    d = torch.tensor([1.0, 2.0, -3.0, 10.0])

    def loss(p):
        return 0.5 * (d * p["x"] ** 2).sum()

    est = hutchinson_trace(loss, {"x": torch.randn(4)}, 7, torch.Generator().manual_seed(0))
    assert est.values.shape == (7,)
    torch.testing.assert_close(est.values, torch.full((7,), 10.0))
    assert est.std == 0.0


def test_small_network_trace_matches_the_exact_hessian():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in net.parameters()])

    def unflatten(flat):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = flat[i:i + s.numel()].view(s)
            i += s.numel()
        return out

    def loss(params):
        # (F.mse_loss has no forward-over-reverse rule in this torch: ZeroTensor error)
        return ((torch.func.functional_call(net, params, (x,)) - y) ** 2).mean()

    exact = torch.func.hessian(lambda f: loss(unflatten(f)))(flat0).trace()  # dense 21x21
    est = hutchinson_trace(loss, unflatten(flat0), 4000, torch.Generator().manual_seed(1),
                           chunk_size=1000)
    assert abs(est.mean - exact.item()) < 4 * est.stderr + 1e-6
    assert est.stderr < 0.2 * abs(exact.item())
