"""What the run logs about its training steps, summed on the device between logs.

The loss is read on the host only at the log cadence (one sync per window).
Non-finite steps are counted, not summed: ``bad`` and the first such step are kept
on the device, so divergence is noticed without a per-step sync. A window with no
finite step logs its averages as NaN, never as 0.

A checkpoint between two logs keeps the open window's sums (:meth:`Window.state`),
so the resumed run's first log averages the same steps as an uninterrupted run's.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import torch

from fastdiff.diffusion import t_bin_names


@dataclass
class Window:
    loss: torch.Tensor
    mse: torch.Tensor
    grad_norm: torch.Tensor
    bad: torch.Tensor
    first_bad: torch.Tensor
    by_t: torch.Tensor  # (3, bins): weighted loss, unweighted ε-MSE and count per t-bin
    bins: int = 0
    T: int = 1
    steps: int = 0  # trained in this process since the window opened
    carried: int = 0  # steps before a resume whose sums the window holds (from the checkpoint)
    start: float = field(default_factory=time.perf_counter)
    excluded: float = 0.0  # seconds of periodic work inside the window

    @classmethod
    def new(cls, device, bins: int = 0, T: int = 1) -> Window:
        zeros = [torch.zeros((), device=device) for _ in range(4)]
        inf = torch.full((), float("inf"), device=device)
        return cls(*zeros, inf, torch.zeros((3, bins), device=device), bins, T)

    def add(self, step: int, out: StepOut) -> None:
        finite = out.finite
        self.loss += torch.where(finite, out.loss, 0.0)
        self.mse += torch.where(finite, out.per_sample_mse.mean(), 0.0)
        self.grad_norm += torch.where(finite, out.grad_norm, 0.0)
        self.bad += (~finite).float()
        self.first_bad = torch.where(finite, self.first_bad, self.first_bad.clamp(max=step + 1))
        if self.bins:  # per-timestep sums (fastdiff.diffusion.t_bin_edges), on the device
            rows = torch.stack([out.per_sample, out.per_sample_mse, torch.ones_like(out.t.float())])
            rows = torch.where(finite, rows.float(), 0.0)
            self.by_t.index_add_(1, out.t * self.bins // self.T, rows)
        self.steps += 1

    def state(self, sums: torch.Tensor, first_bad: float) -> dict:
        """What a checkpoint keeps of the window: its rank-reduced ``sums``, the first
        non-finite step over all ranks and how many steps they cover."""
        return {
            "sums": sums.detach().cpu(),
            "first_bad": first_bad,
            "steps": self.steps + self.carried,
            "bins": self.bins,
        }

    def carry(self, saved: dict | None, holds_sums: bool) -> bool:
        """Continue the window a checkpoint kept (:meth:`state`). The rank that
        ``holds_sums`` takes the sums, the others only the step count: the log reduces
        over ranks. False (a fresh window) when there is none or its t-bins differ."""
        if not saved or saved["bins"] != self.bins:
            return False
        self.carried = saved["steps"]
        if holds_sums:
            sums = saved["sums"].to(self.loss.device)
            for name, value in zip(("loss", "mse", "grad_norm", "bad"), sums[:4]):
                getattr(self, name).copy_(value)
            self.by_t.copy_(sums[4:].view_as(self.by_t))
            self.first_bad.fill_(saved["first_bad"])
        return True

    def seconds(self) -> float:
        """Training time in the window so far (periodic work excluded)."""
        return time.perf_counter() - self.start - self.excluded

    def sums(self) -> torch.Tensor:
        """Everything to reduce over ranks, flat: loss, mse, grad norm, bad, by-t sums."""
        return torch.cat(
            [torch.stack([self.loss, self.mse, self.grad_norm, self.bad]), self.by_t.flatten()]
        )

    def metrics(self, sums: list[float], images: int, processes: int, step_flops: float) -> dict:
        """The window's log line from its rank-reduced ``sums``; ``images``, the time and
        FLOPs are this segment's steps only (carried ones were timed before the resume)."""
        loss, mse, grad_norm, bad = sums[:4]
        by_t = [sums[4 + i * self.bins : 4 + (i + 1) * self.bins] for i in range(3)]
        good = (self.steps + self.carried) * processes - bad  # bad is summed over ranks

        def mean(total: float) -> float:  # no finite step: no loss to report, not 0
            return total / good if good > 0 else float("nan")

        seconds = self.seconds()
        out = {
            "train/loss": mean(loss),
            "train/mse_unweighted": mean(mse),
            "train/grad_norm": mean(grad_norm),
            "train/nonfinite_steps": int(bad / processes),
            "perf/images_per_sec": images / seconds,
            "perf/seconds_per_step": seconds / self.steps,
            "perf/tflops": step_flops * self.steps * processes / seconds / 1e12,
        }
        for name, wsum, msum, count in zip(t_bin_names(self.T, self.bins), *by_t):
            if count:  # (an empty bin logs nothing rather than 0/0)
                out[f"train/loss_by_t/{name}"] = wsum / count
                out[f"train/mse_unweighted_by_t/{name}"] = msum / count
        return out


@dataclass
class StepOut:
    """One training step's results, all device tensors."""

    loss: torch.Tensor  # () batch mean of the weighted loss
    grad_norm: torch.Tensor  # () before clipping
    finite: torch.Tensor  # () bool: the update was applied
    t: torch.Tensor  # (B,)
    per_sample: torch.Tensor  # (B,) weighted loss
    per_sample_mse: torch.Tensor  # (B,) unweighted ε-MSE


class Progress:
    """The whole run's time, images and segments: the resumed checkpoint's record plus
    this segment's closed windows plus the open one (so a checkpoint between logs
    loses none of its steps)."""

    def __init__(self, before: dict, start_step: int, images_per_step: int):
        self.before, self.start_step, self.images_per_step = before, start_step, images_per_step
        self.wall_start = time.perf_counter()
        self.train_seconds, self.images = 0.0, 0

    def close(self, w: Window) -> None:
        self.train_seconds += w.seconds()
        self.images += w.steps * self.images_per_step

    def record(self, step: int, w: Window) -> dict:
        b, seconds = self.before, time.perf_counter() - self.wall_start
        segment = {
            "start_step": self.start_step,
            "end_step": step,
            "seconds": seconds,
            "host": socket.gethostname(),
        }
        train_s = self.train_seconds + w.seconds()
        return {
            "wall_time_s": b.get("wall_time_s", 0.0) + seconds,
            "train_time_s": b.get("train_time_s", 0.0) + train_s,
            "images": b.get("images", 0) + self.images + w.steps * self.images_per_step,
            "segments": [*b.get("segments", []), segment],
        }
