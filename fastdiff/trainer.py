"""The training loop: step → clip → optimizer → EMA → periodic work.

Periodic work (log, probe, grid, checkpoint) is a short list of calls at the
bottom of the loop. The loss is read on the host only at the log cadence;
between logs it accumulates on the device.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from fastdiff.config import Config, flat
from fastdiff.curvature import RunProbes
from fastdiff.data import make_batches, probe_pool
from fastdiff.diffusion import Schedule, eps_loss, q_sample
from fastdiff.ema import EMA
from fastdiff.fid import FIDEvaluator, build_evaluator, generate, shard_of
from fastdiff.kernels import weighted_mse
from fastdiff.rundir import (
    MetricsLog,
    checkpoints,
    config_yaml,
    new_run_dir,
    resolve_checkpoint,
    save_torch,
    write_text,
)
from fastdiff.sampling import sample
from fastdiff.seeding import stream_generator, stream_seed
from fastdiff.unet import build_model

log = logging.getLogger("fastdiff")
INDUCTOR_CACHE = Path.home() / ".cache" / "fastdiff" / "inductor"  # reused across runs


def make_accelerator(cfg: Config) -> Accelerator:
    """bf16 autocast on CUDA where supported, fp16 + grad scaler otherwise, fp32 on CPU."""
    precision = "no"
    if cfg.train.amp and torch.cuda.is_available():
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


def draw_t_noise(seed: int, step: int, rank: int, batch: int, shape, T: int, device):
    """Timesteps (B,) and noise (B, C, H, W) of one step, from their own streams."""
    gen_device = device if device.type == "cuda" else "cpu"
    g = stream_generator(seed, "timesteps", step, rank, device=gen_device)
    t = torch.randint(0, T, (batch,), generator=g, device=gen_device)
    g = stream_generator(seed, "noise", step, rank, device=gen_device)
    noise = torch.randn((batch, *shape), generator=g, device=gen_device)
    return t.to(device), noise.to(device)


@dataclass
class Window:
    """Device-side sums since the last log; read (one host sync) at the log cadence."""

    loss: torch.Tensor
    mse: torch.Tensor
    grad_norm: torch.Tensor
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)
    excluded: float = 0.0  # seconds of periodic work inside the window

    @classmethod
    def new(cls, device) -> Window:
        return cls(*(torch.zeros((), device=device) for _ in range(3)))


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.acc = make_accelerator(cfg)
        self.device = self.acc.device
        torch.manual_seed(stream_seed(cfg.train.seed, "init"))  # same init in paired runs

        # Data first: a missing or unreadable data set fails before anything is written.
        self.batches = make_batches(
            cfg.data,
            cfg.train.batch_size,
            cfg.train.seed,
            self.acc.process_index,
            self.acc.num_processes,
            self.device,
        )
        self.image_shape = (3, cfg.data.image_size, cfg.data.image_size)
        self.fid = self._make_fid()

        self.schedule = Schedule.make(cfg.diffusion.beta_schedule, cfg.diffusion.T)
        self.alphas_cumprod = self.schedule.alphas_cumprod.float().to(self.device)
        self.weights = self.schedule.loss_weights(cfg.loss.weighting, cfg.loss.minsnr_gamma)
        self.weights = self.weights.float().to(self.device)

        model = build_model(
            cfg.model.name,
            cfg.model.base_channels,
            cfg.model.dropout,
            cfg.data.image_size,
            cfg.model.kernels,
        ).to(self.device)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.ema = EMA(model, cfg.train.ema_decay)
        opt = torch.optim.Adam(
            model.parameters(),
            lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            weight_decay=cfg.optim.weight_decay,
            fused=True,
        )
        self.model, self.opt = self.acc.prepare(model, opt)
        self.compiled = (
            cfg.train.compile
            if cfg.train.compile is not None
            else (
                self.device.type == "cuda"  # measured: compiling is slower overall on CPU (README)
            )
        )
        self.loss = self.per_sample_loss
        if self.compiled:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(INDUCTOR_CACHE))
            # One graph for model + loss; under DDP, Dynamo splits at bucket boundaries.
            self.loss = torch.compile(
                self.per_sample_loss,
                fullgraph=self.acc.num_processes == 1,
                backend=cfg.train.compile_backend,
            )

        self.start_step = 0
        resume = resolve_checkpoint(cfg.train.resume) if cfg.train.resume else None
        self.run_dir = self._run_dir(resume)
        if resume is not None:
            self.start_step = self._load(resume)
            self.batches.seek(self.start_step)
        if self.acc.is_main_process:
            write_text(self.run_dir / "config.yaml", config_yaml(cfg))
        self.metrics = MetricsLog(
            self.run_dir,
            self.acc.is_main_process,
            self.start_step if resume else None,
            lambda: flat(cfg),
        )
        self.probe = (
            self._make_probe(probe_pool(cfg.data, self.batches)) if cfg.curvature.enabled else None
        )

    # ----------------------------------------------------------------- set-up
    def _run_dir(self, resume: Path | None) -> Path:
        cfg = self.cfg
        if resume is not None:
            path = resume.parent.parent
        elif cfg.train.run_dir:
            path = Path(cfg.train.run_dir)
        else:
            path = new_run_dir(cfg.train.runs_root, cfg.experiment)
        shared = [str(path)]
        broadcast_object_list(shared)  # every rank writes into rank 0's directory
        return Path(shared[0])

    def _make_probe(self, images: torch.Tensor) -> RunProbes:
        c = self.cfg.curvature
        log.info(
            "curvature: Hutchinson trace, %d probes on a fixed batch of %d, dropout off, "
            "fp32, every %d steps",
            c.probes,
            c.batch_size,
            self._probe_every,
        )
        return RunProbes(images, self.cfg, self.alphas_cumprod, self.weights, self.device)

    def _make_fid(self) -> FIDEvaluator | None:
        enabled = self.cfg.eval.fid.enabled
        if enabled is False:
            log.info("FID off (eval.fid.enabled=false)")
            return None
        return build_evaluator(self.cfg, self.batches, self.device, explicit=enabled is True)

    @property
    def _probe_every(self) -> int:
        return self.cfg.curvature.every or self.cfg.train.log_every

    # ------------------------------------------------------------------- step
    def per_sample_loss(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """The run's loss, unreduced (B,): ε-MSE weighted per timestep."""
        if self.cfg.model.kernels == "triton":  # the fused Min-SNR kernel computes w(t)
            eps = self.model(q_sample(x0, t, noise, self.alphas_cumprod), t)
            return weighted_mse(
                eps,
                noise,
                t,
                self.alphas_cumprod,
                self.cfg.loss.minsnr_gamma,
                self.cfg.loss.weighting,
            )
        return eps_loss(self.model, x0, t, noise, self.alphas_cumprod, self.weights)

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, rank = self.cfg, self.acc.process_index
        x0 = self.batches.batch(step)
        t, noise = draw_t_noise(
            cfg.train.seed, step, rank, x0.shape[0], self.image_shape, cfg.diffusion.T, self.device
        )
        torch.manual_seed(stream_seed(cfg.train.seed, "dropout", step, rank))
        with self.acc.autocast():
            per_sample = self.loss(x0, t, noise)
        loss = per_sample.mean()
        self.acc.backward(loss)
        if cfg.train.grad_clip > 0:
            grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
        else:
            grad_norm = torch.zeros((), device=self.device)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.acc.unwrap_model(self.model))
        mse = (per_sample.detach() / self.weights[t]).mean()
        return loss.detach(), mse, grad_norm.detach().float()

    # ------------------------------------------------------------------- loop
    def train(self) -> dict:
        cfg = self.cfg
        total = cfg.train.total_steps
        if self.acc.is_main_process:
            log.info(
                "run dir %s | %s | %.2fM params | %s x%d | %s",
                self.run_dir,
                cfg.experiment,
                self.n_params / 1e6,
                self.device,
                self.acc.num_processes,
                self.acc.mixed_precision,
            )
        bar = tqdm(
            total=total,
            initial=self.start_step,
            desc=cfg.experiment,
            unit="step",
            disable=not (cfg.train.progress and self.acc.is_main_process),
        )
        wall_start, train_seconds, images_seen = time.perf_counter(), 0.0, 0
        window = Window.new(self.device)
        last: dict[str, float] = {}
        if self.start_step == 0:  # E_t[w(t)]: how much the weighting rescales the loss
            self.metrics.log(0, {"loss/mean_weight": self.weights.mean().item()})
        periodic = self._periodic()
        for step in range(self.start_step, total):
            if self.compiled and step == self.start_step:
                t0 = time.perf_counter()
                loss, mse, grad_norm = self.train_step(step)
                loss.item()  # one sync, to time compilation
                log.info(
                    "compiled the training step in %.1f s (cache %s)",
                    time.perf_counter() - t0,
                    os.environ["TORCHINDUCTOR_CACHE_DIR"],
                )
            else:
                loss, mse, grad_norm = self.train_step(step)
            window.loss += loss
            window.mse += mse
            window.grad_norm += grad_norm
            window.steps += 1
            bar.update()
            done = step + 1

            if done % cfg.train.log_every == 0 or done == total:
                last, seconds = self._log(done, window)
                train_seconds += seconds
                images_seen += window.steps * cfg.train.batch_size * self.acc.num_processes
                bar.set_postfix(
                    loss=f"{last['train/loss']:.4f}", img_s=f"{last['perf/images_per_sec']:.0f}"
                )
                if bar.disable and self.acc.is_main_process:
                    log.info(
                        "step %d/%d  train/loss %.4f  %.0f img/s",
                        done,
                        total,
                        last["train/loss"],
                        last["perf/images_per_sec"],
                    )
                window = Window.new(self.device)
            for due, job in periodic:
                if due(done):
                    t0 = time.perf_counter()
                    job(done)
                    window.excluded += time.perf_counter() - t0
        bar.close()
        summary = {
            **last,
            "step": total,
            "experiment": cfg.experiment,
            "wall_time_s": time.perf_counter() - wall_start,
            "train_time_s": train_seconds,
            "images_per_sec": images_seen / train_seconds if train_seconds else None,
            "params": self.n_params,
            "device": str(self.device),
            "processes": self.acc.num_processes,
        }
        self.metrics.close()
        if self.acc.is_main_process:
            write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            if cfg.train.report:
                from fastdiff.report import Run, write_report

                log.info(
                    "report: %s", write_report([Run.load(self.run_dir)], self.run_dir / "report")
                )
        self.acc.wait_for_everyone()
        return summary

    def _periodic(self):
        """(is it due at this step?, job) pairs, run after the step in this order."""
        cfg, total = self.cfg, self.cfg.train.total_steps

        def every(n: int):
            return lambda done: done % n == 0 or done == total

        jobs = []
        if self.probe is not None:
            jobs.append((every(self._probe_every), self._probe_curvature))
        grid_due = every(cfg.sampling.grid_every)
        if self.fid is not None:
            milestone = every(cfg.eval.milestone_every)
            jobs.append((milestone, self._milestone_fid))
            jobs.append((lambda done: done == total, self._final_fid))
            grid_due = lambda done, g=grid_due: g(done) or milestone(done)  # noqa: E731
        jobs.append((grid_due, self._save_grid))
        jobs.append((every(cfg.train.ckpt_every), self._save_checkpoint))
        return jobs

    # -------------------------------------------------------- periodic work
    def _log(self, step: int, w: Window) -> tuple[dict[str, float], float]:
        sums = torch.stack([w.loss, w.mse, w.grad_norm]) / w.steps
        sums = self.acc.reduce(sums, reduction="mean")  # the host sync of this window
        loss, mse, grad_norm = sums.tolist()
        seconds = time.perf_counter() - w.start - w.excluded
        images = w.steps * self.cfg.train.batch_size * self.acc.num_processes
        metrics = {
            "train/loss": loss,
            "train/mse_unweighted": mse,
            "train/grad_norm": grad_norm,
            "train/lr": self.cfg.optim.lr,
            "perf/images_per_sec": images / seconds,
            "perf/seconds_per_step": seconds / w.steps,
            "data/skipped": self._total_skipped(),
        }
        self.metrics.log(step, metrics)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"train/loss is {loss} at step {step}: the run diverged "
                f"(last checkpoint in {self.run_dir / 'checkpoints'})"
            )
        return metrics, seconds

    def _fid(self, step: int, n: int, prefix: str) -> None:
        """FID/KID of n EMA samples; every rank samples its share, the main process scores."""
        e = self.cfg.eval
        start = time.perf_counter()
        mine = shard_of(n, self.acc.process_index, self.acc.num_processes)
        samples = generate(
            self.ema.model,
            self.schedule,
            mine,
            self.image_shape,
            e.sampler,
            e.nfe,
            e.seed,
            e.batch_size,
        )
        if self.acc.num_processes > 1:
            samples = torch.cat(gather_object([samples]))
        if self.acc.is_main_process:
            scores = self.fid(samples)
            self.metrics.log(
                step,
                {
                    **{f"{prefix}/{k}": v for k, v in scores.items()},
                    f"{prefix}/samples": n,
                    f"{prefix}/seconds": time.perf_counter() - start,
                },
            )
            log.info(
                "%s/fid %.3f at step %d (%d samples, %s NFE %d, %.0f s)",
                prefix,
                scores["fid"],
                step,
                n,
                e.sampler,
                e.nfe,
                time.perf_counter() - start,
            )
        self.acc.wait_for_everyone()

    def _milestone_fid(self, step: int) -> None:
        self._fid(step, self.cfg.eval.milestone_samples, "val/fid_milestone")

    def _final_fid(self, step: int) -> None:
        self._fid(step, self.cfg.eval.final_samples, "eval/final")

    def _total_skipped(self) -> int:
        """Unreadable samples skipped so far, over all ranks."""
        if self.acc.num_processes == 1:
            return int(self.batches.skipped)
        n = torch.tensor(float(self.batches.skipped), device=self.device)
        return int(self.acc.reduce(n, reduction="sum").item())

    def _probe_curvature(self, step: int) -> None:
        if self.acc.is_main_process:  # one probe per run: it is a property of the weights
            self.metrics.log(step, self.probe(self.acc.unwrap_model(self.model)))
        self.acc.wait_for_everyone()

    def _save_grid(self, step: int) -> None:
        if not self.acc.is_main_process:
            return
        from torchvision.utils import save_image

        cfg = self.cfg.sampling
        g = stream_generator(cfg.seed, "grid")
        x = sample(
            cfg.grid_sampler,
            self.ema.model,
            (cfg.grid_images, *self.image_shape),
            self.schedule,
            cfg.grid_nfe,
            g,
        )
        x = (x.float().cpu() + 1) / 2
        if x.shape[-1] < 32:  # small images: upscale so the grid is readable
            x = torch.nn.functional.interpolate(x, scale_factor=32 // x.shape[-1], mode="nearest")
        path = self.run_dir / "samples" / f"grid_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.png")
        save_image(x, tmp, nrow=int(math.sqrt(cfg.grid_images)), padding=2)
        tmp.replace(path)

    def _save_checkpoint(self, step: int) -> None:
        if self.acc.is_main_process:
            state = {
                "step": step,
                "model": self.acc.unwrap_model(self.model).state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scaler": self.acc.scaler.state_dict() if self.acc.scaler else None,
                # Data order, t, noise and dropout are streams keyed by (seed, step):
                # the step restores them exactly. The CPU state is kept for anything else.
                "rng": {"torch": torch.get_rng_state()},
                "config": config_yaml(self.cfg),
            }
            save_torch(state, self.run_dir / "checkpoints" / f"step_{step:07d}.pt")
            for old in checkpoints(self.run_dir)[: -self.cfg.train.keep_checkpoints]:
                old.unlink()
        self.acc.wait_for_everyone()

    def _load(self, path: Path) -> int:
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.acc.unwrap_model(self.model).load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        if self.acc.scaler is not None and state.get("scaler"):
            self.acc.scaler.load_state_dict(state["scaler"])
        if state["step"] >= self.cfg.train.total_steps:
            log.warning(
                "checkpoint %s is already at step %d >= train.total_steps", path, state["step"]
            )
        log.info("resumed from %s at step %d", path, state["step"])
        return state["step"]


def training_loop(cfg: Config) -> dict:
    return Trainer(cfg).train()
