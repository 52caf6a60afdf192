"""``python -m fastdiff.eval RUN_DIR``: FID/KID of a saved checkpoint's EMA weights.

Writes ``eval_step{STEP}_{SAMPLER}{NFE}_n{SAMPLES}.json`` into the run directory and
prints the same row. Bad input is one line on stderr and exit 2, before any sampling.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastdiff.config import need
from fastdiff.diffusion import Schedule
from fastdiff.errors import Parser, guarded
from fastdiff.fid import (
    build_evaluator,
    chosen_extractor,
    generate,
    resolve_weights,
    spacing_record,
)
from fastdiff.restore import load_run
from fastdiff.rundir import write_text
from fastdiff.sampling import SAMPLERS
from fastdiff.tuning import reuse_freed_memory


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m fastdiff.eval", description="FID/KID of a saved checkpoint's EMA weights."
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--nfe", type=int, default=50, help="sampler steps, in [1, T]")
    p.add_argument("--samples", type=int, default=10_000, help="images sampled, >= 2")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddpm")
    p.add_argument("--batch-size", type=int, default=256, help="images per sampling batch")
    p.add_argument("--weights", help="Inception weights file (default: the run's, or torch hub's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not torch.cuda.is_available():  # sampling batches of 100+ images: fastdiff.tuning
        reuse_freed_memory()
    return guarded(lambda: evaluate(args))


def evaluate(args: argparse.Namespace) -> int:
    # FID needs a covariance of the samples' features: at least two of them.
    need(args.samples >= 2, f"--samples must be >= 2, got {args.samples}")
    need(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = load_run(args.run_dir, args.step, weights="ema", device=device)
    cfg, step = run.cfg, run.step
    T = cfg.diffusion.T
    need(1 <= args.nfe <= T, f"--nfe must be in [1, T={T}], got {args.nfe}")
    fid = cfg.eval.fid
    fid.weights_path = args.weights or fid.weights_path
    if chosen_extractor(fid, cfg.data.name) == "inception":
        # Resolved here rather than in build_evaluator, so that an error names --weights.
        fid.weights_path = str(resolve_weights(fid.weights_path, option="--weights"))
    evaluator, _ = build_evaluator(cfg, run.host_batches(), device, explicit=True)
    model = run.model
    schedule = Schedule.of(cfg)  # zero_terminal_snr included
    start = time.perf_counter()
    samples = generate(
        model,
        schedule,
        range(args.samples),
        (3, cfg.data.image_size, cfg.data.image_size),
        sampler=args.sampler,
        nfe=args.nfe,
        seed=cfg.eval.seed,
        batch_size=args.batch_size,
        prediction=cfg.loss.prediction,
        spacing=cfg.sampling.spacing,
        progress=True,
    )
    result = {
        "step": step,
        "sampler": args.sampler,
        "nfe": args.nfe,
        "samples": args.samples,
        **{f"eval/fid/{k}": v for k, v in evaluator(samples).items()},
        "fid_provenance": {
            **evaluator.provenance,
            "sampler": args.sampler,
            "nfe": args.nfe,
            **spacing_record(cfg.sampling.spacing),
        },
        "seconds": time.perf_counter() - start,
    }
    name = f"eval_step{step:07d}_{args.sampler}{args.nfe}_n{args.samples}.json"
    write_text(args.run_dir / name, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
