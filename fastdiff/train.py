"""Entry point: ``python -m fastdiff.train EXPERIMENT [overrides]``.

Also ``accelerate launch -m fastdiff.train e9b`` for several processes/GPUs.
"""

from __future__ import annotations

import logging
import sys

from fastdiff.config import EXPERIMENTS, ConfigError, compose, overrides_from_yaml, to_config
from fastdiff.fid import FIDUnavailable

USAGE = """\
usage: python -m fastdiff.train [EXPERIMENT | --config FILE.yaml] [KEY=VALUE ...] [--cfg job]
       accelerate launch -m fastdiff.train EXPERIMENT [KEY=VALUE ...]

Train a diffusion model for one arm of a paired ablation.

experiments:
{experiments}

overrides (Hydra syntax), e.g.:
  train.total_steps=200 train.batch_size=8 data=digits diffusion=cosine loss=minsnr
  loss.minsnr_gamma=5 optim.lr=2e-4 train.resume=runs/e9b/20261121-101500
groups: model=unet_cifar32|unet_tiny  diffusion=linear|cosine  loss=uniform|minsnr
        data=digits|cifar10 (cifar10 needs data.path=cifar-10-python.tar.gz or its folder)

options:
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        overrides, print_cfg = parse_args(argv)
        node = compose(overrides)
        if print_cfg:
            from omegaconf import OmegaConf

            container = OmegaConf.to_container(node)
            container.pop("defaults", None)
            print(OmegaConf.to_yaml(container), end="")
            return 0
        cfg = to_config(node)
        from fastdiff.trainer import Stopped, training_loop

        try:
            summary = training_loop(cfg)
        except Stopped as stop:
            print(f"fastdiff: {stop}", file=sys.stderr)
            return stop.exit_code
    except (ConfigError, FileNotFoundError, FIDUnavailable) as err:
        print(f"fastdiff: error: {err}", file=sys.stderr)
        return 2
    logging.getLogger("fastdiff").info(
        "done: %s",
        {
            k: summary[k]
            for k in ("step", "train/loss", "wall_time_s", "images_per_sec")
            if k in summary
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
