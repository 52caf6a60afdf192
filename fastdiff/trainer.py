"""The training loop: step → clip → optimizer → EMA → periodic work.

Periodic work (log, probe, grid, checkpoint) is a short list of calls at the
bottom of the loop. The loss is read on the host only at the log cadence;
between logs it accumulates on the device.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from fastdiff.checkpoint import (
    check_architecture,
    check_resumable,
    read_checkpoint,
    resolve_resume,
    restore,
    save_checkpoint,
)
from fastdiff.config import Config, ConfigError, flat
from fastdiff.curvature import RunProbes
from fastdiff.data import make_batches, probe_pool
from fastdiff.diffusion import Schedule, eps_loss, q_sample, t_bin_names
from fastdiff.ema import EMA
from fastdiff.fid import FIDEvaluator, build_evaluator, generate, shard_of
from fastdiff.flat import Handover, backs, flatten_
from fastdiff.flops import peak_flops, train_step_flops
from fastdiff.hostmem import reuse_freed_memory
from fastdiff.kernels import weighted_mse
from fastdiff.rundir import (
    MetricsLog,
    checkpoints,
    config_yaml,
    new_run_dir,
    write_text,
)
from fastdiff.sampling import sample
from fastdiff.seeding import stream_generator, stream_seed
from fastdiff.unet import build_model

log = logging.getLogger("fastdiff")
INDUCTOR_CACHE = Path.home() / ".cache" / "fastdiff" / "inductor"  # reused across runs


def amp_precision(amp: bool, cuda: bool) -> str:
    """What ``train.amp`` means on this machine, as accelerate's ``mixed_precision``:
    bf16 autocast on CUDA where supported, else fp16 with a grad scaler; on CPU bf16
    autocast where the CPU multiplies bf16 natively (AMX or AVX512-BF16: oneDNN's
    bf16 convolutions are ~3x faster than fp32 ones there), else fp32, since emulated
    bf16 is slower than fp32."""
    if not amp:
        return "no"
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    caps = torch.cpu.get_capabilities()
    return "bf16" if caps.get("amx_bf16") or caps.get("avx512_bf16") else "no"


def make_accelerator(cfg: Config) -> Accelerator:
    cuda = torch.cuda.is_available()
    return Accelerator(mixed_precision=amp_precision(cfg.train.amp, cuda), cpu=not cuda)


def draw_t_noise(
    seed: int, step: int, rank: int, world_size: int, batch: int, shape, T: int, device
):
    """This rank's slice of the step's timesteps (B,) and noise (B, C, H, W).

    Drawn for the global batch and sliced, so N processes at batch B see what one
    process at batch N·B sees (tested), each stream from its own generator."""
    gen_device = device if device.type == "cuda" else "cpu"
    rows = slice(rank * batch, (rank + 1) * batch)
    g = stream_generator(seed, "timesteps", step, device=gen_device)
    t = torch.randint(0, T, (batch * world_size,), generator=g, device=gen_device)[rows]
    g = stream_generator(seed, "noise", step, device=gen_device)
    noise = torch.randn((batch * world_size, *shape), generator=g, device=gen_device)[rows]
    return t.to(device), noise.to(device)


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal, resumable with train.resume=auto
EXIT_DIVERGED = 3


class Stopped(Exception):
    """Training ended before train.total_steps."""

    exit_code = 1

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


class Preempted(Stopped):
    exit_code = EXIT_PREEMPTED


class Diverged(Stopped):
    exit_code = EXIT_DIVERGED


class Finished(Stopped):
    """Resuming a run that already reached train.total_steps: nothing is touched."""

    exit_code = 0


@dataclass
class Window:
    """Device-side sums since the last log; read (one host sync) at the log cadence.

    Non-finite steps are counted, not summed: ``bad`` and the first such step are
    tracked on the device, so divergence is detected without a per-step sync."""

    loss: torch.Tensor
    mse: torch.Tensor
    grad_norm: torch.Tensor
    bad: torch.Tensor
    first_bad: torch.Tensor
    by_t: torch.Tensor  # (3, bins): weighted loss, unweighted ε-MSE and count per t-bin
    bins: int = 0
    T: int = 1
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)
    excluded: float = 0.0  # seconds of periodic work inside the window

    @classmethod
    def new(cls, device, bins: int = 0, T: int = 1) -> Window:
        zeros = [torch.zeros((), device=device) for _ in range(4)]
        inf = torch.full((), float("inf"), device=device)
        return cls(*zeros, inf, torch.zeros((3, bins), device=device), bins, T)

    def add(self, step: int, loss, mse, grad_norm, finite, t, per_sample, per_sample_mse) -> None:
        self.loss += torch.where(finite, loss, 0.0)
        self.mse += torch.where(finite, mse, 0.0)
        self.grad_norm += torch.where(finite, grad_norm, 0.0)
        self.bad += (~finite).float()
        self.first_bad = torch.where(finite, self.first_bad, self.first_bad.clamp(max=step + 1))
        if self.bins:  # per-timestep sums (fastdiff.diffusion.t_bin_edges), on the device
            rows = torch.stack([per_sample, per_sample_mse, torch.ones_like(per_sample)])
            rows = torch.where(finite, rows.float(), 0.0)
            self.by_t.index_add_(1, t * self.bins // self.T, rows)
        self.steps += 1


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.acc = make_accelerator(cfg)
        self.device = self.acc.device
        if self.device.type == "cpu" and cfg.train.reuse_host_memory:
            reuse_freed_memory()
        torch.manual_seed(stream_seed(cfg.train.seed, "init"))  # same init in paired runs

        # The checkpoint first: a refused or finished resume costs no set-up, writes nothing.
        self.resumed = resolve_resume(cfg, self.acc.is_main_process)
        self.parent = read_checkpoint(Path(cfg.train.init_from)) if cfg.train.init_from else None
        if self.resumed is not None:
            check_resumable(self.resumed, cfg, self.acc.num_processes)
            if self.resumed.step >= cfg.train.total_steps:
                where = self.resumed.run_dir or self.resumed.path
                raise Finished(
                    self.resumed.step,
                    f"{where} is already at step {self.resumed.step} of train.total_steps="
                    f"{cfg.train.total_steps}: nothing to do (raise train.total_steps to "
                    "train on)",
                )
        if self.parent is not None:
            check_architecture(self.parent, cfg)

        # Data next: a missing or unreadable data set fails before anything is written.
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
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.n_params = sum(p.numel() for p in model.parameters())
        # counted once on the meta device: convolutions, matmuls and attention, fwd + bwd
        self.step_flops = train_step_flops(
            cfg.model.name, cfg.model.base_channels, cfg.data.image_size, cfg.train.batch_size
        )
        self.peak_flops = peak_flops(self.device)
        # Adam, clipping and the EMA each run as one kernel over this buffer (fastdiff.flat)
        self.flat = flatten_(model)
        self.handover = Handover(self.flat, model)
        self.ema = EMA(model, cfg.train.ema_decay, self.flat)
        opt = torch.optim.Adam(
            [self.flat],
            lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            weight_decay=cfg.optim.weight_decay,
            fused=True,
        )
        # The model is on self.device already: accelerate's own .to("cpu:0") would copy
        # every parameter out of the flat buffer.
        self.model = self.acc.prepare_model(model, device_placement=False)
        self.module = model  # unwrapped, once: unwrap_model walks every module per call
        self.opt = self.acc.prepare_optimizer(opt)
        if not backs(self.flat, model):
            raise RuntimeError("the model's parameters left the flat buffer during prepare")
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
        self.run_dir = self._run_dir()
        self.config_text = config_yaml(cfg, self._restore())
        if self.acc.is_main_process:
            write_text(self.run_dir / "config.yaml", self.config_text)
        self.metrics = MetricsLog(
            self.run_dir,
            self.acc.is_main_process,
            self.start_step if self.resumed else None,
            lambda: flat(cfg),
        )
        self.reference_images = probe_pool(cfg.data, self.batches)  # uint8, for probes/stats
        self.probe = self._make_probe(self.reference_images) if cfg.curvature.enabled else None

    # ----------------------------------------------------------------- set-up
    def _run_dir(self) -> Path:
        """An explicit train.run_dir; else the resumed checkpoint's run; else a new run
        under runs_root (also for a loose checkpoint: nothing is written beside it)."""
        cfg = self.cfg
        if cfg.train.run_dir:
            path = Path(cfg.train.run_dir)
        elif self.resumed is not None and self.resumed.run_dir is not None:
            path = self.resumed.run_dir
        else:
            path = new_run_dir(cfg.train.runs_root, cfg.experiment)
        shared = [str(path)]
        broadcast_object_list(shared)  # every rank writes into rank 0's directory
        path = Path(shared[0])
        if self.acc.is_main_process:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(
                    f"cannot create the run directory {path} ({err.strerror}): set "
                    "train.runs_root or train.run_dir to a writable folder"
                ) from None
        return path

    def _restore(self) -> dict | None:
        """Load the resumed checkpoint (everything) or train.init_from's weights; returns
        the parent record config.yaml keeps (carried over when a child run resumes)."""
        if self.resumed is not None:
            restore(self.resumed, self.module, self.ema, self.opt, self.acc.scaler, self.device)
            self.resumed.release_weights()
            self.start_step = self.resumed.step
            self.batches.seek(self.start_step)
            log.info("resumed from %s at step %d", self.resumed.path, self.start_step)
            if self.resumed.run_dir is None:
                log.info(
                    "%s is not in a run directory: continuing in %s",
                    self.resumed.path,
                    self.run_dir,
                )
            return self.resumed.config.get("parent")
        if self.parent is None:
            return None
        keep = self.cfg.train.init_keep_optimizer
        kept = "kept" if keep else "fresh"
        restore(
            self.parent,
            self.module,
            self.ema,
            self.opt,
            self.acc.scaler,
            self.device,
            weights_only=not keep,
        )
        self.parent.release_weights()
        o = self.cfg.optim
        for group in self.opt.optimizer.param_groups:  # the saved groups carry the parent's
            group.update(lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        log.info(
            "new run from the weights of %s (step %d), optimizer %s",
            self.parent.path,
            self.parent.step,
            kept,
        )
        return {
            "checkpoint": str(self.parent.path.resolve()),
            "step": self.parent.step,
            "optimizer": kept,
            "config": self.parent.config,
        }

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

    def train_step(self, step: int):
        """One optimizer step. Returns device tensors (loss, unweighted mse, grad norm,
        finite); a non-finite loss or gradient skips the update on the device."""
        cfg, rank, world = self.cfg, self.acc.process_index, self.acc.num_processes
        x0 = self.batches.batch(step)
        t, noise = draw_t_noise(
            cfg.train.seed,
            step,
            rank,
            world,
            x0.shape[0],
            self.image_shape,
            cfg.diffusion.T,
            self.device,
        )
        torch.manual_seed(stream_seed(cfg.train.seed, "dropout", step, rank))
        with self.acc.autocast():
            per_sample = self.loss(x0, t, noise)
        loss = per_sample.mean()
        self.handover.release()
        self.acc.backward(loss)
        self.handover.collect()
        grad_norm = self._clip(cfg.train.grad_clip)
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        if self.acc.scaler is None:  # fused Adam skips the update where found_inf is 1
            self.opt.optimizer.found_inf = (~finite).float()
        self.opt.step()  # (no zero_grad: the next backward's gradients are handed over)
        self.ema.update(self.module)
        per_sample = per_sample.detach()
        per_sample_mse = per_sample / self.weights[t]
        return (
            loss.detach(),
            per_sample_mse.mean(),
            grad_norm.detach().float(),
            finite,
            t,
            per_sample,
            per_sample_mse,
        )

    def _clip(self, max_norm: float) -> torch.Tensor:
        """The gradient's global norm (before clipping), and clipping to ``max_norm``
        (0: none). Without a loss scaler the clip coefficient goes to fused Adam as its
        ``grad_scale`` (Adam divides each gradient by it as it reads it): one pass over
        the 9M gradients fewer, and the norm is a BLAS dot product (half the time of
        ``vector_norm`` here). Measured in the step: ~4 ms of foreach norm and multiply."""
        grad = self.flat.grad
        if self.acc.scaler is not None:  # fp16: clip the true gradient
            self.acc.unscale_gradients()
        norm = torch.linalg.vecdot(grad, grad).sqrt()
        if max_norm:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            if self.acc.scaler is None:
                self.opt.optimizer.grad_scale = coef.reciprocal()
            else:
                grad.mul_(coef)
        return norm

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
        self.wall_start, self.train_seconds, self.images_seen = time.perf_counter(), 0.0, 0
        window = self._new_window()
        last: dict[str, float] = {}
        if self.start_step == 0:  # E_t[w(t)]: how much the weighting rescales the loss
            self.metrics.log(0, {"loss/mean_weight": self.weights.mean().item()})
        periodic = self._periodic()
        self.window = window
        stop, status = None, {}
        with self._signals():
            try:
                for step in range(self.start_step, total):
                    window.add(step, *self._timed_step(step))
                    bar.update()
                    done = step + 1
                    if done % cfg.train.log_every == 0 or done == total:
                        last, seconds = self._log(done, window)
                        self.train_seconds += seconds
                        self.images_seen += self._images(window)
                        self._show(bar, done, last)
                        window = self.window = self._new_window()
                    for due, job in periodic:
                        if due(done):
                            t0 = time.perf_counter()
                            job(done)
                            window.excluded += time.perf_counter() - t0
                    self._maybe_preempt(done)
            except Stopped as err:
                stop = err
                status = {
                    "step": err.step,
                    "preempted": isinstance(err, Preempted),
                    "diverged": isinstance(err, Diverged),
                    "stopped": str(err),
                }
        bar.close()
        progress = self._progress(status.get("step", total))
        summary = {
            **last,
            "step": total,
            "preempted": False,
            "diverged": False,
            "experiment": cfg.experiment,
            **progress,
            "images_per_sec": (
                progress["images"] / progress["train_time_s"] if progress["train_time_s"] else None
            ),
            "params": self.n_params,
            "flops_per_step": self.step_flops * self.acc.num_processes,
            "device": str(self.device),
            "processes": self.acc.num_processes,
            **({"fid_provenance": self._fid_provenance()} if self.fid is not None else {}),
            **status,
        }
        self.metrics.close()
        if self.acc.is_main_process:
            write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            if cfg.train.report:
                from fastdiff.report import Run, write_report

                log.info(
                    "report: %s", write_report([Run.load(self.run_dir)], self.run_dir / "report")
                )
        if stop is not None:
            raise stop
        self.acc.wait_for_everyone()
        return summary

    def _new_window(self) -> Window:
        return Window.new(self.device, self.cfg.train.loss_bins, self.cfg.diffusion.T)

    def _images(self, w: Window) -> int:
        return w.steps * self.cfg.train.batch_size * self.acc.num_processes

    def _progress(self, step: int) -> dict:
        """The whole run's time, images and segments up to ``step``: the resumed
        checkpoint's record plus this segment, including the steps of the open log
        window (a checkpoint between logs loses none of them)."""
        before = self.resumed.progress if self.resumed is not None else {}
        w = self.window
        train_s = self.train_seconds + time.perf_counter() - w.start - w.excluded
        images = self.images_seen + self._images(w)
        seconds = time.perf_counter() - self.wall_start
        segment = {
            "start_step": self.start_step,
            "end_step": step,
            "seconds": seconds,
            "host": socket.gethostname(),
        }
        return {
            "wall_time_s": before.get("wall_time_s", 0.0) + seconds,
            "train_time_s": before.get("train_time_s", 0.0) + train_s,
            "images": before.get("images", 0) + images,
            "segments": [*before.get("segments", []), segment],
        }

    def _timed_step(self, step: int):
        if not (self.compiled and step == self.start_step):
            return self.train_step(step)
        t0 = time.perf_counter()
        out = self.train_step(step)
        out[0].item()  # one sync, to time compilation
        log.info(
            "compiled the training step in %.1f s (cache %s)",
            time.perf_counter() - t0,
            os.environ["TORCHINDUCTOR_CACHE_DIR"],
        )
        return out

    def _show(self, bar, done: int, last: dict) -> None:
        bar.set_postfix(
            loss=f"{last['train/loss']:.4f}", img_s=f"{last['perf/images_per_sec']:.0f}"
        )
        if bar.disable and self.acc.is_main_process:
            log.info(
                "step %d/%d  train/loss %.4f  %.0f img/s",
                done,
                self.cfg.train.total_steps,
                last["train/loss"],
                last["perf/images_per_sec"],
            )

    # ----------------------------------------------------- stopping early
    @contextlib.contextmanager
    def _signals(self):
        """SIGTERM/SIGINT finish the current step, checkpoint, and exit with EXIT_PREEMPTED."""
        self._signal = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self._signal = signum

        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    def _maybe_preempt(self, done: int) -> None:
        world = self.acc.num_processes
        if world > 1:  # agree across ranks, every few steps (a collective, not every step)
            if done % self.cfg.train.preempt_check_every:
                return
            flag = torch.tensor(float(self._signal), device=self.device)
            signum = int(self.acc.reduce(flag, reduction="sum").item())
        else:
            signum = self._signal
        if not signum or done >= self.cfg.train.total_steps:
            return
        self._save_checkpoint(done)
        self.metrics.log(done, {"event/preempted": 1})
        raise Preempted(
            done,
            f"stopped by signal at step {done}: resume with "
            f"train.resume=auto train.run_dir={self.run_dir}",
        )

    def _check_finite(self, step: int) -> None:
        """Policy stop: raise Diverged if any step since the last log was non-finite."""
        w = self.window
        per_rank = self.acc.gather(torch.stack([w.bad, w.first_bad])[None])  # (ranks, 2)
        if per_rank[:, 0].sum().item() > 0:
            first = int(per_rank[:, 1].min().item())
            raise Diverged(
                first,
                f"non-finite loss or gradient at step {first}: stopped "
                f"(train.on_nonfinite=stop); the last good checkpoint is in "
                f"{self.run_dir / 'checkpoints'}",
            )

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
        sums = torch.cat([torch.stack([w.loss, w.mse, w.grad_norm, w.bad]), w.by_t.flatten()])
        sums = self.acc.reduce(sums, reduction="sum").tolist()  # the host sync of this window
        loss, mse, grad_norm, bad = sums[:4]
        by_t = [sums[4 + i * w.bins : 4 + (i + 1) * w.bins] for i in range(3)]
        if bad and self.cfg.train.on_nonfinite == "stop":
            self._check_finite(step)
        good = max(w.steps * self.acc.num_processes - bad, 1)  # bad is summed over ranks
        seconds = time.perf_counter() - w.start - w.excluded
        images = w.steps * self.cfg.train.batch_size * self.acc.num_processes
        metrics = {
            "train/loss": loss / good,
            "train/mse_unweighted": mse / good,
            "train/grad_norm": grad_norm / good,
            "train/lr": self.cfg.optim.lr,
            "train/nonfinite_steps": int(bad / self.acc.num_processes),
            "perf/images_per_sec": images / seconds,
            "perf/seconds_per_step": seconds / w.steps,
            "perf/tflops": self.step_flops * w.steps * self.acc.num_processes / seconds / 1e12,
            "data/skipped": self._total_skipped(),
        }
        for name, wsum, msum, count in zip(t_bin_names(w.T, w.bins), *by_t):
            if count:  # (an empty bin logs nothing rather than 0/0)
                metrics[f"train/loss_by_t/{name}"] = wsum / count
                metrics[f"train/mse_unweighted_by_t/{name}"] = msum / count
        if self.peak_flops:  # model FLOP utilisation, against every process's peak
            peak = self.peak_flops * self.acc.num_processes / 1e12
            metrics["perf/mfu"] = metrics["perf/tflops"] / peak
        self.metrics.log(step, metrics)
        return metrics, seconds

    def _fid(self, step: int, n: int, prefix: str, final: bool = False) -> None:
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
            # The final score carries its bootstrap interval and precision/recall
            # (collapse shows as low recall); milestones only track the trend.
            scores = self.fid(
                samples, bootstrap=e.fid.bootstrap if final else 0, prc=final, seed=e.seed
            )
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

    def _fid_provenance(self) -> dict:
        """How this run's FIDs were computed (the report compares only equal ones)."""
        e = self.cfg.eval
        return {
            **self.fid.provenance,
            "sampler": e.sampler,
            "nfe": e.nfe,
            "milestone_samples": e.milestone_samples,
            "final_samples": e.final_samples,
            "seed": e.seed,
        }

    def _milestone_fid(self, step: int) -> None:
        self._fid(step, self.cfg.eval.milestone_samples, "val/fid_milestone")

    def _final_fid(self, step: int) -> None:
        self._fid(step, self.cfg.eval.final_samples, "eval/final", final=True)

    def _total_skipped(self) -> int:
        """Unreadable samples skipped so far, over all ranks."""
        if self.acc.num_processes == 1:
            return int(self.batches.skipped)
        n = torch.tensor(float(self.batches.skipped), device=self.device)
        return int(self.acc.reduce(n, reduction="sum").item())

    def _probe_curvature(self, step: int) -> None:
        if self.acc.is_main_process:  # one probe per run: it is a property of the weights
            self.metrics.log(step, self.probe(self.module))
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
        # Washed-out or collapsed samples show in their brightness and contrast (MS1-e9):
        # kept beside the grid, with the same numbers for training images, for the report.
        reference = self.reference_images[: cfg.grid_images].float() / 255
        stats = {
            kind: {
                "mean_intensity": imgs.flatten(1).mean(1).tolist(),
                "contrast": imgs.flatten(1).std(1).tolist(),
            }
            for kind, imgs in (("samples", x), ("training", reference))
        }
        write_text(self.run_dir / "samples" / f"stats_{step:07d}.json", json.dumps(stats) + "\n")
        if x.shape[-1] < 32:  # small images: upscale so the grid is readable
            x = torch.nn.functional.interpolate(x, scale_factor=32 // x.shape[-1], mode="nearest")
        path = self.run_dir / "samples" / f"grid_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.png")
        save_image(x, tmp, nrow=int(math.sqrt(cfg.grid_images)), padding=2)
        tmp.replace(path)

    def _save_checkpoint(self, step: int) -> None:
        if self.cfg.train.on_nonfinite == "stop":
            self._check_finite(step)  # never write a checkpoint past a divergence
        if self.acc.is_main_process:
            save_checkpoint(
                self.run_dir / "checkpoints" / f"step_{step:07d}.pt",
                step,
                self.module,
                self.ema,
                self.opt,
                self.acc.scaler,
                self.config_text,
                self.acc.num_processes,
                self._progress(step),
            )
            for old in checkpoints(self.run_dir)[: -self.cfg.train.keep_checkpoints]:
                old.unlink()
        self.acc.wait_for_everyone()


def training_loop(cfg: Config) -> dict:
    return Trainer(cfg).train()
