"""Loading runs, grouping them into arms and pairing the arms by seed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from fastdiff.diffusion import Schedule, snr
from fastdiff.weighting import canonical_loss, weights

CARD_STEPS = 10_000  # the cards' run length; criteria windows scale with shorter runs
FID_MILESTONE, FID_FINAL = "val/fid_milestone/fid", "eval/final/fid"
TRACE = "curvature/hutch_trace_mean"
TRACE_UNW = "curvature/hutch_trace_mean_unweighted"
# Config keys that do not make a run another arm: where it ran, and the seed it pairs by.
NOT_ARM = {("train", "seed"), ("train", "run_dir"), ("train", "resume"), ("train", "runs_root")}
CARD_SEED = 1077  # the cards' seed: the seed pair whose verdict is the card's own
# Keys two runs of a comparison may differ in beyond what the card varies: the name,
# the seed they pair by, where they ran, and switches that change neither what is
# trained nor what is measured (implementation, cadence of checkpoints and grids).
NOT_COMPARED = {
    "experiment",
    *(".".join(k) for k in NOT_ARM),
    "train.progress",
    "train.compile",
    "train.compile_backend",
    "train.reuse_host_memory",
    "train.report",
    "train.keep_checkpoints",
    "train.ckpt_every",
    "train.preempt_check_every",
    "model.kernels",
    "model.channels_last",
    "data.workers",
    "eval.fid.cache_dir",
    "eval.batch_size",
    "sampling.grid_every",
    "sampling.grid_images",
}


def flatten(node: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as {"group.key": value}."""
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


# Settings added since runs were first recorded, with the value a record without them had
ADDED = {
    "loss.prediction": "eps",
    "diffusion.zero_terminal_snr": False,
    "sampling.spacing": "linspace",
}


def settings(config: dict) -> dict[str, object]:
    """A run's (or a card arm's) config as comparable flat settings: old names read as
    the current ones, unused loss parameters None, settings added since given their
    value then (so a record from before a rename or an addition compares equal)."""
    flat = canonical_loss(flatten({k: v for k, v in config.items() if k != "defaults"}))
    return ADDED | flat


def differing(runs: list[Run], allowed: set[str] = frozenset()) -> dict[str, list]:
    """The config keys whose values differ between ``runs`` (beyond NOT_COMPARED and
    ``allowed``), each with every run's value."""
    flat = [settings(r.config) for r in runs]
    keys = sorted(set().union(*flat) - NOT_COMPARED - set(allowed))
    return {
        k: [f.get(k) for f in flat] for k in keys if any(f.get(k) != flat[0].get(k) for f in flat)
    }


# --------------------------------------------------------------------- loading
@dataclass
class Run:
    path: Path
    config: dict
    rows: list[dict]
    summary: dict = field(default_factory=dict)
    arm_name: str | None = None  # the card's name for the run's arm, once assigned

    @classmethod
    def load(cls, path: str | Path) -> Run:
        path = Path(path)
        if not (path / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{path} is not a fastdiff run directory (no metrics.jsonl)")
        rows = [
            json.loads(line)
            for line in (path / "metrics.jsonl").read_text().splitlines()
            if line.strip()
        ]
        config = (
            yaml.safe_load((path / "config.yaml").read_text())
            if (path / "config.yaml").is_file()
            else {}
        )
        summary = (
            json.loads((path / "summary.json").read_text())
            if (path / "summary.json").is_file()
            else {}
        )
        return cls(path, config, rows, summary)

    @property
    def name(self) -> str:
        return self.arm_name or self.config.get("experiment") or self.path.name

    @property
    def seed(self) -> int:
        return int(self.config.get("train", {}).get("seed", 0))

    @property
    def arm(self) -> str:
        """The run's config without its seed and location: runs of one arm share it."""
        node = {k: v for k, v in self.config.items() if k not in ("parent", "defaults")}
        node = {
            g: (
                {k: v for k, v in sub.items() if (g, k) not in NOT_ARM}
                if isinstance(sub, dict)
                else sub
            )
            for g, sub in node.items()
        }
        return json.dumps(node, sort_keys=True, default=str)

    @property
    def weighting(self) -> str:
        return self.config.get("loss", {}).get("weighting", "uniform")

    @property
    def schedule(self) -> str:
        return self.config.get("diffusion", {}).get("beta_schedule", "?")

    @property
    def total_steps(self) -> int:
        return int(self.config.get("train", {}).get("total_steps", CARD_STEPS))

    @property
    def reached(self) -> int | None:
        """The step the run ended at (None: it wrote no summary, so it never ended)."""
        step = self.summary.get("step")
        return None if step is None else int(step)

    @property
    def finished(self) -> bool:
        return (
            self.reached is not None
            and self.reached >= self.total_steps
            and not self.summary.get("preempted")
            and not self.summary.get("diverged")
        )

    def stopped_at(self) -> str:
        """Why the run is not finished, in words."""
        if self.reached is None:
            return f"{self.name} (seed {self.seed}) never finished (no summary.json)"
        return (
            f"{self.name} (seed {self.seed}) stopped at step {self.reached} of {self.total_steps}"
        )

    @property
    def loss(self) -> dict:
        """The run's loss settings as fastdiff records them now (old key names read)."""
        flat = {f"loss.{k}": v for k, v in self.config.get("loss", {}).items()}
        out = canonical_loss(flat)
        return {k[len("loss.") :]: v for k, v in out.items()} | {
            "prediction": flat.get("loss.prediction", "eps")
        }

    @property
    def gamma(self) -> float | None:
        return self.loss.get("gamma")

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.config.get("diffusion", {}).get("zero_terminal_snr", False))

    @property
    def objective(self) -> str:
        """The weighting family with its parameters, and the prediction when it is not ε."""
        loss = self.loss
        params = [f"{p}={loss[p]:g}" for p in ("gamma", "k") if loss.get(p) is not None]
        w = self.weighting if self.weighting != "minsnr" else "Min-SNR"
        if self.weighting != "uniform" and params:
            w += " " + ", ".join(params).replace("gamma", "γ")
        pred = loss["prediction"]
        return w if pred == "eps" else f"{pred}-prediction, {w}"

    @property
    def schedule_label(self) -> str:
        return f"{self.schedule} β" + (", zero terminal SNR" if self.zero_terminal_snr else "")

    def weight_table(self):
        """(log-SNR (T,), w(t) (T,)): the weight on this run's own MSE at each timestep."""
        d = self.config.get("diffusion", {})
        sched = Schedule.make(
            self.schedule, int(d.get("T", 1000)), zero_terminal_snr=self.zero_terminal_snr
        )
        s = snr(sched.alphas_cumprod)
        loss = self.loss
        params = {p: loss.get(p) for p in ("gamma", "k")}
        w = weights(s, self.weighting, prediction=loss["prediction"], **params)
        return s.log().numpy(), w.numpy()

    @property
    def label(self) -> str:
        return f"{self.name} ({self.schedule_label}, {self.objective})"

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of ``key``; a value logged as missing (null) is NaN."""
        pts = [
            (r["step"], float("nan" if r[key] is None else r[key])) for r in self.rows if key in r
        ]
        if not pts:
            return np.zeros(0), np.zeros(0)
        steps, values = zip(*pts)
        return np.asarray(steps, float), np.asarray(values, float)

    def value(self, key: str) -> float | None:
        _, v = self.series(key)
        return float(v[-1]) if len(v) else None

    def final_sample_stats(self) -> dict | None:
        """Per-sample mean intensity and contrast of the final grid and of as many
        training images (written beside the grids)."""
        found = sorted((self.path / "samples").glob("stats_*.json"))
        return json.loads(found[-1].read_text()) if found else None

    def final_grid(self) -> Path | None:
        grids = sorted((self.path / "samples").glob("grid_*.png"))
        return grids[-1] if grids else None


Pair = tuple[Run, Run]  # (vanilla, Min-SNR) runs of one seed


def group_arms(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by arm (config without seed), each arm's runs sorted by seed."""
    arms: dict[str, list[Run]] = {}
    for run in runs:
        arms.setdefault(run.arm, []).append(run)
    return {k: sorted(v, key=lambda r: r.seed) for k, v in arms.items()}


def pairs_of(
    runs: list[Run], schedule: str | None = None, *, baseline: str | None = None
) -> list[Pair]:
    """(baseline, treatment) runs paired by seed: with the card's ``baseline`` arm (runs
    named by their card), every other arm against it; else the largest uniform arm
    against the largest weighted one, optionally under one β schedule."""
    if baseline is not None and any(r.arm_name == baseline for r in runs):
        base = {r.seed: r for r in runs if r.arm_name == baseline}
        treated = [r for r in runs if r.arm_name not in (None, baseline)]
        return [
            (base[r.seed], r)
            for r in sorted(treated, key=lambda r: (r.name, r.seed))
            if r.seed in base
        ]
    arms = [a for a in group_arms(runs).values() if schedule in (None, a[0].schedule)]
    base = max((a for a in arms if a[0].weighting == "uniform"), key=len, default=None)
    treat = max((a for a in arms if a[0].weighting != "uniform"), key=len, default=None)
    if base is None or treat is None:
        return []
    by_seed = {r.seed: r for r in treat}
    return [(b, by_seed[b.seed]) for b in base if b.seed in by_seed]
