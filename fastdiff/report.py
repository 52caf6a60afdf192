"""Comparison report: answer a card's question from its runs' logs.

    python -m fastdiff.report RUN_A RUN_B [more runs…] [--card e6|e9] [--out DIR]

Reads each run's metrics.jsonl, config.yaml, summary.json and sample grids;
writes PNG plots, REPORT.md and a self-contained report.html. Each criterion of
the card is evaluated as pass / fail / not evaluable (missing data never passes).
"""

from __future__ import annotations

import argparse
import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

PASS, FAIL, NA = "pass", "fail", "not evaluable"
CARD_STEPS = 10_000  # the cards' run length; criteria windows scale with shorter runs
FID_MILESTONE, FID_FINAL = "val/fid_milestone/fid", "eval/final/fid"
TRACE = "curvature/hutch_trace_mean"
TRACE_STD = "curvature/hutch_trace_std"
TRACE_UNW = "curvature/hutch_trace_mean_unweighted"


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
    def weighting(self) -> str:
        return self.config.get("loss", {}).get("weighting", "uniform")

    @property
    def schedule(self) -> str:
        return self.config.get("diffusion", {}).get("beta_schedule", "?")

    @property
    def total_steps(self) -> int:
        return int(self.config.get("train", {}).get("total_steps", CARD_STEPS))

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


def window(steps: np.ndarray, values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return values[(steps >= lo) & (steps <= hi)]


def scale_steps(run: Run, step: float) -> float:
    """A card step (out of 10k) mapped onto a shorter or longer run."""
    return step * run.total_steps / CARD_STEPS


def relative_change(treat: float, base: float) -> float:
    return (treat - base) / abs(base)


def curvature_reduction(
    base: Run,
    treat: Run,
    key: str = TRACE,
    lo: float = 6000,
    hi: float = 10000,
    divide_by_mean_weight: bool = False,
    threshold: float = 0.15,
) -> Criterion:
    """W1-E6: mean trace over [lo, hi] (card steps) at least ``threshold`` lower."""
    lo_s, hi_s = scale_steps(base, lo), scale_steps(base, hi)
    means = []
    for run in (base, treat):
        vals = window(*run.series(key), lo_s, hi_s)
        if divide_by_mean_weight and len(vals):
            vals = vals / (run.value("loss/mean_weight") or 1.0)
        means.append(float(vals.mean()) if len(vals) else None)
    name = f"mean {key} over steps {lo_s:g}–{hi_s:g} ≥{threshold:.0%} lower"
    if divide_by_mean_weight:
        name += " (÷ mean weight)"
    if None in means:
        return Criterion(
            name,
            NA,
            f"no {key} in steps {lo_s:g}–{hi_s:g} of "
            f"{'both runs' if means == [None, None] else 'one run'}",
        )
    change = relative_change(means[1], means[0])
    return Criterion(
        name,
        PASS if change <= -threshold else FAIL,
        f"{treat.name} {means[1]:.4g} vs {base.name} {means[0]:.4g}: {change:+.1%}",
        "curvature.png",
    )


def spike_count(
    base: Run, treat: Run, lo: float = 2000, hi: float = 10000, factor: float = 1.5
) -> Criterion:
    """W1-E6: fewer points above ``factor`` × the baseline's median trace in [lo, hi]."""
    lo_s, hi_s = scale_steps(base, lo), scale_steps(base, hi)
    b = window(*base.series(TRACE), lo_s, hi_s)
    t = window(*treat.series(TRACE), lo_s, hi_s)
    name = f"fewer spikes > {factor}× {base.name}'s median trace (steps {lo_s:g}–{hi_s:g})"
    if not len(b) or not len(t):
        return Criterion(name, NA, f"no {TRACE} in that range of one of the runs")
    limit = factor * float(np.median(b))
    nb, nt = int((b > limit).sum()), int((t > limit).sum())
    return Criterion(
        name,
        PASS if nt < nb else FAIL,
        f"limit {limit:.4g}: {treat.name} {nt}/{len(t)} points, {base.name} {nb}/{len(b)}",
        "curvature.png",
    )


def fid_band(base: Run, treat: Run, max_increase: float = 0.10) -> list[Criterion]:
    """W1-E6: final FID no worse than +10%; and whether it improved by 5–10%."""
    fb, ft = _final_fid(base), _final_fid(treat)
    name = f"final FID no worse than +{max_increase:.0%}"
    differs = fid_provenance_differs(base, treat)
    if differs:
        return [Criterion(name, NA, differs), Criterion("final FID improved by ≥5%", NA, differs)]
    if fb is None or ft is None:
        msg = "no final FID (eval/final/fid or a milestone FID) in " + _missing(fb, ft, base, treat)
        return [Criterion(name, NA, msg), Criterion("final FID improved by ≥5%", NA, msg)]
    change = relative_change(ft, fb)
    detail = f"{treat.name} {ft:.2f} vs {base.name} {fb:.2f}: {change:+.1%}"
    return [
        Criterion(name, PASS if change <= max_increase else FAIL, detail, "fid.png"),
        Criterion(
            "final FID improved by ≥5%", PASS if change <= -0.05 else FAIL, detail, "fid.png"
        ),
    ]


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


def _missing(fb, ft, base: Run, treat: Run) -> str:
    return "either run" if fb is None and ft is None else (base if fb is None else treat).name


def _final_fid(run: Run) -> float | None:
    final = run.value(FID_FINAL)
    return final if final is not None else run.value(FID_MILESTONE)


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
        f"{run.name} completed {run.total_steps} steps without NaN/inf",
        PASS if ok else FAIL,
        f"reached step {run.summary.get('step', 'unknown')}, "
        f"loss {'finite' if finite else 'NOT finite (or missing)'}",
        "loss.png",
    )


def fid_ratio(base: Run, treat: Run, which: str) -> Criterion:
    """MS1-e9: Min-SNR's FID within 30% of vanilla (success) or ≥2× (pathology)."""

    def pick(run):
        if which == "best":
            _, v = run.series(FID_MILESTONE)
            vals = [x for x in v.tolist() + [run.value(FID_FINAL)] if x is not None]
            return min(vals) if vals else None
        return _final_fid(run)

    fb, ft = pick(base), pick(treat)
    name = f"{which} FID within 30% of {base.name} (pathology at ≥2×)"
    differs = fid_provenance_differs(base, treat)
    if differs:
        return Criterion(name, NA, differs)
    if fb is None or ft is None:
        return Criterion(name, NA, "no FID logged in " + _missing(fb, ft, base, treat))
    ratio = ft / fb
    verdict = "PATHOLOGY" if ratio >= 2 else ("within band" if ratio <= 1.3 else "outside band")
    return Criterion(
        name,
        PASS if ratio <= 1.3 else FAIL,
        f"{treat.name} {ft:.2f} / {base.name} {fb:.2f} = {ratio:.2f}× ({verdict})",
        "fid.png",
    )


EXPLODE_FACTOR = 3.0


def exploding_curvature(base: Run, treat: Run, burn_in: float = 2000) -> Criterion:
    """Rule: after burn-in, the treatment's trace exceeds EXPLODE_FACTOR × the baseline's at
    the same probe step, at any step (a Min-SNR-only pathology)."""
    lo = scale_steps(base, burn_in)
    sb, vb = base.series(TRACE)
    st, vt = treat.series(TRACE)
    common = sorted(set(sb[sb >= lo].tolist()) & set(st[st >= lo].tolist()))
    name = f"no exploding curvature unique to {treat.name}"
    if not common:
        return Criterion(name, NA, f"no common probe steps ≥ {lo:g} with {TRACE}")
    b = np.array([vb[sb == s][-1] for s in common])
    t = np.array([vt[st == s][-1] for s in common])
    ratio = t / np.where(np.abs(b) > 0, np.abs(b), np.nan)
    worst = float(np.nanmax(ratio))
    return Criterion(
        name,
        PASS if worst < EXPLODE_FACTOR else FAIL,
        f"rule: trace > {EXPLODE_FACTOR:g}× {base.name}'s at the same step after "
        f"step {lo:g}; worst ratio {worst:.2f}× over {len(common)} probe steps",
        "curvature.png",
    )


def loss_pathology(base: Run, treat: Run) -> Criterion:
    """Min-SNR-only loss pathology: treatment's unweighted ε-MSE over the last quarter
    more than 2× the baseline's (the weighted losses are not comparable in scale)."""
    key = "train/mse_unweighted"
    vals = []
    for run in (base, treat):
        s, v = run.series(key)
        vals.append(window(s, v, 0.75 * run.total_steps, run.total_steps))
    name = f"no loss pathology unique to {treat.name}"
    if not len(vals[0]) or not len(vals[1]):
        return Criterion(name, NA, f"no {key} in the last quarter of one run")
    ratio = float(vals[1].mean() / vals[0].mean())
    return Criterion(
        name,
        PASS if ratio < 2 and np.isfinite(ratio) else FAIL,
        f"rule: unweighted ε-MSE over the last quarter < 2× {base.name}'s; ratio {ratio:.2f}×",
        "loss.png",
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
    if card.status == PASS and statuses == {PASS}:
        return (
            "The card's verdict survives the loss-scale confound: the trace is also lower "
            "on the unweighted loss and after dividing by the mean weight."
        )
    if card.status == PASS:
        return (
            "The card's verdict does not survive the loss-scale confound: part or all of "
            "the lower trace is Min-SNR's smaller mean weight, not a flatter landscape."
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

    if any(len(r.series(TRACE)[0]) for r in runs):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for run in runs:
            s, m = run.series(TRACE)
            _, sd = run.series(TRACE_STD)
            (line,) = axes[0].plot(s, m, marker="o", ms=3, label=run.label)
            if len(sd) == len(m):
                axes[0].fill_between(s, m - sd, m + sd, color=line.get_color(), alpha=0.2)
            s, m = run.series(TRACE_UNW)
            if len(s):
                axes[1].plot(
                    s, m, marker="o", ms=3, color=line.get_color(), label=f"{run.name} unweighted"
                )
            elif run.weighting == "uniform":
                s, m = run.series(TRACE)
                axes[1].plot(
                    s, m, marker="o", ms=3, color=line.get_color(), label=f"{run.name} (uniform)"
                )
        axes[0].set(title="curvature/hutch_trace_mean ± std (weighted loss)", xlabel="step")
        axes[1].set(title="trace of the unweighted ε-MSE", xlabel="step")
        for ax in axes:
            ax.legend(fontsize=8)
        save(fig, "curvature.png")

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


def pair(runs: list[Run], schedule: str | None = None) -> tuple[Run, Run] | None:
    """(vanilla, Min-SNR) runs, optionally under one β schedule."""
    pool = [r for r in runs if schedule is None or r.schedule == schedule]
    base = [r for r in pool if r.weighting == "uniform"]
    treat = [r for r in pool if r.weighting != "uniform"]
    return (base[0], treat[0]) if base and treat else None


def evaluate(runs: list[Run], card: str | None) -> tuple[list[Criterion], list[str]]:
    notes = []
    if card is None:
        return [completed(r) for r in runs], notes
    if card == "e6":
        p = pair(runs, "linear") or pair(runs)
    else:
        p = pair(runs, "cosine") or pair(runs)
    if p is None:
        return [Criterion("paired runs present", NA, "need one uniform and one Min-SNR run")], notes
    base, treat = p
    if base.total_steps != CARD_STEPS:
        notes.append(
            f"The runs are {base.total_steps} steps, not the card's {CARD_STEPS}: "
            f"every step in the criteria is scaled by {base.total_steps / CARD_STEPS:g}."
        )
    if card == "e6":
        card_crit = curvature_reduction(base, treat)
        crits = [card_crit, spike_count(base, treat), *fid_band(base, treat)]
    else:
        card_crit = curvature_reduction(base, treat, lo=2000)
        crits = [
            completed(base),
            completed(treat),
            fid_ratio(base, treat, "best"),
            fid_ratio(base, treat, "final"),
            loss_pathology(base, treat),
            exploding_curvature(base, treat),
        ]
        linear = pair(runs, "linear")
        if linear is not None and card == "e9":
            crits.append(fid_gap_persists(linear, (base, treat)))
    unw = _unweighted_reduction(base, treat, card_crit_lo(card))
    rescaled = curvature_reduction(base, treat, lo=card_crit_lo(card), divide_by_mean_weight=True)
    crits += [unw, rescaled]
    notes.append(confound_sentence(card_crit, unw, rescaled))
    return crits, notes


def card_crit_lo(card: str) -> float:
    return 6000 if card == "e6" else 2000


def _unweighted_reduction(base: Run, treat: Run, lo: float) -> Criterion:
    """Unweighted trace: a uniform baseline's trace is already the unweighted one."""
    lo_s, hi_s = scale_steps(base, lo), scale_steps(base, CARD_STEPS)
    base_key = TRACE_UNW if base.series(TRACE_UNW)[0].size else TRACE
    b = window(*base.series(base_key), lo_s, hi_s)
    t = window(*treat.series(TRACE_UNW), lo_s, hi_s)
    name = f"mean unweighted trace over steps {lo_s:g}–{hi_s:g} ≥15% lower"
    if not len(b) or not len(t):
        return Criterion(name, NA, "no unweighted trace in that range")
    change = relative_change(float(t.mean()), float(b.mean()))
    return Criterion(
        name,
        PASS if change <= -0.15 else FAIL,
        f"{treat.name} {t.mean():.4g} vs {base.name} {b.mean():.4g}: {change:+.1%}",
        "curvature.png",
    )


def fid_gap_persists(linear: tuple[Run, Run], cosine: tuple[Run, Run]) -> Criterion:
    gaps = []
    for base, treat in (linear, cosine):
        fb, ft = _final_fid(base), _final_fid(treat)
        gaps.append(None if fb is None or ft is None else ft / fb)
    name = "FID gap (Min-SNR / vanilla) under cosine vs linear"
    differs = fid_provenance_differs(*linear, *cosine)
    if differs:
        return Criterion(name, NA, differs)
    if None in gaps:
        return Criterion(name, NA, "final FID missing in the linear or cosine pair")
    worse = gaps[1] > gaps[0]
    return Criterion(
        name,
        FAIL if worse else PASS,
        f"linear {gaps[0]:.2f}×, cosine {gaps[1]:.2f}×: the gap "
        f"{'worsens' if worse else 'does not worsen'} under cosine",
        "fid.png",
    )


def card_table(runs: list[Run]) -> str:
    keys = [
        ("train/loss", "final train/loss"),
        ("train/mse_unweighted", "final unweighted MSE"),
        (TRACE, "final hutch_trace_mean"),
        (FID_FINAL, "eval/final/fid"),
        ("loss/mean_weight", "mean weight"),
    ]
    head = "| run | steps | " + " | ".join(label for _, label in keys) + " | img/s |"
    lines = [head, "|" + "---|" * (len(keys) + 3)]
    for run in runs:
        cells = []
        for key, _ in keys:
            v = run.value(key)
            cells.append("—" if v is None else f"{v:.4g}")
        ips = run.summary.get("images_per_sec")
        lines.append(
            f"| {run.label} | {run.summary.get('step', '—')} | "
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


def write_report(runs: list[Run], out: Path, card: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    card = card or detect_card(runs)
    figures = make_plots(runs, out)
    crits, notes = evaluate(runs, card)
    title = {
        "e6": "W1-E6 — Min-SNR vs vanilla ε-MSE, curvature under linear β",
        "e9": "MS1-e9 — Min-SNR vs vanilla ε-MSE under cosine β",
    }.get(card, "Run report")
    icon = {PASS: "✅ pass", FAIL: "❌ fail", NA: "⚪ not evaluable"}
    md = [
        f"# {title}",
        "",
        "Runs: " + ", ".join(f"`{r.path}`" for r in runs),
        "",
        card_table(runs),
        "",
        "## Criteria",
        "",
        "| criterion | result | numbers | figure |",
        "|---|---|---|---|",
    ]
    md += [f"| {c.name} | {icon[c.status]} | {c.detail} | {c.figure} |" for c in crits]
    md += ["", *[f"- {n}" for n in notes], ""]
    md += provenance_lines(runs)
    for fig in figures:
        md += [f"![{fig}]({fig})", ""]
    text = "\n".join(md)
    (out / "REPORT.md").write_text(text)
    (out / "report.html").write_text(_html(text, out, figures))
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
