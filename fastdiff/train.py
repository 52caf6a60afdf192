"""Entry point: ``python -m fastdiff.train EXPERIMENT [overrides]``.

Also ``accelerate launch -m fastdiff.train e9b`` for several processes/GPUs.
"""

from __future__ import annotations

import logging
import sys

from fastdiff.config import EXPERIMENTS, ConfigError, compose, overrides_from_yaml, to_config
from fastdiff.errors import BAD_INPUT, fail
from fastdiff.tuning import reuse_freed_memory

log = logging.getLogger("fastdiff")

USAGE = """\
usage: python -m fastdiff.train [EXPERIMENT | --config FILE.yaml] [KEY=VALUE ...] [--cfg job]
       accelerate launch -m fastdiff.train EXPERIMENT [KEY=VALUE ...]

Train a diffusion model for one arm of a paired ablation.

experiments:
{experiments}

overrides (Hydra syntax), e.g.:
  train.total_steps=200 train.batch_size=8 data=digits diffusion=cosine loss=minsnr
  loss.gamma=5 optim.lr=2e-4 train.resume=runs/e9b/20261121-101500
groups: model=unet_cifar32|unet_tiny  diffusion=linear|cosine
        loss=uniform|minsnr|soft_minsnr|maxsnr|p2|debiased (loss.gamma, loss.k)
        data=digits|cifar10 (cifar10 needs data.path=cifar-10-python.tar.gz or its folder)

options:
  --multirun, -m  sweep with Hydra: experiment=e9a,e9b train.seed=1077,2077 (each
                  combination a run; hydra/launcher=submitit_slurm for SLURM)
  --config FILE   an experiment YAML (e.g. configs/study/MS1_min_snr/e9/...yaml)
  --cfg job       print the resolved config and exit
  -h, --help      show this help
"""


def usage() -> str:
    width = max(map(len, EXPERIMENTS))
    lines = [f"  {name:<{width}}  {desc}" for name, (desc, _) in EXPERIMENTS.items()]
    return USAGE.format(experiments="\n".join(lines))


def parse_args(argv: list[str]) -> tuple[list[str], bool]:
    """argv -> (Hydra overrides, print-config-only)."""
    overrides, print_cfg, args = [], False, list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config":
            if not args:
                raise ConfigError("--config needs a YAML file path")
            overrides = overrides_from_yaml(args.pop(0)) + overrides
        elif arg.startswith("--config="):
            overrides = overrides_from_yaml(arg.split("=", 1)[1]) + overrides
        elif arg in ("--cfg", "-c"):
            print_cfg = True
            if args and args[0] in ("job", "all"):
                args.pop(0)
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg}: see python -m fastdiff.train --help")
        elif "=" not in arg:
            overrides.insert(0, f"experiment={arg}")  # a bare positional experiment name
        else:
            overrides.append(arg)
    return overrides, print_cfg


def apply_host_tuning(cfg) -> None:
    """Process-wide settings a run asks for (fastdiff.tuning), applied here, by the
    entry point, rather than as a side effect of building a Trainer."""
    import torch

    if cfg.train.reuse_host_memory and not torch.cuda.is_available():
        reuse_freed_memory()


def run(node) -> int:
    """One run from a composed config: the task of both the single-run path and of
    each job of a Hydra sweep. Returns the exit code; a bad config is one line."""
    from fastdiff.stopping import Stopped
    from fastdiff.trainer import training_loop

    try:
        cfg = to_config(node)
        apply_host_tuning(cfg)
        try:
            summary = training_loop(cfg)
        except Stopped as stop:
            print(f"fastdiff: {stop}", file=sys.stderr)
            return stop.exit_code
    except BAD_INPUT as err:
        return fail(str(err))
    keys = ("step", "train/loss", "wall_time_s", "images_per_sec")
    log.info("done: %s", {k: summary[k] for k in keys if k in summary})
    return 0


def sweep(overrides: list[str]) -> int:
    """``--multirun``: Hydra's own main over the same store, through hydra-zen, so
    comma sweeps, ``hydra/sweeper=...`` and launcher plugins (``hydra/launcher=
    submitit_slurm``) work. A job that fails stops the sweep with its exit code."""
    from hydra_zen import zen

    from fastdiff.config import build_store

    def task(zen_cfg) -> None:
        code = run(zen_cfg)
        if code:
            raise SystemExit(code)

    if not any(o.startswith("hydra.sweep.dir=") for o in overrides):
        overrides = ["hydra.sweep.dir=${train.runs_root}/multirun/${now:%Y%m%d-%H%M%S}", *overrides]
    build_store().add_to_hydra_store(overwrite_ok=True)
    argv, sys.argv = sys.argv, [sys.argv[0], "--multirun", *overrides]
    try:
        zen(task).hydra_main(config_name="fastdiff", config_path=None, version_base="1.3")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    multirun = any(a in ("--multirun", "-m") for a in argv)
    try:
        overrides, print_cfg = parse_args([a for a in argv if a not in ("--multirun", "-m")])
        if multirun:
            if print_cfg:
                raise ConfigError("--cfg prints one config: drop --multirun to print it")
            return sweep(overrides)
        node = compose(overrides)
    except ConfigError as err:
        return fail(str(err))
    if print_cfg:
        from omegaconf import OmegaConf

        container = OmegaConf.to_container(node)
        container.pop("defaults", None)
        print(OmegaConf.to_yaml(container), end="")
        return 0
    return run(node)


if __name__ == "__main__":
    sys.exit(main())
