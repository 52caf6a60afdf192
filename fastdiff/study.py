"""Run a card's paired arms, once per seed, then write the comparison report.

    python -m fastdiff.study e9 [KEY=VALUE ...] [--seeds 3 | --seeds 1077,2001,3003]
                                [--launch "accelerate launch ARGS"] [--out DIR]

CARD is a shipped card's name or a card file (fastdiff.cards): its arms are
experiments with overrides, its criteria those the report judges. Overrides apply to
every arm and may not set what the arms vary. Each arm-seed
is an ordinary run directory, ``DIR/<arm>/seed<seed>``; the two arms of one seed share
data order, timesteps, noise and init. Every run is started with train.resume=auto,
so running the same study again leaves finished runs as they are and resumes
unfinished ones: an interrupted study continues where it stopped. The default DIR
is named by a hash of the card and the overrides (not the seeds), so the same command
finds its runs, and adding seeds (``--seeds 3`` after ``--seeds 1``) trains only the
new ones. A DIR belongs to one card and one set of overrides (``study.json``): another
set into the same ``--out`` is refused. Each run's output is also kept in
``DIR/logs/<arm>-seed<seed>.log``; the study exits 1 if any run failed, naming it.

    python -m fastdiff.study e9 data=digits train.total_steps=60 --seeds 2

``--fused`` trains all of them in one process as one batched pass (fastdiff.fused);
the run directories are the same.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from fastdiff.cards import load_card
from fastdiff.config import compose, to_config
from fastdiff.errors import ConfigError, Parser, fail
from fastdiff.report.runs import CARD_SEED
from fastdiff.stopping import EXIT_PREEMPTED  # the cards' seed; --seeds N adds 2077, 3077, ...

RECORD = "study.json"
CARD_COPY = "card.yaml"  # the card as the study ran it: the report reads this copy


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


def study_dir(card: str, overrides: list[str]) -> Path:
    """The default folder of a study: its card and overrides, not its seeds, so adding
    seeds finds the runs already made."""
    key = hashlib.sha256(" ".join([card, *sorted(overrides)]).encode()).hexdigest()
    return Path("runs") / "study" / f"{card}-{key[:10]}"


def claim(root: Path, card: str, overrides: list[str]) -> None:
    """Record which study ``root`` holds; refuse one with another card or overrides, whose
    runs would be reported under the same labels as this one's."""
    mine = {"card": card, "overrides": sorted(overrides)}
    path = root / RECORD
    if path.is_file():
        theirs = json.loads(path.read_text())
        if theirs != mine:
            raise ConfigError(
                f"{root} holds study {theirs['card']} with overrides "
                f"{' '.join(theirs['overrides']) or '(none)'}, not {card} with "
                f"{' '.join(mine['overrides']) or '(none)'}: pass another --out"
            )
        return
    if root.is_dir() and any(root.iterdir()):
        raise ConfigError(f"{root} is not empty and holds no {RECORD}: pass another --out")
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=1) + "\n")


def run_logged(cmd: list[str], log: Path) -> int:
    """Run ``cmd``, its output to the terminal and to ``log`` as it comes (progress bars
    included: bytes, not lines). Ctrl-C reaches the run too (one process group): the
    study keeps reading until the run has checkpointed and exited, so its last lines are
    logged; a second Ctrl-C is passed on, which ends the run at once."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, interrupts = sys.stdout.buffer, 0
        while True:
            try:
                chunk = os.read(proc.stdout.fileno(), 65536)
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts > 1:
                    proc.send_signal(signal.SIGINT)
                continue
            if not chunk:
                break
            out.write(chunk)
            out.flush()
            f.write(chunk)
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog="python -m fastdiff.study",
        description="Run a card's paired arms for every seed, then report.",
    )
    parser.add_argument("card", help="a shipped card's name (e9, e6, …) or a card file's path")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every arm")
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        help="a count (3: 1077, 2077, 3077) or a list (1077,2001,3003; one seed: 1077,); "
        "default: the card's seeds",
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

    try:
        card = load_card(args.card)
    except ConfigError as err:
        return fail(str(err))
    seeds = args.seeds or card.seeds
    if any(
        o.startswith(("train.seed=", "train.run_dir=", "train.resume=")) for o in args.overrides
    ):
        return fail(
            "the study sets train.seed, train.run_dir and train.resume itself: use --seeds "
            "and --out"
        )
    launch = shlex.split(args.launch)
    if not launch or shutil.which(launch[0]) is None:
        return fail(f"--launch {args.launch!r}: {launch[0] if launch else ''} is not a program")
    root = args.out or study_dir(card.name, args.overrides)
    try:  # check every arm's config, and the folder, before any training
        clash = [o for o in args.overrides if o.split("=", 1)[0].lstrip("+~") in card.varied]
        if clash:
            raise ConfigError(
                f"{' '.join(clash)} sets what the card's arms vary "
                f"({', '.join(sorted(card.varied))}): change the arms in a copy of the card"
            )
        for arm, overrides in card.arms.items():
            try:
                to_config(compose([*overrides, *args.overrides]))
            except ConfigError as err:
                raise ConfigError(f"arm {arm!r} of {card.name}: {err}") from None
        claim(root, card.name, args.overrides)
    except ConfigError as err:
        return fail(str(err))
    (root / CARD_COPY).write_text(card.as_yaml())
    launch = shlex.split(args.launch)
    if launch[:2] == ["accelerate", "launch"]:  # the launcher of this interpreter's env
        launch = [sys.executable, "-m", "accelerate.commands.launch", *launch[2:]]
    print(f"study {card.name}: {len(card.arms)} arms x {len(seeds)} seeds in {root}", flush=True)
    failed = []
    if args.fused:
        listed = ",".join(map(str, seeds)) + ","
        cmd = [*launch, "-m", "fastdiff.fused_cli", str(root / CARD_COPY), *args.overrides]
        cmd += ["--seeds", listed, "--out", str(root)]
        print("$", shlex.join(cmd), flush=True)
        log = root / "logs" / "fused.log"
        if run_logged(cmd, log) != 0:
            failed.append(f"the fused job (log: {log})")
    for seed in seeds if not args.fused else []:
        for arm in card.arms:
            cmd = [
                *launch,
                "-m",
                "fastdiff.train",
                *card.run_overrides(arm, args.overrides, seed=seed, root=root),
            ]
            print("$", shlex.join(cmd), flush=True)
            log = root / "logs" / f"{arm}-seed{seed}.log"
            code = run_logged(cmd, log)
            if code == EXIT_PREEMPTED:
                print(
                    f"fastdiff: study stopped by a signal during {arm} seed {seed} (log: {log}): "
                    "run the same command again to resume",
                    file=sys.stderr,
                )
                return EXIT_PREEMPTED
            if code != 0:
                failed.append(f"{arm} seed {seed} (log: {log})")
    from fastdiff.report import Run
    from fastdiff.report.render import write_report

    # this command's seeds only: the folder may hold more from an earlier --seeds
    dirs = [root / arm / f"seed{seed}" for seed in seeds for arm in card.arms]
    runs = [Run.load(d) for d in dirs if (d / "metrics.jsonl").is_file()]
    if runs:
        path = write_report(runs, root / "report", card)
        print(f"report: {path}")
    if failed:
        print(
            f"fastdiff.study: {len(failed)} run(s) failed: {'; '.join(failed)}"
            + ("; the report covers what finished" if runs else ""),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
