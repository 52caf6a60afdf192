"""Calibration of the report's verdicts: simulated paired studies with a known truth.

    fastdiff calibrate [--reps 200] [--seed 0]      (fastdiff/calibrate_cli.py)

Each replicate draws a study of n seeds (n = 1, 2, 3, 5), builds the runs' logs in
memory as the trainer writes them, and hands them to the report's own criterion
functions. Two truths are known for every study:

- the **arms'** value (what "Min-SNR vs vanilla" is over seeds), which an arms'
  verdict and interval must hold;
- each **seed's** noise-free value (what that seed's two runs would measure with
  infinite probes and samples), which the seed pair's interval must hold.

The model (the probe and FID as fastdiff measures them, the trajectory as the issue's
review assumed):

- log-trace of the baseline: an AR(1) path over the 17 probe steps of 2k–10k
  (correlation 0.7, sd 0.15), around 100; Min-SNR's is the baseline's times
  (1 + change at that step)(1 + ηₛ), with a seed effect ηₛ ~ N(0, 0.08²);
- the probe: K = 16 vectors and B = 8 timestep strata, reused at every step and shared
  by the arms of a seed: term (k, j) = trace · cⱼ · (1 + uₖ + wⱼ + 0.05 ε), uₖ ~ N(0,
  0.3²), wⱼ ~ N(0, 0.3²) (Min-SNR's wⱼ correlated 0.8 with vanilla's); Min-SNR's strata
  weights cⱼ span 1000× (its weights under cosine), normalised to mean 1;
- spikes: the same AR(1) paths at sd 0.35, Min-SNR's path correlated 0.5 with
  vanilla's; the arms' truth is the expected count difference (5,000 noise-free
  studies);
- FID: vanilla's 30·e^(0.05 z) per seed, Min-SNR's times (1 + θ + ηₛ), ηₛ ~ N(0,
  0.05²), each measured with a bootstrap SE of 2% (logged as eval/final/fid_se);
- the gap: a linear and a cosine pair per seed, each as above;
- loss: unweighted ε-MSE over the last quarter's 10 log steps, Min-SNR's ratio (θ + ηₛ)
  per seed, 2% noise per log step.

A verdict is wrong when it lies on the other side of the threshold from the truth (the
threshold itself counts as the pass side).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastdiff.cards import load_card
from fastdiff.report.criteria import (
    Criterion,
    curvature_reduction,
    exploding_curvature,
    fid_band,
    fid_gap_persists,
    fid_ratio,
    function_params,
    loss_pathology,
    spike_count,
)
from fastdiff.report.runs import FID_FINAL, Run
from fastdiff.stats import FAIL, PASS

STEPS = np.arange(2000, 10001, 500)
K, B = 16, 8
SEED_COUNTS = (1, 2, 3, 5)


# ------------------------------------------------------------------- the model
def ar1(rng, n: int, rho: float, sd: float) -> np.ndarray:
    x = np.empty(n)
    x[0] = sd * rng.standard_normal()
    for i in range(1, n):
        x[i] = rho * x[i - 1] + sd * math.sqrt(1 - rho * rho) * rng.standard_normal()
    return x


def _config(name: str, weighting: str, schedule: str, seed: int) -> dict:
    return {
        "experiment": name,
        "loss": {"weighting": weighting, "gamma": 5.0},
        "diffusion": {"beta_schedule": schedule},
        "train": {"total_steps": 10_000, "seed": seed},
    }


def _run(name, weighting, schedule, seed, *, rows) -> Run:
    summary = {"step": 10_000}
    return Run(Path(f"{name}-{seed}"), _config(name, weighting, schedule, seed), rows, summary)


def _probe_rows(traces: np.ndarray, c: np.ndarray, u: np.ndarray, w: np.ndarray, *, rng) -> list:
    """A run's curvature rows: every step's (K, B) terms around its trace."""
    rows = []
    for step, trace in zip(STEPS, traces):
        noise = 0.05 * rng.standard_normal((K, B))
        h = trace * c[None, :] * (1 + u[:, None] + w[None, :] + noise)  # (K, B)
        probes, samples = h.mean(1), h.mean(0)
        se = math.hypot(probes.std(ddof=1) / math.sqrt(K), samples.std(ddof=1) / math.sqrt(B))
        rows.append(
            {
                "step": int(step),
                "curvature/hutch_trace_mean": float(h.mean()),
                "curvature/hutch_trace_stderr_total": se,
                "curvature/hutch_trace_probes": probes.tolist(),
                "curvature/hutch_trace_samples": samples.tolist(),
            }
        )
    return rows


def curvature_study(rng, seeds: list[int], change: np.ndarray, path_sd: float = 0.15):
    """Pairs whose Min-SNR trace is vanilla's times (1 + change)(1 + ηₛ), and each
    seed's noise-free base and treat traces."""
    strata = np.geomspace(1e-3, 1, B)
    strata /= strata.mean()
    pairs, truths = [], []
    for seed in seeds:
        base = 100 * np.exp(ar1(rng, len(STEPS), 0.7, path_sd))
        treat = base * (1 + change) * (1 + 0.08 * rng.standard_normal())
        u = 0.3 * rng.standard_normal(K)
        w_b = 0.3 * rng.standard_normal(B)
        w_t = 0.8 * w_b + 0.6 * 0.3 * rng.standard_normal(B)
        rows_b = _probe_rows(base, np.ones(B), u, w_b, rng=rng)
        rows_t = _probe_rows(treat, strata, u, w_t, rng=rng)
        pairs.append(
            (
                _run("vanilla", "uniform", "linear", seed, rows=rows_b),
                _run("min-snr", "minsnr", "linear", seed, rows=rows_t),
            )
        )
        truths.append((base, treat))
    return pairs, truths


def spike_paths(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    xb = ar1(rng, n, 0.7, 0.35)
    xt = 0.5 * xb + math.sqrt(0.75) * ar1(rng, n, 0.7, 0.35)
    return 100 * np.exp(xb), 100 * np.exp(xt)


def spike_difference(base: np.ndarray, treat: np.ndarray, factor: float, lo_index: int) -> int:
    vb, vt = base[lo_index:], treat[lo_index:]
    limit = factor * np.median(vb)
    return int((vt > limit).sum() - (vb > limit).sum())


def spike_study(rng, seeds: list[int]):
    u_sd, w_sd = 0.1, 0.1
    pairs = []
    for seed in seeds:
        base, treat = spike_paths(rng, len(STEPS))
        u = u_sd * rng.standard_normal(K)
        w = w_sd * rng.standard_normal(B)
        pairs.append(
            (
                _run(
                    "vanilla",
                    "uniform",
                    "linear",
                    seed,
                    rows=_probe_rows(base, np.ones(B), u, w, rng=rng),
                ),
                _run(
                    "min-snr",
                    "minsnr",
                    "linear",
                    seed,
                    rows=_probe_rows(treat, np.ones(B), u, w, rng=rng),
                ),
            )
        )
    return pairs, [None] * len(seeds)


def fid_pair(rng, seed: int, theta: float, schedule: str, *, names=("vanilla-cos", "min-snr-cos")):
    """A pair of finished runs with final FIDs, and the seed's noise-free ratio."""
    fb = 30 * math.exp(0.05 * rng.standard_normal())
    ratio = 1 + theta + 0.05 * rng.standard_normal()
    runs = []
    for name, weighting, f in ((names[0], "uniform", fb), (names[1], "minsnr", fb * ratio)):
        se = 0.02 * f
        row = {"step": 10_000, FID_FINAL: f + se * rng.standard_normal(), FID_FINAL + "_se": se}
        runs.append(_run(name, weighting, schedule, seed, rows=[row]))
    return tuple(runs), ratio


def fid_study(rng, seeds, theta: float):
    got = [fid_pair(rng, s, theta, "cosine") for s in seeds]
    return [p for p, _ in got], [r for _, r in got]


def gap_study(rng, seeds, theta_linear: float, theta_cosine: float):
    lin = [fid_pair(rng, s, theta_linear, "linear", names=("vanilla", "min-snr")) for s in seeds]
    cos = [fid_pair(rng, s, theta_cosine, "cosine") for s in seeds]
    truths = [rc - rl for (_, rl), (_, rc) in zip(lin, cos)]
    return ([p for p, _ in lin], [p for p, _ in cos]), truths


def loss_study(rng, seeds, theta: float):
    steps = np.arange(7500, 10001, 250)
    pairs, truths = [], []
    for seed in seeds:
        mb = 0.05 * math.exp(0.05 * rng.standard_normal())
        ratio = theta + 0.05 * rng.standard_normal()
        runs = []
        for name, weighting, m in (
            ("vanilla-cos", "uniform", mb),
            ("min-snr-cos", "minsnr", mb * ratio),
        ):
            rows = [
                {"step": int(s), "train/mse_unweighted": m * (1 + 0.02 * rng.standard_normal())}
                for s in steps
            ]
            runs.append(_run(name, weighting, "cosine", seed, rows=rows))
        pairs.append(tuple(runs))
        truths.append(ratio)
    return pairs, truths


# ------------------------------------------------------------------- scenarios
E6, E9 = (function_params(load_card(n)) for n in ("ms1_e6", "ms1_e9"))
WINDOW = STEPS >= E6["curvature_reduction"]["lo"]
BURN = STEPS >= E9["exploding_curvature"]["burn_in"]


@dataclass
class Scenario:
    """One criterion in one state of the world: ``draw(rng, seeds)`` gives the
    criterion's input and each seed's noise-free value; ``truth`` is the arms'."""

    criterion: str
    name: str
    truth: float
    threshold: float
    draw: Callable
    judge: Callable[..., Criterion]
    pass_below: bool = True  # every scenario here passes at or below its threshold


def _trace_change(change: float) -> Callable:
    def draw(rng, seeds):
        pairs, truths = curvature_study(rng, seeds, np.full(len(STEPS), change))
        return pairs, [t[WINDOW].mean() / b[WINDOW].mean() - 1 for b, t in truths]

    return draw


def _worst_ratio(peak: float) -> Callable:
    change = np.zeros(len(STEPS))
    change[-3] = peak - 1  # one step's blow-up, late in the run

    def draw(rng, seeds):
        pairs, truths = curvature_study(rng, seeds, change)
        return pairs, [float((t[BURN] / b[BURN]).max()) for b, t in truths]

    return draw


def _fid(theta: float, *, as_change: bool) -> Callable:
    def draw(rng, seeds):
        pairs, ratios = fid_study(rng, seeds, theta)
        return pairs, [r - 1 if as_change else r for r in ratios]

    return draw


def _expected_spike_difference(reps: int = 5000, seed: int = 12345) -> float:
    rng = np.random.default_rng(seed)
    lo = int(np.argmax(STEPS >= E6["spike_count"]["lo"]))
    factor = E6["spike_count"]["factor"]
    return float(
        np.mean([spike_difference(*spike_paths(rng, len(STEPS)), factor, lo) for _ in range(reps)])
    )


def scenarios() -> list[Scenario]:
    red, fb, fr = E6["curvature_reduction"], E6["fid_band"], E9["fid_ratio"]
    ex, lp = E9["exploding_curvature"], E9["loss_pathology"]

    def reduction(pairs):
        return curvature_reduction(pairs, **red)

    def worse(pairs):
        return fid_band(pairs, **fb)[0]

    def improved(pairs):
        return fid_band(pairs, **fb)[1]

    def ratio(pairs):
        return fid_ratio(pairs, "final", **fr)

    out = [
        Scenario(
            "e6 trace ≥15% lower",
            name,
            truth=truth,
            threshold=-red["threshold"],
            draw=_trace_change(truth),
            judge=reduction,
        )
        for name, truth in (
            ("no difference", 0.0),
            ("truth at −15%", -0.15),
            ("real effect −30%", -0.30),
        )
    ]
    out += [
        Scenario(
            "e6 FID ≤ +10%",
            name,
            truth=t,
            threshold=fb["max_increase"],
            draw=_fid(t, as_change=True),
            judge=worse,
        )
        for name, t in (("no difference", 0.0), ("truth at +10%", 0.10), ("real effect +25%", 0.25))
    ]
    out += [
        Scenario(
            "e6 FID improved ≥5%",
            name,
            truth=t,
            threshold=-fb["improved"],
            draw=_fid(t, as_change=True),
            judge=improved,
        )
        for name, t in (("no difference", 0.0), ("truth at −5%", -0.05))
    ]
    out += [
        Scenario(
            "e9 final FID ≤ 1.3×",
            name,
            truth=1 + t,
            threshold=fr["band"],
            draw=_fid(t, as_change=False),
            judge=ratio,
        )
        for name, t in (("no difference", 0.0), ("truth at 1.3×", 0.3), ("real effect 1.6×", 0.6))
    ]
    out += [
        Scenario(
            "e9 FID gap persists",
            "no gap",
            truth=0.0,
            threshold=0.0,
            draw=lambda rng, seeds: gap_study(rng, seeds, 0.1, 0.1),
            judge=lambda pairs: fid_gap_persists(*pairs),
        )
    ]
    out += [
        Scenario(
            "e9 worst step < 3×",
            name,
            truth=peak,
            threshold=ex["factor"],
            draw=_worst_ratio(peak),
            judge=lambda pairs: exploding_curvature(pairs, **ex),
        )
        for name, peak in (("Min-SNR weights, no change", 1.0), ("one step at 3×", 3.0))
    ]
    out += [
        Scenario(
            "e9 loss < 2× vanilla's",
            name,
            truth=t,
            threshold=lp["factor"],
            draw=lambda rng, seeds, t=t: loss_study(rng, seeds, t),
            judge=lambda pairs: loss_pathology(pairs, **lp),
        )
        for name, t in (("no difference", 1.0), ("truth at 2×", 2.0))
    ]
    sc = E6["spike_count"]
    out += [
        Scenario(
            "e6 fewer spikes",
            "no difference",
            truth=_expected_spike_difference(),
            threshold=-0.5,
            draw=spike_study,
            judge=lambda pairs: spike_count(pairs, **sc, reps=200),
        )
    ]
    return out


# ------------------------------------------------------------------ measuring
def _wrong(status: str, truth: float, threshold: float, pass_below: bool) -> bool:
    truth_passes = truth <= threshold if pass_below else truth >= threshold
    return (status == PASS and not truth_passes) or (status == FAIL and truth_passes)


def _covers(interval, truth: float) -> bool:
    return interval is not None and interval[0] <= truth <= interval[1]


@dataclass
class Cell:
    """One scenario at one seed count: rates over ``reps`` replicates."""

    scenario: Scenario
    n_seeds: int
    reps: int
    arms_wrong: int = 0
    arms_covered: int = 0
    arms_decided: int = 0
    pair_wrong: int = 0
    pair_covered: int = 0
    pair_known: int = 0

    def rate(self, k: int, n: int | None = None) -> float | None:
        n = self.reps if n is None else n
        return k / n if n else None


def run_cell(scenario: Scenario, n_seeds: int, reps: int, rng) -> Cell:
    cell = Cell(scenario, n_seeds, reps)
    s = scenario
    for _ in range(reps):
        seeds = [1077 + 1000 * i for i in range(n_seeds)]
        pairs, seed_truths = s.draw(rng, seeds)
        crit = s.judge(pairs)
        cell.arms_wrong += _wrong(crit.status, s.truth, s.threshold, s.pass_below)
        cell.arms_decided += crit.status in (PASS, FAIL)
        cell.arms_covered += n_seeds == 1 or _covers(crit.interval, s.truth)
        pair, own = crit.pair, seed_truths[0]
        if pair is not None and own is not None:
            cell.pair_known += 1
            cell.pair_wrong += _wrong(pair.status, own, s.threshold, s.pass_below)
            cell.pair_covered += _covers(pair.interval, own)
    return cell


def calibrate(reps: int, seed: int = 0, counts=SEED_COUNTS) -> list[Cell]:
    rng = np.random.default_rng(seed)
    return [run_cell(s, n, reps, rng) for s in scenarios() for n in counts]


def binomial_limit(p: float, n: int, z: float = 2.0) -> float:
    """The largest rate a procedure of true rate ``p`` shows in n trials, ~97.7% of the
    time (normal approximation, with a floor of one event)."""
    return p + z * math.sqrt(p * (1 - p) / n) + 1 / n


def table(cells: list[Cell]) -> str:
    def pct(x):
        return "—" if x is None else f"{x:.1%}"

    lines = [
        "| criterion | scenario | truth | seeds | arms: wrong | arms: decided | arms: coverage "
        "| seed pair: wrong | seed pair: coverage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        s = c.scenario
        lines.append(
            f"| {s.criterion} | {s.name} | {s.truth:+.3g} | {c.n_seeds} "
            f"| {pct(c.rate(c.arms_wrong))} | {pct(c.rate(c.arms_decided))} "
            f"| {'no interval' if c.n_seeds == 1 else pct(c.rate(c.arms_covered))} "
            f"| {pct(c.rate(c.pair_wrong, c.pair_known))} "
            f"| {pct(c.rate(c.pair_covered, c.pair_known))} |"
        )
    return "\n".join(lines)
