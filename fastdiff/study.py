"""Run a card's paired arms, once per seed, then write the comparison report.

    python -m fastdiff.study e9 [KEY=VALUE ...] [--seeds 3 | --seeds 1077,2001,3003]
                                [--launch "accelerate launch ARGS"] [--out DIR]

e9 runs e9a and e9b; e6 runs e5 and e6. Overrides apply to every arm. Each arm-seed
is an ordinary run directory, ``DIR/<arm>/seed<seed>``; the two arms of one seed share
data order, timesteps, noise and init. Every run is started with train.resume=auto,
so running the same study again leaves finished runs as they are and resumes
unfinished ones: an interrupted study continues where it stopped. The default DIR
is named by a hash of the overrides and seeds, so the same command finds its runs.

    python -m fastdiff.study e9 data=digits train.total_steps=60 --seeds 2

``--fused`` trains all of them in one process as one batched pass (fastdiff.fused);
the run directories are the same.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import subprocess
import sys
from pathlib import Path

from fastdiff.config import ConfigError, compose, to_config

STUDIES = {"e9": ("e9a", "e9b"), "e6": ("e5", "e6")}
CARD_SEED = 1077  # the cards' seed; --seeds N adds 2077, 3077, ...


MOST_SEEDS = 100  # a larger count is a seed typed without its comma


def parse_seeds(text: str) -> list[int]:
    """'3' -> the card's seed and two more; '1077,2001' (or '1077,') -> those seeds."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            count = int(text)
            if count > MOST_SEEDS:
                raise argparse.ArgumentTypeError(
                    f"--seeds {text} asks for {count} seeds: for the seed {text} itself "
                    f"write --seeds {text}, (a list, here of one)"
                )
            seeds = [CARD_SEED + 1000 * i for i in range(count)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds takes a count (3) or a comma-separated list (1077,2001), got {text!r}"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs at least one seed, each once: {text!r}")
    return seeds


def study_dir(card: str, overrides: list[str], seeds: list[int]) -> Path:
    key = hashlib.sha256(" ".join([card, *overrides, *map(str, seeds)]).encode()).hexdigest()
    return Path("runs") / "study" / f"{card}-{key[:10]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastdiff.study",
        description="Run a card's paired arms for every seed, then report.",
    )
    parser.add_argument("card", choices=sorted(STUDIES))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every arm")
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        default=[CARD_SEED],
        help="a count (3: 1077, 2077, 3077) or a list (1077,2001,3003; one seed: 1077,); "
        "default: 1077",
    )
    parser.add_argument(
        "--launch",
        default="accelerate launch",
        help="launcher command and arguments (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, help="study dir (default: runs/study/CARD-<hash of the command>)"
    )
    parser.add_argument(
        "--fused",
        action="store_true",
        help="train every arm and seed in one job, one batched pass (fastdiff.fused)",
    )
    args = parser.parse_intermixed_args(argv)

    arms = STUDIES[args.card]
    if any(
        o.startswith(("train.seed=", "train.run_dir=", "train.resume=")) for o in args.overrides
    ):
        print(
            "fastdiff.study: error: the study sets train.seed, train.run_dir and "
            "train.resume itself: use --seeds and --out",
            file=sys.stderr,
        )
        return 2
    root = args.out or study_dir(args.card, args.overrides, args.seeds)
    try:  # check every arm's config before any training
        for arm in arms:
            to_config(compose([f"experiment={arm}", *args.overrides]))
    except ConfigError as err:
        print(f"fastdiff.study: error: {err}", file=sys.stderr)
        return 2
    launch = shlex.split(args.launch)
    if launch[:2] == ["accelerate", "launch"]:  # the launcher of this interpreter's env
        launch = [sys.executable, "-m", "accelerate.commands.launch", *launch[2:]]
    print(f"study {args.card}: {len(arms)} arms x {len(args.seeds)} seeds in {root}", flush=True)
    failed = []
    if args.fused:
        seeds = ",".join(map(str, args.seeds)) + ","
        cmd = [*launch, "-m", "fastdiff.fused", args.card, *args.overrides]
        cmd += ["--seeds", seeds, "--out", str(root)]
        print("$", shlex.join(cmd), flush=True)
        if subprocess.call(cmd) != 0:
            failed.append("the fused job")
    for seed in args.seeds if not args.fused else []:
        for arm in arms:
            run_dir = root / arm / f"seed{seed}"
            cmd = [
                *launch,
                "-m",
                "fastdiff.train",
                arm,
                *args.overrides,
                f"train.seed={seed}",
                f"train.run_dir={run_dir}",
                "train.resume=auto",
            ]
            print("$", shlex.join(cmd), flush=True)
            if subprocess.call(cmd) != 0:
                failed.append(f"{arm} seed {seed}")
    if failed:
        print(
            f"fastdiff.study: {', '.join(failed)} failed; the report covers what finished",
            file=sys.stderr,
        )
    from fastdiff.report import Run, write_report

    runs = [Run.load(p.parent) for p in sorted(root.glob("*/seed*/metrics.jsonl"))]
    path = write_report(runs, root / "report", args.card)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
