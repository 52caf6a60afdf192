"""Hutchinson estimate of the trace of the loss Hessian w.r.t. the parameters.

tr(H) = E_v[vᵀ H v] for Rademacher v (Hutchinson 1989; PyHessian, Yao et al. 2020).
The K probes run at once under ``torch.func.vmap``, ``chunk_size`` at a time to bound
memory. For fastdiff's UNet, vᵀHv comes from second-order Taylor mode
(:mod:`fastdiff.taylor`, no backward pass); for any other model (or
``curvature.method=jvp``) from forward-over-reverse, Hv = jvp(∇L, θ; v).

The measured function is fixed per run: the run's weighted training loss on a
probe batch (x0, t, noise) drawn once from the run's seed, dropout off, fp32.
Two runs with the same seed therefore probe the same batch at every step.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastdiff.diffusion import t_bin_edges, t_bin_names
from fastdiff.kernels import reference_only
from fastdiff.objective import Objective
from fastdiff.seeding import stream_generator
from fastdiff.taylor import vhv_taylor, vhv_taylor_per_sample
from fastdiff.unet import UNet

log = logging.getLogger("fastdiff")


@dataclass
class TraceEstimate:
    values: torch.Tensor  # (K,) vᵀHv per probe
    mean: float
    std: float
    stderr: float


def hutchinson_trace(
    loss_fn,
    params: dict[str, torch.Tensor],
    probes: int,
    generator: torch.Generator,
    *,
    chunk_size: int | None = None,
    vhv_fn=None,
) -> TraceEstimate:
    """vᵀHv for ``probes`` Rademacher vectors v, batched with vmap.

    ``loss_fn(params) -> scalar``; ``params`` a dict of tensors (not modified). By
    default vᵀHv is forward-over-reverse (``jvp`` of ``grad``); ``vhv_fn(params, v) ->
    scalar`` replaces it for one probe (e.g. :func:`fastdiff.taylor.vhv_taylor`: same
    values, no backward pass).
    """
    params = {k: p.detach() for k, p in params.items()}
    one = _jvp_of_grad(loss_fn, params) if vhv_fn is None else partial(vhv_fn, params)
    batched = vmap(one)

    chunk = chunk_size or probes
    values = []
    for start in range(0, probes, chunk):  # the vectors of one chunk at a time
        n = min(chunk, probes - start)
        vs = {k: _stacked(p, n) for k, p in params.items()}
        for i in range(n):  # drawn probe by probe: the vectors do not depend on the chunking
            for k in params:
                _signs_(vs[k][i], generator)
        values.append(batched(vs).detach())
        del vs
    values = torch.cat(values)
    std = values.std().item() if probes > 1 else 0.0
    return TraceEstimate(values, values.mean().item(), std, std / probes**0.5)


def _jvp_of_grad(loss_fn, params: dict[str, torch.Tensor]):
    """v -> vᵀHv, forward-over-reverse."""
    # Copies: views into a flat parameter buffer (fastdiff.flat) make functorch build
    # base-sized gradients per view (24 GB for the UNet); 36 MB of copies avoid that.
    params = {k: p.clone() for k, p in params.items()}
    grad_fn = grad(loss_fn)

    def vhv(v: dict[str, torch.Tensor]) -> torch.Tensor:
        hv = jvp(grad_fn, (params,), (v,))[1]
        return sum((v[k] * hv[k]).sum() for k in v)

    return vhv


_BITS = {}


def rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """±1 with probability ½ each, shaped like ``like``."""
    return _signs_(torch.empty_like(like), generator)


def _signs_(out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill ``out`` with Rademacher signs, 64 per random int64 word: one random bit per
    sign, an order of magnitude faster for the UNet's 9M signs than ``randint(0, 2)``
    then ``* 2 - 1`` (docs/performance.md#measurements-behind-choices-in-the-code)."""
    n, device = out.numel(), generator.device
    if device not in _BITS:
        _BITS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    words = torch.randint(
        -(2**63), 2**63 - 1, (-(-n // 64),), generator=generator, dtype=torch.int64, device=device
    )
    bits = (words.view(torch.uint8)[:, None] >> _BITS[device]) & 1
    return out.copy_(bits.view(-1)[:n].view(out.shape)).mul_(2).sub_(1)


def _stacked(p: torch.Tensor, n: int) -> torch.Tensor:
    """An empty (n, *p.shape) buffer; each p-shaped slice has p's memory format."""
    cl = (
        p.dim() == 4
        and not p.is_contiguous()
        and p.is_contiguous(memory_format=torch.channels_last)
    )
    fmt = torch.channels_last if cl else torch.contiguous_format
    out = torch.empty(
        n * p.shape[0], *p.shape[1:], dtype=p.dtype, device=p.device, memory_format=fmt
    )
    return out.unflatten(0, (n, p.shape[0]))


def probe_batch(images: torch.Tensor, n: int, T: int, seed: int):
    """The run's fixed probe batch (x0, t, noise), drawn once from the run's seed.

    The timesteps are stratified: one in each of n equal-width strata of [0, T), so a
    small batch still covers the whole SNR range. Depends only on (images, n, T, seed),
    never on the weighting, so the paired runs of a card probe the same batch.
    ``images``: uint8 (N, C, H, W).
    """
    if not 1 <= n <= images.shape[0]:
        raise ValueError(f"a probe batch takes 1 to {images.shape[0]} images (the pool), not {n}")
    g = stream_generator(seed, "probe")
    idx = torch.randperm(images.shape[0], generator=g)[:n]
    x0 = images[idx].float() / 127.5 - 1
    edges = torch.tensor(t_bin_edges(T, n))
    lo, width = edges[:-1], torch.diff(edges)
    t = lo + (torch.rand(n, generator=g, dtype=torch.float64) * width).long().clamp(max=width - 1)
    noise = torch.randn(x0.shape, generator=g)
    return x0, t, noise


class CurvatureProbe:
    """The run's fixed probe: its training loss on one batch, evaluated on the live model.

    The probe vectors are redrawn from the same generator state at every call, so
    successive measurements differ only through the weights. Dropout is off (eval
    mode), autocast off (fp32) and attention uses the math backend, which has the
    forward-over-reverse derivatives that the fused SDPA kernels lack.
    """

    def __init__(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        *,
        objective: Objective,
        probes: int,
        seed: int,
        chunk_size: int | None = None,
        method: str = "auto",
    ):
        self.x_t = objective.noised(x0, t, noise)
        self.t, self.target = t, objective.target(x0, noise, t)
        self.weight = objective.weight(t).float()
        # the "unweighted" trace is the ε-MSE's whatever the prediction, as
        # train/mse_unweighted is
        self.eps_factor = objective.eps_per_target[t]
        self.probes, self.seed, self.method = probes, seed, method
        self._chunk_size = chunk_size

    def _taylor(self, model: torch.nn.Module) -> bool:
        if self.method == "taylor" and not isinstance(model, UNet):
            raise ValueError(
                f"curvature.method=taylor needs fastdiff's UNet, got {type(model).__name__}: "
                "use curvature.method=jvp"
            )
        return self.method == "taylor" or (self.method == "auto" and isinstance(model, UNet))

    def chunk_size(self, taylor: bool) -> int | None:
        if self._chunk_size or self.x_t.device.type != "cpu":
            return self._chunk_size
        return 8 if taylor else 4

    def _hutchinson(self, model, *, taylor: bool, loss_fn=None, vhv_fn=None) -> torch.Tensor:
        """The probe values of ``vhv_fn`` (Taylor) or of ``loss_fn``'s jvp(grad)."""
        generator = stream_generator(self.seed, "probe-vectors", device=self.x_t.device)
        return hutchinson_trace(
            loss_fn,
            dict(model.named_parameters()),
            self.probes,
            generator,
            chunk_size=self.chunk_size(taylor),
            vhv_fn=vhv_fn,
        ).values

    @contextmanager
    def _exact(self, model):
        """fp32, dropout off, math attention, reference kernels (no jvp rules in Triton)."""
        was_training = model.training
        model.eval()
        try:
            with (
                sdpa_kernel(SDPBackend.MATH),
                torch.autocast(self.x_t.device.type, enabled=False),
                reference_only(),
            ):
                yield
        finally:
            model.train(was_training)

    def per_sample(self, model: torch.nn.Module) -> torch.Tensor:
        """(K, B): vₖᵀH_b vₖ of each sample's unweighted loss, for the K probe vectors.
        Taylor mode gets all B from one pass; the jvp path pays one pass per sample."""
        with self._exact(model):
            if self._taylor(model):
                fn = partial(
                    vhv_taylor_per_sample, model, x_t=self.x_t, t=self.t, target=self.target
                )
                return self._hutchinson(model, taylor=True, vhv_fn=fn)
            one = torch.ones(1, device=self.x_t.device)
            columns = []
            for b in range(len(self.t)):
                rows = slice(b, b + 1)

                def loss_fn(params, rows=rows):
                    f = partial(functional_call, model, params)
                    x_t, t, y = self.x_t[rows], self.t[rows], self.target[rows]
                    return Objective.of_noised(lambda *a: f(a), x_t, t, y, weight=one).mean()

                columns.append(self._hutchinson(model, taylor=False, loss_fn=loss_fn))
            return torch.stack(columns, 1)

    def trace(self, model: torch.nn.Module, unweighted: bool = False) -> TraceEstimate:
        """The trace of the (weighted, or with ``unweighted`` the plain ε-MSE's) batch loss."""
        weight = self.eps_factor if unweighted else self.weight
        with self._exact(model):
            if self._taylor(model):
                fn = partial(
                    vhv_taylor, model, x_t=self.x_t, t=self.t, target=self.target, weight=weight
                )
                values = self._hutchinson(model, taylor=True, vhv_fn=fn)
            else:

                def loss_fn(params):
                    f = partial(functional_call, model, params)
                    x_t, t, y = self.x_t, self.t, self.target
                    return Objective.of_noised(lambda *a: f(a), x_t, t, y, weight=weight).mean()

                values = self._hutchinson(model, taylor=False, loss_fn=loss_fn)
        std = values.std().item() if len(values) > 1 else 0.0
        return TraceEstimate(values, values.mean().item(), std, std / len(values) ** 0.5)


def summarize(
    per_sample: torch.Tensor, weight: torch.Tensor, terms: bool = False
) -> dict[str, float | list[float]]:
    """The trace estimate mean_{k,b} w_b Sₖ_b of a (K, B) per-sample matrix, with its
    uncertainty over both things drawn at random: the probe vectors (``stderr``, the
    probes' standard error) and the probe samples (``stderr_samples``, over the samples'
    probe-mean terms w_b mean_k Sₖ_b); ``stderr_total`` combines them in quadrature.

    With ``terms``, also the terms themselves: ``probes`` (K,) and ``samples`` (B,).
    Every probe step of a run reuses the same vectors and samples, so their errors are
    shared from step to step and between the arms of one seed: a mean over steps, or a
    difference between arms, takes its standard error from these terms, not from the
    per-step errors as if they were independent (:mod:`fastdiff.report.criteria`)."""
    cross = per_sample.double() * weight.double()  # (K, B)
    per_probe = cross.mean(1)  # (K,)
    per_sample_mean = cross.mean(0)  # (B,)
    k, b = cross.shape
    std = per_probe.std().item() if k > 1 else 0.0
    se_probe = std / k**0.5
    se_samples = per_sample_mean.std().item() / b**0.5 if b > 1 else 0.0
    out = {
        "mean": per_probe.mean().item(),
        "std": std,
        "stderr": se_probe,
        "stderr_samples": se_samples,
        "stderr_total": (se_probe**2 + se_samples**2) ** 0.5,
    }
    if terms:
        out |= {"probes": per_probe.tolist(), "samples": per_sample_mean.tolist()}
    return out


class RunProbes:
    """Everything a run measures at a probe step, under the cards' metric names, from
    ONE pass over the fixed, t-stratified probe batch with one set of probe vectors:

    - ``curvature/hutch_trace_{mean,std,stderr,stderr_samples,stderr_total}``: the run's
      weighted training loss (``stderr``: over probe vectors; ``stderr_samples``: over
      probe samples; ``stderr_total``: both), and its terms: ``curvature/hutch_trace_probes``
      (K per-probe values) and ``curvature/hutch_trace_samples`` (B per-sample values);
    - ``…_unweighted``: the plain ε-MSE's, whatever the prediction, on the same batch and
      vectors, unless the run's loss already is it (uniform ε): Min-SNR's weights average
      below 1, which shrinks the weighted trace even where the landscape is unchanged;
    - ``curvature/hutch/t{lo}-{hi}/trace_…``: the weighted trace over the samples of
      each of ``curvature.t_bins`` equal-width timestep bins, with its terms;
    - ``curvature/hutch_seconds``: the probe's wall time.
    """

    def __init__(self, images: torch.Tensor, cfg, objective: Objective, device):
        c, T, seed = cfg.curvature, cfg.diffusion.T, cfg.train.seed
        log.info(
            "curvature: Hutchinson trace, %d probes on a fixed batch of %d, dropout off, fp32",
            c.probes,
            c.batch_size,
        )
        x0, t, noise = probe_batch(images, c.batch_size, T, seed)
        self.main = CurvatureProbe(
            x0.to(device),
            t.to(device),
            noise.to(device),
            objective=objective,
            probes=c.probes,
            seed=seed,
            chunk_size=c.chunk_size,
            method=c.method,
        )
        # a uniform ε run's weighted trace is already the ε-MSE's
        self.unweighted = cfg.loss.weighting != "uniform" or cfg.loss.prediction != "eps"
        which = self.main.t * max(c.t_bins, 1) // T
        self.bins = {name: which == i for i, name in enumerate(t_bin_names(T, c.t_bins))}

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        start = time.perf_counter()
        per_sample = self.main.per_sample(model)  # (K, B)
        w = self.main.weight
        out = _named(summarize(per_sample, w, terms=True), "curvature/hutch_trace_{}")
        if self.unweighted:
            out |= _named(
                summarize(per_sample, self.main.eps_factor, terms=True),
                "curvature/hutch_trace_{}_unweighted",
            )
        for name, mask in self.bins.items():
            out |= _named(
                summarize(per_sample[:, mask], w[mask], terms=True),
                f"curvature/hutch/{name}/trace_{{}}",
            )
        out["curvature/hutch_seconds"] = time.perf_counter() - start
        return out


def _named(stats: dict[str, float], pattern: str) -> dict[str, float]:
    return {pattern.format(k): v for k, v in stats.items()}
