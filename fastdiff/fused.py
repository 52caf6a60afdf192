"""A study's arms and seeds trained together: K runs, one batched forward and backward.

    python -m fastdiff.fused_cli e9 [KEY=VALUE ...] [--seeds 2] [--out DIR]
    python -m fastdiff.study e9 --seeds 2 --fused [KEY=VALUE ...]

Each of the K arm-seeds is an ordinary :class:`~fastdiff.trainer.Trainer` with its own
run directory, config, optimizer, EMA, checkpoints, probes, grids and FID, so
``fastdiff.report``, ``fastdiff.eval``, ``fastdiff.curvature`` and ``train.resume``
work on them unchanged, and ``train.on_nonfinite`` acts per run. Only the forward and
backward pass is shared: the K models' weights are stacked, one ``torch.func.vmap``
of the UNet runs all of them, and each model's gradient is handed to its own run's
optimizer. Every run gets the batch, timesteps, noise and dropout masks its
standalone run would draw (tested: the same per-step losses in fp32). A run's
``perf/seconds_per_step`` and train time are the job's fused steps, without any run's
logging or periodic jobs.

Where it pays: launch-bound hardware (a GPU at the cards' batch 4). On a 2-core CPU
the convolutions run no faster batched (docs/performance.md), so there it is slower.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from accelerate import PartialState
from torch.func import functional_call, vmap

from fastdiff.checkpoint import ARCHITECTURE, changed_settings
from fastdiff.config import Config, ConfigError, compose, to_config
from fastdiff.stopping import Stopped
from fastdiff.tuning import Dropout, amp_precision, training_mask
from fastdiff.unet import build_model
from fastdiff.window import StepOut

log = logging.getLogger("fastdiff")
SHARED = ARCHITECTURE + [  # what the K runs must agree on to share one batched pass
    "train.batch_size",
    "train.amp",
    "train.total_steps",
    "train.compile",
    "model.dropout",
    "model.kernels",
    "diffusion.T",
]


# Bytes per parameter per run: its weights, gradient, Adam's two moments and EMA, plus
# the fused step's stacked weights, per-parameter gradient views and stacked gradient.
STATE_BYTES = 4 * 5 + 4 * 3
HEADROOM = 0.9  # of the free memory: the allocator's slack and the backward's transients


def probe_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    m = cfg.model
    model = build_model(m.name, m.base_channels, m.dropout, cfg.data.image_size, kernels=m.kernels)
    return model.to(device)


def saved_bytes(cfg: Config, batch: int, device: torch.device, model=None) -> int:
    """Bytes autograd keeps for the backward of one model's forward pass at ``batch``
    (saved-tensor hooks on ``model``, else a fresh one; each storage once, parameters
    excluded)."""
    model = probe_model(cfg, device) if model is None else model
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storage = x.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return x

    size = cfg.data.image_size
    precision = amp_precision(cfg.train.amp, device.type == "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    x = torch.zeros(batch, 3, size, size, device=device)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x),
        torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
    ):
        model(x, t)
    return sum(seen.values())


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def run_bytes(cfg: Config, device: torch.device) -> tuple[int, int, int]:
    """One fused run's memory as (state, fixed, per-sample): the state is STATE_BYTES
    per parameter; the activations are measured at batch 1 and 2 as fixed + per-sample."""
    model = probe_model(cfg, device)
    state = STATE_BYTES * sum(p.numel() for p in model.parameters())
    one, two = saved_bytes(cfg, 1, device, model), saved_bytes(cfg, 2, device, model)
    return state, 2 * one - two, two - one


def check_fits(cfgs: list[Config], device: torch.device) -> None:
    """A fused job that cannot fit stops before any run is set up, with one line naming
    the K and batch it tried and what would fit."""
    k, batch = len(cfgs), cfgs[0].train.batch_size
    state, fixed, per_sample = run_bytes(cfgs[0], device)
    per_run = state + fixed + per_sample * batch
    # the processes on one host share its memory; each GPU is its own process's
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1
    budget = HEADROOM * free_bytes(device) / sharing
    if k * per_run <= budget:
        return
    gib = 2**30
    fits_k = int(budget // per_run)
    fits_batch = int((budget / k - state - fixed) // per_sample) if per_sample else 0
    options = [f"K={fits_k} at batch {batch}"] if fits_k else []
    options += [f"batch {fits_batch} at K={k}"] if fits_batch else []
    raise ConfigError(
        f"a fused job of K={k} runs at batch {batch} needs about {k * per_run / gib:.1f} GiB, "
        f"and {budget / gib:.1f} GiB of {device.type} memory is free"
        + (f" to each of its {sharing} processes" if sharing > 1 else "")
        + ": "
        + (" or ".join(options) + " would fit" if options else "not one run fits")
        + "; run fewer seeds per job (--seeds) or the runs unfused"
    )


def check_compatible(cfgs: list[Config]) -> None:
    first = cfgs[0]
    for cfg in cfgs[1:]:
        differ = changed_settings(first, cfg, SHARED)
        if differ:
            raise ConfigError(
                f"fused runs must share {differ[0]} in {cfg.experiment} against "
                f"{first.experiment}: run them separately"
            )
    if first.model.kernels != "torch":
        raise ConfigError("fused runs need model.kernels=torch (the Triton ops have no vmap rule)")


class FusedRuns:
    def __init__(self, cfgs: list[Config]):
        from fastdiff.stopping import Finished
        from fastdiff.trainer import Trainer

        check_compatible(cfgs)
        # accelerate's process state: the device every run's Accelerator will be given
        check_fits(cfgs, PartialState(cpu=not torch.cuda.is_available()).device)
        self.trainers = []
        for cfg in cfgs:
            try:
                self.trainers.append(Trainer(cfg))
            except Finished as done:  # a rerun of a study: finished runs are left alone
                log.info("%s", done)
        if not self.trainers:
            raise Finished(cfgs[0].train.total_steps, "every fused run is finished")
        starts = {t.start_step for t in self.trainers}
        if len(starts) > 1:
            raise ConfigError(
                f"the fused runs resume at different steps {sorted(starts)}: resume them "
                "separately until they are level"
            )
        self.start_step = starts.pop()
        first = self.trainers[0]
        self.module = first.module  # the architecture, called with each run's weights
        self.params = [(n, p) for n, p in first.module.named_parameters()]
        self.masks = self._dropout_layout()
        self.all = list(self.trainers)
        self._stacked = self._grad = None
        # The K models' forward, vmapped; compiled only when asked for (train.compile=true):
        # it traces and matches eager on CPU, but no GPU has measured it yet.
        self.forward = vmap(self._one)
        if first.cfg.train.compile is True:
            backend = first.cfg.train.compile_backend
            self.forward = torch.compile(self.forward, backend=backend)

    def _one(self, params: dict, x: torch.Tensor, t: torch.Tensor, masks: dict) -> torch.Tensor:
        """One model's output from its weights and dropout masks (under vmap)."""
        return functional_call(self.module, {**params, **masks}, (x, t))

    def _dropout_layout(self) -> list[tuple]:
        """(name, shape, stride, dtype, p) of every dropout input in forward order (the
        order a standalone step draws its masks in), from one forward pass."""
        t0 = self.trainers[0]
        seen = []

        def record(m, a, name):
            seen.append((name, a[0].shape, a[0].stride(), a[0].dtype, m.p))

        hooks = [
            m.register_forward_pre_hook(lambda m, a, name=name: record(m, a, name))
            for name, m in self.module.named_modules()
            if isinstance(m, Dropout) and m.p > 0
        ]
        B = t0.cfg.train.batch_size
        x = torch.zeros(B, *t0.image_shape, device=t0.device)
        if t0.cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            with torch.no_grad(), t0.acc.autocast():
                self.module(x, torch.zeros(B, dtype=torch.long, device=t0.device))
        finally:
            for h in hooks:
                h.remove()
        return seen

    def _buffers(self, ts: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The (K, N) stacked weights and gradient, kept from step to step: a fresh
        (K, N) buffer each step is fresh pages of memory each step, and on a CPU
        zero-filling one (4 x 9M floats) page-faulted through a large share of a K=4
        step (docs/performance.md#measurements-behind-choices-in-the-code). The
        gradient's alignment gaps stay 0 from the one fill."""
        shape = (len(ts), ts[0].optimizer.flat.numel())
        if self._stacked is None or self._stacked.shape != shape:
            flat = ts[0].optimizer.flat
            self._stacked = torch.empty(shape, dtype=flat.dtype, device=flat.device)
            self._grad = torch.zeros_like(self._stacked)
        return self._stacked, self._grad

    def _draw_masks(self, trainer, step: int) -> list[torch.Tensor]:
        """The masks the run's standalone step would draw, on its device: seeded as that
        step seeds them (its dropout stream, through the default generators), layer by
        layer in forward order. On CUDA they are then F.dropout's Philox masks, so a fused
        run equals its standalone run there too, and no mask crosses from the host."""
        trainer.seed_dropout(step)
        like = [
            torch.empty_strided(shape, stride, dtype=dtype, device=trainer.device)
            for _, shape, stride, dtype, _ in self.masks
        ]
        return [training_mask(x, layout[-1]) for x, layout in zip(like, self.masks)]

    def step(self, step: int, trainers=None) -> list[StepOut]:
        """One step of every run (or of ``trainers``): their losses from one vmapped
        forward and backward, then each run's own update (clip, skip-on-non-finite,
        Adam) and EMA."""
        ts = self.trainers if trainers is None else trainers
        x_t, ts_, x0s, noises, masks = [], [], [], [], []
        for tr in ts:
            x0, t, noise = tr.draws(step)
            x_t.append(tr.objective.noised(x0, t, noise))
            ts_.append(t)
            x0s.append(x0)
            noises.append(noise)
            masks.append(self._draw_masks(tr, step))
        # The runs' weights side by side, (K, N), and each parameter a (K, ...) view of
        # them made a leaf of its own: autograd then hands each parameter its gradient
        # (an as_strided of one stacked leaf would allocate a (K, N) buffer per parameter).
        stacked, grad = self._buffers(ts)
        torch.stack([tr.optimizer.flat.detach() for tr in ts], out=stacked)
        n = stacked.shape[1]

        def as_stacked(buffer, p):
            return buffer.as_strided((len(ts), *p.shape), (n, *p.stride()), p.storage_offset())

        views = {name: as_stacked(stacked, p).requires_grad_() for name, p in self.params}
        # each Dropout's mask buffer, (K, ...): functional_call hands model k its own
        masks_k = {
            f"{layout[0]}.mask": torch.stack(layer)
            for layout, layer in zip(self.masks, zip(*masks))
        }

        with ts[0].acc.autocast():
            out = self.forward(views, torch.stack(x_t), torch.stack(ts_), masks_k)
            per_sample = [
                tr.objective.of_prediction(out[k], x0s[k], noises[k], ts_[k])
                for k, tr in enumerate(ts)
            ]
        ts[0].acc.backward(torch.stack([p.mean() for p in per_sample]).sum())
        got = [(as_stacked(grad, p), views[name].grad) for name, p in self.params]
        torch._foreach_copy_(
            [g for g, v in got if v is not None], [v for _, v in got if v is not None]
        )
        for g, v in got:
            if v is None:  # a parameter this pass did not reach
                g.zero_()
        if ts[0].acc.num_processes > 1:  # DDP's all-reduce, done here for the stacked grad
            grad = ts[0].acc.reduce(grad, reduction="mean")
        outs = []
        for k, tr in enumerate(ts):
            tr.optimizer.flat.grad.copy_(grad[k])
            outs.append(tr.finish_step(per_sample[k], ts_[k], backward=False))
        return outs

    def train(self) -> list[dict | Stopped]:
        """Every run to total_steps; a run that stops (divergence under
        train.on_nonfinite=stop) leaves the others training. Returns each run's summary,
        or the Stopped it ended with."""
        live = list(self.trainers)
        results: dict[int, dict | Stopped] = {}
        for tr in live:
            tr.begin()
        signals = live[0].signals
        for tr in live:
            tr.signals = signals  # one handler for the process: every run stops on it
        with signals.caught():
            for tr in list(live):  # the jobs a signal cut short before their checkpoint
                try:
                    tr.redo_jobs()
                except Stopped as stop:
                    live.remove(tr)
                    results[id(tr)] = self._finish(tr, stop)
            for step in range(self.start_step, live[0].cfg.train.total_steps):
                if not live:
                    break
                outs = self.step(step, live)
                for tr, out in zip(list(live), outs):
                    t0 = time.perf_counter()
                    try:
                        tr.after_step(step, out)
                    except Stopped as stop:
                        live.remove(tr)
                        results[id(tr)] = self._finish(tr, stop)
                    # one run's logging and jobs are not the others' training time
                    spent = time.perf_counter() - t0
                    for other in live:
                        if other is not tr:
                            other.window.excluded += spent
        for tr in live:
            results[id(tr)] = self._finish(tr, None)
        return [results[id(tr)] for tr in self.all]

    @staticmethod
    def _finish(trainer, stop: Stopped | None):
        try:
            return trainer.finish(stop)
        except Stopped as err:
            return err


def study_configs(card, overrides: list[str], seeds: list[int], root: Path) -> list[Config]:
    """Every arm-seed of ``card`` (a fastdiff.cards.Card) as a run config."""
    return [
        to_config(compose(card.run_overrides(arm, overrides, seed=seed, root=root)))
        for seed in seeds
        for arm in card.arms
    ]
