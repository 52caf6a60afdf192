"""Comparison report: answer a card's question from its runs' logs.

    python -m fastdiff.report RUN_A RUN_B [more runs…] [--card e6|e9] [--out DIR]

Reads each run's metrics.jsonl, config.yaml, summary.json and sample grids;
writes PNG plots, REPORT.md, a self-contained report.html and report.json. Runs are
grouped into arms (their config without the seed) and paired by seed; each of the
card's criteria is an estimate with a 95% interval (a paired t-interval over seeds
when there are several, the runs' own standard errors when one) and a status:
pass / fail when the whole interval lies on one side of the threshold, inconclusive
when it straddles it, not evaluable when data is missing (which never passes).
"""

from __future__ import annotations

import argparse
import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from fastdiff.diffusion import Schedule, snr
from fastdiff.stats import (
    FAIL,
    INCONCLUSIVE,
    NA,
    PASS,
    Measure,
    interval,
    seeds_needed,
    t_interval,
    verdict,
)

CARD_STEPS = 10_000  # the cards' run length; criteria windows scale with shorter runs
FID_MILESTONE, FID_FINAL = "val/fid_milestone/fid", "eval/final/fid"
TRACE = "curvature/hutch_trace_mean"
TRACE_UNW = "curvature/hutch_trace_mean_unweighted"
# Config keys that do not make a run another arm: where it ran, and the seed it pairs by.
NOT_ARM = {("train", "seed"), ("train", "run_dir"), ("train", "resume"), ("train", "runs_root")}


# --------------------------------------------------------------------- loading
@dataclass
class Run:
    path: Path
    config: dict
    rows: list[dict]
    summary: dict = field(default_factory=dict)

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
        return self.config.get("experiment") or self.path.name

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
    def gamma(self) -> float:
        return float(self.config.get("loss", {}).get("minsnr_gamma", 5.0))

    @property
    def label(self) -> str:
        w = self.weighting
        if w == "minsnr":
            w = f"Min-SNR γ={self.config.get('loss', {}).get('minsnr_gamma', '?'):g}"
        return f"{self.name} ({self.schedule} β, {w})"

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        pts = [(r["step"], float(r[key])) for r in self.rows if key in r]
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


# -------------------------------------------------------------------- criteria
@dataclass
class Criterion:
    name: str
    status: str
    detail: str
    figure: str = ""
    estimate: float | None = None
    interval: tuple[float, float] | None = None
    threshold: float | None = None
    method: str = ""
    seeds: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    seeds_needed: int | None = None

    def as_json(self) -> dict:
        def num(x):
            return x if x is None or np.isfinite(x) else str(x)

        return {
            "name": self.name,
            "status": self.status,
            "estimate": num(self.estimate),
            "interval": None if self.interval is None else [num(v) for v in self.interval],
            "threshold": self.threshold,
            "method": self.method,
            "n_seeds": len(self.seeds),
            "seeds": self.seeds,
            "values": self.values,
            "seeds_needed": self.seeds_needed,
            "detail": self.detail,
        }


Pair = tuple[Run, Run]  # (vanilla, Min-SNR) runs of one seed


def window(steps: np.ndarray, values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return values[(steps >= lo) & (steps <= hi)]


def scale_steps(run: Run, step: float) -> float:
    """A card step (out of 10k) mapped onto a shorter or longer run."""
    return step * run.total_steps / CARD_STEPS


def stderr_key(key: str) -> str:
    """The standard-error series logged beside a curvature mean (probe vectors and
    samples together)."""
    return key.replace("_mean", "_stderr_total", 1)


def window_mean(run: Run, key: str, lo: float, hi: float) -> tuple[float, float | None] | None:
    """Mean of ``key`` over steps [lo, hi] and its standard error (from the logged
    per-step standard errors; None if the run logged none)."""
    steps, values = run.series(key)
    inside = (steps >= lo) & (steps <= hi)
    if not inside.any():
        return None
    se_steps, se_values = run.series(stderr_key(key))
    se = None
    if len(se_values) == len(values) and np.array_equal(se_steps, steps):
        se = float(np.sqrt((se_values[inside] ** 2).sum()) / inside.sum())
    return float(values[inside].mean()), se


def relative_change(treat: float, base: float) -> float:
    return (treat - base) / abs(base)


def change_measure(t: tuple, b: tuple, detail: str) -> Measure:
    """(mt − mb)/|mb| with its delta-method standard error."""
    (mt, st), (mb, sb) = t, b
    se = None if st is None or sb is None else np.hypot(st, mt / mb * sb) / abs(mb)
    return Measure(relative_change(mt, mb), se, detail)


def ratio_measure(t: tuple, b: tuple, detail: str) -> Measure:
    (mt, st), (mb, sb) = t, b
    r = mt / mb
    se = None if st is None or sb is None else abs(r) * np.hypot(st / mt, sb / mb)
    return Measure(r, se, detail)


def _pct(x: float) -> str:
    return f"{x:+.1%}"


def _times(x: float) -> str:
    return f"{x:.2f}×"


def by_seed(pairs: list[Pair]) -> list[tuple[int, Pair]]:
    return [(base.seed, (base, treat)) for base, treat in pairs]


def judge(
    name: str,
    items: list[tuple[int, tuple]],
    measure,
    threshold: float,
    pass_below: bool,
    figure: str = "",
    fmt=_pct,
    missing: str = "no data",
) -> Criterion:
    """``measure(*args)`` for every (seed, args) item, then the three-way verdict on the
    interval (over seeds when several, the run's own standard error when one)."""
    got = [(seed, measure(*args)) for seed, args in items]
    have = [(seed, m) for seed, m in got if m is not None]
    if not have:
        return Criterion(name, NA, missing, threshold=threshold)
    iv = interval([m for _, m in have])
    status = verdict(iv, threshold, pass_below)
    seeds = [seed for seed, _ in have]
    text = f"{fmt(iv.estimate)} [{fmt(iv.lo)}, {fmt(iv.hi)}] ({iv.method}, {len(have)} seed"
    text += f"{'s' if len(have) > 1 else ''})"
    if len(have) == 1:
        text += f"; {have[0][1].detail}"
    if len(have) < len(got):
        text += f"; {len(got) - len(have)} seed pair(s) without data left out"
    need = None
    if status == INCONCLUSIVE:
        need = seeds_needed(iv, threshold)
        side = "≤" if pass_below else "≥"
        text += f"; straddles {side} {fmt(threshold)}: ~{need} seeds would decide it at this spread"
    return Criterion(
        name,
        status,
        text,
        figure,
        iv.estimate,
        (iv.lo, iv.hi),
        threshold,
        iv.method,
        seeds,
        [m.value for _, m in have],
        need,
    )


def curvature_reduction(
    pairs: list[Pair],
    key: str = TRACE,
    lo: float = 6000,
    hi: float = 10000,
    divide_by_mean_weight: bool = False,
    threshold: float = 0.15,
    base_key: str | None = None,
) -> Criterion:
    """W1-E6: mean trace over [lo, hi] (card steps) at least ``threshold`` lower."""
    base0 = pairs[0][0]
    lo_s, hi_s = scale_steps(base0, lo), scale_steps(base0, hi)

    def measure(base: Run, treat: Run):
        means = []
        for run, k in ((base, base_key or key), (treat, key)):
            m = window_mean(run, k, lo_s, hi_s)
            if m is None:
                return None
            if divide_by_mean_weight:
                w = run.value("loss/mean_weight") or 1.0
                m = (m[0] / w, None if m[1] is None else m[1] / w)
            means.append(m)
        return change_measure(
            means[1],
            means[0],
            f"{treat.name} {means[1][0]:.4g} vs {base.name} {means[0][0]:.4g}",
        )

    what = "unweighted trace" if key == TRACE_UNW else key
    name = f"mean {what} over steps {lo_s:g}–{hi_s:g} ≥{threshold:.0%} lower"
    if divide_by_mean_weight:
        name += " (÷ mean weight)"
    return judge(
        name,
        by_seed(pairs),
        measure,
        -threshold,
        True,
        "curvature.png",
        missing=f"no {key} in steps {lo_s:g}–{hi_s:g} of one of the runs",
    )


def spike_count(pairs: list[Pair], lo: float = 2000, hi: float = 10000, factor: float = 1.5):
    """W1-E6: fewer points above ``factor`` × the baseline's median trace in [lo, hi]:
    the difference of the counts, with a Poisson standard error √(n_t + n_b)."""
    base0 = pairs[0][0]
    lo_s, hi_s = scale_steps(base0, lo), scale_steps(base0, hi)

    def measure(base: Run, treat: Run):
        b = window(*base.series(TRACE), lo_s, hi_s)
        t = window(*treat.series(TRACE), lo_s, hi_s)
        if not len(b) or not len(t):
            return None
        limit = factor * float(np.median(b))
        nb, nt = int((b > limit).sum()), int((t > limit).sum())
        return Measure(
            nt - nb,
            float(np.sqrt(nt + nb)),
            f"limit {limit:.4g}: {treat.name} {nt}/{len(t)} points, {base.name} {nb}/{len(b)}",
        )

    return judge(
        f"fewer spikes > {factor}× the baseline's median trace (steps {lo_s:g}–{hi_s:g})",
        by_seed(pairs),
        measure,
        -0.5,  # counts are whole: "fewer" is a difference of at most −1
        True,
        "curvature.png",
        fmt=lambda x: f"{x:+.1f}",
        missing=f"no {TRACE} in that range of one of the runs",
    )


FID_DIFFERS = "not evaluable: FIDs computed against different references"


def fid_provenance_differs(*runs: Run) -> str | None:
    """Why these runs' FIDs cannot be compared (None: they can): implementations,
    weights and references alone move FID by several percent."""
    found = [r.summary.get("fid_provenance") for r in runs]
    if all(p is None for p in found) or all(p == found[0] for p in found):
        return None
    keys = sorted(
        {k for p in found if p for k in p if any((q or {}).get(k) != p.get(k) for q in found)}
    )
    return f"{FID_DIFFERS} ({', '.join(keys) or 'one run has no record'} differ)"


def _final_fid(run: Run) -> tuple[float, float | None] | None:
    """The final FID and its bootstrap standard error (else the last milestone's, which
    carries none)."""
    final = run.value(FID_FINAL)
    if final is not None:
        return final, run.value(FID_FINAL + "_se")
    milestone = run.value(FID_MILESTONE)
    return None if milestone is None else (milestone, None)


def _fid_judge(
    name: str,
    pairs: list[Pair],
    measure,
    threshold,
    pass_below,
    fmt,
    missing: str = "no final FID (eval/final/fid or a milestone FID) in one of the runs",
) -> Criterion:
    differs = fid_provenance_differs(*{r.path: r for pair in pairs for r in pair}.values())
    if differs:
        return Criterion(name, NA, differs, threshold=threshold)
    return judge(
        name,
        by_seed(pairs),
        measure,
        threshold,
        pass_below,
        "fid.png",
        fmt,
        missing=missing,
    )


def _fid_change(base: Run, treat: Run):
    fb, ft = _final_fid(base), _final_fid(treat)
    if fb is None or ft is None:
        return None
    return change_measure(ft, fb, f"{treat.name} {ft[0]:.2f} vs {base.name} {fb[0]:.2f}")


def fid_band(pairs: list[Pair], max_increase: float = 0.10) -> list[Criterion]:
    """W1-E6: final FID no worse than +10%; and whether it improved by 5–10%."""
    return [
        _fid_judge(
            f"final FID no worse than +{max_increase:.0%}",
            pairs,
            _fid_change,
            max_increase,
            True,
            _pct,
        ),
        _fid_judge("final FID improved by ≥5%", pairs, _fid_change, -0.05, True, _pct),
    ]


def fid_ratio(pairs: list[Pair], which: str) -> Criterion:
    """MS1-e9: Min-SNR's FID within 30% of vanilla (success); ≥2× is the pathology."""

    def pick(run: Run):
        if which == "best":
            _, v = run.series(FID_MILESTONE)
            final = _final_fid(run)
            vals = [(x, None) for x in v.tolist()] + ([final] if final else [])
            return min(vals, key=lambda m: m[0]) if vals else None
        return _final_fid(run)

    def measure(base: Run, treat: Run):
        fb, ft = pick(base), pick(treat)
        if fb is None or ft is None:
            return None
        r = ft[0] / fb[0]
        word = "PATHOLOGY" if r >= 2 else ("within band" if r <= 1.3 else "outside band")
        return ratio_measure(
            ft, fb, f"{treat.name} {ft[0]:.2f} / {base.name} {fb[0]:.2f} = {r:.2f}× ({word})"
        )

    return _fid_judge(
        f"{which} FID within 30% of vanilla (pathology at ≥2×)", pairs, measure, 1.3, True, _times
    )


def recall_kept(pairs: list[Pair], floor: float = 0.8) -> Criterion:
    """MS1-e9 "mode collapse": Min-SNR's recall (torch-fidelity prc, final samples) at
    least ``floor`` × vanilla's. fastdiff's rule; recall carries no within-run SE."""

    def measure(base: Run, treat: Run):
        rb, rt = base.value("eval/final/recall"), treat.value("eval/final/recall")
        if rb is None or rt is None or rb == 0:
            return None
        return Measure(rt / rb, None, f"recall {treat.name} {rt:.3f} vs {base.name} {rb:.3f}")

    return _fid_judge(
        f"no mode collapse: recall ≥ {floor:g}× vanilla's",
        pairs,
        measure,
        floor,
        False,
        _times,
        missing="no eval/final/recall in one of the runs",
    )


def completed(run: Run) -> Criterion:
    _, losses = run.series("train/loss")
    finite = (
        bool(len(losses))
        and bool(np.isfinite(losses).all())
        and not run.summary.get("diverged", False)
    )
    done = run.summary.get("step", 0) >= run.total_steps
    ok = finite and done
    return Criterion(
        f"{run.name} (seed {run.seed}) completed {run.total_steps} steps without NaN/inf",
        PASS if ok else FAIL,
        f"reached step {run.summary.get('step', 'unknown')}, "
        f"loss {'finite' if finite else 'NOT finite (or missing)'}",
        "loss.png",
        seeds=[run.seed],
    )


EXPLODE_FACTOR = 3.0


def exploding_curvature(pairs: list[Pair], burn_in: float = 2000) -> Criterion:
    """Rule: after burn-in, the treatment's trace stays below EXPLODE_FACTOR × the
    baseline's at the same probe step (the worst step's ratio, with its SE)."""
    lo = scale_steps(pairs[0][0], burn_in)

    def measure(base: Run, treat: Run):
        sb, vb = base.series(TRACE)
        st, vt = treat.series(TRACE)
        common = sorted(set(sb[sb >= lo].tolist()) & set(st[st >= lo].tolist()))
        if not common:
            return None
        se_b = dict(zip(*base.series(stderr_key(TRACE))))
        se_t = dict(zip(*treat.series(stderr_key(TRACE))))
        ratios = []
        for s in common:
            b, t = float(vb[sb == s][-1]), float(vt[st == s][-1])
            if b != 0:
                ratios.append((t / b, s, (t, se_t.get(s)), (b, se_b.get(s))))
        if not ratios:
            return None
        worst, step, t, b = max(ratios)
        return ratio_measure(
            t, b, f"worst ratio {worst:.2f}× at step {step:g} over {len(common)} probe steps"
        )

    return judge(
        f"no exploding curvature unique to Min-SNR (trace < {EXPLODE_FACTOR:g}× vanilla's "
        f"after step {lo:g})",
        by_seed(pairs),
        measure,
        EXPLODE_FACTOR,
        True,
        "curvature.png",
        _times,
        missing=f"no common probe steps ≥ {lo:g} with {TRACE}",
    )


def loss_pathology(pairs: list[Pair]) -> Criterion:
    """Min-SNR-only loss pathology: treatment's unweighted ε-MSE over the last quarter
    at least 2× the baseline's (the weighted losses are not comparable in scale)."""
    key = "train/mse_unweighted"

    def last_quarter(run: Run):
        s, v = run.series(key)
        v = window(s, v, 0.75 * run.total_steps, run.total_steps)
        if not len(v):
            return None
        return float(v.mean()), (float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None)

    def measure(base: Run, treat: Run):
        b, t = last_quarter(base), last_quarter(treat)
        if b is None or t is None:
            return None
        return ratio_measure(t, b, f"{treat.name} {t[0]:.4g} vs {base.name} {b[0]:.4g}")

    return judge(
        "no loss pathology unique to Min-SNR (unweighted ε-MSE, last quarter, < 2× vanilla's)",
        by_seed(pairs),
        measure,
        2.0,
        True,
        "loss.png",
        _times,
        missing=f"no {key} in the last quarter of one run",
    )


def fid_gap_persists(linear: list[Pair], cosine: list[Pair]) -> Criterion:
    """Whether Min-SNR's FID gap (ratio to vanilla) is larger under cosine than linear,
    per seed: gap_cosine − gap_linear ≤ 0 passes."""
    lin = {b.seed: (b, t) for b, t in linear}
    both = [(lin[b.seed], (b, t)) for b, t in cosine if b.seed in lin]
    name = "FID gap (Min-SNR / vanilla) no worse under cosine than linear"
    if not both:
        return Criterion(name, NA, "no linear pair with the cosine pair's seeds", threshold=0.0)

    def gap(pair: Pair):
        fb, ft = _final_fid(pair[0]), _final_fid(pair[1])
        return None if fb is None or ft is None else ratio_measure(ft, fb, "")

    def measure(lin_pair: Pair, cos_pair: Pair):
        gl, gc = gap(lin_pair), gap(cos_pair)
        if gl is None or gc is None:
            return None
        se = None if gl.se is None or gc.se is None else float(np.hypot(gl.se, gc.se))
        return Measure(gc.value - gl.value, se, f"linear {gl.value:.2f}×, cosine {gc.value:.2f}×")

    differs = fid_provenance_differs(*[r for pair in both for p in pair for r in p])
    if differs:
        return Criterion(name, NA, differs, threshold=0.0)
    return judge(
        name,
        [(cos_pair[0].seed, (lin_pair, cos_pair)) for lin_pair, cos_pair in both],
        measure,
        0.0,
        True,
        "fid.png",
        lambda x: f"{x:+.2f}",
        missing="final FID missing in the linear or cosine pair",
    )


def confound_sentence(card: Criterion, unweighted: Criterion, rescaled: Criterion) -> str:
    statuses = {unweighted.status, rescaled.status}
    if card.status == NA:
        return "The card's curvature verdict is not evaluable, so the confound cannot be checked."
    if NA in statuses:
        return (
            "The unweighted trace was not logged for both runs, so whether the verdict "
            "survives the loss-scale confound cannot be said."
        )
    if card.status == INCONCLUSIVE:
        return (
            "The card's curvature verdict is inconclusive; the unweighted comparisons give "
            f"{unweighted.status} / {rescaled.status}."
        )
    if card.status == PASS and statuses == {PASS}:
        return (
            "The card's verdict survives the loss-scale confound: the trace is also lower "
            "on the unweighted loss and after dividing by the mean weight."
        )
    if card.status == PASS and FAIL in statuses:
        return (
            "The card's verdict does not survive the loss-scale confound: part or all of "
            "the lower trace is Min-SNR's smaller mean weight, not a flatter landscape."
        )
    if card.status == PASS:
        return (
            "Whether the card's verdict survives the loss-scale confound is inconclusive: "
            f"the unweighted comparisons give {unweighted.status} / {rescaled.status}."
        )
    return (
        "The card's criterion failed on the weighted trace; the unweighted comparisons "
        f"give {unweighted.status} / {rescaled.status}."
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
    sched = Schedule.make(run.schedule, int(run.config.get("diffusion", {}).get("T", 1000)))
    mid = [(int(lo) + int(hi)) // 2 for lo, hi in (n[1:].split("-") for n in names)]
    lsnr = np.log(snr(sched.alphas_cumprod[mid]).numpy())
    weighted = [np.mean([r[prefix_w + n] for r in rows]) for n in names]
    unweighted = [np.mean([r[prefix_u + n] for r in rows]) for n in names]
    return rows[0]["step"], lsnr, weighted, unweighted


def make_plots(runs: list[Run], out: Path) -> list[str]:
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
                if key == TRACE_UNW and arm_runs[0].weighting == "uniform":
                    key = TRACE  # a uniform run's trace is the unweighted one
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
    # sit at each SNR, so: w against t, and log-SNR against t with the γ line.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    gammas = sorted({r.gamma for r in runs if r.weighting == "minsnr"}) or [5.0]
    t = np.arange(1000)
    for schedule, style in (("linear", "-"), ("cosine", "--")):
        sched = Schedule.make(schedule, 1000)
        lsnr = np.log(snr(sched.alphas_cumprod).numpy())
        for gamma in gammas:
            w = sched.loss_weights("minsnr", gamma).numpy()
            share = float((w < 1).mean())
            axes[0].plot(
                t, w, style, label=f"Min-SNR γ={gamma:g}, {schedule} β ({share:.0%} of t below 1)"
            )
        axes[1].plot(t, lsnr, style, label=f"{schedule} β")
    for gamma in gammas:
        axes[1].axhline(np.log(gamma), color="0.4", lw=0.8, label=f"log γ = log {gamma:g}")
    axes[0].axhline(1.0, color="0.6", lw=0.8, label="uniform")
    axes[0].set(title="loss weight w(t)", xlabel="timestep t", ylabel="w(t)")
    axes[1].set(
        title="log-SNR(t): Min-SNR lowers the weight above the γ line",
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


# ---------------------------------------------------------------------- report
def detect_card(runs: list[Run]) -> str | None:
    names = {r.name for r in runs}
    if {"e9a", "e9b"} <= names:
        return "e9"
    if {"e5", "e6"} <= names:
        return "e6"
    return None


def group_arms(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by arm (config without seed), each arm's runs sorted by seed."""
    arms: dict[str, list[Run]] = {}
    for run in runs:
        arms.setdefault(run.arm, []).append(run)
    return {k: sorted(v, key=lambda r: r.seed) for k, v in arms.items()}


def pairs_of(runs: list[Run], schedule: str | None = None) -> list[Pair]:
    """(vanilla, Min-SNR) runs paired by seed, optionally under one β schedule: the
    largest uniform arm against the largest Min-SNR arm."""
    arms = [a for a in group_arms(runs).values() if schedule in (None, a[0].schedule)]
    base = max((a for a in arms if a[0].weighting == "uniform"), key=len, default=None)
    treat = max((a for a in arms if a[0].weighting != "uniform"), key=len, default=None)
    if base is None or treat is None:
        return []
    by_seed = {r.seed: r for r in treat}
    return [(b, by_seed[b.seed]) for b in base if b.seed in by_seed]


def evaluate(runs: list[Run], card: str | None) -> tuple[list[Criterion], list[str]]:
    notes = []
    if card is None:
        return [completed(r) for r in runs], notes
    pairs = pairs_of(runs, "linear" if card == "e6" else "cosine") or pairs_of(runs)
    if not pairs:
        return [
            Criterion(
                "paired runs present", NA, "need uniform and Min-SNR runs with a seed in common"
            )
        ], notes
    base = pairs[0][0]
    seeds = [b.seed for b, _ in pairs]
    notes.append(
        f"{len(pairs)} seed pair(s) ({', '.join(map(str, seeds))}): intervals are "
        + (
            "paired t-intervals over seeds."
            if len(pairs) > 1
            else "from within-run standard errors."
        )
    )
    if base.total_steps != CARD_STEPS:
        notes.append(
            f"The runs are {base.total_steps} steps, not the card's {CARD_STEPS}: "
            f"every step in the criteria is scaled by {base.total_steps / CARD_STEPS:g}."
        )
    lo = card_crit_lo(card)
    if card == "e6":
        card_crit = curvature_reduction(pairs)
        crits = [card_crit, spike_count(pairs), *fid_band(pairs)]
    else:
        card_crit = curvature_reduction(pairs, lo=2000)
        crits = [completed(r) for pair in pairs for r in pair]
        crits += [
            fid_ratio(pairs, "best"),
            fid_ratio(pairs, "final"),
            recall_kept(pairs),
            loss_pathology(pairs),
            exploding_curvature(pairs),
        ]
        linear = pairs_of(runs, "linear")
        if linear:
            crits.append(fid_gap_persists(linear, pairs))
    unw = curvature_reduction(pairs, TRACE_UNW, lo=lo, base_key=_unweighted_key(base))
    rescaled = curvature_reduction(pairs, lo=lo, divide_by_mean_weight=True)
    crits += [unw, rescaled]
    notes.append(confound_sentence(card_crit, unw, rescaled))
    if any(c.status == INCONCLUSIVE for c in crits):
        notes.append(
            "Inconclusive: the 95% interval straddles the threshold, so these runs cannot "
            "say which side the arms are on; the detail says about how many seeds the "
            "observed spread would need (python -m fastdiff.study CARD --seeds N)."
        )
    return crits, notes


def card_crit_lo(card: str) -> float:
    return 6000 if card == "e6" else 2000


def _unweighted_key(base: Run) -> str:
    """A uniform baseline's trace is already the unweighted one."""
    return TRACE_UNW if base.series(TRACE_UNW)[0].size else TRACE


def card_table(runs: list[Run]) -> str:
    keys = [
        ("train/loss", "final train/loss"),
        ("train/mse_unweighted", "final unweighted MSE"),
        (TRACE, "final hutch_trace_mean"),
        (FID_FINAL, "eval/final/fid"),
        ("loss/mean_weight", "mean weight"),
    ]
    head = "| run | seed | steps | " + " | ".join(label for _, label in keys) + " | img/s |"
    lines = [head, "|" + "---|" * (len(keys) + 4)]
    for run in sorted(runs, key=lambda r: (r.label, r.seed)):
        cells = []
        for key, _ in keys:
            v = run.value(key)
            cell = "—" if v is None else f"{v:.4g}"
            lo, hi = run.value(key + "_lo"), run.value(key + "_hi")
            if v is not None and lo is not None and hi is not None:
                cell += f" [{lo:.4g}, {hi:.4g}]"
            cells.append(cell)
        ips = run.summary.get("images_per_sec")
        lines.append(
            f"| {run.label} | {run.seed} | {run.summary.get('step', '—')} | "
            + " | ".join(cells)
            + f" | {'—' if ips is None else f'{ips:.1f}'} |"
        )
    return "\n".join(lines)


def provenance_lines(runs: list[Run]) -> list[str]:
    """How each run's FID was computed, once per run."""
    lines = []
    for run in runs:
        p = run.summary.get("fid_provenance")
        if p is None:
            continue
        ref = p.get("reference", {})
        against = (
            f"statistics {ref['stats_file']} (sha256 {ref['stats_sha256'][:12]})"
            if "stats_file" in ref
            else f"training set {ref.get('data_sha256')} ({ref.get('count')} images)"
        )
        lines.append(
            f"- {run.name}: {p['extractor']} ({p['layer']}, {p['resize']}), weights sha256 "
            f"{p['weights_sha256'][:12]}, torch-fidelity {p['torch_fidelity']}, against "
            f"{against}; {p['sampler']} NFE {p['nfe']}, {p['final_samples']} final samples"
        )
    return ["## How FID was computed", "", *lines, ""] if lines else []


ICON = {PASS: "✅ pass", FAIL: "❌ fail", INCONCLUSIVE: "🟡 inconclusive", NA: "⚪ not evaluable"}


def write_report(runs: list[Run], out: Path, card: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    card = card or detect_card(runs)
    figures = make_plots(runs, out)
    crits, notes = evaluate(runs, card)
    title = {
        "e6": "W1-E6 — Min-SNR vs vanilla ε-MSE, curvature under linear β",
        "e9": "MS1-e9 — Min-SNR vs vanilla ε-MSE under cosine β",
    }.get(card, "Run report")
    md = [
        f"# {title}",
        "",
        "Runs: " + ", ".join(f"`{r.path}`" for r in runs),
        "",
        card_table(runs),
        "",
        "## Criteria",
        "",
        "Each estimate has its 95% interval in brackets. A criterion passes or fails only "
        "when the whole interval lies on one side of its threshold.",
        "",
        "| criterion | result | estimate [95% interval] and numbers | figure |",
        "|---|---|---|---|",
    ]
    md += [f"| {c.name} | {ICON[c.status]} | {c.detail} | {c.figure} |" for c in crits]
    md += ["", *[f"- {n}" for n in notes], ""]
    md += provenance_lines(runs)
    for fig in figures:
        md += [f"![{fig}]({fig})", ""]
    text = "\n".join(md)
    (out / "REPORT.md").write_text(text)
    (out / "report.html").write_text(_html(text, out, figures))
    verdicts = {
        "card": card,
        "runs": [str(r.path) for r in runs],
        "criteria": [c.as_json() for c in crits],
        "notes": notes,
    }
    (out / "report.json").write_text(json.dumps(verdicts, indent=1) + "\n")
    return out / "REPORT.md"


def _html(md: str, out: Path, figures: list[str]) -> str:
    """A minimal self-contained page: tables and lists from the markdown, images inlined."""
    import html

    body, in_table = [], False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("- "):
            body.append(f"<p>• {html.escape(line[2:])}</p>")
        elif line.startswith("!["):
            name = line[line.index("(") + 1 : -1]
            data = base64.b64encode((out / name).read_bytes()).decode()
            body.append(f'<img alt="{name}" src="data:image/png;base64,{data}">')
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse}td{border:1px solid #ccc;padding:4px 8px}"
        "img{max-width:100%}"
    )
    return f"<!doctype html><meta charset='utf-8'><style>{style}</style>" + "\n".join(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastdiff.report",
        description="Plots, criteria and verdicts for a card's runs.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--card", choices=["e6", "e9"], help="default: from the experiment names")
    parser.add_argument("--out", type=Path, help="default: <first run>/report")
    args = parser.parse_args(argv)
    try:
        runs = [Run.load(p) for p in args.runs]
    except FileNotFoundError as err:
        print(f"fastdiff.report: error: {err}")
        return 2
    path = write_report(runs, args.out or runs[0].path / "report", args.card)
    print(f"wrote {path} and {path.with_name('report.html')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
