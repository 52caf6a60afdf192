"""The cards' criteria: each an estimate with a 95% interval and a three-way verdict."""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np

from fastdiff.errors import ConfigError
from fastdiff.report.runs import (
    CARD_SEED,
    CARD_STEPS,
    FID_FINAL,
    FID_MILESTONE,
    TRACE,
    TRACE_UNW,
    Pair,
    Run,
    differing,
)
from fastdiff.stats import (
    FAIL,
    INCONCLUSIVE,
    LEVEL,
    NA,
    PASS,
    Measure,
    normal_interval,
    run_interval,
    seed_interval,
    seeds_needed,
    verdict,
    welch_df,
)

# -------------------------------------------------------------------- criteria
CARD, EXTRA = "card", "fastdiff"
# The confidence of each interval. A card with k treatment arms judges k comparisons
# against one baseline; each is made at 1 − (1 − LEVEL)/k (Bonferroni), so the family of
# k intervals holds its truths together with probability ≥ LEVEL (``simultaneous``).
_LEVEL: ContextVar[float] = ContextVar("level", default=LEVEL)


@contextmanager
def simultaneous(k: int):
    """Judge every criterion inside at the Bonferroni level for k comparisons."""
    token = _LEVEL.set(1 - (1 - LEVEL) / max(k, 1))
    try:
        yield
    finally:
        _LEVEL.reset(token)  # a criterion written on the card, or fastdiff's own check


@dataclass
class Criterion:
    """One criterion's verdict. The top level answers the arms' question (Min-SNR vs
    vanilla beyond seed-to-seed training noise, over seeds); ``pair`` is what the card
    seed's two runs measured, with their own measurement error: the card's literal
    verdict for that seed."""

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
    origin: str = CARD
    pair: Criterion | None = None

    def as_json(self) -> dict:
        def num(x):
            return x if x is None or np.isfinite(x) else str(x)

        def level(c: Criterion) -> dict:
            return {
                "status": c.status,
                "estimate": num(c.estimate),
                "interval": (
                    None
                    if c.interval is None or not all(np.isfinite(c.interval))
                    else list(c.interval)
                ),
                "method": c.method,
                "seeds": c.seeds,
                "detail": c.detail,
            }

        return {
            "name": self.name,
            "origin": self.origin,
            "threshold": self.threshold,
            **level(self),
            "n_seeds": len(self.seeds),
            "values": self.values,
            "seeds_needed": self.seeds_needed,
            "arms": level(self),
            "seed_pair": None if self.pair is None else level(self.pair),
        }


def window(steps: np.ndarray, values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return values[(steps >= lo) & (steps <= hi)]


def scale_steps(run: Run, step: float) -> float:
    """A card step (out of 10k) mapped onto a shorter or longer run."""
    return step * run.total_steps / CARD_STEPS


def stderr_key(key: str) -> str:
    """The standard-error series logged beside a curvature mean (probe vectors and
    samples together)."""
    return key.replace("_mean", "_stderr_total", 1)


@dataclass
class WindowTrace:
    """A curvature mean over the probe steps of a window, with the standard error that
    holds whatever the correlation between those steps (``se``), and, where the run
    logged them, its terms averaged over the same steps: ``probes`` (K,), one per probe
    vector, and ``samples`` (B,), one per probe sample."""

    mean: float
    se: float | None
    probes: np.ndarray | None = None
    samples: np.ndarray | None = None

    def scaled(self, c: float) -> WindowTrace:
        def mul(x):
            return None if x is None else x * c

        return WindowTrace(self.mean * c, mul(self.se), mul(self.probes), mul(self.samples))


def step_traces(run: Run, key: str) -> dict[float, WindowTrace]:
    """Every probe step of ``key``: its value, standard error and terms (each None
    where the run did not log it). One pass over the run's rows."""
    se_key = stderr_key(key)
    probes_key, samples_key = (key.replace("_mean", f"_{x}", 1) for x in ("probes", "samples"))

    def terms(row, k):
        return np.asarray(row[k], float) if k in row else None

    return {
        float(row["step"]): WindowTrace(
            float(row[key]),
            float(row[se_key]) if se_key in row else None,
            terms(row, probes_key),
            terms(row, samples_key),
        )
        for row in run.rows
        if key in row
    }


def paired_steps(
    base: Run, treat: Run, key: str, base_key: str | None = None
) -> list[tuple[float, WindowTrace, WindowTrace]]:
    """(step, treat's, base's) at every probe step both runs logged, in step order."""
    at_b, at_t = step_traces(base, base_key or key), step_traces(treat, key)
    return [(s, at_t[s], at_b[s]) for s in sorted(at_b.keys() & at_t.keys())]


def _window_steps(
    run: Run, key: str, lo: float, hi: float, *, only: set[float] | None = None
) -> list[WindowTrace]:
    """The probe steps of ``key`` in [lo, hi] (and in ``only``), in step order."""
    at = step_traces(run, key)
    return [at[s] for s in sorted(at) if lo <= s <= hi and (only is None or s in only)]


def common_steps(base: Run, treat: Run, key: str, base_key: str | None = None) -> set[float]:
    """The probe steps both runs logged: a run that stopped early is compared with its
    partner over its own steps only, never its few steps against the other's many."""
    return set(step_traces(base, base_key or key)) & set(step_traces(treat, key))


def over_common(base: Run, treat: Run, steps: set[float], *, lo: float, hi: float) -> str:
    """A note when the comparison covers less of [lo, hi] than a finished pair would."""
    if base.finished and treat.finished:
        return ""
    short = next(r for r in (base, treat) if not r.finished)
    inside = [s for s in steps if lo <= s <= hi]
    upto = f" (≤ step {max(inside):g})" if inside else ""
    return f"; {short.stopped_at()}: compared over the probe steps both runs logged{upto}"


def window_mean(
    run: Run, key: str, lo: float, hi: float, *, only: set[float] | None = None
) -> WindowTrace | None:
    """Mean of ``key`` over steps [lo, hi], its standard error and its terms (None if
    the run has no value in the window).

    The probe measures the same batch with the same vectors at every step, so its errors
    are shared from step to step: the window mean's standard error is the mean of the
    steps' (what it is when the errors move together, and an upper bound whatever they
    do), not theirs ÷ √n. Every part is a mean over the steps, and is None unless every
    step in the window has it (the terms also of one length)."""
    inside = _window_steps(run, key, lo, hi, only=only)
    if not inside:
        return None

    def mean(parts):
        if any(p is None for p in parts) or len({np.shape(p) for p in parts}) != 1:
            return None
        return np.mean(parts, axis=0)

    se = mean([w.se for w in inside])
    return WindowTrace(
        float(np.mean([w.mean for w in inside])),
        None if se is None else float(se),
        mean([w.probes for w in inside]),
        mean([w.samples for w in inside]),
    )


def relative_change(treat: float, base: float) -> float:
    return (treat - base) / abs(base)


def change_measure(t: tuple, b: tuple, detail: str) -> Measure:
    """(mt − mb)/|mb| with its delta-method standard error (t and b independent)."""
    (mt, st), (mb, sb) = t, b
    se = None if st is None or sb is None else np.hypot(st, mt / mb * sb) / abs(mb)
    return Measure(relative_change(mt, mb), se, detail)


def strata_groups(n: int) -> list[slice]:
    """Adjacent strata in pairs (the last three together when ``n`` is odd): the probe
    draws one sample per timestep stratum, in stratum order."""
    if n < 4:
        return [slice(0, n)]
    starts = list(range(0, n - n % 2 - 2, 2))  # every pair but the last group
    return [slice(c, c + 2) for c in starts] + [slice(starts[-1] + 2 if starts else 0, n)]


def stratified_variance(z: np.ndarray) -> tuple[float, int]:
    """The variance of the mean of one sample per stratum, and its degrees of freedom.

    The strata are fixed by design, so only the spread within a stratum is error; with
    one sample per stratum it is estimated by collapsing adjacent strata into groups of
    g (Cochran 1977, §5A.12): Var(z̄) ≈ Σ_groups g·s²_g / B². Adjacent strata have
    nearly equal means, so little of their between-strata difference is counted; the
    i.i.d. formula s²/B would count all of it (Min-SNR's weights span ~1000× across
    strata under cosine)."""
    n = len(z)
    if n < 2:
        return 0.0, 0
    groups = [z[g] for g in strata_groups(n)]
    var = sum(len(x) * float(x.var(ddof=1)) for x in groups) / n**2
    return var, sum(len(x) - 1 for x in groups)


def paired_se(t: WindowTrace, b: WindowTrace) -> tuple[float, float | None] | None:
    """The standard error of (t̄ − b̄)/|b̄|, and so of t̄/b̄ for b̄ > 0, from the terms the
    two runs share, with its degrees of freedom. The arms of one seed probe the same B
    samples with the same K vectors, so their errors largely cancel in the comparison.
    Delta method, term by term: zᵢ = (tᵢ − r·bᵢ)/|b̄| with r = t̄/b̄; the probe vectors
    are i.i.d. (s²(z)/K), the samples one per timestep stratum (stratified_variance).
    Welch–Satterthwaite gives the degrees of freedom (B is 8 by default, so a normal
    quantile would make the interval too short). None when either run lacks the terms
    or their shapes differ."""
    variances, dfs = [], []
    for tz, bz, strata in ((t.probes, b.probes, False), (t.samples, b.samples, True)):
        if tz is None or bz is None or tz.shape != bz.shape:
            return None
        z = (tz - t.mean / b.mean * bz) / abs(b.mean)
        if strata:
            var, df = stratified_variance(z)
        else:
            var, df = (float(z.var(ddof=1) / len(z)), len(z) - 1) if len(z) > 1 else (0.0, 0)
        variances.append(var)
        dfs.append(df)
    return float(np.sqrt(sum(variances))), welch_df(variances, dfs)


def trace_measure(t: WindowTrace, b: WindowTrace, value: float, detail: str, *, ratio=False):
    """A comparison of two runs' curvature (``value``, their relative change or ratio)
    with its standard error: paired over the shared probe terms where both runs logged
    them, else the per-run errors taken as independent."""
    paired = paired_se(t, b)
    if paired is not None:
        se, df = paired
        detail += f"; SE paired over {len(t.probes)} probe vectors and {len(t.samples)} samples"
        return Measure(value, se, detail, df)
    if ratio:
        return ratio_measure((t.mean, t.se), (b.mean, b.se), detail)
    return change_measure((t.mean, t.se), (b.mean, b.se), detail)


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


def _nonnegative(iv, fmt):
    """A ratio of two positive quantities is never negative: its interval stops at 0."""
    if fmt is _times and iv.lo < 0:
        iv.lo = 0.0
    return iv


Outcome = Measure | str | None  # a seed's measure, why it has none, or None (no data)


def judge(
    name: str,
    items: list[tuple[int, tuple]],
    measure,
    *,
    threshold: float,
    pass_below: bool,
    figure: str = "",
    fmt=_pct,
    missing: str = "no data",
    origin: str = CARD,
) -> Criterion:
    """``measure(*args)`` for every (seed, args) item, then a verdict at both levels: the
    card seed's pair on its runs' own error, and the arms over the seeds. A measure
    returns a Measure, a string saying why that seed is not evaluable, or None."""
    got: list[tuple[int, Outcome]] = [(seed, measure(*args)) for seed, args in items]
    have = [(seed, m) for seed, m in got if isinstance(m, Measure)]
    why = "; ".join(f"seed {seed}: {m}" for seed, m in got if isinstance(m, str))
    if not have:
        return Criterion(name, NA, why or missing, figure, threshold=threshold, origin=origin)
    side = "≤" if pass_below else "≥"
    level = _LEVEL.get()
    seed0, m0 = next(((s, m) for s, m in have if s == CARD_SEED), have[0])
    iv0 = _nonnegative(run_interval(m0, level), fmt)
    pair = Criterion(
        name,
        verdict(iv0, threshold, pass_below),
        f"seed {seed0}'s runs measured {fmt(iv0.estimate)} [{fmt(iv0.lo)}, {fmt(iv0.hi)}] "
        f"({iv0.method}: their measurement error, not the seed-to-seed spread); {m0.detail}",
        figure,
        estimate=iv0.estimate,
        interval=(iv0.lo, iv0.hi),
        threshold=threshold,
        method=iv0.method,
        seeds=[seed0],
        values=[m0.value],
        origin=origin,
    )
    if pair.status == INCONCLUSIVE:
        pair.detail += f"; straddles {side} {fmt(threshold)}: its own measurement cannot decide"
    left_out = f"; left out: {why}" if why else ""
    others = [seed for seed, m in got if m is None]
    if others:
        left_out += f"; {len(others)} seed pair(s) without data left out"
    if len(have) == 1:
        return Criterion(
            name,
            INCONCLUSIVE,
            f"{fmt(m0.value)} from one seed: how much the arms vary from seed to seed is "
            "not known yet, so one seed pair cannot tell them apart from training noise "
            f"(run the study with --seeds 3){left_out}",
            figure,
            estimate=m0.value,
            interval=None,
            threshold=threshold,
            method="arms: one seed, spread unknown",
            seeds=[seed0],
            values=[m0.value],
            origin=origin,
            pair=pair,
        )
    iv = _nonnegative(seed_interval([m for _, m in have], level), fmt)
    status = verdict(iv, threshold, pass_below)
    text = f"{fmt(iv.estimate)} [{fmt(iv.lo)}, {fmt(iv.hi)}] ({iv.method}, {len(have)} seeds)"
    text += left_out
    need = None
    if status == INCONCLUSIVE:
        need = seeds_needed(iv, threshold, level)
        text += f"; straddles {side} {fmt(threshold)}: ~{need} seeds would decide it at this spread"
    return Criterion(
        name,
        status,
        text,
        figure,
        estimate=iv.estimate,
        interval=(iv.lo, iv.hi),
        threshold=threshold,
        method=iv.method,
        seeds=[seed for seed, _ in have],
        values=[m.value for _, m in have],
        seeds_needed=need,
        origin=origin,
        pair=pair,
    )


def curvature_reduction(
    pairs: list[Pair],
    lo: float,
    hi: float,
    threshold: float,
    *,
    key: str = TRACE,
    divide_by_mean_weight: bool = False,
    base_key: str | None = None,
    origin: str = CARD,
) -> Criterion:
    """W1-E6: mean trace over [lo, hi] (card steps) at least ``threshold`` lower."""
    base0 = pairs[0][0]
    lo_s, hi_s = scale_steps(base0, lo), scale_steps(base0, hi)

    def measure(base: Run, treat: Run):
        steps = common_steps(base, treat, key, base_key)
        means = []
        for run, k in ((base, base_key or key), (treat, key)):
            m = window_mean(run, k, lo_s, hi_s, only=steps)
            if m is None:
                return None
            if divide_by_mean_weight:
                m = m.scaled(1 / (run.value("loss/mean_weight") or 1.0))
            means.append(m)
        b, t = means
        detail = f"{treat.name} {t.mean:.4g} vs {base.name} {b.mean:.4g}"
        detail += over_common(base, treat, steps, lo=lo_s, hi=hi_s)
        return trace_measure(t, b, relative_change(t.mean, b.mean), detail)

    what = "unweighted trace" if key == TRACE_UNW else key
    name = f"mean {what} over steps {lo_s:g}–{hi_s:g} ≥{threshold:.0%} lower"
    if divide_by_mean_weight:
        name += " (÷ mean weight)"
    return judge(
        name,
        by_seed(pairs),
        measure,
        threshold=-threshold,
        pass_below=True,
        figure="curvature_ratio.png",
        missing=f"no {key} at steps {lo_s:g}–{hi_s:g} that both runs logged",
        origin=origin,
    )


def cluster_sizes(above: np.ndarray) -> list[int]:
    """Lengths of the runs of consecutive True in ``above``."""
    sizes, size = [], 0
    for a in np.asarray(above, bool).tolist() + [False]:
        if a:
            size += 1
        elif size:
            sizes.append(size)
            size = 0
    return sizes


def count_variance(above: np.ndarray) -> float:
    """The variance of a spike count. Spikes come in runs (the trajectory and the probe's
    shared error both move slowly), so each run of consecutive spiking probe steps is one
    event of its size: compound Poisson, Σ size². The ½ is the Jeffreys prior's: a run
    with no spikes still has an unknown, not a zero, spike rate."""
    return float(sum(m * m for m in cluster_sizes(above))) + 0.5


def resampled_counts(
    base: list[WindowTrace], treat: list[WindowTrace], factor: float, reps: int, *, seed: int = 0
) -> tuple[np.ndarray, str] | None:
    """The spike-count difference nt − nb re-measured ``reps`` times, its limit
    (``factor`` × the baseline's median) re-derived each time, with how.

    Where both runs logged every step's terms, the probe vectors and samples are
    resampled once per replicate and used at every step of both runs, as the probe
    uses them: value* = mean(probes[i*]) + mean(samples[j*]) − mean (the two error
    sources of summarize()). Else each run's values move by one shared draw of their
    standard errors, z·seₛ (the steps' errors moving together, as window_mean assumes).
    None when a step has neither."""
    rng = np.random.default_rng(seed)
    both = base + treat
    mean = np.array([w.mean for w in both])[:, None]  # (S, 1)
    shapes = {(np.shape(w.probes), np.shape(w.samples)) for w in both}
    if all(w.probes is not None and w.samples is not None for w in both) and len(shapes) == 1:
        probes = np.stack([w.probes for w in both])  # (S, K)
        samples = np.stack([w.samples for w in both])  # (S, B)
        iv = rng.integers(0, probes.shape[1], (reps, probes.shape[1]))
        # samples are redrawn within their group of adjacent strata (stratified_variance)
        js = np.concatenate(
            [
                g.start + rng.integers(0, g.stop - g.start, (reps, g.stop - g.start))
                for g in strata_groups(samples.shape[1])
            ],
            axis=1,
        )
        values = probes[:, iv].mean(-1) + samples[:, js].mean(-1) - mean  # (S, reps)
        k, b = probes.shape[1], samples.shape[1]
        how = f"probe re-measured over its {k} vectors and {b} samples, paired"
    elif all(w.se is not None for w in both):
        se = np.array([w.se for w in both])[:, None]
        z = np.concatenate(
            [np.repeat(rng.standard_normal((1, reps)), len(run), 0) for run in (base, treat)]
        )
        values = mean + z * se
        how = "probe error from the steps' standard errors, shared within each run"
    else:
        return None
    vb, vt = values[: len(base)], values[len(base) :]
    limit = factor * np.median(vb, axis=0)
    return (vt > limit).sum(0) - (vb > limit).sum(0), how


def _sizes(above: np.ndarray) -> str:
    return "+".join(map(str, cluster_sizes(above))) or "none"


def spike_count(
    pairs: list[Pair], lo: float, hi: float, factor: float, *, reps: int = 2000
) -> Criterion:
    """W1-E6: fewer points above ``factor`` × the baseline's median trace in [lo, hi]:
    the difference of the counts. Its one-seed standard error has two parts: the
    spikes' own chance (compound Poisson over runs of consecutive spikes,
    count_variance) and the probe's measurement error, which moves points across the
    limit and the limit itself (resampled_counts)."""
    base0 = pairs[0][0]
    lo_s, hi_s = scale_steps(base0, lo), scale_steps(base0, hi)

    def measure(base: Run, treat: Run):
        steps = common_steps(base, treat, TRACE)
        b = _window_steps(base, TRACE, lo_s, hi_s, only=steps)
        t = _window_steps(treat, TRACE, lo_s, hi_s, only=steps)
        if not b or not t:
            return None
        vb, vt = np.array([w.mean for w in b]), np.array([w.mean for w in t])
        limit = factor * float(np.median(vb))
        above_b, above_t = vb > limit, vt > limit
        nb, nt = int(above_b.sum()), int(above_t.sum())
        var = count_variance(above_b) + count_variance(above_t)
        detail = f"limit {limit:.4g}: {treat.name} {nt}/{len(t)} points, {base.name} {nb}/{len(b)}"
        detail += f"; runs of consecutive spikes {_sizes(above_t)} vs {_sizes(above_b)}"
        remeasured = resampled_counts(b, t, factor, reps)
        if remeasured is None:
            detail += "; the probe's own error unknown (no standard errors logged), left out"
        else:
            diffs, how = remeasured
            var += float(diffs.var())
            detail += f"; {how}"
        detail += over_common(base, treat, steps, lo=lo_s, hi=hi_s)
        return Measure(nt - nb, float(np.sqrt(var)), detail)

    return judge(
        f"fewer spikes > {factor}× the baseline's median trace (steps {lo_s:g}–{hi_s:g})",
        by_seed(pairs),
        measure,
        threshold=-0.5,  # counts are whole: "fewer" is a difference of at most −1
        pass_below=True,
        figure="curvature.png",
        fmt=lambda x: f"{x:+.1f}",
        missing=f"no {TRACE} at steps in that range that both runs logged",
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


def _final_fid(run: Run) -> tuple[float, float | None] | str | None:
    """The final FID and its bootstrap standard error (else a milestone's at the last
    step, which carries none). A run that stopped early has no final FID: its last
    milestone is an earlier model's, so it says why instead."""
    if not run.finished:
        return f"{run.stopped_at()}, so it has no final FID"
    final = run.value(FID_FINAL)
    if final is not None:
        return final, run.value(FID_FINAL + "_se")
    steps, values = run.series(FID_MILESTONE)
    at_end = values[steps >= run.total_steps]
    return (float(at_end[-1]), None) if len(at_end) else None


def _both(fb, ft):
    """The two runs' FIDs, or why (a string) or that (None) one is missing."""
    for f in (fb, ft):
        if f is None or isinstance(f, str):
            return f
    return None


def _fid_judge(
    name: str,
    pairs: list[Pair],
    measure,
    *,
    threshold: float,
    pass_below: bool,
    fmt,
    missing: str = "no final FID (eval/final/fid or a milestone FID) in one of the runs",
    origin: str = CARD,
) -> Criterion:
    differs = fid_provenance_differs(*{r.path: r for pair in pairs for r in pair}.values())
    if differs:
        return Criterion(name, NA, differs, threshold=threshold, origin=origin)
    off = [r for pair in pairs for r in pair if r.summary.get("fid_off")]
    if off:  # say why, from the run's own record
        missing = f"FID was off in {off[0].name}: {off[0].summary['fid_off']}"
    return judge(
        name,
        by_seed(pairs),
        measure,
        threshold=threshold,
        pass_below=pass_below,
        figure="fid.png",
        fmt=fmt,
        missing=missing,
        origin=origin,
    )


def _fid_change(base: Run, treat: Run):
    fb, ft = _final_fid(base), _final_fid(treat)
    if (why := _both(fb, ft)) is not None or fb is None or ft is None:
        return why if isinstance(why, str) else None
    return change_measure(ft, fb, f"{treat.name} {ft[0]:.2f} vs {base.name} {fb[0]:.2f}")


def fid_change(pairs: list[Pair], threshold: float, name: str) -> Criterion:
    """The final FID's relative change at most ``threshold`` (negative: an improvement
    of at least |threshold|)."""
    return _fid_judge(name, pairs, _fid_change, threshold=threshold, pass_below=True, fmt=_pct)


def fid_band(pairs: list[Pair], max_increase: float, improved: float) -> list[Criterion]:
    """W1-E6: final FID no worse than +``max_increase``; and whether it improved by at
    least ``improved``."""
    return [
        fid_change(pairs, max_increase, f"final FID no worse than +{max_increase:.0%}"),
        fid_change(pairs, -improved, f"final FID improved by ≥{improved:.0%}"),
    ]


def fid_ratio(pairs: list[Pair], which: str, band: float, pathology: float) -> Criterion:
    """MS1-e9: Min-SNR's FID within ``band`` × vanilla's (success); ≥ ``pathology`` ×
    is the pathology."""

    def pick(run: Run):
        final = _final_fid(run)
        if which == "best" and not isinstance(final, str):
            _, v = run.series(FID_MILESTONE)
            vals = [(x, None) for x in v.tolist()] + ([final] if final else [])
            return min(vals, key=lambda m: m[0]) if vals else None
        return final

    def measure(base: Run, treat: Run):
        fb, ft = pick(base), pick(treat)
        if (why := _both(fb, ft)) is not None or fb is None or ft is None:
            return why if isinstance(why, str) else None
        r = ft[0] / fb[0]
        word = "PATHOLOGY" if r >= pathology else ("within band" if r <= band else "outside band")
        return ratio_measure(
            ft, fb, f"{treat.name} {ft[0]:.2f} / {base.name} {fb[0]:.2f} = {r:.2f}× ({word})"
        )

    return _fid_judge(
        f"{which} FID within {band - 1:.0%} of vanilla (pathology at ≥{pathology:g}×)",
        pairs,
        measure,
        threshold=band,
        pass_below=True,
        fmt=_times,
    )


def recall_kept(pairs: list[Pair], floor: float) -> Criterion:
    """MS1-e9 "mode collapse": Min-SNR's recall (torch-fidelity prc, final samples) at
    least ``floor`` × vanilla's. fastdiff's rule; recall carries no within-run SE."""

    def measure(base: Run, treat: Run):
        for run in (base, treat):
            if not run.finished:
                return f"{run.stopped_at()}, so it has no final recall"
        rb, rt = base.value("eval/final/recall"), treat.value("eval/final/recall")
        if rb is None or rt is None or rb == 0:
            return None
        return Measure(rt / rb, None, f"recall {treat.name} {rt:.3f} vs {base.name} {rb:.3f}")

    return _fid_judge(
        f"no mode collapse: recall ≥ {floor:g}× vanilla's",
        pairs,
        measure,
        threshold=floor,
        pass_below=False,
        fmt=_times,
        missing="no eval/final/recall in one of the runs",
        origin=EXTRA,
    )


NONFINITE = re.compile(r"train/nonfinite\w*")


def completed(run: Run) -> Criterion:
    """Finished every step with a finite loss in every window. A window whose steps were
    all skipped as non-finite logs its loss as missing, and a count of them: neither
    passes."""
    _, losses = run.series("train/loss")
    skipped = sum(
        float(v or 0) for row in run.rows for k, v in row.items() if NONFINITE.fullmatch(k)
    )
    finite = (
        bool(len(losses))
        and bool(np.isfinite(losses).all())
        and skipped == 0
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


BAND_TRACE = re.compile(r"curvature/hutch/t(\d+)-\d+/trace_mean")


def band_keys(run: Run) -> list[str]:
    """The run's per-timestep-band trace series (``curvature/hutch/t{lo}-{hi}/trace_mean``),
    low t (high SNR) first."""
    found = {k for row in run.rows for k in row if BAND_TRACE.fullmatch(k)}
    return sorted(found, key=lambda k: int(BAND_TRACE.fullmatch(k).group(1)))


def exploding_curvature(
    pairs: list[Pair], burn_in: float, factor: float, bands: bool = False
) -> Criterion:
    """Rule: after burn-in, the treatment's trace stays below ``factor`` × the
    baseline's at the same probe step (the worst step's ratio, with its SE). With
    ``bands``, the same over each timestep band's trace: the worst band and step (MS1-e9's
    "curvature / SNR stats": a blow-up confined to one SNR range hides in the total)."""
    lo = scale_steps(pairs[0][0], burn_in)

    def measure(base: Run, treat: Run):
        keys = band_keys(base) if bands else [TRACE]
        ratios, probed = [], 0
        for key in keys:
            common = [(s, t, b) for s, t, b in paired_steps(base, treat, key) if s >= lo]
            probed = max(probed, len(common))
            # a ratio to a negative trace says nothing of growth
            ratios += [(t.mean / b.mean, s, key, t, b) for s, t, b in common if b.mean > 0]
        if not ratios:
            return None
        worst, step, key, _, _ = max(ratios, key=lambda r: r[:2])
        where = f" in band {key.split('/')[2]}" if bands else ""
        detail = f"worst ratio {worst:.2f}×{where} at step {step:g} over {probed} probe steps"
        if bands:
            detail += f" and {len(keys)} bands"
        return max_measure(
            [trace_measure(t, b, r, "", ratio=True) for r, _, _, t, b in ratios], detail
        )

    if bands:
        name = (
            f"no SNR band with exploding curvature unique to Min-SNR (each timestep band's "
            f"trace < {factor:g}× vanilla's after step {lo:g})"
        )
        missing = f"no per-band traces (curvature/hutch/t…/trace_mean) at common steps ≥ {lo:g}"
    else:
        name = (
            f"no exploding curvature unique to Min-SNR (trace < {factor:g}× vanilla's "
            f"after step {lo:g})"
        )
        missing = f"no common probe steps ≥ {lo:g} with {TRACE}"
    figure = "curvature.png" if bands else "curvature_ratio.png"
    return judge(
        name,
        by_seed(pairs),
        measure,
        threshold=factor,
        pass_below=True,
        figure=figure,
        fmt=_times,
        missing=missing,
    )


def max_measure(measures: list[Measure], detail: str, level: float | None = None) -> Measure:
    """The largest of several noisy values, with an interval for the largest of their
    true values. The largest observed value is biased upward (the noisiest step tends
    to win), and its own standard error says nothing of that; intervals simultaneous
    over all m values (Bonferroni, each at 1 − (1 − level)/m) hold every true value at
    once with probability ≥ level, so [max of the lows, max of the highs] holds the
    largest."""
    level = _LEVEL.get() if level is None else level
    each = 1 - (1 - level) / len(measures)
    lows, highs = [], []
    for m in measures:
        if m.se is None:
            lows.append(-np.inf)
            highs.append(np.inf)
            continue
        lo, hi = normal_interval(m.value, m.se, each, m.df)
        lows.append(lo)
        highs.append(hi)
    how = f"simultaneous over {len(measures)} comparisons" if len(measures) > 1 else ""
    detail += f"; interval {how}" if how else ""
    return Measure(max(m.value for m in measures), None, detail, lo=max(lows), hi=max(highs))


def loss_pathology(pairs: list[Pair], factor: float) -> Criterion:
    """Min-SNR-only loss pathology: treatment's unweighted ε-MSE over the last quarter
    at least ``factor`` × the baseline's (the weighted losses are not comparable in scale)."""
    key = "train/mse_unweighted"

    def last_quarter(run: Run, steps: set[float]):
        s, v = run.series(key)
        inside = np.isin(s, list(steps))
        v = window(s[inside], v[inside], 0.75 * run.total_steps, run.total_steps)
        if not len(v):
            return None
        return (
            float(v.mean()),
            (float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None),
            len(v),
        )

    def measure(base: Run, treat: Run):
        steps = set(base.series(key)[0].tolist()) & set(treat.series(key)[0].tolist())
        b, t = last_quarter(base, steps), last_quarter(treat, steps)
        if b is None or t is None:
            short = [r for r in (base, treat) if not r.finished]
            return f"{short[0].stopped_at()}, before the last quarter" if short else None
        detail = f"{treat.name} {t[0]:.4g} vs {base.name} {b[0]:.4g}"
        detail += over_common(base, treat, steps, lo=0.75 * base.total_steps, hi=base.total_steps)
        m = ratio_measure(t[:2], b[:2], detail)
        if m.se is not None:  # each window's SE comes from its few log steps: Student t
            parts = [(x[1] / x[0]) ** 2 for x in (t, b)]
            m.df = welch_df(parts, [t[2] - 1, b[2] - 1])
        return m

    return judge(
        f"no loss pathology unique to Min-SNR (unweighted ε-MSE, last quarter, < {factor:g}× "
        "vanilla's)",
        by_seed(pairs),
        measure,
        threshold=factor,
        pass_below=True,
        figure="loss.png",
        fmt=_times,
        missing=f"no {key} in the last quarter at steps both runs logged",
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
        if (why := _both(fb, ft)) is not None or fb is None or ft is None:
            return why
        return ratio_measure(ft, fb, "")

    def measure(lin_pair: Pair, cos_pair: Pair):
        gl, gc = gap(lin_pair), gap(cos_pair)
        if not isinstance(gl, Measure) or not isinstance(gc, Measure):
            return gl if isinstance(gl, str) else gc if isinstance(gc, str) else None
        se = None if gl.se is None or gc.se is None else float(np.hypot(gl.se, gc.se))
        return Measure(gc.value - gl.value, se, f"linear {gl.value:.2f}×, cosine {gc.value:.2f}×")

    differs = fid_provenance_differs(*[r for pair in both for p in pair for r in p])
    if differs:
        return Criterion(name, NA, differs, threshold=0.0)
    return judge(
        name,
        [(cos_pair[0].seed, (lin_pair, cos_pair)) for lin_pair, cos_pair in both],
        measure,
        threshold=0.0,
        pass_below=True,
        figure="fid.png",
        fmt=lambda x: f"{x:+.2f}",
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
        "The card's curvature criterion (≥15% lower trace) failed; the unweighted "
        f"comparisons give {unweighted.status} / {rescaled.status}."
    )


def _values(values: list) -> str:
    return " vs ".join(map(str, values))


def matched(pairs: list[Pair], varies: set[str]) -> tuple[list[Pair], list[str]]:
    """The pairs whose runs differ only in what the card varies, and why each other
    pair is not evaluable (every differing key with both values)."""
    kept, why = [], []
    for base, treat in pairs:
        diff = differing([base, treat], varies)
        if diff:
            keys = "; ".join(f"{k} {_values(v)}" for k, v in diff.items())
            why.append(f"seed {base.seed}: {base.name} and {treat.name} differ in {keys}")
        else:
            kept.append((base, treat))
    return kept, why


def _unmatched(reasons: list[str]) -> Criterion:
    return Criterion(
        "the arms are a matched pair (differ only in what the card varies)",
        NA,
        "not evaluable: " + " | ".join(reasons),
    )


# ------------------------------------------------------------ the card's library
@dataclass
class Kind:
    """A criterion kind a card can name: its parameters and how to judge it."""

    judge: Callable[..., list[Criterion]]  # (pairs, params, ctx) -> criteria
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    def check(self, params: dict, where: str) -> None:
        missing = [k for k in self.required if k not in params]
        unknown = [k for k in params if k not in self.required + self.optional]
        if missing or unknown:
            wants = ", ".join(self.required + self.optional) or "none"
            raise ConfigError(
                f"{where}: {'missing ' + ', '.join(missing) if missing else ''}"
                f"{'; ' if missing and unknown else ''}"
                f"{'unknown ' + ', '.join(unknown) if unknown else ''} (parameters: {wants})"
            )


@dataclass
class Context:
    """What a kind may need beyond its pairs: every run handed to the report, and the
    notes the report prints."""

    runs: list[Run]
    notes: list[str]
    lead: str  # the card seed's level ("For seed 1077's runs: ") or the arms'
    pick: Callable[[Criterion], Criterion]


def _window_change(pairs, p, ctx):
    key = p.get("metric", TRACE)
    window = {"lo": p["lo"], "hi": p["hi"], "threshold": -p["threshold"]}
    main = curvature_reduction(pairs, **window, key=key)
    if not p.get("confound"):
        return [main]
    base = pairs[0][0]
    unw = curvature_reduction(
        pairs, **window, key=TRACE_UNW, base_key=unweighted_key(base), origin=EXTRA
    )
    rescaled = curvature_reduction(pairs, **window, divide_by_mean_weight=True, origin=EXTRA)
    ctx.notes.append(
        ctx.lead + confound_sentence(ctx.pick(main), ctx.pick(unw), ctx.pick(rescaled))
    )
    return [main, unw, rescaled]


def _completed(pairs, p, ctx):
    return [completed(r) for r in {id(r): r for pair in pairs for r in pair}.values()]


def _fid_gap(pairs, p, ctx):
    """The other schedule's pair, found among the report's runs by experiment name."""
    named = {
        arm: {r.seed: r for r in ctx.runs if r.name == p[arm]} for arm in ("baseline", "treatment")
    }
    other = [
        (named["baseline"][s], named["treatment"][s])
        for s in named["baseline"]
        if s in named["treatment"]
    ]
    if not other:
        crit = fid_gap_persists([], pairs)
        crit.detail = (
            f"not evaluable: no {p['baseline']} and {p['treatment']} runs with this pair's "
            "seeds were handed to the report (pass their run dirs too)"
        )
        return [crit]
    varied = set(differing(list(pairs[0])))  # the other pair may differ as this one does
    other, _ = matched(other, varied)
    by_seed = {b.seed: b for b, _ in pairs}
    allowed = varied | {"diffusion.beta_schedule"}
    why = [
        f"seed {b.seed}: the two schedules' pairs differ in "
        + "; ".join(f"{k} {_values(v)}" for k, v in diff.items())
        for b, _ in other
        if b.seed in by_seed and (diff := differing([b, by_seed[b.seed]], allowed))
    ]
    crit = fid_gap_persists(other, pairs)
    return [Criterion(crit.name, NA, "not evaluable: " + " | ".join(why)) if why else crit]


KINDS: dict[str, Kind] = {
    "window_change": Kind(_window_change, ("lo", "hi", "threshold"), ("metric", "confound")),
    "spike_count": Kind(lambda pairs, p, ctx: [spike_count(pairs, **p)], ("lo", "hi", "factor")),
    "fid_change": Kind(
        lambda pairs, p, ctx: [fid_change(pairs, p["threshold"], p["title"])],
        ("threshold", "title"),
    ),
    "fid_ratio": Kind(
        lambda pairs, p, ctx: [fid_ratio(pairs, **p)], ("which", "band", "pathology")
    ),
    "recall_floor": Kind(lambda pairs, p, ctx: [recall_kept(pairs, **p)], ("floor",)),
    "loss_ratio": Kind(lambda pairs, p, ctx: [loss_pathology(pairs, **p)], ("factor",)),
    "worst_ratio": Kind(
        lambda pairs, p, ctx: [exploding_curvature(pairs, **p)],
        ("burn_in", "factor"),
        ("bands",),
    ),
    "completed": Kind(_completed),
    "fid_gap": Kind(_fid_gap, ("baseline", "treatment")),
}


def function_params(card) -> dict[str, dict]:
    """A card's parameters keyed by the criterion functions above (for the plots, the
    calibration and tests that call those functions directly)."""
    out: dict[str, dict] = {}
    for spec in card.criteria:
        p = spec.params
        if spec.kind == "window_change":
            out.setdefault(
                "curvature_reduction", {"lo": p["lo"], "hi": p["hi"], "threshold": -p["threshold"]}
            )
        elif spec.kind == "fid_change":
            which = "max_increase" if p["threshold"] > 0 else "improved"
            out.setdefault("fid_band", {})[which] = abs(p["threshold"])
        elif spec.kind in ("spike_count", "fid_ratio"):
            out.setdefault(spec.kind, {k: v for k, v in p.items() if k != "which"})
        elif spec.kind in FUNCTION_OF:
            out.setdefault(FUNCTION_OF[spec.kind], {k: v for k, v in p.items() if k != "bands"})
    return out


FUNCTION_OF = {
    "recall_floor": "recall_kept",
    "loss_ratio": "loss_pathology",
    "worst_ratio": "exploding_curvature",
}


def arms_of(runs: list[Run], card) -> tuple[dict[str, list[Run]], list[Run]]:
    """The card's arms' runs, each sorted by seed, and the runs of no arm."""
    arms: dict[str, list[Run]] = {a: [] for a in card.arms}
    other = []
    for run in runs:
        arm = card.arm_of(run.config)
        if arm:
            run.arm_name = arm  # several arms may share an experiment (γ variants)
        (arms[arm] if arm else other).append(run)
    return {a: sorted(rs, key=lambda r: r.seed) for a, rs in arms.items()}, other


def evaluate(runs: list[Run], card) -> tuple[list[Criterion], list[str]]:
    """Every criterion of ``card`` (a :class:`fastdiff.cards.Card`; None: each run's
    completion only) for each treatment arm against the baseline, on the pairs of runs
    that share a seed."""
    notes: list[str] = []
    if card is None:
        return [completed(r) for r in runs], notes
    arms, _ = arms_of(runs, card)
    base_runs = {r.seed: r for r in arms[card.baseline]}
    k = len(card.treatments)
    crits: list[Criterion] = []
    judged: list[Pair] = []
    if k > 1:
        notes.append(
            f"{k} treatment arms against {card.baseline}: every interval is simultaneous "
            f"over the {k} comparisons (Bonferroni, each at {1 - (1 - LEVEL) / k:.1%}), so "
            f"all {k} hold together with 95% probability."
        )
    if "loss.prediction" in card.varied:
        notes.append(
            "The arms predict different targets: the loss criteria compare the ε-MSE, in "
            "which an x0-prediction's error at high SNR counts SNR-fold (ε-error = √SNR · "
            "x0-error), so a loss ratio there measures the target as much as the weighting."
        )
    for arm in card.treatments:
        pairs = [(base_runs[r.seed], r) for r in arms[arm] if r.seed in base_runs]
        suffix = f" — {arm}" if k > 1 else ""
        if not pairs:
            crits.append(
                Criterion(
                    f"paired runs present{suffix}",
                    NA,
                    f"need {card.baseline} and {arm} runs with a seed in common",
                )
            )
            continue
        pairs, unmatched = matched(pairs, card.varied)
        if unmatched:
            crits.append(_unmatched(unmatched))
        if not pairs:
            continue
        judged += pairs
        seeds = [b.seed for b, _ in pairs]
        card_seed = CARD_SEED if CARD_SEED in seeds else seeds[0]
        one = len(pairs) == 1
        ctx = Context(
            runs,
            notes,
            f"For seed {card_seed}'s runs{suffix}: " if one else f"For the arms{suffix}: ",
            (lambda c: c.pair or c) if one else (lambda c: c),
        )
        with simultaneous(k):
            for spec in card.criteria:
                for crit in KINDS[spec.kind].judge(pairs, dict(spec.params), ctx):
                    if spec.source == "rule" and crit.origin == CARD:
                        crit.origin = EXTRA
                    if suffix and spec.kind != "completed":
                        crit.name += suffix
                    crits.append(crit)
    crits = _dedupe_completed(crits)
    if judged:
        notes[:0] = _level_notes(judged, card)
    if any(c.status == INCONCLUSIVE for c in crits):
        notes.append(
            "Inconclusive: the 95% interval straddles the threshold (or, with one seed, the "
            "seed-to-seed spread is unknown), so these runs cannot say which side the arms "
            "are on; with two or more seeds the detail says about how many would decide it."
        )
    extras = [c.name for c in crits if c.origin == EXTRA]
    if extras:
        notes.append(
            "Not on the card, fastdiff's own checks (marked in the table): "
            + "; ".join(extras)
            + "."
        )
    return crits, notes


def _dedupe_completed(crits: list[Criterion]) -> list[Criterion]:
    """The baseline's completion row once, however many arms it is paired with."""
    seen, out = set(), []
    for c in crits:
        if c.name in seen and "completed" in c.name:
            continue
        seen.add(c.name)
        out.append(c)
    return out


def _level_notes(pairs: list[Pair], card) -> list[str]:
    notes = []
    seeds = sorted({b.seed for b, _ in pairs})
    card_seed = CARD_SEED if CARD_SEED in seeds else seeds[0]
    notes.append(
        f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}). Each criterion has two "
        f"verdicts: **seed {card_seed}'s runs** — what that seed's two runs measured, with "
        "their own measurement error (the card's criterion as written for one seed); and "
        "**the arms** — whether the treatment differs from the baseline beyond "
        "seed-to-seed training noise, a paired t-interval over seeds. "
        + (
            "One seed says nothing about that noise, so the arms' verdict stays "
            "inconclusive: run the same study command again with --seeds 3."
            if len(seeds) == 1
            else ""
        )
    )
    base = pairs[0][0]
    if base.total_steps != CARD_STEPS:
        notes.append(
            f"The runs are {base.total_steps} steps, not the card's {CARD_STEPS}: "
            f"every step in the criteria is scaled by {base.total_steps / CARD_STEPS:g}."
        )
    for run in {r.path: r for pair in pairs for r in pair}.values():
        if not run.finished:
            notes.append(
                f"{run.stopped_at()}: curvature and loss are compared over the steps both "
                "runs of its pair logged; its final FID and recall are not evaluable."
            )
    return notes


def unweighted_key(base: Run) -> str:
    """A uniform baseline's trace is already the unweighted one."""
    return TRACE_UNW if base.series(TRACE_UNW)[0].size else TRACE
