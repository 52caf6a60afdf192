"""Bad settings are one line before any work; YAML values reach Hydra unchanged."""

import re

import pytest

from fastdiff import train
from fastdiff.config import ConfigError, compose, overrides_from_yaml, to_config


@pytest.mark.parametrize(
    "override, says",
    [
        ("optim.beta1=1.5", "optim.beta1 must be in [0, 1), got 1.5"),
        ("optim.beta2=1.0", "optim.beta2 must be in [0, 1), got 1.0"),
        ("optim.beta1=-0.1", "optim.beta1 must be in [0, 1), got -0.1"),
        ("optim.weight_decay=-1", "optim.weight_decay must be >= 0, got -1.0"),
    ],
)
def test_optimizer_settings_are_checked(override, says, capsys):
    with pytest.raises(ConfigError, match=re.escape(says)):
        to_config(compose(["experiment=quickstart", override]))
    assert train.main(["quickstart", override]) == 2
    err = capsys.readouterr().err
    assert err == f"fastdiff: error: {says}\n"


def test_a_yaml_value_with_a_comma_or_bracket_arrives_as_written(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "experiment: quickstart\n"
        "data:\n  path: /data/cifar10,v2 [old]\n"
        "train:\n  total_steps: 3\n  amp: false\n"
        "optim:\n  lr: 2.0e-4\n"
        "eval:\n  fid:\n    weights_path: null\n"
    )
    cfg = compose(overrides_from_yaml(path))
    assert cfg.data.path == "/data/cifar10,v2 [old]"
    assert cfg.experiment == "quickstart" and cfg.train.total_steps == 3
    assert cfg.train.amp is False and cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.eval.fid.weights_path is None


@pytest.mark.parametrize(
    "text, says",
    [
        ("train: [1,\n  total: 2", "is not valid YAML at line 2"),
        ("- train.total_steps=3\n", "holds a list, not a mapping"),
        ("just words\n", "holds a str, not a mapping"),
    ],
)
def test_a_malformed_config_file_is_one_line(tmp_path, capsys, text, says):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    assert train.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdiff: error: config file") and says in err
    assert err.count("\n") == 1


def test_checks_that_only_matter_for_fid_wait_until_fid_is_on():
    off = ["experiment=quickstart", "eval.fid.enabled=false"]
    to_config(compose([*off, "diffusion.T=10", "sampling.grid_nfe=5"]))  # eval.nfe=50 > T
    with pytest.raises(ConfigError, match="eval.nfe must be in"):
        to_config(compose(["experiment=quickstart", "diffusion.T=10", "sampling.grid_nfe=5"]))
