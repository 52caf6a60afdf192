"""Experiments, YAML cards and one-line errors."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from fastdiff.config import (
    CONFIGS_ROOT,
    EXPERIMENT_FILES,
    EXPERIMENTS,
    ConfigError,
    compose,
    discover_experiments,
    overrides_from_yaml,
    read_experiment,
    to_config,
)
from fastdiff.train import main, parse_args
from tests.conftest import tiny

ROOT = Path(__file__).resolve().parents[1]


def test_base_config_has_the_cards_shared_settings():
    cfg = to_config(compose(["experiment=e1", "data=digits"]))
    assert (cfg.model.name, cfg.model.base_channels) == ("unet_cifar32", 64)
    assert cfg.diffusion.T == 1000 and cfg.optim.lr == 1e-4 and cfg.optim.name == "adam"
    t = cfg.train
    assert (t.batch_size, t.amp, t.grad_clip, t.ema_decay, t.seed, t.log_every) == (
        4,
        True,
        1.0,
        0.999,
        1077,
        500,
    )
    assert cfg.curvature.probes == 16


@pytest.mark.parametrize(
    "name, schedule, weighting, steps, curvature",
    [
        ("e1", "linear", "uniform", 10_000, False),
        ("e2", "linear", "minsnr", 50_000, False),
        ("e5", "linear", "uniform", 10_000, True),
        ("e6", "linear", "minsnr", 10_000, True),
        ("e9a", "cosine", "uniform", 10_000, True),
        ("e9b", "cosine", "minsnr", 10_000, True),
    ],
)
def test_study_experiments(name, schedule, weighting, steps, curvature):
    cfg = to_config(compose([f"experiment={name}", "data=digits"]))
    assert cfg.experiment == name
    assert cfg.diffusion.beta_schedule == schedule and cfg.loss.weighting == weighting
    assert cfg.train.total_steps == steps and cfg.curvature.enabled is curvature
    assert cfg.loss.gamma == (5.0 if weighting == "minsnr" else None)


def test_paired_experiments_differ_only_in_weighting():
    def resolved(name):
        node = OmegaConf.to_container(compose([f"experiment={name}"]))
        node.pop("experiment")
        node["loss"].pop("weighting")
        assert node["loss"].pop("gamma") == (5.0 if name in ("e6", "e9b") else None)
        return node

    assert resolved("e9a") == resolved("e9b")
    assert resolved("e5") == resolved("e6")


@pytest.mark.parametrize("name", list(EXPERIMENT_FILES))
def test_a_file_read_as_overrides_composes_as_its_experiment(name):
    """Two readers of one file agree: --config's (dotted overrides) and the store's."""
    path = ROOT / EXPERIMENT_FILES[name]
    assert path.read_text().splitlines()[4].endswith(f"--config {EXPERIMENT_FILES[name]}")
    # without `experiment=`, which would load the store's node and hide a key the
    # overrides lose
    overrides = [o for o in overrides_from_yaml(path) if not o.startswith("experiment=")]
    by_file = OmegaConf.to_container(compose(overrides))
    by_file["experiment"] = name
    by_name = OmegaConf.to_container(compose([f"experiment={name}"]))
    assert by_file == by_name


def test_the_experiments_are_the_yaml_files_outside_the_cards():
    """Every YAML file in configs/ but a card is an experiment (none skipped) with its
    header's description, and the wheel ships it (pyproject.toml's package data)."""
    tomllib = pytest.importorskip("tomllib")
    assert CONFIGS_ROOT == ROOT / "configs"
    files = sorted(
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "configs").rglob("*.yaml")
        if p.relative_to(ROOT / "configs").parts[0] != "cards"
    )
    assert sorted(EXPERIMENT_FILES.values()) == files
    assert list(EXPERIMENTS)[:1] == ["quickstart"]
    assert {"e1", "e2", "e5", "e6", "e9a", "e9b"} <= set(EXPERIMENTS)
    for name, rel in EXPERIMENT_FILES.items():
        text = (ROOT / rel).read_text()
        assert yaml.safe_load(text)["experiment"] == name
        assert EXPERIMENTS[name][0] == text.splitlines()[1].removeprefix("# ")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["fastdiff.shipped_configs"]
    for rel in files:
        inside = Path(rel).relative_to("configs")
        assert any(inside.match(g) and len(inside.parts) == len(Path(g).parts) for g in globs), rel


def _experiment_file(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def test_a_new_experiment_is_a_new_file(tmp_path):
    body = "# @package _global_\n# mine: e9b at 2k steps\nexperiment: mine\n"
    body += "defaults:\n- override /diffusion: cosine\ntrain:\n  total_steps: 2000\n"
    _experiment_file(tmp_path / "study" / "x" / "y", "mine", body)
    _experiment_file(tmp_path / "cards", "card", "name: mine\nexperiment: not-one\n")
    _experiment_file(tmp_path, "notes", "just: settings\n")
    found = discover_experiments(tmp_path)
    assert list(found) == ["mine"]
    path, desc, node = found["mine"]
    assert path.name == "mine.yaml" and desc == "mine: e9b at 2k steps"
    assert node == {
        "defaults": [{"override /diffusion": "cosine"}],
        "train": {"total_steps": 2000},
    }


@pytest.mark.parametrize(
    "files, message",
    [
        (
            {"a": "# @package _global_\n# a\nexperiment: a\n", "b": "# x\n# b\nexperiment: a\n"},
            "experiment 'a' is named by",
        ),
        ({"a": "experiment: a\ntrain: {}\n"}, "a `# description` comment"),
        ({"a": "# @package _global_\n# a\nexperiment: a\ndefaults: x\n"}, "must be a list"),
        ({"a": "experiment: [a\n"}, "is not valid YAML"),
    ],
)
def test_a_bad_experiment_file_is_one_line(tmp_path, files, message):
    for name, text in files.items():
        _experiment_file(tmp_path, name, text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        discover_experiments(tmp_path)


def test_no_experiment_or_card_name_is_written_in_the_code():
    """The files name the experiments and cards; fastdiff's code names none of them."""
    from fastdiff.cards import load_card, shipped

    names = set(EXPERIMENTS) | {load_card(p).name for p in shipped()}
    found = [
        f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}"
        for path in sorted((ROOT / "fastdiff").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value in names
    ]
    assert not found, "\n".join(found)
    assert read_experiment(ROOT / "configs" / "cards" / "ms1_e9.yaml") is None


def test_cli_positional_name_and_overrides():
    overrides, print_cfg = parse_args(
        ["e9b", "train.total_steps=20", "data=digits", "--cfg", "job"]
    )
    assert overrides == ["experiment=e9b", "train.total_steps=20", "data=digits"] and print_cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["experiment=e99"], "unknown experiment 'e99': choose one of quickstart"),
        (["data=digits", "diffusion.beta_schedule=sigmoid"], "unknown diffusion.beta_schedule"),
        (["data=digits", "loss.weighting=p3"], "unknown loss.weighting"),
        (["data=digits", "loss=minsnr", "loss.minsnr_gamma=0"], "loss.gamma must be > 0"),
        (["data=digits", "train.total_steps=-5"], "train.total_steps must be a positive"),
        (["data=digits", "train.batch_size=0"], "train.batch_size must be a positive"),
        (["data=cifar10"], "data=cifar10 needs data.path, which is not set"),
        (["data=cifar10", "data.path=/no/such/cifar"], "/no/such/cifar does not exist"),
        (["data=digits", "train.nope=1"], "bad override"),
    ],
)
def test_bad_input_is_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        to_config(compose(overrides))


def test_main_reports_one_line_and_writes_nothing(tmp_path, capsys):
    assert main(["e9b", f"train.runs_root={tmp_path}", "train.total_steps=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fastdiff: error:")
    assert not any(tmp_path.iterdir())


def test_help_lists_experiments_and_fits_a_screen():
    out = subprocess.run(
        [sys.executable, "-m", "fastdiff.train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in EXPERIMENTS:
        assert f"  {name} " in out
    assert len(out.splitlines()) <= 40


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "e9b",
            [
                "beta_schedule: cosine",
                "weighting: minsnr",
                "gamma: 5.0",
                "total_steps: 10000",
                "seed: 1077",
                "probes: 16",
                "ema_decay: 0.999",
            ],
        ),
        ("e6", ["beta_schedule: linear", "weighting: minsnr", "nfe: 50", "enabled: true"]),
    ],
)
def test_print_config_shows_the_card(name, expected):
    out = subprocess.run(
        [sys.executable, "-m", "fastdiff.train", name, "--cfg", "job"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in expected:
        assert line in out


@pytest.mark.slow
def test_multirun_sweeps_through_hydra_one_run_per_combination(tmp_path, monkeypatch):
    """--multirun goes through Hydra's main (hydra-zen's zen): a comma sweep over seeds
    makes one run per value, each with that seed, and Hydra's sweep record."""
    import json

    monkeypatch.chdir(tmp_path)
    args = [a for a in tiny(tmp_path, "train.total_steps=2") if not a.startswith("train.seed")]
    assert main(["--multirun", "quickstart", *args, "train.seed=1,2", "train.report=false"]) == 0
    runs = sorted((tmp_path / "quickstart").iterdir())
    assert len(runs) == 2
    seeds = sorted(yaml.safe_load((r / "config.yaml").read_text())["train"]["seed"] for r in runs)
    assert seeds == [1, 2]
    assert all(json.loads((r / "summary.json").read_text())["step"] == 2 for r in runs)
    (record,) = (tmp_path / "multirun").glob("*/multirun.yaml")
    assert "train.seed=1,2" in record.read_text()


def test_multirun_with_print_config_is_one_line(tmp_path, capsys):
    assert main(["--multirun", "quickstart", *tiny(tmp_path), "--cfg", "job"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
