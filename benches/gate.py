"""The speed regression gate: this run's ratios against the committed baseline's.

python -m benches.gate .benchmarks/check.json [--baseline benches/baseline.json] [--tolerance 0.25]

Absolute times do not carry from one machine to another, nor from one minute to the
next on a shared VM (fastdiff's batch-4 step measured 175 ms and 280 ms on one machine
within ten minutes), so the gate reads ratios measured within one run:

- each train step's speed-up over the diffusers peer (steps interleaved round by round,
  with its 95% interval over rounds) must stay within ``tolerance`` of the baseline's:
  it fails when the whole interval lies below (1 − tolerance) × the baseline's,
  passes when the whole interval lies at or above it, and is inconclusive otherwise;
- each sampler's overhead over the bare forward passes it makes (sampler / forward,
  interleaved too) must stay below (1 + tolerance) × the baseline's, judged the same
  way.

Exit 0 when everything passes, 1 when anything fails, 2 when nothing fails but
something is inconclusive (rerun, or raise the rounds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benches.ratios import load
from fastdiff.stats import FAIL, INCONCLUSIVE, Interval, verdict

BASELINE = Path(__file__).resolve().parent / "baseline.json"


def check(what: str, ratio: list, was: float, tolerance: float, higher_is_better: bool):
    """(what, status, detail) for a ratio (estimate, lo, hi) this run against the
    baseline's estimate ``was``: it may move ``tolerance`` of it the wrong way."""
    est, lo, hi = ratio
    if lo is None:  # one round: no interval
        lo, hi = float("-inf"), float("inf")
    limit = (1 - tolerance if higher_is_better else 1 + tolerance) * was
    status = verdict(Interval(est, lo, hi, "rounds"), limit, pass_below=not higher_is_better)
    side = "≥" if higher_is_better else "≤"
    share = limit / was
    detail = f"{est:.3f}× [{lo:.3f}, {hi:.3f}] against {side} {limit:.3f}× "
    return what, status, detail + f"({share:.0%} of the baseline's {was:.3f}×)"


def checks(now: dict, base: dict, tolerance: float) -> list[tuple[str, str, str]]:
    """Every gated ratio that this run and the baseline both have."""
    rows = []
    for name in sorted(now.keys() & base.keys()):
        ours, theirs = now[name]["extra_info"], base[name]["extra_info"]
        if name.startswith("test_train_step["):
            for peer in sorted(ours["vs_fastdiff"].keys() & theirs["vs_fastdiff"].keys()):
                if peer.startswith("diffusers"):
                    was = theirs["vs_fastdiff"][peer][0]
                    what = f"{name} {peer} / fastdiff"
                    rows.append(check(what, ours["vs_fastdiff"][peer], was, tolerance, True))
        elif name.startswith("test_sampler["):
            was = theirs["overhead"][0]
            rows.append(check(f"{name} / bare forward", ours["overhead"], was, tolerance, False))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="this run's pytest-benchmark JSON")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--tolerance", type=float, default=0.25)
    args = parser.parse_args(argv)
    for path in (args.json, args.baseline):
        if not path.is_file():
            how = "make bench, then make bench-baseline" if path == args.baseline else "make bench"
            print(f"bench gate: {path} does not exist; run {how} first", file=sys.stderr)
            return 1
    (now, _), (base, _) = load(args.json), load(args.baseline)
    rows = checks(now, base, args.tolerance)
    if not rows:
        print("bench gate: no bench in common with the baseline", file=sys.stderr)
        return 1
    width = max(len(r[0]) for r in rows)
    for what, status, detail in rows:
        print(f"{what:<{width}}  {status:<12}  {detail}")
    statuses = {r[1] for r in rows}
    if FAIL in statuses:
        return 1
    return 2 if INCONCLUSIVE in statuses else 0


if __name__ == "__main__":
    raise SystemExit(main())
