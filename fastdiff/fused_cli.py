"""``python -m fastdiff.fused_cli CARD``: a card's arms and seeds trained as one job
(:class:`fastdiff.fused.FusedRuns`); what ``fastdiff study --fused`` launches."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from fastdiff.cards import load_card
from fastdiff.errors import BAD_INPUT, Parser, fail
from fastdiff.fused import FusedRuns, study_configs
from fastdiff.stopping import Stopped
from fastdiff.study import parse_seeds, study_dir
from fastdiff.train import apply_host_tuning


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog="python -m fastdiff.fused_cli", description="Train a card's arms and seeds as one job."
    )
    parser.add_argument("card", help="a card's name or file")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--seeds", type=parse_seeds, help="default: the card's seeds")
    parser.add_argument("--out", type=Path)
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        card = load_card(args.card)
        root = args.out or study_dir(card.name, args.overrides)
        cfgs = study_configs(card, args.overrides, args.seeds or card.seeds, root)
        apply_host_tuning(cfgs[0])
        fused = FusedRuns(cfgs)
    except BAD_INPUT as err:
        return fail(str(err))
    except Stopped as done:
        print(f"fastdiff.fused: {done}", file=sys.stderr)
        return done.exit_code
    results = fused.train()
    stopped = [r for r in results if isinstance(r, Stopped)]
    for r in stopped:
        print(f"fastdiff.fused: {r}", file=sys.stderr)
    return max((r.exit_code for r in stopped), default=0)


if __name__ == "__main__":
    sys.exit(main())
