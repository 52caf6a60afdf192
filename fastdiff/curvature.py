"""Hutchinson estimate of the trace of the loss Hessian w.r.t. the parameters.

tr(H) = E_v[vᵀ H v] for Rademacher v (Hutchinson 1989; PyHessian, Yao et al. 2020).
Each Hessian-vector product is forward-over-reverse, Hv = jvp(∇L, θ; v), and the
K probes run at once under ``torch.func.vmap`` (``chunk_size`` bounds memory).

The measured function is fixed per run: the run's weighted training loss on a
probe batch (x0, t, noise) drawn once from the run's seed, dropout off, fp32.
Two runs with the same seed therefore probe the same batch at every step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastdiff.diffusion import eps_mse, q_sample


@dataclass
class TraceEstimate:
    values: torch.Tensor  # (K,) vᵀHv per probe
    mean: float
    std: float
    stderr: float


def hutchinson_trace(loss_fn, params: dict[str, torch.Tensor], probes: int,
                     generator: torch.Generator, chunk_size: int | None = None) -> TraceEstimate:
    """vᵀHv for ``probes`` Rademacher vectors v, batched with vmap.

    ``loss_fn(params) -> scalar``; ``params`` a dict of tensors (not modified).
    """
    params = {k: p.detach() for k, p in params.items()}
    grad_fn = grad(loss_fn)

    def vhv(v: dict[str, torch.Tensor]) -> torch.Tensor:
        hv = jvp(grad_fn, (params,), (v,))[1]
        return sum((v[k] * hv[k]).sum() for k in v)

    vs = {k: (torch.randint(0, 2, (probes, *p.shape), generator=generator,
                            device=generator.device).to(p) * 2 - 1)
          for k, p in params.items()}
    values = vmap(vhv, chunk_size=chunk_size)(vs).detach()
    std = values.std().item() if probes > 1 else 0.0
    return TraceEstimate(values, values.mean().item(), std, std / probes**0.5)


class CurvatureProbe:
    """The run's fixed probe: weighted ε-MSE on one batch, evaluated on the live model."""

    def __init__(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                 alphas_cumprod: torch.Tensor, weights: torch.Tensor, probes: int,
                 seed_generator: torch.Generator, chunk_size: int | None = None):
        self.x_t = q_sample(x0, t, noise, alphas_cumprod)
        self.t, self.noise = t, noise
        self.weight = weights.to(x0.device)[t].float()
        self.probes, self.chunk_size = probes, chunk_size
        self.generator = seed_generator
        self._gen_state = seed_generator.get_state()

    def __call__(self, model: torch.nn.Module, unweighted: bool = False) -> dict[str, float]:
        was_training = model.training
        model.eval()  # dropout off: the probe measures a deterministic function
        weight = torch.ones_like(self.weight) if unweighted else self.weight

        def loss_fn(params):
            eps = functional_call(model, params, (self.x_t, self.t))
            return eps_mse(eps, self.noise, weight).mean()

        # Same probe vectors every time: curvature differences come from the weights only.
        self.generator.set_state(self._gen_state)
        start = time.perf_counter()
        try:
            with sdpa_kernel(SDPBackend.MATH), torch.autocast(self.x_t.device.type,
                                                               enabled=False):
                est = hutchinson_trace(loss_fn, dict(model.named_parameters()), self.probes,
                                       self.generator, self.chunk_size)
        finally:
            model.train(was_training)
        prefix = "curvature/hutch_unweighted_" if unweighted else "curvature/hutch_"
        return {f"{prefix}trace_mean": est.mean, f"{prefix}trace_std": est.std,
                f"{prefix}trace_stderr": est.stderr,
                f"{prefix}seconds": time.perf_counter() - start}
