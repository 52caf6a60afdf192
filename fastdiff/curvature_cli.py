"""``python -m fastdiff.curvature RUN_DIR``: the Hutchinson trace of a saved checkpoint.

The run's training loss at that checkpoint, measured as the run measures it
(:class:`fastdiff.curvature.RunProbes`): the probe batch drawn from the same pool of
images, the same probe vectors, the same timestep bands. Prints one JSON row. Bad
input is one line on stderr and exit 2, before the model is built.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastdiff.config import need
from fastdiff.curvature import RunProbes
from fastdiff.data import probe_pool
from fastdiff.errors import Parser, guarded
from fastdiff.objective import Objective
from fastdiff.restore import load_run


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m fastdiff.curvature",
        description="Hutchinson trace of a saved checkpoint's "
        "training loss, on the run's fixed probe batch.",
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--probes", type=int, help="number of probe vectors (default: the run's)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="probe batch size, a multiple of the run's curvature.t_bins (default: the run's)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return guarded(lambda: measure(args))


def measure(args: argparse.Namespace) -> int:
    for flag, value in (("--probes", args.probes), ("--batch-size", args.batch_size)):
        need(value is None or value >= 1, f"{flag} must be >= 1, got {value}")
    run = load_run(args.run_dir, args.step, weights="model")
    cfg, step = run.cfg, run.step
    c, T = cfg.curvature, cfg.diffusion.T
    if args.probes is not None:
        c.probes = args.probes
    if args.batch_size is not None:
        c.batch_size = args.batch_size
    # The run's own values passed these checks when it started (fastdiff.config); the
    # flags' values have not.
    need(
        c.batch_size <= T,
        f"--batch-size must be <= T={T} (one timestep per stratum of [0, T)), got {c.batch_size}",
    )
    need(
        c.t_bins == 0 or c.batch_size % c.t_bins == 0,
        f"--batch-size must be a multiple of the run's curvature.t_bins={c.t_bins} (each "
        f"timestep band gets whole strata of the batch), got {c.batch_size}",
    )
    images = probe_pool(cfg.data, run.host_batches())
    need(
        c.batch_size <= len(images),
        f"--batch-size must be <= {len(images)}, the images the run's probe batch is drawn "
        f"from, got {c.batch_size}",
    )
    probes = RunProbes(images, cfg, Objective.of(cfg, "cpu"), "cpu")
    print(json.dumps({"step": step, "probes": c.probes, **probes(run.model)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
