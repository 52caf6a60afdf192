"""The report's figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastdiff.report.criteria import (
    paired_steps,
    stderr_key,
    trace_measure,
    unweighted_key,
)
from fastdiff.report.runs import (
    FID_FINAL,
    FID_MILESTONE,
    TRACE,
    TRACE_UNW,
    Run,
    group_arms,
    pairs_of,
)
from fastdiff.stats import (
    normal_interval,
    t_interval,
)


# ----------------------------------------------------------------------- plots
def _smooth(values: np.ndarray) -> np.ndarray:
    """Debiased exponential moving average (as TensorBoard draws it), its window set
    to about an eighth of the points so short runs are not flattened."""
    alpha = float(np.clip(1 - 8 / max(len(values), 1), 0.0, 0.95))
    out, acc = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        acc = alpha * acc + (1 - alpha) * v
        out[i] = acc / (1 - alpha ** (i + 1))
    return out


COLORS = [f"C{i}" for i in range(10)]


def trace_band(runs: list[Run], key: str):
    """(steps, mean, lo, hi, how) of an arm's trace: one run's mean ± 1.96 SE of the
    probe mean (probes and samples), or over seeds the t-interval of the seed mean."""
    series = [r.series(key) for r in runs]
    series = [(s, v) for s, v in series if len(s)]
    if not series:
        return None
    if len(series) == 1:
        (s, m), run = series[0], runs[0]
        ss, se = run.series(stderr_key(key))
        if len(se) != len(m):
            se = np.full_like(m, np.nan)
        return s, m, m - 1.96 * se, m + 1.96 * se, "(± 1.96 SE)"
    common = sorted(set.intersection(*[set(s.tolist()) for s, _ in series]))
    rows = np.array([[v[s == c][-1] for s, v in series] for c in common])  # (steps, seeds)
    bands = [t_interval(r) for r in rows]
    m, lo, hi = (np.array([b[i] for b in bands]) for i in range(3))
    return np.array(common), m, lo, hi, f"(mean of {len(series)} seeds, 95% t)"


def paired_ratios(base: Run, treat: Run, key: str, base_key: str | None = None):
    """(steps, ratio, lo, hi) of treat's trace over base's at every probe step both
    have (base's trace > 0), with the 95% interval of each step's comparison: paired
    over the probe terms the arms share where they logged them, else from the runs'
    standard errors as independent (NaN where there are none). None without a step.

    Each arm's own band carries the probe error the two share, so the bands overlap
    even where the paired comparison tells the arms apart; this is the view of the
    question "has the trajectory changed, or is it noise?"."""
    common = [(s, t, b) for s, t, b in paired_steps(base, treat, key, base_key) if b.mean > 0]
    if not common:
        return None
    out = []
    for s, t, b in common:
        m = trace_measure(t, b, t.mean / b.mean, "", ratio=True)
        lo, hi = (np.nan, np.nan) if m.se is None else normal_interval(m.value, m.se, df=m.df)
        out.append((s, m.value, lo, hi))
    return tuple(np.array(col, float) for col in zip(*out))


def loss_by_t(runs: list[Run]):
    """(step, log-SNR per bin, weighted, unweighted) at the last step with per-t losses,
    averaged over the arm's seeds."""
    prefix_w, prefix_u = "train/loss_by_t/", "train/mse_unweighted_by_t/"
    rows = [
        next((r for r in reversed(run.rows) if any(k.startswith(prefix_w) for k in r)), None)
        for run in runs
    ]
    rows = [r for r in rows if r is not None]
    if not rows:
        return None
    names = [k[len(prefix_w) :] for k in rows[0] if k.startswith(prefix_w)]
    names = [n for n in names if all(prefix_w + n in r and prefix_u + n in r for r in rows)]
    if not names:
        return None
    run = runs[0]
    mid = [(int(lo) + int(hi)) // 2 for lo, hi in (n[1:].split("-") for n in names)]
    lsnr = run.weight_table()[0][mid]
    weighted = [np.mean([r[prefix_w + n] for r in rows]) for n in names]
    unweighted = [np.mean([r[prefix_u + n] for r in rows]) for n in names]
    return rows[0]["step"], lsnr, weighted, unweighted


def make_plots(
    runs: list[Run], out: Path, lower: float | None = None, *, baseline: str | None = None
) -> list[str]:
    """Every figure the report shows; ``lower``: the card's curvature reduction, drawn
    on the ratio plot; ``baseline``: the card's baseline arm, which the ratios divide by."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        s, v = run.series("train/loss")
        (line,) = axes[0].plot(s, v, alpha=0.35)
        axes[0].plot(s, _smooth(v), color=line.get_color(), label=run.label)
        s, v = run.series("train/mse_unweighted")
        axes[1].plot(s, _smooth(v), label=run.label)
    axes[0].set(title="train/loss (raw, smoothed)", xlabel="step", yscale="log")
    axes[1].set(title="unweighted ε-MSE (smoothed)", xlabel="step", yscale="log")
    for ax in axes:
        ax.legend(fontsize=8)
    save(fig, "loss.png")

    arms = group_arms(runs)
    if any(len(r.series(TRACE)[0]) for r in runs):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for color, arm_runs in zip(COLORS, arms.values()):
            for ax, key in ((axes[0], TRACE), (axes[1], TRACE_UNW)):
                if key == TRACE_UNW and not arm_runs[0].series(TRACE_UNW)[0].size:
                    key = TRACE  # a uniform ε run's trace is the ε-MSE's
                band = trace_band(arm_runs, key)
                if band is None:
                    continue
                s, m, lo, hi, how = band
                ax.plot(s, m, marker="o", ms=3, color=color, label=f"{arm_runs[0].label} {how}")
                ax.fill_between(s, lo, hi, color=color, alpha=0.2)
        axes[0].set(title="curvature/hutch_trace_mean, 95% interval (weighted loss)", xlabel="step")
        axes[1].set(title="trace of the unweighted ε-MSE, 95% interval", xlabel="step")
        for ax in axes:
            ax.legend(fontsize=7)
        save(fig, "curvature.png")

    pairs = pairs_of(runs, baseline=baseline)
    if pairs and any(len(r.series(TRACE)[0]) for pair in pairs for r in pair):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for color, (base, treat) in zip(COLORS, pairs):
            for ax, key, base_key in (
                (axes[0], TRACE, TRACE),
                (axes[1], TRACE_UNW, unweighted_key(base)),
            ):
                got = paired_ratios(base, treat, key, base_key)
                if got is None:
                    continue
                s, r, lo, hi = got
                label = f"{treat.name} / {base.name}, seed {base.seed}"
                ax.plot(s, r, marker="o", ms=3, color=color, label=label)
                ax.fill_between(s, lo, hi, color=color, alpha=0.2)
        for ax, what in zip(axes, ("weighted", "unweighted")):
            ax.axhline(1.0, color="0.4", lw=0.8, label="1: no change")
            if lower is not None:
                ax.axhline(
                    1 - lower, color="0.6", lw=0.8, ls="--", label=f"the card's {lower:.0%} lower"
                )
            ax.set(
                title=f"{what} trace: treatment / baseline per probe step (95%, paired)",
                xlabel="step",
            )
            ax.legend(fontsize=7)
        save(fig, "curvature_ratio.png")

    by_t = [(arm_runs, loss_by_t(arm_runs)) for arm_runs in arms.values()]
    by_t = [(a, b) for a, b in by_t if b is not None]
    if by_t:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for color, (arm_runs, (step, lsnr, weighted, unweighted)) in zip(COLORS, by_t):
            label = f"{arm_runs[0].label}, step {step:g}"
            axes[0].plot(lsnr, weighted, marker="o", ms=3, color=color, label=label)
            axes[1].plot(lsnr, unweighted, marker="o", ms=3, color=color, label=label)
        axes[0].set(title="train/loss_by_t (weighted) vs log-SNR", xlabel="log SNR(t)")
        axes[1].set(title="train/mse_unweighted_by_t vs log-SNR", xlabel="log SNR(t)")
        for ax in axes:
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        save(fig, "loss_by_snr.png")

    # w(t) is a function of SNR alone; what the schedule changes is how many timesteps
    # sit at each SNR, so: each arm's w(t) against t, and log-SNR against t with γ lines.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    setups = {}
    for r in runs:  # one curve per distinct objective, whatever family it is
        setups.setdefault((r.schedule_label, r.objective), r)
    t = np.arange(1000)
    schedules = {}
    for (schedule, objective), r in setups.items():
        lsnr, w = r.weight_table()
        t = np.arange(len(w))
        share = float((w < 1).mean())
        axes[0].plot(t, w, label=f"{objective}, {schedule} ({share:.0%} of t below 1)")
        schedules.setdefault(schedule, lsnr)
    for schedule, lsnr in schedules.items():
        axes[1].plot(t, np.where(np.isfinite(lsnr), lsnr, np.nan), label=schedule)
    caps = {r.gamma for r in runs if r.weighting in ("minsnr", "soft_minsnr")}
    for gamma in sorted(caps):  # γ is an SNR cap only for these (p2's is an exponent)
        axes[1].axhline(np.log(gamma), color="0.4", lw=0.8, label=f"log γ = log {gamma:g}")
    axes[0].set(title="loss weight w(t) on each arm's own MSE", xlabel="timestep t", ylabel="w(t)")
    axes[0].set_yscale("log")
    axes[1].set(
        title="log-SNR(t), with each Min-SNR cap γ",
        xlabel="timestep t",
        ylabel="log SNR",
    )
    for ax in axes:
        ax.legend(fontsize=7)
    save(fig, "weights.png")

    if any(len(r.series(FID_MILESTONE)[0]) or r.value(FID_FINAL) is not None for r in runs):
        fig, ax = plt.subplots(figsize=(6, 4))
        for run in runs:
            s, v = run.series(FID_MILESTONE)
            (line,) = ax.plot(s, v, marker="o", label=run.label)
            final = run.value(FID_FINAL)
            if final is not None:
                ax.scatter([run.total_steps], [final], marker="*", s=120, color=line.get_color())
        ax.set(title="FID vs step (★ final)", xlabel="step", ylabel="FID")
        ax.legend(fontsize=8)
        save(fig, "fid.png")

    stats = [(r, r.final_sample_stats()) for r in runs if r.final_sample_stats() is not None]
    if stats:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for i, key in enumerate(("mean_intensity", "contrast")):
            ax = axes[i]
            ref = np.concatenate([s["training"][key] for _, s in stats])
            ax.hist(ref, bins=20, color="0.6", alpha=0.6, density=True, label="training images")
            for color, (run, s) in zip(COLORS, stats):
                ax.hist(
                    s["samples"][key],
                    bins=20,
                    histtype="step",
                    density=True,
                    color=color,
                    label=f"{run.label} seed {run.seed}",
                )
            ax.set(title=f"final grid samples: {key.replace('_', ' ')}", xlabel=key)
            ax.legend(fontsize=7)
        save(fig, "sample_stats.png")

    grids = [(r, r.final_grid()) for r in runs if r.final_grid() is not None]
    if grids:
        fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), 4.4))
        for ax, (run, grid) in zip(np.atleast_1d(axes), grids):
            ax.imshow(plt.imread(grid))
            ax.set_title(f"{run.label}\n{grid.stem}", fontsize=8)
            ax.axis("off")
        save(fig, "samples.png")
    return made
