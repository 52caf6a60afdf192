"""The training loop: one step (objective → optimizer → EMA), then the periodic jobs.

Where things live: the loss in :mod:`fastdiff.objective`, the update in
:mod:`fastdiff.optim`, what is logged per window in :mod:`fastdiff.window`, grids and
FID in :mod:`fastdiff.jobs`, checkpoints and resume in :mod:`fastdiff.checkpoint`,
early stops in :mod:`fastdiff.stopping`. The Trainer sets them up and runs the loop.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from fastdiff import checkpoint as ckpt
from fastdiff.config import Config, flat
from fastdiff.curvature import RunProbes
from fastdiff.data import make_batches, probe_pool
from fastdiff.ema import EMA
from fastdiff.errors import ConfigError
from fastdiff.fid import build_evaluator
from fastdiff.flat import backs
from fastdiff.flops import peak_flops, train_step_flops
from fastdiff.jobs import FIDJob, Grids, Interruptible
from fastdiff.objective import Objective
from fastdiff.optim import FlatAdam
from fastdiff.restore import model_of
from fastdiff.rundir import (
    MetricsLog,
    checkpoint_step,
    checkpoints,
    config_yaml,
    make_run_dir,
    run_dir_for,
    write_text,
)
from fastdiff.seeding import step_draws, stream_seed
from fastdiff.stopping import (
    JobInterrupted,
    Preempted,
    Signals,
    Stopped,
    agreed_signal,
    check_finite,
)
from fastdiff.stopping import status as stop_status
from fastdiff.tuning import amp_precision
from fastdiff.window import Progress, StepOut, Window

log = logging.getLogger("fastdiff")
INDUCTOR_CACHE = Path.home() / ".cache" / "fastdiff" / "inductor"  # reused across runs


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg, self.acc = cfg, self._accelerator(cfg)
        acc = self.acc
        self.device, self.main = acc.device, acc.is_main_process
        torch.manual_seed(stream_seed(cfg.train.seed, "init"))  # same init in paired runs
        # The checkpoint first: a refused or finished resume costs no set-up, writes nothing.
        self.resumed = ckpt.resolve_resume(cfg, self.main)
        init_from = cfg.train.init_from
        self.parent = ckpt.read_checkpoint(Path(init_from)) if init_from else None
        ckpt.check_start(cfg, self.resumed, self.parent, acc.num_processes)
        self.start_step = self.resumed.step if self.resumed is not None else 0
        # One run per run directory: a folder holding another run is refused untouched.
        self.run_dir, self.restarted = self._claim_run_dir()
        # Data next: a missing or unreadable data set fails before anything is written.
        self.batches = make_batches(
            cfg.data,
            cfg.train.batch_size,
            cfg.train.seed,
            rank=acc.process_index,
            world_size=acc.num_processes,
            device=self.device,
        )
        self.image_shape = (3, cfg.data.image_size, cfg.data.image_size)
        explicit = cfg.eval.fid.enabled is True
        if cfg.eval.fid.enabled is False:
            self.fid, self.fid_off = None, "eval.fid.enabled=false"
        else:
            self.fid, self.fid_off = build_evaluator(cfg, self.batches, self.device, explicit)
        self.objective = Objective.of(cfg, self.device)
        self.schedule = self.objective.schedule
        self._build_model()
        self._start_record()

    @staticmethod
    def _accelerator(cfg: Config) -> Accelerator:
        cuda = torch.cuda.is_available()
        return Accelerator(mixed_precision=amp_precision(cfg.train.amp, cuda), cpu=not cuda)

    def _start_record(self) -> None:
        """The weights to start from, then the run dir, config.yaml, the metrics log and
        the jobs."""
        cfg = self.cfg
        parent = ckpt.start_from(
            cfg,
            self.resumed,
            self.parent,
            model=self.module,
            ema=self.ema,
            optimizer=self.optimizer,
            scaler=self.acc.scaler,
            device=self.device,
        )
        if self.resumed is not None:
            self.batches.seek(self.start_step)
            log.info("resumed from %s at step %d", self.resumed.path, self.start_step)
        self.config_text = config_yaml(cfg, parent)
        if self.main:
            make_run_dir(self.run_dir)
            if self.resumed is not None and self.resumed.run_dir is None:
                log.info(
                    "%s is not in a run directory: continuing in %s",
                    self.resumed.path,
                    self.run_dir,
                )
            write_text(self.run_dir / "config.yaml", self.config_text)
        resumed_at = self.start_step if self.resumed or self.restarted else None
        self.metrics = MetricsLog(self.run_dir, self.main, resumed_at, lambda: flat(cfg))
        self.reference_images = probe_pool(cfg.data, self.batches)  # uint8, for probes/stats
        if cfg.curvature.enabled:
            log.info("curvature: every %d steps", self._probe_every)
        self.probe = (
            RunProbes(self.reference_images, cfg, self.objective, self.device)
            if cfg.curvature.enabled
            else None
        )
        shape = self.image_shape
        self.grids = Grids(
            self.run_dir,
            cfg.sampling,
            self.schedule,
            shape,
            reference=self.reference_images,
            prediction=cfg.loss.prediction,
        )
        if self.fid is not None:
            self.fid_job = FIDJob(
                self.fid,
                cfg.eval,
                self.acc,
                self.metrics,
                schedule=self.schedule,
                shape=shape,
                prediction=cfg.loss.prediction,
                spacing=cfg.sampling.spacing,
            )

    # ----------------------------------------------------------------- set-up
    def _build_model(self) -> None:
        cfg = self.cfg
        m = cfg.model
        model = model_of(cfg, self.device)
        self.n_params = sum(p.numel() for p in model.parameters())
        # counted once on the meta device: convolutions, matmuls and attention, fwd + bwd
        size, batch = cfg.data.image_size, cfg.train.batch_size
        self.step_flops = train_step_flops(m.name, m.base_channels, size, batch)
        self.peak_flops = peak_flops(self.device, self.acc.mixed_precision)
        o = cfg.optim
        self.optimizer = FlatAdam(
            model,
            self.acc,
            o.lr,
            (o.beta1, o.beta2),
            weight_decay=o.weight_decay,
            grad_clip=cfg.train.grad_clip,
            name=o.name,
        )
        self.ema = EMA(model, cfg.train.ema_decay, self.optimizer.flat)
        # The model is on self.device already: accelerate's own .to("cpu:0") would copy
        # every parameter out of the flat buffer.
        self.model = self.acc.prepare_model(model, device_placement=False)
        self.module = model  # unwrapped, once: unwrap_model walks every module per call
        if not backs(self.optimizer.flat, model):
            raise RuntimeError("the model's parameters left the flat buffer during prepare")
        # measured: compiling is slower overall on CPU (docs/performance.md)
        self.compiled = (
            cfg.train.compile if cfg.train.compile is not None else self.device.type == "cuda"
        )
        self.loss = self.objective
        if self.compiled:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(INDUCTOR_CACHE))
            # One graph for model + loss; under DDP, Dynamo splits at bucket boundaries.
            fullgraph = self.acc.num_processes == 1
            self.loss = torch.compile(
                self.objective, fullgraph=fullgraph, backend=cfg.train.compile_backend
            )

    def _claim_run_dir(self) -> tuple[Path, bool]:
        """Rank 0's run directory, checked before anything is written
        (:func:`fastdiff.checkpoint.claim_run_dir`), and whether the run starts again
        from step 0 in a folder of its own that has no checkpoint yet."""
        resumed_dir = self.resumed.run_dir if self.resumed is not None else None
        path = run_dir_for(self.cfg, resumed_dir)
        shared = [str(path), "", False]  # path, refusal, restart
        if self.main:
            try:
                shared[2] = ckpt.claim_run_dir(self.cfg, self.resumed, path)
            except ConfigError as err:
                shared[1] = str(err)
        broadcast_object_list(shared)  # every rank writes into rank 0's directory, or none
        if shared[1]:
            raise ConfigError(shared[1])
        return Path(shared[0]), bool(shared[2])

    @property
    def _probe_every(self) -> int:
        return self.cfg.curvature.every or self.cfg.train.log_every

    # ------------------------------------------------------------------- step
    def draws(self, step: int):
        """This rank's images (B, C, H, W), timesteps (B,) and noise for ``step``."""
        cfg, rank, world = self.cfg, self.acc.process_index, self.acc.num_processes
        x0 = self.batches.batch(step)
        t, noise = step_draws(
            cfg.train.seed,
            step,
            rank,
            world,
            batch=x0.shape[0],
            shape=self.image_shape,
            T=cfg.diffusion.T,
            device=self.device,
        )
        return x0, t, noise

    def seed_dropout(self, step: int) -> None:
        """Seed the default generators with this step's dropout stream: the masks a step
        draws, alone or in a fused job, depend only on (seed, step, rank)."""
        torch.manual_seed(stream_seed(self.cfg.train.seed, "dropout", step, self.acc.process_index))

    def train_step(self, step: int) -> StepOut:
        """One optimizer step; a non-finite loss or gradient skips the update on the device."""
        x0, t, noise = self.draws(step)
        self.seed_dropout(step)
        with self.acc.autocast():
            per_sample = self.loss(self.model, x0, t, noise)
        return self.finish_step(per_sample, t)

    def finish_step(self, per_sample: torch.Tensor, t: torch.Tensor, *, backward=True) -> StepOut:
        """The end of every step, alone or fused: the update (clip, skip-on-non-finite,
        Adam; ``backward=False`` when the gradient is already in the flat buffer), the EMA,
        and what the log window sums."""
        loss = per_sample.mean()
        update = self.optimizer.step if backward else self.optimizer.update
        grad_norm, finite = update(loss)
        self.ema.update(self.module)
        per_sample = per_sample.detach()
        mse = self.objective.unweighted(per_sample, t)
        return StepOut(loss.detach(), grad_norm, finite, t, per_sample, mse)

    # ------------------------------------------------------------------- loop
    def jobs(self):
        """The periodic work, as (is it due after this step?, job) in running order."""
        total = self.cfg.train.total_steps
        c = self.cfg

        def every(n: int):
            return lambda done: done % n == 0 or done == total

        jobs = []
        if self.probe is not None:
            jobs.append((every(self._probe_every), self._probe_curvature))
        grid_due = every(c.sampling.grid_every)
        if self.fid is not None:
            milestone = every(c.eval.milestone_every)
            jobs.append((milestone, self._fid_milestone))
            jobs.append((lambda done: done == total, self._fid_final))
            grid_due = lambda done, g=grid_due: g(done) or milestone(done)  # noqa: E731
        jobs.append((grid_due, self._save_grid))
        jobs.append((every(c.train.ckpt_every), self._save_checkpoint))
        return jobs

    def train(self) -> dict:
        """Every step from start_step to total_steps, then summary.json (and the report).
        A run that several steps drive together (a fused study) calls begin, after_step
        and finish itself."""
        self.begin()
        stop = None
        with self.signals.caught():
            try:
                self.redo_jobs()
                for step in range(self.start_step, self.cfg.train.total_steps):
                    self.after_step(step, self._timed_step(step))
            except Stopped as err:
                stop = err
        return self.finish(stop)

    def begin(self) -> None:
        cfg = self.cfg
        if self.main:
            log.info(
                "run dir %s | %s | %.2fM params | %s x%d | %s",
                self.run_dir,
                cfg.experiment,
                self.n_params / 1e6,
                self.device,
                self.acc.num_processes,
                self.acc.mixed_precision,
            )
        show = cfg.train.progress and self.main
        self.bar = tqdm(
            total=cfg.train.total_steps,
            initial=self.start_step,
            desc=cfg.experiment,
            unit="step",
            disable=not show,
        )
        before = self.resumed.progress if self.resumed is not None else {}
        self.progress = Progress(before, self.start_step, self._images_per_step)
        self.window, self.last = self._new_window(), self.metrics.last_train
        if self.resumed is not None and not self.window.carry(self.resumed.window, self.main):
            log.info("the checkpoint kept no open log window: the first log averages fewer steps")
        if self.start_step == 0:  # E_t[w(t)]: how much the weighting rescales the loss
            self.metrics.log(0, {"loss/mean_weight": self.objective.weights.mean().item()})
        # Jobs are cut short by a signal only in a single process: the ranks of several
        # would leave their collectives at different points; they agree at a step instead.
        one = self.acc.num_processes == 1
        self._jobs, self.signals = self.jobs(), Signals(interrupt_jobs=one, announce=self.main)
        # (late-bound: a fused study hands every run one Signals after begin)
        self._job_model = Interruptible(self.ema.model, lambda: self.signals.stop_job())
        self._saved_at: int | None = None  # the step of the last checkpoint written

    def after_step(self, step: int, out: StepOut) -> None:
        """Account the step, log at the cadence, run the jobs that are due, and stop
        (Preempted) if a signal came."""
        self.window.add(step, out)
        self.bar.update()
        done, total = step + 1, self.cfg.train.total_steps
        if done % self.cfg.train.log_every == 0 or done == total:
            self._log(done)  # and a new window, which excludes the jobs' time
        cut = self._run_jobs(done, [job for due, job in self._jobs if due(done)])
        self._maybe_preempt(done, cut)

    def redo_jobs(self) -> None:
        """The jobs a signal cut short at the resumed checkpoint's step, then that
        checkpoint again without them (a run resumed at total_steps is then finished)."""
        names = self.resumed.pending_jobs if self.resumed is not None else []
        if not names:
            return
        log.info("step %d: redoing %s (cut short by a signal)", self.start_step, ", ".join(names))
        by_name = {_job_name(job): job for _, job in self._jobs}
        jobs = [by_name[name] for name in names if name in by_name]
        cut = self._run_jobs(self.start_step, [*jobs, self._save_checkpoint])
        self._maybe_preempt(self.start_step, cut)

    def _run_jobs(self, done: int, jobs: list) -> list[str]:
        """Run ``jobs`` for step ``done``, in order. Once a signal has come, the jobs on
        the weights stop at their next sampler step or do not start: their names are
        returned, for the checkpoint of :meth:`_maybe_preempt` to keep and the resumed
        run to redo (the periodic checkpoint then waits for that one)."""
        cut: list[str] = []
        for job in jobs:
            if job == self._save_checkpoint:
                if not cut:
                    self._timed(job, done)
                continue
            if not cut and not self.signals.stop_job():
                try:
                    with self.signals.job():
                        self._timed(job, done)
                    continue
                except JobInterrupted:
                    pass
            cut.append(_job_name(job))
        return cut

    def _timed(self, job, done: int) -> None:
        t0 = time.perf_counter()
        try:
            job(done)
        finally:
            self.window.excluded += time.perf_counter() - t0

    def finish(self, stop: Stopped | None) -> dict:
        """summary.json (and the report); re-raises ``stop`` once they are written."""
        self.bar.close()
        self.batches.close()
        summary = self._summary(stop_status(stop))
        self.metrics.close()
        if self.main:
            write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            if self.cfg.train.report and not self.signals.hard:  # a second signal: no report
                from fastdiff.report import Run
                from fastdiff.report.render import write_report

                report = write_report([Run.load(self.run_dir)], self.run_dir / "report")
                log.info("report: %s", report)
        if stop is not None:
            raise stop
        self.acc.wait_for_everyone()
        return summary

    def _summary(self, status: dict) -> dict:
        progress = self.progress.record(status.get("step", self.cfg.train.total_steps), self.window)
        train_s = progress["train_time_s"]
        return {
            **self.last,
            "step": self.cfg.train.total_steps,
            "preempted": False,
            "diverged": False,
            "experiment": self.cfg.experiment,
            **progress,
            "images_per_sec": progress["images"] / train_s if train_s else None,
            "params": self.n_params,
            "flops_per_step": self.step_flops * self.acc.num_processes,
            "device": str(self.device),
            "processes": self.acc.num_processes,
            **(
                {"fid_provenance": self.fid_job.provenance()}
                if self.fid is not None
                else {"fid_off": self.fid_off}
            ),
            **status,
        }

    @property
    def _images_per_step(self) -> int:
        return self.cfg.train.batch_size * self.acc.num_processes

    def _new_window(self) -> Window:
        return Window.new(self.device, self.cfg.train.loss_bins, self.cfg.diffusion.T)

    def _timed_step(self, step: int) -> StepOut:
        if not (self.compiled and step == self.start_step):
            return self.train_step(step)
        t0 = time.perf_counter()
        out = self.train_step(step)
        out.loss.item()  # one sync, to time compilation
        log.info(
            "compiled the training step in %.1f s (cache %s)",
            time.perf_counter() - t0,
            os.environ["TORCHINDUCTOR_CACHE_DIR"],
        )
        return out

    # -------------------------------------------------------------- the jobs
    def _log(self, done: int) -> None:
        """The window's metrics (its one host sync), then a fresh window."""
        w, world = self.window, self.acc.num_processes
        sums = self.acc.reduce(w.sums(), reduction="sum").tolist()
        if sums[3] and self.cfg.train.on_nonfinite == "stop":
            self._check_finite(done)
        metrics = w.metrics(sums, w.steps * self._images_per_step, world, self.step_flops)
        metrics["train/lr"] = self.cfg.optim.lr
        metrics["data/skipped"] = self._total_skipped()
        if self.peak_flops:  # model FLOP utilisation, against every process's peak
            metrics["perf/mfu"] = metrics["perf/tflops"] / (self.peak_flops * world / 1e12)
        self.metrics.log(done, metrics)
        self.progress.close(w)
        self.last = metrics
        self.bar.set_postfix(
            loss=f"{metrics['train/loss']:.4f}", img_s=f"{metrics['perf/images_per_sec']:.0f}"
        )
        if self.bar.disable and self.main:
            log.info(
                "step %d/%d  train/loss %.4f  %.0f img/s",
                done,
                self.cfg.train.total_steps,
                metrics["train/loss"],
                metrics["perf/images_per_sec"],
            )
        self.window = self._new_window()

    def _maybe_preempt(self, done: int, cut: list[str]) -> None:
        """SIGTERM/SIGINT: checkpoint (with the jobs ``cut`` short) and stop. A signal
        at the last step, with no job cut short, lets the run finish."""
        every = self.cfg.train.preempt_check_every
        if not cut and (
            done >= self.cfg.train.total_steps
            or not agreed_signal(self.acc, self.signals, done, every)
        ):
            return
        if cut or self._saved_at != done:
            self._save_checkpoint(done, cut)
        self.metrics.log(done, {"event/preempted": 1})
        redo = f" ({', '.join(cut)} cut short: redone on resume)" if cut else ""
        raise Preempted(
            done,
            f"stopped by signal at step {done}{redo}: resume with "
            f"train.resume=auto train.run_dir={self.run_dir}",
        )

    def _check_finite(self, step: int) -> None:
        """Policy stop: Diverged if any step since the last log was non-finite."""
        good = [p for p in checkpoints(self.run_dir) if checkpoint_step(p) <= step]
        check_finite(self.acc, self.window, good[-1] if good else None)

    def _total_skipped(self) -> int:
        """Unreadable samples skipped so far, over all ranks."""
        if self.acc.num_processes == 1:
            return int(self.batches.skipped)
        n = torch.tensor(float(self.batches.skipped), device=self.device)
        return int(self.acc.reduce(n, reduction="sum").item())

    def _save_grid(self, step: int) -> None:
        if self.main:
            self.grids(step, self._job_model)

    def _fid_milestone(self, step: int) -> None:
        self.fid_job.milestone(step, self._job_model)

    def _fid_final(self, step: int) -> None:
        self.fid_job.final(step, self._job_model)

    def _probe_curvature(self, step: int) -> None:
        if self.main:  # one probe per run: it is a property of the weights
            self.metrics.log(step, self.probe(self.module))
        self.acc.wait_for_everyone()

    def _save_checkpoint(self, step: int, cut: list[str] | None = None) -> None:
        """The checkpoint of ``step``, with the open log window and the jobs ``cut``
        short at this step; then the oldest of this run's beyond keep_checkpoints."""
        if self.cfg.train.on_nonfinite == "stop":
            self._check_finite(step)  # never write a checkpoint past a divergence
        window = self._window_state()
        if self.main:
            ckpt.save_checkpoint(
                self.run_dir / "checkpoints" / f"step_{step:07d}.pt",
                step,
                self.module,
                self.ema,
                optimizer=self.optimizer,
                scaler=self.acc.scaler,
                config=self.config_text,
                processes=self.acc.num_processes,
                progress=self.progress.record(step, self.window),
                window=window,
                pending_jobs=cut or [],
            )
            # Only the steps this run has reached: checkpoints past them (left by the
            # future of an older checkpoint it resumed from) are not a reason to drop its own.
            reached = [p for p in checkpoints(self.run_dir) if checkpoint_step(p) <= step]
            for old in reached[: -self.cfg.train.keep_checkpoints]:
                old.unlink()
        self._saved_at = step
        self.acc.wait_for_everyone()

    def _window_state(self) -> dict:
        """The open log window reduced over ranks (rank 0 carries it on resume)."""
        w = self.window
        sums = self.acc.reduce(w.sums(), reduction="sum")
        first_bad = self.acc.gather(w.first_bad[None]).min().item()
        return w.state(sums, first_bad)


def _job_name(job) -> str:
    """A periodic job's name in a checkpoint's pending_jobs (its method's name)."""
    return getattr(job, "__name__", type(job).__name__).removeprefix("_")


def training_loop(cfg: Config) -> dict:
    return Trainer(cfg).train()
