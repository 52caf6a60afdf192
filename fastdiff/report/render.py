"""REPORT.md, report.html and report.json (the command line is fastdiff.report_cli)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from fastdiff.cards import detect_card, load_card
from fastdiff.report.criteria import (
    EXTRA,
    Criterion,
    arms_of,
    evaluate,
)
from fastdiff.report.plots import (
    make_plots,
)
from fastdiff.report.runs import (
    FID_FINAL,
    TRACE,
    Run,
    differing,
    settings,
)
from fastdiff.stats import (
    FAIL,
    INCONCLUSIVE,
    NA,
    PASS,
)


def arm_labels(runs: list[Run]) -> dict[Path, str]:
    """Each run's label, with every config key that differs between the arms, so two
    arms that differ in more than the card varies cannot look alike."""
    diff = differing(runs, {"train.seed"})
    labels = {}
    for run in runs:
        flat = settings(run.config)
        extra = ", ".join(f"{k}={flat.get(k)}" for k in diff if k not in SHOWN)
        labels[run.path] = run.label + (f" [{extra}]" if extra else "")
    return labels


# Keys Run.label already shows.
SHOWN = {
    "loss.prediction",
    "loss.weighting",
    "loss.gamma",
    "loss.k",
    "diffusion.beta_schedule",
    "diffusion.zero_terminal_snr",
}


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
    labels = arm_labels(runs)
    for run in sorted(runs, key=lambda r: (labels[r.path], r.seed)):
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
            f"| {labels[run.path]} | {run.seed} | {run.summary.get('step', '—')} | "
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


def write_report(runs: list[Run], out: Path, card=None) -> Path:
    """The report of ``runs`` against ``card`` (a Card, a card's name or path; None: the
    shipped card whose arms all have runs here, else a per-run report)."""
    out.mkdir(parents=True, exist_ok=True)
    card = load_card(card) if isinstance(card, (str, Path)) else card or detect_card(runs)
    lower = None
    baseline = None
    if card is not None:
        windows = [c.params for c in card.criteria if c.kind == "window_change"]
        lower = -windows[0]["threshold"] if windows else None
        arms_of(runs, card)  # the card's arm names label every figure
        baseline = card.baseline
    figures = make_plots(runs, out, lower, baseline=baseline)
    crits, notes = evaluate(runs, card)
    title = card.title if card is not None else "Run report"
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
        "when the whole interval lies on one side of its threshold. **Seed pair**: what "
        "the card seed's two runs measured, judged on their own measurement error — the "
        "card's criterion for that seed. **Arms**: whether each treatment arm and the "
        "baseline differ beyond seed-to-seed training noise, judged over seeds; one seed "
        "never decides it.",
        "",
        "| criterion | seed pair (its runs' error) | arms (over seeds) | numbers | figure |",
        "|---|---|---|---|---|",
    ]
    md += [_row(c, figures) for c in crits]
    md += ["", *[f"- {n}" for n in notes], ""]
    md += provenance_lines(runs)
    for fig in figures:
        md += [f"![{fig}]({fig})", ""]
    text = "\n".join(md)
    (out / "REPORT.md").write_text(text)
    (out / "report.html").write_text(_html(text, out, figures))
    if card is not None and card.question:
        md[1:1] = ["", f"*{card.question}*"]
    verdicts = {
        "card": None if card is None else card.name,
        "runs": [str(r.path) for r in runs],
        "criteria": [c.as_json() for c in crits],
        "notes": notes,
    }
    (out / "report.json").write_text(json.dumps(verdicts, indent=1) + "\n")
    return out / "REPORT.md"


def _row(c: Criterion, figures: list[str]) -> str:
    name = c.name + (" *(fastdiff's check, not on the card)*" if c.origin == EXTRA else "")
    figure = c.figure if c.figure in figures else ""
    if c.pair is None and c.status != NA:  # a fact of one run (completion), not an estimate
        return f"| {name} | {ICON[c.status]} | — | {c.detail} | {figure} |"
    pair = "—" if c.pair is None else ICON[c.pair.status]
    detail = c.detail if c.pair is None else f"seed pair: {c.pair.detail}<br>arms: {c.detail}"
    return f"| {name} | {pair} | {ICON[c.status]} | {detail} | {figure} |"


def _html(md: str, out: Path, figures: list[str]) -> str:
    """report.html: REPORT.md through Python-Markdown (tables, code spans), one
    self-contained file with the figures inlined as data URIs."""
    import markdown

    body = markdown.markdown(md, extensions=["tables"], output_format="html")
    for name in figures:
        data = base64.b64encode((out / name).read_bytes()).decode()
        body = body.replace(f'src="{name}"', f'src="data:image/png;base64,{data}"')
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        "img{max-width:100%}code{background:#f4f4f4;padding:0 2px}"
    )
    return f"<!doctype html><meta charset='utf-8'><style>{style}</style>\n{body}\n"
