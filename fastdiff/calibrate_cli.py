"""``fastdiff calibrate`` (``python -m fastdiff.calibrate_cli``): the report's verdict rules
on simulated paired studies with a known truth (:mod:`fastdiff.report.calibration`)."""

from __future__ import annotations

from fastdiff.errors import Parser
from fastdiff.report.calibration import calibrate, table


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog="fastdiff calibrate",
        description="Wrong-verdict rates and coverage of the report's criteria on "
        "simulated paired studies with a known truth.",
    )
    parser.add_argument("--reps", type=int, default=200, help="studies per cell")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    print(table(calibrate(args.reps, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
