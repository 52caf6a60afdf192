"""Run both arms of a card, then write the comparison report.

    python -m fastdiff.study e9 [KEY=VALUE ...] [--launch "accelerate launch ARGS"]

e9 runs e9a then e9b; e6 runs e5 then e6. Overrides apply to both arms, so a
short smoke version of a whole study is one command:

    python -m fastdiff.study e9 data=digits train.total_steps=60
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from fastdiff.config import ConfigError, compose, to_config

STUDIES = {"e9": ("e9a", "e9b"), "e6": ("e5", "e6")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastdiff.study", description="Run a card's paired arms and report."
    )
    parser.add_argument("card", choices=sorted(STUDIES))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to both arms")
    parser.add_argument(
        "--launch",
        default="accelerate launch",
        help="launcher command and arguments (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, help="study dir (default: runs/study/CARD/<time>)")
    args = parser.parse_args(argv)

    arms = STUDIES[args.card]
    root = args.out or Path("runs") / "study" / args.card / time.strftime("%Y%m%d-%H%M%S")
    try:  # check both arms' configs before any training
        for arm in arms:
            to_config(compose([f"experiment={arm}", *args.overrides]))
    except ConfigError as err:
        print(f"fastdiff.study: error: {err}", file=sys.stderr)
        return 2
    launch = shlex.split(args.launch)
    if launch[:2] == ["accelerate", "launch"]:  # the launcher of this interpreter's env
        launch = [sys.executable, "-m", "accelerate.commands.launch", *launch[2:]]
    for arm in arms:
        cmd = [*launch, "-m", "fastdiff.train", arm, *args.overrides, f"train.run_dir={root / arm}"]
        print("$", shlex.join(cmd), flush=True)
        if subprocess.call(cmd) != 0:
            print(
                f"fastdiff.study: arm {arm} failed; the report covers what finished",
                file=sys.stderr,
            )
    from fastdiff.report import Run, write_report

    runs = [Run.load(root / arm) for arm in arms if (root / arm / "metrics.jsonl").exists()]
    path = write_report(runs, root / "report", args.card)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
