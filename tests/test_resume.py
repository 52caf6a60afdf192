"""Resume never lies: another arm is refused, a finished run is left alone, a broken
checkpoint is passed over, nothing is written outside runs_root, the summary covers
every segment, and train.init_from is a new run with its parent on record."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from fastdiff.checkpoint import UNREADABLE_SUFFIX
from fastdiff.config import ConfigError, compose, to_config
from fastdiff.data.prepare import main as prepare_main
from fastdiff.stopping import Finished
from fastdiff.train import main as train_main
from fastdiff.trainer import training_loop
from tests.conftest import tiny


def run(root, *overrides):
    return training_loop(to_config(compose(tiny(root, *overrides))))


def only_run(root, experiment="custom") -> Path:
    (path,) = (Path(root) / experiment).iterdir()
    return path


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 6-step run (checkpoints at 3 and 6), trained once for the module."""
    root = tmp_path_factory.mktemp("finished")
    run(root)
    return root, only_run(root)


@pytest.mark.parametrize(
    "override, named",
    [
        ("loss=minsnr", r"loss.weighting=uniform \(this run: minsnr\)"),
        ("diffusion=cosine", r"diffusion.beta_schedule=linear \(this run: cosine\)"),
        ("train.batch_size=8", r"train.batch_size=4 \(this run: 8\)"),
        ("train.seed=5", r"train.seed=1077 \(this run: 5\)"),
        ("loss.prediction=v", r"loss.prediction=eps \(this run: v\)"),
        ("sampling.spacing=trailing", r"sampling.spacing=linspace \(this run: trailing\)"),
    ],
)
def test_resuming_as_another_arm_is_refused_naming_the_key(finished, override, named):
    root, run_dir = finished
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match=f"trained another arm: {named}"):
        run(root, "train.total_steps=9", "train.resume=auto", f"train.run_dir={run_dir}", override)
    assert snapshot(run_dir) == before


def test_every_changed_key_is_named_in_one_line(finished):
    root, run_dir = finished
    with pytest.raises(ConfigError) as err:
        run(root, "train.total_steps=9", f"train.resume={run_dir}", "loss=minsnr", "optim.lr=1e-3")
    message = str(err.value)
    assert "\n" not in message
    assert "loss.weighting=uniform" in message and "optim.lr=0.0001 (this run: 0.001)" in message


def test_resuming_under_another_process_count_is_refused(finished, tmp_path):
    _, run_dir = finished
    state = torch.load(run_dir / "checkpoints" / "step_0000003.pt", weights_only=False)
    assert state["processes"] == 1
    state["processes"] = 2
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000003.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save(state, ckpt)
    (tmp_path / "run" / "config.yaml").write_text(state["config"])
    with pytest.raises(ConfigError, match=r"processes=2 \(this run: 1\)"):
        run(tmp_path, "train.total_steps=9", f"train.resume={ckpt}")


def test_settings_that_do_not_change_training_may_differ_on_resume(tmp_path):
    run(tmp_path, "train.total_steps=3")
    run_dir = only_run(tmp_path)
    summary = run(
        tmp_path,
        "train.total_steps=4",
        "train.log_every=1",
        "curvature.probes=3",
        "sampling.grid_every=2",
        f"train.resume={run_dir}",
    )
    assert summary["step"] == 4


def test_a_finished_run_is_left_alone(finished, capsys):
    root, run_dir = finished
    before = snapshot(run_dir)
    with pytest.raises(Finished, match="already at step 6 of train.total_steps=6"):
        run(root, "train.resume=auto", f"train.run_dir={run_dir}")
    assert train_main(tiny(root, "train.resume=auto", f"train.run_dir={run_dir}")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to do" in err[0]
    assert snapshot(run_dir) == before  # summary.json byte-identical, nothing else touched


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    aligned = "train.log_every=3"  # windows that start at a checkpoint average the same steps
    run(tmp_path / "straight", "train.total_steps=9", aligned)
    run(tmp_path / "broken", "train.total_steps=6", aligned)
    run_dir = only_run(tmp_path / "broken")
    newest = run_dir / "checkpoints" / "step_0000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated by a crash outside fastdiff
    run(
        tmp_path / "broken",
        "train.total_steps=9",
        aligned,
        "train.resume=auto",
        f"train.run_dir={run_dir}",
    )
    assert (run_dir / "checkpoints" / f"step_0000006.pt{UNREADABLE_SUFFIX}").is_file()
    assert losses(run_dir) == losses(only_run(tmp_path / "straight"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["start_step"] for s in summary["segments"]] == [0, 3]  # resumed from step 3


def test_an_explicit_unreadable_checkpoint_is_an_error(finished, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="bad.pt cannot be read"):
        run(tmp_path, "train.total_steps=9", f"train.resume={bad}")


def test_a_loose_checkpoint_starts_a_run_under_runs_root(finished, tmp_path):
    _, run_dir = finished
    loose = tmp_path / "elsewhere" / "ckpts" / "x.pt"
    loose.parent.mkdir(parents=True)
    loose.write_bytes((run_dir / "checkpoints" / "step_0000003.pt").read_bytes())
    root = tmp_path / "root"
    run(root, "train.total_steps=6", f"train.resume={loose}")
    assert sorted(p.name for p in (tmp_path / "elsewhere").rglob("*")) == ["ckpts", "x.pt"]
    new = only_run(root)
    config = yaml.safe_load((new / "config.yaml").read_text())
    assert config["train"]["resume"] == str(loose)  # the source, on record
    assert losses(new)[-1] == losses(run_dir)[-1]  # steps 5-6, trained on from step 3


def test_summary_covers_every_segment_of_a_resumed_run(tmp_path):
    run(tmp_path, "train.total_steps=4", "train.ckpt_every=2")
    run_dir = only_run(tmp_path)
    first = json.loads((run_dir / "summary.json").read_text())
    run(tmp_path, "train.total_steps=8", "train.ckpt_every=2", f"train.resume={run_dir}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["images"] == 8 * 4  # 8 steps at batch 4, over both segments
    assert [(s["start_step"], s["end_step"]) for s in summary["segments"]] == [(0, 4), (4, 8)]
    assert summary["wall_time_s"] == pytest.approx(sum(s["seconds"] for s in summary["segments"]))
    assert summary["train_time_s"] > first["train_time_s"]
    assert summary["images_per_sec"] == pytest.approx(32 / summary["train_time_s"])
    assert all(s["host"] for s in summary["segments"])


def test_a_checkpoint_between_logs_keeps_the_open_windows_images(tmp_path):
    run(tmp_path, "train.total_steps=3", "train.log_every=2", "train.ckpt_every=3")
    run_dir = only_run(tmp_path)
    state = torch.load(run_dir / "checkpoints" / "step_0000003.pt", weights_only=False)
    assert state["progress"]["images"] == 3 * 4  # step 3 was not a log step


def _weights(run_dir, step):
    state = torch.load(run_dir / "checkpoints" / f"step_{step:07d}.pt", weights_only=False)
    return state, torch.cat([v.flatten().float() for v in state["model"].values()])


@pytest.mark.parametrize("keep", [False, True])
def test_init_from_is_a_new_run_from_the_parents_weights(tmp_path, keep):
    run(tmp_path / "parent", "train.total_steps=3", "optim.lr=1e-2")
    parent_dir = only_run(tmp_path / "parent")
    ckpt = parent_dir / "checkpoints" / "step_0000003.pt"
    tiny_lr = ["train.total_steps=1", "train.ckpt_every=1", "optim.lr=1e-7"]
    run(tmp_path / "fresh", *tiny_lr)
    run(
        tmp_path / "child",
        *tiny_lr,
        "loss=minsnr",
        f"train.init_from={ckpt}",
        f"train.init_keep_optimizer={keep}",
    )
    child = only_run(tmp_path / "child")
    _, parent_w = _weights(parent_dir, 3)
    state, child_w = _weights(child, 1)
    _, fresh_w = _weights(only_run(tmp_path / "fresh"), 1)
    assert (child_w - parent_w).abs().max() < 1e-5  # the parent's weights, one tiny step on
    assert (fresh_w - parent_w).abs().max() > 1e-3  # (a fresh init is far from them)
    assert int(state["optimizer"]["state"][0]["step"]) == (4 if keep else 1)
    config = yaml.safe_load((child / "config.yaml").read_text())
    assert config["loss"]["weighting"] == "minsnr"
    assert config["parent"]["checkpoint"] == str(ckpt.resolve())
    assert config["parent"]["step"] == 3
    assert config["parent"]["optimizer"] == ("kept" if keep else "fresh")
    assert config["parent"]["config"]["loss"]["weighting"] == "uniform"
    # the child resumes as itself (minsnr), and keeps its parent on record
    run(
        tmp_path / "child",
        *tiny_lr[2:],
        "train.total_steps=2",
        "loss=minsnr",
        f"train.resume={child}",
    )
    assert yaml.safe_load((child / "config.yaml").read_text())["parent"]["step"] == 3


def test_init_from_refuses_weights_of_another_shape(finished, tmp_path):
    _, run_dir = finished
    ckpt = run_dir / "checkpoints" / "step_0000003.pt"
    with pytest.raises(ConfigError, match=r"another shape: model.base_channels=16 \(this run: 8"):
        run(tmp_path, "model.base_channels=8", f"train.init_from={ckpt}")


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.image_size=13", "unet_tiny takes image sizes divisible by 4.*use e.g. 12 or 16"),
        ("sampling.grid_images=7", "sampling.grid_images must be a perfect square.*4 or 9"),
        ("train.init_from=/no/such.pt", "train.init_from=/no/such.pt does not exist"),
    ],
)
def test_bad_settings_are_one_line_before_work(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        to_config(compose(tiny(tmp_path, override)))


def test_an_unwritable_runs_root_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert train_main(tiny(tmp_path, f"train.runs_root={blocker}/runs")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"fastdiff: error: train.runs_root={blocker}/runs cannot be written: "
        f"{blocker} is a file, not a folder"
    ]


def test_prepare_names_src_for_an_unreadable_archive(tmp_path, capsys):
    bogus = tmp_path / "random.bin"
    bogus.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    assert prepare_main(["cifar10", "--src", str(bogus), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "not a readable CIFAR-10 archive" in err[0] and f"--src {bogus}" in err[0]
    assert "data.path" not in err[0] and "method" not in err[0]
    assert not (tmp_path / "out").exists()


def _per_block_projections(state: dict) -> dict:
    """A model state dict as saved when each ResBlock held its own temb_proj."""
    from fastdiff.unet import ResBlock, build_model

    model = build_model("unet_tiny", 16, 0.1, 8)
    state = dict(state)
    w, b = state.pop("temb_proj.weight"), state.pop("temb_proj.bias")
    names = [n for n, m in model.named_modules() if isinstance(m, ResBlock)]
    lo = 0
    for name, size in zip(names, model.temb_sizes, strict=True):
        state[f"{name}.temb_proj.weight"], state[f"{name}.temb_proj.bias"] = (
            w[lo : lo + size],
            b[lo : lo + size],
        )
        lo += size
    return state


def test_a_checkpoint_of_the_per_block_layout_starts_a_run_but_is_not_resumed(finished, tmp_path):
    """Its weights load (init_from), but its flat optimizer state has the old parameter
    order: resuming it is one line that says to use init_from."""
    _, run_dir = finished
    state = torch.load(run_dir / "checkpoints" / "step_0000003.pt", weights_only=False)
    state["model"] = _per_block_projections(state["model"])
    state["ema"] = _per_block_projections(state["ema"])
    old = tmp_path / "old" / "step_0000003.pt"
    old.parent.mkdir()
    torch.save(state, old)
    with pytest.raises(ConfigError, match="own time projection.*train.init_from="):
        run(tmp_path / "resumed", f"train.resume={old}")
    run(tmp_path / "child", "train.total_steps=1", f"train.init_from={old}")
    assert json.loads((only_run(tmp_path / "child") / "summary.json").read_text())["step"] == 1
