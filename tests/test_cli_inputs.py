"""What the measuring commands (eval, curvature, report) do with bad input, and the
curvature command on every data set the trainer reads."""

import json
import subprocess
import sys
from unittest import mock

import pytest
import torch
from PIL import Image

from fastdiff.config import compose, load_run_config, to_config
from fastdiff.curvature_cli import main as curvature_main
from fastdiff.data import load_digits
from fastdiff.data.prepare import main as prepare_main
from fastdiff.diffusion import Schedule
from fastdiff.errors import ConfigError
from fastdiff.eval import main as eval_main
from fastdiff.fid import generate, random_inception_weights
from fastdiff.report_cli import main as report_main
from fastdiff.restore import load_run
from fastdiff.rundir import find_checkpoint
from fastdiff.trainer import training_loop
from fastdiff.unet import build_model
from tests.conftest import tiny


def train(root, *extra):
    """A two-step tiny run with a checkpoint at step 2; its run directory."""
    steps = ["train.total_steps=2", "train.ckpt_every=2", "train.log_every=1"]
    training_loop(to_config(compose(tiny(root, *steps, *extra))))
    (run_dir,) = (root / "custom").iterdir()
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # FID on Inception features of 12 reference images: if a bad flag slipped through,
    # the evaluation behind it would still take seconds, not minutes.
    fid = [
        "eval.fid.extractor=inception",
        "eval.fid.reference_limit=12",
        f"eval.fid.cache_dir={root / 'fid-cache'}",
    ]
    return train(root, *fid)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth", 0)


def one_error_line(capsys, *words: str) -> str:
    """The command's stderr, checked to be one ``fastdiff: error:`` line naming
    ``words``, with nothing on stdout."""
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("fastdiff: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err
    return err


def test_generate_refuses_a_batch_size_that_fills_no_sample():
    model = build_model("unet_tiny", 16, 0.0, 8)
    schedule = Schedule.make("linear", 1000)
    for batch_size in (0, -5):
        with pytest.raises(ValueError, match="batch_size must be >= 1"):
            generate(
                model,
                schedule,
                range(4),
                (3, 8, 8),
                sampler="ddpm",
                nfe=2,
                seed=0,
                batch_size=batch_size,
            )


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--batch-size", "-5"], "--batch-size"),
        (["--batch-size", "0"], "--batch-size"),
        (["--samples", "1"], "--samples"),
        (["--nfe", "0"], "--nfe"),
        (["--nfe", "1001"], "--nfe"),
        (["--step", "7"], "it has [2]"),
    ],
)
def test_eval_refuses_bad_counts_before_sampling(run_dir, inception_weights, capsys, flags, named):
    args = [str(run_dir), "--samples", "8", "--nfe", "2", "--weights", str(inception_weights)]
    assert eval_main([*args, *flags]) == 2
    one_error_line(capsys, named)
    assert not list(run_dir.glob("eval_step*.json"))


def test_eval_names_its_own_weights_flag(run_dir, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "inception.pth"
    assert eval_main([str(run_dir), "--weights", str(missing)]) == 2
    err = one_error_line(capsys, f"--weights={missing} does not exist")
    assert "eval.fid.weights_path" not in err
    # Neither given nor in the hub cache, and no network.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", mock.Mock(side_effect=OSError))
    assert eval_main([str(run_dir)]) == 2
    err = one_error_line(capsys, "pass --weights=FILE")
    assert "eval.fid" not in err


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--probes", "-2"], "--probes"),
        (["--probes", "0"], "--probes"),  # not the run's default in disguise
        (["--batch-size", "-4"], "--batch-size"),
        (["--batch-size", "2000"], "--batch-size"),
        (["--batch-size", "3"], "curvature.t_bins=4"),  # an empty band: NaN traces
        (["--step", "7"], "it has [2]"),
    ],
)
def test_curvature_refuses_bad_flags_in_one_line(run_dir, capsys, flags, named):
    assert curvature_main([str(run_dir), *flags]) == 2
    one_error_line(capsys, named)


def test_report_errors_go_to_stderr(tmp_path, capsys):
    assert report_main([str(tmp_path / "not-a-run")]) == 2
    one_error_line(capsys, "not-a-run")


def test_eval_and_curvature_restore_the_weights_they_measure(run_dir):
    step, ckpt = find_checkpoint(run_dir)
    state = torch.load(ckpt, map_location="cpu")
    for which in ("ema", "model"):
        run = load_run(run_dir, weights=which)
        assert (run.step, run.checkpoint) == (step, ckpt)
        assert run.cfg == load_run_config(run_dir)
        run.cfg.model.channels_last = True  # the model is built from the run's config
        model = run.model
        assert not model.training
        assert model.out[1].weight.is_contiguous(memory_format=torch.channels_last)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[which][k]), (which, k)
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["ema"])
    with pytest.raises(ConfigError, match="weights must be one of ema, model"):
        load_run(run_dir, weights="raw")
    with pytest.raises(ConfigError, match="no checkpoint for step 7"):
        load_run(run_dir, step=7)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A prepared shard folder of 40 8x8 digits, 20 per shard."""
    root = tmp_path_factory.mktemp("shards")
    (root / "png").mkdir()
    for i, image in enumerate(load_digits(8)[0][:40]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / "png" / f"{i:03d}.png")
    args = ["digits", "--src", str(root / "png"), "--out", str(root / "out")]
    assert prepare_main([*args, "--format", "folder", "--shard-size", "20"]) == 0
    return root / "out"


@pytest.mark.parametrize("data", ["shards", "cifar10"])
def test_curvature_reads_prepared_shards_as_the_trainer_does(shards, tmp_path, capsys, data):
    # data=cifar10 with data.path at a prepared folder is the README's way to train on it.
    run_dir = train(
        tmp_path,
        f"data={data}",
        f"data.path={shards}",
        "data.image_size=8",
        "data.workers=0",
        "curvature.enabled=true",
        "curvature.every=2",
        "curvature.probes=2",
        "curvature.batch_size=4",
        "curvature.t_bins=2",
    )
    capsys.readouterr()
    assert curvature_main([str(run_dir)]) == 0
    row = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (logged,) = [r for r in rows if "curvature/hutch_trace_mean" in r]
    assert row["step"] == logged["step"] == 2
    # The same pool, probe batch, vectors and weights as the run's own probe.
    assert row["curvature/hutch_trace_mean"] == pytest.approx(
        logged["curvature/hutch_trace_mean"], rel=1e-5
    )
    # The probe batch is drawn from the first shard: 20 images.
    assert curvature_main([str(run_dir), "--batch-size", "24"]) == 2
    one_error_line(capsys, "--batch-size must be <= 20")


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ["fastdiff.eval", "RUN", "--batch-size", "-5"],
        ["fastdiff.curvature", "RUN", "--probes", "0"],
        ["fastdiff.report", "NOT-A-RUN"],
    ],
)
def test_each_command_exits_2_with_one_line_on_stderr(run_dir, tmp_path, command):
    where = {"RUN": str(run_dir), "NOT-A-RUN": str(tmp_path / "not-a-run")}
    argv = [sys.executable, "-m", *(where.get(a, a) for a in command)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("fastdiff: error: ") and done.stderr.count("\n") == 1
