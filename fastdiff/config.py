"""Typed configuration: hydra-zen dataclasses, config groups and named experiments.

The base :class:`Config` is the MS1 study's shared setting (the cards' "same
everything"): `unet_cifar32` at 64 base channels, T = 1000, Adam lr 1e-4,
batch 4, AMP, grad clip 1.0, EMA 0.999, seed 1077, logging every 500 steps,
16 Hutchinson probes. A named experiment overrides only what differs, so
``e9b`` reads as "cosine + Min-SNR γ=5, 10k steps, curvature on".

Groups (choose with ``GROUP=OPTION`` on the command line):
model (unet_cifar32, unet_tiny), diffusion (linear, cosine), loss (one per weighting
family, fastdiff.weighting.FAMILIES),
data (digits, cifar10), optim/train/sampling/eval/curvature (default).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra_zen import ZenStore
from omegaconf import MISSING, DictConfig, OmegaConf

from fastdiff.diffusion import BETA_SCHEDULES, PREDICTIONS
from fastdiff.errors import ConfigError
from fastdiff.weighting import FAMILIES, canonical_loss, check_loss


@dataclass
class ModelConfig:
    name: str = "unet_cifar32"
    base_channels: int = 64
    dropout: float = 0.1
    kernels: str = "torch"  # "torch" reference ops; "triton" for fastdiff.kernels on CUDA
    channels_last: bool = True  # NHWC weights and activations: faster convs on CPU and GPU


@dataclass
class DiffusionConfig:
    beta_schedule: str = "linear"
    T: int = 1000
    # Rescale β so SNR(T) = 0 exactly (Lin et al. 2024); needs loss.prediction v or x0
    zero_terminal_snr: bool = False


@dataclass
class LossConfig:
    prediction: str = "eps"  # what the UNet outputs: eps, x0 or v
    weighting: str = "uniform"  # a family of fastdiff.weighting (λ on the x0-MSE)
    gamma: float | None = None  # the family's γ (minsnr, soft_minsnr: 5 when unset; p2)
    k: float | None = None  # p2's k
    minsnr_gamma: float | None = None  # the old name of gamma, read as gamma


@dataclass
class OptimConfig:
    name: str = "adam"  # or "adamw": weight decay decoupled from the gradient
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0


@dataclass
class TrainConfig:
    total_steps: int = 10_000
    batch_size: int = 4  # per process
    amp: bool = True  # bf16 autocast (fp16 + scaler on older GPUs; fp32 on CPUs without bf16)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 1077
    log_every: int = 500
    # Equal-width timestep bins of train/loss_by_t and train/mse_unweighted_by_t; 0: off
    loss_bins: int = 10
    ckpt_every: int = 2000
    keep_checkpoints: int = 3
    on_nonfinite: str = "stop"  # "stop": end the run, keep the last good checkpoint; "skip"
    preempt_check_every: int = 10  # steps between ranks agreeing on a stop signal
    compile: bool | None = None  # None: on for CUDA, off on CPU (slower there, see README)
    compile_backend: str = "inductor"
    # CPU: glibc keeps freed memory for reuse (fastdiff.tuning: faster at large batches)
    reuse_host_memory: bool = True
    resume: str | None = None  # a checkpoint file, a run dir (its latest), or "auto"
    # A new run from another checkpoint's weights (model + EMA), e.g. to fine-tune under
    # another weighting; its optimizer state too with init_keep_optimizer=true.
    init_from: str | None = None
    init_keep_optimizer: bool = False
    runs_root: str = "runs"
    run_dir: str | None = None  # default: <runs_root>/<experiment>/<timestamp>
    progress: bool = True
    report: bool = False  # write a one-run report into <run dir>/report at the end


@dataclass
class DataConfig:
    name: str = "digits"
    # cifar10 / shards: a folder prepared by `python -m fastdiff.data.prepare` (streamed with
    # WebDataset); cifar10 also takes cifar-10-python.tar.gz or its folder (held in memory).
    path: str | None = None
    image_size: int = 32
    hflip: bool = False
    # WebDataset loader processes. None: one per core left after the trainer, at most 4
    # (workers beyond the free cores oversubscribe the CPU and measured slower on 2 cores:
    # docs/performance.md#measurements-behind-choices-in-the-code).
    workers: int | None = None
    shuffle_buffer: int = 2000


@dataclass
class SamplingConfig:
    grid_sampler: str = "ddim"
    grid_nfe: int = 20
    grid_images: int = 64
    grid_every: int = 2000
    seed: int = 0  # the sampling stream: grids of every run start from the same noise
    ddpm_variance: str = "posterior"  # the grids' DDPM σ²: "posterior" (β̃) or "beta" (β)
    # Which K of the T steps a K-step sampler visits: "linspace" (0 … T−1, evenly) or
    # "trailing" (T−1 down by T/K; Lin et al. 2024 §3.3, for zero terminal SNR)
    spacing: str = "linspace"


@dataclass
class FIDConfig:
    # None = auto: on when the chosen extractor is at hand (below) and, on a CPU, its
    # sampling costs no more than the training; else off with one warning.
    # true = required: fail at start-up without it. false = off.
    enabled: bool | None = None
    # "inception" (FID proper), "digits" (an FD on a small CNN trained on the embedded
    # digits, fastdiff.digits_fd: no download) or "auto": Inception when its weights are at
    # hand, else digits for data=digits. In auto mode (enabled: None) a CPU run also leaves
    # FID off, with one line, when its sampling would cost more than its training.
    extractor: str = "auto"
    weights_path: str | None = None
    stats_path: str | None = None  # precomputed reference statistics (.npz with mu, sigma)
    cache_dir: str | None = None  # reference statistics cache (default ~/.cache/fastdiff/fid)
    reference_limit: int | None = None  # use only the first N reference images (tests)
    # Bootstrap resamples of the final FID over its samples (its 95% interval); 0: none.
    # Each is one eigendecomposition of a 2048x2048 matrix, which is not free on a CPU
    # (docs/performance.md#measurements-behind-choices-in-the-code).
    bootstrap: int = 100


@dataclass
class EvalConfig:
    fid: FIDConfig = field(default_factory=FIDConfig)
    sampler: str = "ddpm"
    nfe: int = 50
    milestone_every: int = 2000
    milestone_samples: int = 5000
    final_samples: int = 10_000
    batch_size: int = 256  # samples per generation batch (per process)
    seed: int = 0  # sample i starts from the noise of generator (seed, i) in every run


@dataclass
class CurvatureConfig:
    enabled: bool = False
    probes: int = 16
    # Probe samples, one timestep per equal-width stratum of [0, T). 8 keeps a probe of
    # unet_cifar32 a small share of the training time between probes on a CPU
    # (docs/performance.md#measurements-behind-choices-in-the-code).
    batch_size: int = 8
    every: int | None = None  # default: train.log_every
    # Per-timestep-bin traces (curvature/hutch/t{lo}-{hi}/...) from the same pass; must
    # divide batch_size. 0: none.
    t_bins: int = 4
    # How vᵀHv is computed: "taylor" (second-order forward mode, no backward pass; fastdiff's
    # UNet only), "jvp" (forward-over-reverse jvp of grad, any model), "auto" (taylor if it can).
    method: str = "auto"
    # Probes per vmap chunk. None: on CPU 8 for taylor, 4 for jvp (the fastest measured on
    # unet_cifar32, cache-bound); all at once on CUDA.
    chunk_size: int | None = None


GROUP_DEFAULTS = {
    "model": "unet_cifar32",
    "diffusion": "linear",
    "loss": "uniform",
    "optim": "default",
    "train": "default",
    "data": "cifar10",
    "sampling": "default",
    "eval": "default",
    "curvature": "default",
}


@dataclass
class Config:
    defaults: list[Any] = field(
        default_factory=lambda: [
            "_self_",
            *({g: o} for g, o in GROUP_DEFAULTS.items()),
            {"experiment": None},
        ]
    )
    experiment: str = "custom"
    model: ModelConfig = MISSING
    diffusion: DiffusionConfig = MISSING
    loss: LossConfig = MISSING
    optim: OptimConfig = MISSING
    train: TrainConfig = MISSING
    data: DataConfig = MISSING
    sampling: SamplingConfig = MISSING
    eval: EvalConfig = MISSING
    curvature: CurvatureConfig = MISSING


# ---------------------------------------------------------------- experiments
# An experiment is one YAML file in the shipped configs folder, and nowhere else: its
# name (`experiment:`), its group choices (`defaults:`, as Hydra overrides) and only the
# settings that differ from Config. Line 2 of its header is its one-line description.
# The cards' files (cards/) are not experiments. In a checkout the folder is configs/;
# an installed wheel holds the same files as fastdiff.shipped_configs (pyproject.toml).
_PACKAGE = Path(__file__).resolve().parent
SHIPPED_CONFIGS = _PACKAGE / "shipped_configs"
CONFIGS_ROOT = SHIPPED_CONFIGS if SHIPPED_CONFIGS.is_dir() else _PACKAGE.parent / "configs"
CARDS_FOLDER = "cards"


def experiment_paths(root: Path = CONFIGS_ROOT) -> list[Path]:
    """Every YAML file under ``root`` but the cards, in path order."""
    paths = sorted(root.rglob("*.yaml"), key=lambda p: p.relative_to(root).as_posix())
    return [p for p in paths if p.relative_to(root).parts[0] != CARDS_FOLDER]


def read_experiment(path: Path) -> tuple[str, str, dict] | None:
    """(name, description, overrides) of an experiment file; None for a YAML file that
    names no experiment."""
    text = path.read_text()
    try:
        node = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(node, dict) or "experiment" not in node:
        return None
    name = node.pop("experiment")
    lines = text.splitlines()
    if not isinstance(name, str) or len(lines) < 2 or not lines[1].startswith("# "):
        raise ConfigError(
            f"{path}: an experiment file needs `experiment: NAME` and, on its second "
            "line, a `# description` comment"
        )
    if not isinstance(node.get("defaults", []), list):
        raise ConfigError(f"{path}: `defaults:` must be a list of group overrides")
    return name, lines[1][2:].strip(), node


def discover_experiments(root: Path = CONFIGS_ROOT) -> dict[str, tuple[Path, str, dict]]:
    """name -> (file, description, overrides) of every experiment file under ``root``."""
    found: dict[str, tuple[Path, str, dict]] = {}
    for path in experiment_paths(root):
        read = read_experiment(path)
        if read is None:
            continue
        name, desc, node = read
        if name in found:
            raise ConfigError(f"experiment {name!r} is named by {found[name][0]} and {path}")
        found[name] = (path, desc, node)
    return found


_DISCOVERED = discover_experiments()
# name -> (one-line description, overrides relative to the base Config): group choices
# under "defaults" as Hydra overrides, everything else merged.
EXPERIMENTS: dict[str, tuple[str, dict]] = {
    name: (desc, node) for name, (_, desc, node) in _DISCOVERED.items()
}
# name -> the file's path as the cards and --config name it ("configs/..."; from an
# installed wheel, overrides_from_yaml finds it among the shipped configs)
EXPERIMENT_FILES: dict[str, str] = {
    name: (Path("configs") / path.relative_to(CONFIGS_ROOT)).as_posix()
    for name, (path, _, _) in _DISCOVERED.items()
}


def experiments_table() -> str:
    """Each experiment's name and description, and its file below them."""
    width = max(map(len, EXPERIMENTS))
    return "\n".join(
        f"{name:<{width}}  {desc}\n{'':<{width}}  {EXPERIMENT_FILES[name]}"
        for name, (desc, _) in EXPERIMENTS.items()
    )


def experiment_node(name: str) -> dict:
    """The experiment as a Hydra node (package _global_), with its name recorded."""
    node = copy.deepcopy(EXPERIMENTS[name][1])
    node["defaults"] = ["_self_", *node.get("defaults", [])]
    node["experiment"] = name
    return node


def build_store() -> ZenStore:
    # Nodes are stored as they are (dataclasses, dicts): no `_target_` wrappers.
    store = ZenStore("fastdiff", overwrite_ok=True)(to_config=lambda node: node)
    store(Config, name="fastdiff")
    groups = {
        "model": {
            "unet_cifar32": ModelConfig(),
            "unet_tiny": ModelConfig(name="unet_tiny", base_channels=32),
        },
        "diffusion": {s: DiffusionConfig(beta_schedule=s) for s in BETA_SCHEDULES},
        "loss": {w: LossConfig(weighting=w) for w in FAMILIES},
        "data": {
            "digits": DataConfig(),
            "cifar10": DataConfig(name="cifar10", path=MISSING, hflip=True),
            "shards": DataConfig(name="shards", path=MISSING, hflip=True),
        },
        "optim": {"default": OptimConfig()},
        "train": {"default": TrainConfig()},
        "sampling": {"default": SamplingConfig()},
        "eval": {"default": EvalConfig()},
        "curvature": {"default": CurvatureConfig()},
    }
    for group, options in groups.items():
        for name, node in options.items():
            store(node, group=group, name=name)
    for name in EXPERIMENTS:
        store(experiment_node(name), group="experiment", name=name, package="_global_")
    return store


# ------------------------------------------------------------------- the CLI side
def dotted(node: dict, prefix: str = ""):
    """Nested dict -> ("a.b.c", leaf value) pairs."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def overrides_from_yaml(path: str | Path) -> list[str]:
    """An experiment YAML file -> Hydra overrides (group choices + dotted keys)."""
    path = Path(path)
    shipped = SHIPPED_CONFIGS / Path(*path.parts[1:]) if path.parts[:1] == ("configs",) else None
    if not path.is_file() and shipped is not None and shipped.is_file():
        path = shipped  # the cards' paths, from an installed wheel (outside a checkout)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found: pass an existing YAML file to --config")
    try:
        node = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(node, dict):
        raise ConfigError(
            f"config file {path} holds a {type(node).__name__}, not a mapping of settings "
            "(e.g. 'train:\\n  total_steps: 200')"
        )
    out = []
    for entry in node.pop("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                out.append(f"{key.removeprefix('override /')}={value}")

    out += [f"{k}={override_value(v)}" for k, v in dotted(node)]
    return out


def override_value(value) -> str:
    """A YAML value as Hydra's override grammar reads it back unchanged: strings quoted
    (a comma, bracket or colon in a path is grammar otherwise), others as literals."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    raise ConfigError(f"cannot use {value!r} ({type(value).__name__}) as a setting")


# Old setting names, still accepted on the command line, in cards and config files
RENAMED = {"loss.minsnr_gamma": "loss.gamma"}


def renamed(overrides: list[str]) -> list[str]:
    """``overrides`` with old setting names replaced by the current ones."""
    out = []
    for o in overrides:
        key, sep, value = o.partition("=")
        new = RENAMED.get(key.lstrip("+"))
        if new is not None and sep:
            given = [x for x in overrides if x.partition("=")[0].lstrip("+") == new]
            if given and given[-1].partition("=")[2] != value:
                raise ConfigError(
                    f"{key}={value} and {given[-1]} disagree: set only {new} "
                    f"({key} is its old name)"
                )
            o = f"{new}={value}"
        out.append(o)
    return out


def compose(overrides: list[str]) -> DictConfig:
    """Compose the config from the store and Hydra overrides; errors become ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = renamed(overrides)
    for o in overrides:
        name = o.split("=", 1)[1].strip("'\"") if o.startswith("experiment=") else None
        if name is not None and name not in EXPERIMENTS:
            raise ConfigError(
                f"unknown experiment {name!r}: choose one of {', '.join(EXPERIMENTS)}"
            )
    build_store().add_to_hydra_store(overwrite_ok=True)
    GlobalHydra.instance().clear()
    try:
        with initialize(version_base="1.3", config_path=None):
            return hydra_compose("fastdiff", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"bad override: {first}") from None


def to_config(cfg: DictConfig) -> Config:
    """The typed Config object, after checking every value (one-line errors)."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        raise ConfigError(f"missing value: {str(err).splitlines()[0]}") from None
    validate(obj)
    return obj


def need(ok: bool, msg: str) -> None:
    """A failed check: one line, before any work."""
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Every group checks its own values (and those it depends on in other groups);
    data paths are checked with the data code (:func:`fastdiff.data.check_paths`)."""
    for check in CHECKS.values():
        check(cfg)


def _check_model(cfg: Config) -> None:
    from fastdiff.unet import MODELS

    need(
        cfg.model.name in MODELS,
        f"unknown model.name {cfg.model.name!r}: use one of {', '.join(MODELS)}",
    )
    need(
        cfg.model.kernels in ("torch", "triton"),
        f"model.kernels must be 'torch' or 'triton', got {cfg.model.kernels!r}",
    )
    spec = MODELS[cfg.model.name]
    down = 2 ** (len(spec.ch_mult) - 1)
    size = cfg.data.image_size
    need(
        size % down == 0,
        f"{cfg.model.name} takes image sizes divisible by {down} (its downsampling), got "
        f"data.image_size={size}: use e.g. {max(down, size // down * down)} or "
        f"{-(-size // down) * down}",
    )
    need(
        cfg.model.base_channels > 0 and cfg.model.base_channels % spec.norm_groups == 0,
        f"model.base_channels must be a positive multiple of {spec.norm_groups} (the GroupNorm "
        f"groups of {cfg.model.name}), got {cfg.model.base_channels}",
    )


def _check_diffusion(cfg: Config) -> None:
    need(
        cfg.diffusion.beta_schedule in BETA_SCHEDULES,
        f"unknown diffusion.beta_schedule {cfg.diffusion.beta_schedule!r}: use one of "
        f"{', '.join(BETA_SCHEDULES)}",
    )
    need(cfg.diffusion.T > 0, f"diffusion.T must be > 0, got {cfg.diffusion.T}")
    need(
        not (cfg.diffusion.zero_terminal_snr and cfg.loss.prediction == "eps"),
        "diffusion.zero_terminal_snr=true with loss.prediction=eps: at SNR = 0 x_t is pure "
        "noise, so ε says nothing of the image; use loss.prediction=v or x0",
    )
    need(
        0 <= cfg.train.loss_bins <= cfg.diffusion.T,
        f"train.loss_bins must be in [0, T={cfg.diffusion.T}], got {cfg.train.loss_bins}",
    )


def _check_loss(cfg: Config) -> None:
    """Checks the family and its parameters, and writes them resolved into the config (the
    old key minsnr_gamma as gamma, a family's default γ filled in), so the record says
    what was trained."""
    try:
        resolved = canonical_loss(
            {f"loss.{k}": getattr(cfg.loss, k) for k in ("weighting", "gamma", "k", "minsnr_gamma")}
        )
        check_loss(cfg.loss.weighting, cfg.loss.prediction, resolved)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    cfg.loss.gamma, cfg.loss.k, cfg.loss.minsnr_gamma = (
        resolved["loss.gamma"],
        resolved["loss.k"],
        None,
    )
    need(
        cfg.loss.prediction in PREDICTIONS,
        f"unknown loss.prediction {cfg.loss.prediction!r}: use one of {', '.join(PREDICTIONS)}",
    )


def _check_optim(cfg: Config) -> None:
    need(
        cfg.optim.name in ("adam", "adamw"),
        f"optim.name must be 'adam' or 'adamw' (decoupled weight decay), got {cfg.optim.name!r}",
    )
    need(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}")
    for key in ("beta1", "beta2"):  # Adam's moment decays: 1 would never forget, ≥1 diverges
        value = getattr(cfg.optim, key)
        need(0 <= value < 1, f"optim.{key} must be in [0, 1), got {value}")
    need(
        cfg.optim.weight_decay >= 0,
        f"optim.weight_decay must be >= 0, got {cfg.optim.weight_decay}",
    )


def _check_train(cfg: Config) -> None:
    for key in ("total_steps", "batch_size", "log_every", "ckpt_every", "keep_checkpoints"):
        value = getattr(cfg.train, key)
        need(value > 0, f"train.{key} must be a positive integer, got {value}")
    need(
        0 <= cfg.train.ema_decay < 1,
        f"train.ema_decay must be in [0, 1), got {cfg.train.ema_decay}",
    )
    need(
        cfg.train.grad_clip >= 0,
        f"train.grad_clip must be >= 0 (0 = off), got {cfg.train.grad_clip}",
    )
    need(
        cfg.train.on_nonfinite in ("stop", "skip"),
        f"train.on_nonfinite must be 'stop' or 'skip', got {cfg.train.on_nonfinite!r}",
    )
    need(cfg.train.preempt_check_every > 0, "train.preempt_check_every must be > 0")
    if cfg.train.resume not in (None, "auto"):
        need(
            Path(cfg.train.resume).exists(),
            f"train.resume={cfg.train.resume} does not exist: "
            "pass a checkpoint file or a run directory",
        )
    if cfg.train.init_from is not None:
        need(
            cfg.train.resume is None,
            "train.init_from starts a new run and train.resume continues one: set only one",
        )
        need(
            Path(cfg.train.init_from).is_file(),
            f"train.init_from={cfg.train.init_from} does not exist: pass a checkpoint file",
        )
    for key in ("runs_root", "run_dir"):
        where = getattr(cfg.train, key)
        if where is not None:
            problem = unwritable(Path(where))
            need(problem is None, f"train.{key}={where} cannot be written: {problem}")


def _check_data(cfg: Config) -> None:
    from fastdiff.data import path_problem

    need(
        cfg.data.name in ("digits", "cifar10", "shards"),
        f"unknown data.name {cfg.data.name!r}: use data=digits, data=cifar10 or data=shards",
    )
    need(cfg.data.image_size > 0, f"data.image_size must be > 0, got {cfg.data.image_size}")
    need(
        cfg.data.workers is None or cfg.data.workers >= 0,
        f"data.workers must be >= 0 (or null for auto), got {cfg.data.workers}",
    )
    problem = path_problem(cfg.data)
    need(problem is None, problem)


def _check_sampling(cfg: Config) -> None:
    from fastdiff.sampling import SAMPLERS

    for key in ("grid_sampler", "sampler"):
        name = getattr(cfg.sampling if key == "grid_sampler" else cfg.eval, key)
        need(name in SAMPLERS, f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    need(
        cfg.sampling.spacing in ("linspace", "trailing"),
        f"sampling.spacing must be 'linspace' or 'trailing', got {cfg.sampling.spacing!r}",
    )
    need(
        cfg.sampling.ddpm_variance in ("posterior", "beta"),
        f"sampling.ddpm_variance must be 'posterior' or 'beta', got {cfg.sampling.ddpm_variance!r}",
    )
    nfes = [("sampling.grid_nfe", cfg.sampling.grid_nfe)]
    if cfg.eval.fid.enabled is not False:  # eval.nfe only matters when FID runs
        nfes.append(("eval.nfe", cfg.eval.nfe))
    for key, nfe in nfes:
        need(1 <= nfe <= cfg.diffusion.T, f"{key} must be in [1, T={cfg.diffusion.T}], got {nfe}")
    need(
        cfg.sampling.grid_images > 0 and cfg.sampling.grid_every > 0,
        "sampling.grid_images and sampling.grid_every must be > 0",
    )
    side = math.isqrt(cfg.sampling.grid_images)
    need(
        side * side == cfg.sampling.grid_images,
        f"sampling.grid_images must be a perfect square (the grid is square), got "
        f"{cfg.sampling.grid_images}: use {side * side} or {(side + 1) ** 2}",
    )


def _check_curvature(cfg: Config) -> None:
    need(
        cfg.curvature.method in ("auto", "taylor", "jvp"),
        f"curvature.method must be 'auto', 'taylor' or 'jvp', got {cfg.curvature.method!r}",
    )
    need(
        cfg.curvature.probes > 0 and cfg.curvature.batch_size > 0,
        "curvature.probes and curvature.batch_size must be > 0",
    )
    c = cfg.curvature
    need(
        c.t_bins >= 0 and (c.t_bins == 0 or c.batch_size % c.t_bins == 0),
        f"curvature.t_bins must be >= 0 and divide curvature.batch_size={c.batch_size} (the "
        f"probe batch has one timestep per stratum, so each bin gets whole strata), "
        f"got {c.t_bins}",
    )
    need(
        c.batch_size <= cfg.diffusion.T,
        f"curvature.batch_size must be <= T={cfg.diffusion.T} (one timestep per stratum)",
    )


def _check_eval(cfg: Config) -> None:
    for key in ("milestone_every", "milestone_samples", "final_samples", "batch_size"):
        value = getattr(cfg.eval, key)
        need(value > 0, f"eval.{key} must be a positive integer, got {value}")
    need(
        cfg.eval.fid.bootstrap >= 0,
        f"eval.fid.bootstrap must be >= 0, got {cfg.eval.fid.bootstrap}",
    )
    need(
        cfg.eval.milestone_samples >= 2 and cfg.eval.final_samples >= 2,
        "eval.milestone_samples and eval.final_samples must be >= 2 (FID needs a covariance)",
    )
    fid = cfg.eval.fid
    need(
        fid.extractor in ("auto", "inception", "digits"),
        f"eval.fid.extractor must be auto, inception or digits, got {fid.extractor!r}",
    )
    need(
        fid.extractor != "digits" or cfg.data.name == "digits" or fid.enabled is False,
        f"eval.fid.extractor=digits is trained on the embedded digits; data={cfg.data.name} "
        "needs eval.fid.extractor=inception",
    )
    # Paths given explicitly are checked whatever eval.fid.enabled says: a typo must not
    # quietly cost a run its FID.
    if fid.weights_path is not None:
        need(
            Path(fid.weights_path).is_file() and os.access(fid.weights_path, os.R_OK),
            f"eval.fid.weights_path={fid.weights_path} does not exist or cannot be read: "
            "point it at the Inception weights file, or leave it unset",
        )
    if fid.stats_path is not None:
        need(
            Path(fid.stats_path).is_file(),
            f"eval.fid.stats_path={fid.stats_path} does not exist: pass an .npz "
            "with mu and sigma, or leave it unset to use the training set",
        )
        from fastdiff.fid import chosen_extractor, read_stats_file

        try:
            if chosen_extractor(fid, cfg.data.name) == "digits":
                from fastdiff import digits_fd

                read_stats_file(fid.stats_path, digits_fd.DIM, digits_fd.NAME)
            else:
                read_stats_file(fid.stats_path)
        except ValueError as err:
            raise ConfigError(str(err)) from None


CHECKS = {
    "model": _check_model,
    "diffusion": _check_diffusion,
    "loss": _check_loss,
    "optim": _check_optim,
    "train": _check_train,
    "data": _check_data,
    "sampling": _check_sampling,
    "curvature": _check_curvature,
    "eval": _check_eval,
}


def unwritable(path: Path) -> str | None:
    """Why a directory could not be created or written at ``path`` (None: it can)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return "no existing parent folder"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"no permission to write in {probe}"
    return None


def load_run_config(run_dir: str | Path) -> Config:
    """The typed, checked config a run directory was trained with."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a fastdiff run directory (no config.yaml)")
    saved = OmegaConf.load(path)
    saved.pop("parent", None)  # train.init_from's record, not a setting
    node = OmegaConf.merge(OmegaConf.structured(Config), saved)
    node.train.resume = None
    cfg = OmegaConf.to_object(node)
    validate(cfg)
    return cfg


def flat(cfg: Config) -> dict[str, Any]:
    """The config as a flat {"group.key": value} dict (for TensorBoard's hparams)."""
    node = OmegaConf.to_container(OmegaConf.structured(cfg))
    node.pop("defaults", None)
    return dict(dotted(node))


if __name__ == "__main__":  # the experiments, as read from their files
    print(experiments_table())
