"""Fused runs: K arm-seeds from one vmapped forward and backward, each exactly its
standalone run (same batches, timesteps, noise, dropout masks and init)."""

import json
import math

import pytest
import torch

from fastdiff.config import ConfigError, compose, to_config
from fastdiff.fused import FusedRuns, check_compatible
from fastdiff.trainer import training_loop
from tests.conftest import tiny

STEPS = 20


def arm(tmp_path, name, experiment, seed, *extra):
    overrides = tiny(
        tmp_path,
        f"experiment={experiment}",
        f"train.seed={seed}",
        "train.amp=false",  # fp32: the batched convolutions agree to rounding
        f"train.total_steps={STEPS}",
        "optim.lr=1e-3",  # weights that move: the masks and weights show in the losses
        "train.log_every=1",
        f"train.ckpt_every={STEPS}",
        "curvature.enabled=false",
        f"train.run_dir={tmp_path / name}",
        *extra,
    )
    return to_config(compose(overrides))


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.parametrize("seeds", [(1077,), (1077, 2077)])
def test_fused_runs_match_their_standalone_runs(tmp_path, seeds):
    """K = 2 (e9a, e9b) and K = 4 (both arms for two seeds): every run's per-step loss
    over 20 steps within 1e-4 relative of the same run trained alone, dropout on."""
    names = [(f"{e}-{s}", e, s) for s in seeds for e in ("e9a", "e9b")]
    fused = FusedRuns([arm(tmp_path / "fused", n, e, s) for n, e, s in names])
    results = fused.train()
    assert all(r["step"] == STEPS for r in results)
    for n, e, s in names:
        training_loop(arm(tmp_path / "alone", n, e, s))
        together, alone = losses(tmp_path / "fused" / n), losses(tmp_path / "alone" / n)
        assert len(together) == len(alone) == STEPS
        assert together == pytest.approx(alone, rel=1e-4), n
    # the arms of a seed differ (their weightings), the seeds differ (their data)
    first = {n: losses(tmp_path / "fused" / n) for n, _, _ in names}
    assert first[names[0][0]] != first[names[1][0]]
    if len(seeds) > 1:
        assert first[names[0][0]] != first[names[2][0]]
    # the card's verdict table is the same from the fused runs as from the standalone ones
    from fastdiff.report import Run
    from fastdiff.report.render import write_report

    tables = {}
    for kind in ("fused", "alone"):
        runs = [Run.load(tmp_path / kind / n) for n, _, _ in names]
        write_report(runs, tmp_path / f"report-{kind}", "e9")
        crits = json.loads((tmp_path / f"report-{kind}" / "report.json").read_text())["criteria"]
        tables[kind] = [(c["name"], c["status"], c["estimate"]) for c in crits]
    assert [row[:2] for row in tables["fused"]] == [row[:2] for row in tables["alone"]]
    for (_, _, a), (_, _, b) in zip(tables["fused"], tables["alone"]):
        assert a == b or a == pytest.approx(b, rel=1e-3)


def test_fused_arms_of_mixed_targets_families_and_snr_match_their_standalone_runs(tmp_path):
    """One pass for arms that differ in prediction target, weighting family and SNR
    definition: each arm's target and weights are its own, within 1e-4 in fp32."""
    names = {
        "v-ztsnr": ("e9a", "loss.prediction=v", "diffusion.zero_terminal_snr=true"),
        "x0-p2": ("e9b", "loss.prediction=x0", "loss.weighting=p2", "loss.k=1", "loss.gamma=1"),
        "eps-minsnr": ("e9b",),
    }
    cfgs = {n: arm(tmp_path / "fused", n, e, 1077, *x) for n, (e, *x) in names.items()}
    FusedRuns(list(cfgs.values())).train()
    for n, (e, *x) in names.items():
        training_loop(arm(tmp_path / "alone", n, e, 1077, *x))
        together, alone = losses(tmp_path / "fused" / n), losses(tmp_path / "alone" / n)
        assert len(together) == STEPS and all(map(math.isfinite, together))
        assert together == pytest.approx(alone, rel=1e-4), n
    assert len({losses(tmp_path / "fused" / n)[0] for n in names}) == 3


def test_runs_that_cannot_share_a_pass_are_one_line(tmp_path):
    a = arm(tmp_path, "a", "e9a", 1077)
    b = arm(tmp_path, "b", "e9b", 1077, "train.batch_size=8")
    with pytest.raises(ConfigError, match="must share train.batch_size"):
        check_compatible([a, b])


def test_a_diverging_run_stops_alone(tmp_path, monkeypatch):
    """train.on_nonfinite=stop ends the run that went non-finite; the other trains on."""
    import fastdiff.objective as objective_mod

    real = objective_mod.weighted_mse
    calls = []

    def poisoned(out, target, weight):
        # a step calls it for e9a, then e9b: e9b's 3rd and 4th steps are NaN; at the log
        # after its 4th step e9b stops, and e9a alone calls it from then on
        calls.append(1)
        loss = real(out, target, weight)
        return loss * float("nan") if len(calls) in (6, 8) else loss

    monkeypatch.setattr(objective_mod, "weighted_mse", poisoned)
    runs = FusedRuns(
        [
            arm(tmp_path, "a", "e9a", 1077, "train.log_every=2"),
            arm(tmp_path, "b", "e9b", 1077, "train.log_every=2"),
        ]
    )
    a, b = runs.train()
    assert a["step"] == STEPS and not a["diverged"]
    assert b.exit_code != 0 and b.step == 3
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["diverged"] and summary["step"] == 3
    assert torch.isfinite(torch.tensor(losses(tmp_path / "a"))).all()


@pytest.mark.gpu  # where there is one, the runs train on CUDA: the masks are Philox's
def test_each_run_gets_the_dropout_masks_its_standalone_step_draws(tmp_path):
    """The masks handed to the vmapped pass are the ones the run's own Dropout layers
    draw in a standalone step (seeded by its dropout stream), layer by layer, on the
    run's device."""
    from fastdiff.seeding import stream_seed
    from fastdiff.tuning import Dropout

    runs = FusedRuns([arm(tmp_path, "a", "e9a", 1077), arm(tmp_path, "b", "e9b", 2077)])
    assert len(runs.masks) == 11  # one per ResBlock of unet_tiny
    for tr in runs.trainers:
        drawn = []
        hooks = [
            m.register_forward_hook(lambda m, a, out, drawn=drawn: drawn.append(out / a[0]))
            for m in tr.module.modules()
            if isinstance(m, Dropout)
        ]
        x = torch.randn(4, 3, 8, 8, device=tr.device) + 10
        x = x.contiguous(memory_format=torch.channels_last)
        torch.manual_seed(stream_seed(tr.cfg.train.seed, "dropout", 7, 0))
        with torch.no_grad():
            tr.module(x, torch.full((4,), 500, device=tr.device))
        for h in hooks:
            h.remove()
        supplied = runs._draw_masks(tr, 7)
        assert len(drawn) == len(supplied) == 11
        for d, s in zip(drawn, supplied, strict=True):
            assert s.device == tr.device
            finite = torch.isfinite(d)  # (0/0 where an input is exactly 0)
            torch.testing.assert_close(d[finite], s[finite])


@pytest.mark.slow
def test_study_fused_writes_the_same_run_directories_and_reruns_as_nothing(tmp_path):
    import subprocess
    import sys

    overrides = [o for o in tiny(tmp_path) if not o.startswith("train.runs_root")]
    cmd = [sys.executable, "-m", "fastdiff.study", "e9", *overrides, "curvature.enabled=false"]
    cmd += ["--seeds", "2", "--fused", "--launch", sys.executable, "--out", str(tmp_path / "s")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    root = tmp_path / "s"
    runs = sorted(str(p.parent.relative_to(root)) for p in root.glob("*/seed*/summary.json"))
    assert runs == ["e9a/seed1077", "e9a/seed2077", "e9b/seed1077", "e9b/seed2077"]
    for p in root.glob("*/seed*/summary.json"):
        assert json.loads(p.read_text())["step"] == 6
        assert (p.parent / "checkpoints" / "step_0000006.pt").exists()
    assert (root / "report" / "report.json").exists()
    before = {p: p.read_bytes() for p in root.glob("*/seed*/summary.json")}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "nothing to do" in again.stdout + again.stderr
    assert {p: p.read_bytes() for p in before} == before


def _final_weights(run_dir, step):
    path = run_dir / "checkpoints" / f"step_{step:07d}.pt"
    return torch.load(path, weights_only=False)["model"]


def test_a_fused_job_resumes_exactly(tmp_path):
    """Stopped after 3 steps and resumed (each run from its own checkpoint), a fused
    job ends with the weights of one that ran straight through."""
    extra = ("train.total_steps=6", "train.ckpt_every=3", "optim.lr=1e-3")

    def job(root, *more):
        return FusedRuns(
            [arm(root, n, e, 1077, *extra, *more) for n, e in (("a", "e9a"), ("b", "e9b"))]
        ).train()

    job(tmp_path / "straight")
    job(tmp_path / "stopped", "train.total_steps=3")
    job(tmp_path / "stopped", "train.resume=auto")
    for name in ("a", "b"):
        summary = json.loads((tmp_path / "stopped" / name / "summary.json").read_text())
        assert [g["start_step"] for g in summary["segments"]] == [0, 3]  # resumed, not redone
        a = _final_weights(tmp_path / "straight" / name, 6)
        b = _final_weights(tmp_path / "stopped" / name, 6)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.slow
def test_two_processes_fused_match_one(tmp_path):
    """Under torchrun, each rank holds its slice of every run's global batch, and the
    stacked gradient is averaged over the ranks: the weights of one process at the
    same global batch."""
    import os
    import subprocess
    import sys

    common = [o for o in tiny(tmp_path) if not o.startswith(("train.batch_size", "train.runs"))]
    common += [
        "model.dropout=0",
        "train.amp=false",
        "train.total_steps=4",
        "curvature.enabled=false",
    ]

    def fused(out, batch, processes):
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        launcher += ["--master_port", "29533"] if processes > 1 else []
        cmd = [sys.executable, *(launcher if processes > 1 else []), "-m", "fastdiff.fused_cli"]
        cmd += ["e9", *common, f"train.batch_size={batch}", "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    fused(tmp_path / "two", 2, 2)
    fused(tmp_path / "one", 4, 1)
    for arm_name in ("e9a", "e9b"):
        a = _final_weights(tmp_path / "two" / arm_name / "seed1077", 4)
        b = _final_weights(tmp_path / "one" / arm_name / "seed1077", 4)
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_activation_bytes_are_fixed_plus_per_sample(tmp_path):
    """The fit check extrapolates the saved activations from batch 1 and 2 as fixed +
    per-sample. In fp32 nothing is fixed (the weights belong to the state); under bf16
    autocast the fixed part is the bf16 copies of the conv and linear weights. Per
    sample it holds at least the first convolution's input (the image, fp32)."""
    from fastdiff.fused import saved_bytes
    from fastdiff.tuning import amp_precision
    from fastdiff.unet import build_model

    cpu = torch.device("cpu")
    cfg = arm(tmp_path, "a", "e9a", 1077)
    one, two, three = (saved_bytes(cfg, b, cpu) for b in (1, 2, 3))
    assert three == one + 2 * (two - one)
    assert 2 * one - two == 0 and two - one >= 3 * cfg.data.image_size**2 * 4
    if amp_precision(True, cuda=False) != "bf16":
        return
    cfg = arm(tmp_path, "b", "e9a", 1077, "train.amp=true")
    one, two = saved_bytes(cfg, 1, cpu), saved_bytes(cfg, 2, cpu)
    layers = [m for m in build_model("unet_tiny", 16, 0.1, 8).modules()]
    layers = [m for m in layers if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    weights = sum(m.weight.numel() for m in layers)
    assert (
        0.95 * 2 * weights <= 2 * one - two <= 2 * sum(m.bias.numel() for m in layers) + 2 * weights
    )


def test_a_fused_job_that_does_not_fit_is_one_line_naming_what_fits(tmp_path, monkeypatch, capsys):
    from fastdiff import fused, fused_cli
    from fastdiff.unet import build_model

    cfgs = [arm(tmp_path / "fused", f"r{k}", "e9a", 1077 + k, "train.amp=true") for k in range(3)]
    m, cpu = cfgs[0].model, torch.device("cpu")
    n = sum(p.numel() for p in build_model(m.name, m.base_channels, 0.1, 8).parameters())
    one, two = fused.saved_bytes(cfgs[0], 1, cpu), fused.saved_bytes(cfgs[0], 2, cpu)
    # weights, grad, two moments, EMA, stacked weights, grad views, stacked grad: fp32 each
    per_run = 8 * 4 * n + (2 * one - two) + 4 * (two - one)
    free = 2.5 * per_run / fused.HEADROOM  # two runs fit, three do not
    monkeypatch.setattr(fused, "free_bytes", lambda device: free)
    fused.check_fits(cfgs[:2], cpu)
    with monkeypatch.context() as two_processes:  # on one host they share its memory
        two_processes.setenv("LOCAL_WORLD_SIZE", "2")
        with pytest.raises(ConfigError, match="each of its 2 processes: K=1 at batch 4"):
            fused.check_fits(cfgs[:2], cpu)
    with pytest.raises(ConfigError) as err:
        fused.check_fits(cfgs, cpu)
    line = str(err.value)
    assert "K=3 runs at batch 4" in line and "K=2 at batch 4" in line
    fits_batch = int((2.5 * per_run / 3 - 8 * 4 * n - (2 * one - two)) // (two - one))
    assert f"batch {fits_batch} at K=3" in line and fits_batch < 4
    # through the command: one line, before any run is set up
    out = tmp_path / "study"
    argv = ["e9", *tiny(tmp_path), "--seeds", "1,2", "--out", str(out)]
    assert fused_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "K=4 runs at batch 4" in err[0]
    assert not out.exists()


def test_one_runs_periodic_work_is_not_the_others_training_time(tmp_path):
    """Run 0 gets a 1 s job after every 4th step; neither run's seconds per step nor
    train time may count it. The bounds are relative to the job, not to this machine's
    step time (a tiny fused step is 0.1 s on one 2-core VM, milliseconds on another)."""
    import time

    fused = FusedRuns([arm(tmp_path, n, e, 1077) for n, e in (("a", "e9a"), ("b", "e9b"))])
    slow = fused.trainers[0]
    plain_jobs = slow.jobs
    job_s, every = 1.0, 4
    slow.jobs = lambda: [
        *plain_jobs(),
        (lambda done: done % every == 0, lambda s: time.sleep(job_s)),
    ]
    start = time.perf_counter()
    fused.train()
    wall = time.perf_counter() - start
    jobs_s = job_s * (STEPS // every)
    for name in ("a", "b"):
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        per_step = [r["perf/seconds_per_step"] for r in rows if "perf/seconds_per_step" in r]
        assert len(per_step) == STEPS and max(per_step[1:]) < job_s / 2, (name, per_step)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["train_time_s"] < wall - 0.9 * jobs_s, (name, summary["train_time_s"], wall)


def test_a_compiled_fused_step_traces_and_matches_eager(tmp_path):
    """train.compile=true compiles the vmapped forward. Traced through Dynamo and AOT
    autograd (the aot_eager backend: the tracing path without inductor's minutes of
    code generation on a CPU), each run's losses equal the eager fused step's."""
    names = (("a", "e9a"), ("b", "e9b"))
    eager = FusedRuns([arm(tmp_path / "eager", n, e, 1077) for n, e in names])
    compile_ = ["train.compile=true", "train.compile_backend=aot_eager"]
    compiled = FusedRuns([arm(tmp_path / "compiled", n, e, 1077, *compile_) for n, e in names])
    assert hasattr(compiled.forward, "_torchdynamo_orig_callable")
    assert not hasattr(eager.forward, "_torchdynamo_orig_callable")
    for step in range(3):
        ours = [o.loss.item() for o in compiled.step(step)]
        theirs = [o.loss.item() for o in eager.step(step)]
        assert ours == pytest.approx(theirs, rel=1e-5)
