"""``fastdiff report`` (also ``python -m fastdiff.report``): plots and verdicts.

    fastdiff report STUDY_DIR                       # writes STUDY_DIR/report
    fastdiff report RUN_DIR                         # writes RUN_DIR/report
    fastdiff report RUN_A RUN_B [...] --card NAME   # writes ./report (or --out DIR)

The command lives above the library it calls (:func:`fastdiff.report.render.write_report`):
it reads the arguments, finds the card and the runs, and picks where the report goes.
Bad input is one line on stderr and exit 2, before anything is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastdiff.cards import Card, load_card
from fastdiff.errors import Parser, guarded
from fastdiff.report.render import write_report
from fastdiff.report.runs import Run

# Where a report of several runs goes without --out: the current folder, not inside one
# of the runs (the first run named is no more the report's than the others).
SHARED_OUT = Path("report")


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m fastdiff.report",
        description="Plots, criteria and verdicts for a card's runs.",
    )
    p.add_argument("runs", nargs="+", type=Path, help="run directories, or one study folder")
    p.add_argument(
        "--card",
        help="a card's name or file (default: a study folder's card.yaml, else the shipped "
        "card whose arms all have runs)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help=f"default: STUDY_DIR/report, RUN_DIR/report for one run, ./{SHARED_OUT} for several",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return guarded(lambda: report(args))


def report(args: argparse.Namespace) -> int:
    card, runs, out = inputs(args.runs, args.card)
    path = write_report(runs, args.out or out or shared_out(), card)
    print(f"wrote {path} and {path.with_name('report.html')}")
    return 0


def inputs(paths: list[Path], card_arg: str | None) -> tuple[Card | None, list[Run], Path | None]:
    """(card, runs, default output folder): a study folder holds its card and its runs,
    and one run directory its own report; several runs have no folder of their own (None)."""
    if len(paths) == 1 and (paths[0] / "card.yaml").is_file():
        root = paths[0]
        card = load_card(card_arg or root / "card.yaml")
        runs = [Run.load(p.parent) for p in sorted(root.glob("*/seed*/metrics.jsonl"))]
        if not runs:
            raise FileNotFoundError(f"{root} holds a card but no runs yet")
        return card, runs, root / "report"
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: pass run directories")
    runs = [Run.load(p) for p in paths]
    card = load_card(card_arg) if card_arg else None
    return card, runs, (runs[0].path / "report" if len(runs) == 1 else None)


def shared_out() -> Path:
    """./report for the report of several runs, unless ./report is something else."""
    taken = SHARED_OUT.exists() and not (SHARED_OUT / "report.json").is_file()
    if taken and (not SHARED_OUT.is_dir() or any(SHARED_OUT.iterdir())):
        raise FileExistsError(
            f"./{SHARED_OUT} exists and is not a report: pass --out DIR for these runs' report"
        )
    return SHARED_OUT
