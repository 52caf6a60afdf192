"""The run's periodic work on the EMA weights: sample grids and FID.

Each job is called with the step and the model to evaluate; the trainer decides when
(:meth:`fastdiff.trainer.Trainer.jobs`) and hands them the model as
:class:`Interruptible`, so a signal ends a grid or an FID generation at its next
sampler step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object

from fastdiff.fid import FIDEvaluator, generate, shard_of, spacing_record
from fastdiff.rundir import MetricsLog, atomic_path, write_text
from fastdiff.sampling import sample
from fastdiff.seeding import stream_generator
from fastdiff.stopping import JobInterrupted

log = logging.getLogger("fastdiff")


class Interruptible(torch.nn.Module):
    """``model`` as a job sees it: each call, one sampler step of one batch, first asks
    ``should_stop`` and raises JobInterrupted if it says so. The samplers and FID's
    generation loop then stop between steps without a stop argument of their own."""

    def __init__(self, model: torch.nn.Module, should_stop):
        super().__init__()
        self.model, self.should_stop = model, should_stop

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.should_stop():
            raise JobInterrupted
        return self.model(x, t)


class Grids:
    """A square grid of samples from a fixed noise seed (so grids of one run, and of
    paired runs, show the same draws), and beside it the samples' brightness and
    contrast with the same numbers for training images: washed-out or collapsed
    samples show there (MS1-e9)."""

    def __init__(
        self,
        run_dir: Path,
        sampling,
        schedule,
        image_shape,
        *,
        reference: torch.Tensor,
        prediction: str = "eps",
    ):
        self.dir, self.cfg, self.schedule = run_dir / "samples", sampling, schedule
        self.prediction = prediction  # loss.prediction: what the model outputs
        self.shape = (sampling.grid_images, *image_shape)
        self.reference = reference[: sampling.grid_images].float() / 255  # uint8 training images

    def __call__(self, step: int, model: torch.nn.Module) -> None:
        from torchvision.utils import save_image

        c = self.cfg
        g = stream_generator(c.seed, "grid")
        x = sample(
            c.grid_sampler,
            model,
            self.shape,
            self.schedule,
            nfe=c.grid_nfe,
            generator=g,
            ddpm_variance=c.ddpm_variance,
            prediction=self.prediction,
            spacing=c.spacing,
        )
        x = (x.float().cpu() + 1) / 2
        stats = {
            kind: {
                "mean_intensity": imgs.flatten(1).mean(1).tolist(),
                "contrast": imgs.flatten(1).std(1).tolist(),
            }
            for kind, imgs in (("samples", x), ("training", self.reference))
        }
        write_text(self.dir / f"stats_{step:07d}.json", json.dumps(stats) + "\n")
        if x.shape[-1] < 32:  # small images: upscale so the grid is readable
            x = torch.nn.functional.interpolate(x, scale_factor=32 // x.shape[-1], mode="nearest")
        with atomic_path(self.dir / f"grid_{step:07d}.png") as tmp:
            save_image(x, tmp, format="png", nrow=int(math.sqrt(c.grid_images)), padding=2)


class FIDJob:
    """FID/KID of EMA samples at the milestones and at the end: every rank samples its
    share, the main process scores. The final score carries its bootstrap interval and
    precision/recall (collapse shows as low recall); milestones only track the trend."""

    def __init__(
        self,
        evaluator: FIDEvaluator,
        eval_cfg,
        accelerator,
        metrics: MetricsLog,
        *,
        schedule,
        shape,
        prediction: str = "eps",
        spacing: str = "linspace",
    ):
        self.fid, self.cfg, self.acc, self.metrics = evaluator, eval_cfg, accelerator, metrics
        self.schedule, self.shape = schedule, shape
        # loss.prediction and sampling.spacing: what the model outputs, which steps to visit
        self.prediction, self.spacing = prediction, spacing

    def milestone(self, step: int, model) -> None:
        self._score(step, model, self.cfg.milestone_samples, "val/fid_milestone", final=False)

    def final(self, step: int, model) -> None:
        self._score(step, model, self.cfg.final_samples, "eval/final", final=True)

    def provenance(self) -> dict:
        """How this run's FIDs were computed (the report compares only equal ones)."""
        e = self.cfg
        return {
            **self.fid.provenance,
            "sampler": e.sampler,
            "nfe": e.nfe,
            **spacing_record(self.spacing),
            "milestone_samples": e.milestone_samples,
            "final_samples": e.final_samples,
            "seed": e.seed,
        }

    def _score(self, step: int, model, n: int, prefix: str, *, final: bool) -> None:
        e, acc = self.cfg, self.acc
        start = time.perf_counter()
        mine = shard_of(n, acc.process_index, acc.num_processes)
        samples = generate(
            model,
            self.schedule,
            mine,
            self.shape,
            sampler=e.sampler,
            nfe=e.nfe,
            seed=e.seed,
            batch_size=e.batch_size,
            prediction=self.prediction,
            spacing=self.spacing,
        )
        if acc.num_processes > 1:
            samples = torch.cat(gather_object([samples]))
        if acc.is_main_process:
            scores = self.fid(
                samples, bootstrap=e.fid.bootstrap if final else 0, prc=final, seed=e.seed
            )
            seconds = time.perf_counter() - start
            self.metrics.log(
                step,
                {
                    **{f"{prefix}/{k}": v for k, v in scores.items()},
                    f"{prefix}/samples": n,
                    f"{prefix}/seconds": seconds,
                },
            )
            log.info(
                "%s/fid %.3f at step %d (%d samples, %s NFE %d, %.0f s)",
                prefix, scores["fid"], step, n, e.sampler, e.nfe, seconds,
            )  # fmt: skip
        acc.wait_for_everyone()
