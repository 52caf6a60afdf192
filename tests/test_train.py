"""End to end on tiny settings: run dir, paired runs, exact resume, golden loss curve."""

import json
from pathlib import Path

import pytest
import torch

import fastdiff.objective as objective_mod
import fastdiff.trainer as trainer_mod
from fastdiff.config import compose, to_config
from fastdiff.flops import train_step_flops
from fastdiff.seeding import step_draws
from fastdiff.trainer import training_loop
from fastdiff.tuning import amp_precision
from tests.conftest import tiny

GOLDEN = Path(__file__).parent / "assets" / "golden_losses_tiny.json"


def run(tmp_path, *overrides):
    cfg = to_config(compose(tiny(tmp_path, *overrides)))
    summary = training_loop(cfg)
    (run_dir,) = [
        p for p in (tmp_path / cfg.experiment).iterdir() if cfg.train.run_dir is None
    ] or [Path(cfg.train.run_dir)]
    return summary, run_dir


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_contents(tmp_path):
    summary, run_dir = run(
        tmp_path,
        "experiment=e9b",
        "curvature.probes=2",
        "curvature.batch_size=2",
        "curvature.t_bins=2",
        "curvature.every=3",
        "sampling.grid_every=3",
    )
    assert run_dir.parent.name == "e9b"
    assert "beta_schedule: cosine" in (run_dir / "config.yaml").read_text()
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6]
    curv = [r for r in rows if "curvature/hutch_trace_mean" in r]
    assert [r["step"] for r in curv] == [3, 6] and all(
        "curvature/hutch_trace_std" in r for r in curv
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_0000003.pt",
        "step_0000006.pt",
    ]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "grid_0000003.png",
        "grid_0000006.png",
        "stats_0000003.json",
        "stats_0000006.json",
    ]
    from torchvision.io import decode_png, read_file

    stats = json.loads((run_dir / "samples" / "stats_0000006.json").read_text())
    grid = decode_png(read_file(str(run_dir / "samples" / "grid_0000006.png"))).float() / 255
    cell = grid[:, 2:34, 2:34]  # the first sample: 2 px padding, 8x8 upscaled to 32x32
    assert stats["samples"]["mean_intensity"][0] == pytest.approx(cell.mean().item(), abs=3e-3)
    assert len(stats["training"]["contrast"]) == 4 and min(stats["training"]["contrast"]) > 0
    assert list(run_dir.glob("events.out.tfevents.*"))
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["step"] == 6 and saved["images_per_sec"] > 0 and saved == summary
    # achieved TFLOP/s = counted FLOPs per step / seconds per step
    assert saved["flops_per_step"] == train_step_flops("unet_tiny", 16, 8, 4)
    last = [r for r in rows if "train/loss" in r][-1]
    expected = saved["flops_per_step"] / last["perf/seconds_per_step"] / 1e12
    assert last["perf/tflops"] == pytest.approx(expected, rel=1e-6)
    assert not list(run_dir.rglob(".*.tmp*"))  # nothing half-written left behind


def test_paired_runs_see_the_same_batches_timesteps_and_noise(tmp_path, monkeypatch):
    seen = {}
    real = objective_mod.Objective.__call__

    def spy(self, model, x0, t, noise):
        seen.setdefault(key, []).append((x0.clone(), t.clone(), noise.clone(), self.weight(t)))
        return real(self, model, x0, t, noise)

    monkeypatch.setattr(objective_mod.Objective, "__call__", spy)
    for key in ("e9a", "e9b"):
        run(tmp_path / key, f"experiment={key}", "train.total_steps=4", "curvature.enabled=false")
    a, b = seen["e9a"], seen["e9b"]
    assert len(a) == len(b) == 4
    for (x0a, ta, na, wa), (x0b, tb, nb, _wb) in zip(a, b):
        assert torch.equal(x0a, x0b) and torch.equal(ta, tb) and torch.equal(na, nb)
        assert torch.all(wa == 1)
    assert any(not torch.all(w == 1) for *_, w in b)  # Min-SNR did reweight some steps
    assert not torch.equal(a[0][0], a[1][0])  # and the batches do change step to step


def test_resume_continues_exactly(tmp_path):
    _, straight = run(tmp_path / "a", "train.total_steps=6")
    _, first = run(tmp_path / "b", "train.total_steps=3")
    run(tmp_path / "b", "train.total_steps=6", f"train.resume={first}")
    a = torch.load(straight / "checkpoints" / "step_0000006.pt", weights_only=False)
    b = torch.load(first / "checkpoints" / "step_0000006.pt", weights_only=False)
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-6, atol=1e-7)

    def loss_at(run_dir):  # steps 2 and 6 average the same steps in both runs
        return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}

    resumed, uninterrupted = loss_at(first), loss_at(straight)
    assert sorted(resumed) == [2, 3, 4, 6]
    for step in (2, 6):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5)


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("clip", [1e-3, 0.0])
def test_step_clips_the_gradient_and_reports_its_norm(tmp_path, clip, amp):
    """Adam's first moment after one step is (1 − β₁)·g: g must be the loss gradient
    scaled to norm ``train.grad_clip`` when it is larger (0: never clipped), and the
    step reports the unclipped norm. The gradient is recomputed here by autograd, under
    bf16 autocast when ``train.amp`` resolves to bf16 on this machine."""
    import copy

    from fastdiff.diffusion import q_sample, weighted_mse

    cfg = to_config(
        compose(
            tiny(
                tmp_path,
                "loss=minsnr",
                "model.dropout=0",
                f"train.grad_clip={clip}",
                f"train.amp={str(amp).lower()}",
            )
        )
    )
    trainer = trainer_mod.Trainer(cfg)
    assert trainer.acc.mixed_precision == amp_precision(amp, cuda=False)
    model = trainer.acc.unwrap_model(trainer.model)
    x0 = trainer.batches.batch(0)
    t, noise = step_draws(
        cfg.train.seed,
        0,
        0,
        1,
        batch=x0.shape[0],
        shape=trainer.image_shape,
        T=cfg.diffusion.T,
        device=trainer.device,
    )
    ref = copy.deepcopy(model)
    bf16 = trainer.acc.mixed_precision == "bf16"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        x_t = q_sample(x0, t, noise, trainer.objective.alphas_cumprod)
        loss = weighted_mse(ref(x_t, t), noise, trainer.objective.weights[t]).mean()
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    norm = torch.sqrt(sum(g.double().square().sum() for g in grads)).item()
    assert norm > 1e-3  # so that the clipped case clips

    grad_norm = trainer.train_step(0).grad_norm.item()

    assert grad_norm == pytest.approx(norm, rel=1e-4)
    scale = min(1.0, clip / norm) if clip else 1.0
    exp_avg = trainer.optimizer.moments()["exp_avg"]
    for p, g in zip(model.parameters(), grads, strict=True):
        seen = exp_avg.as_strided(p.shape, p.stride(), p.storage_offset())
        torch.testing.assert_close(seen / (1 - cfg.optim.beta1), g * scale, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(True, False, "bf16"), (False, True, "bf16"), (False, False, "no")],
)
def test_amp_on_cpu_is_bf16_only_where_the_cpu_has_bf16(monkeypatch, amx, avx512_bf16, expected):
    caps = {"amx_bf16": amx, "avx512_bf16": avx512_bf16, "avx512_f": True}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert amp_precision(True, cuda=False) == expected
    assert amp_precision(False, cuda=False) == "no"


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16"), (False, "fp16")])
def test_amp_on_cuda_is_bf16_where_supported_else_fp16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert amp_precision(True, cuda=True) == expected
    assert amp_precision(False, cuda=True) == "no"


def test_golden_loss_curve(tmp_path):
    """Per-step losses of the tiny preset: catches silent changes to the maths.
    Regenerate (and say why in the commit) with: python -m tests.test_train"""
    _, run_dir = run(tmp_path, *GOLDEN_OVERRIDES)
    losses = [r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r]
    golden = json.loads(GOLDEN.read_text())
    assert golden["overrides"] == GOLDEN_OVERRIDES
    assert losses == pytest.approx(golden["losses"], rel=1e-3)


GOLDEN_OVERRIDES = [  # fp32: the same numbers on CPUs with and without bf16
    "experiment=e9b",
    "train.amp=false",
    "curvature.enabled=false",
    "train.total_steps=30",
    "train.log_every=1",
    "train.ckpt_every=1000",
    "optim.lr=1e-3",
]

if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _, rd = run(Path(tmp), *GOLDEN_OVERRIDES)
        losses = [r["train/loss"] for r in read_metrics(rd) if "train/loss" in r]
    GOLDEN.write_text(json.dumps({"overrides": GOLDEN_OVERRIDES, "losses": losses}, indent=1))
    print(f"wrote {len(losses)} losses to {GOLDEN}")


def test_loss_by_timestep_bin_equals_a_host_side_recomputation(tmp_path, monkeypatch):
    seen = []
    real = objective_mod.Objective.__call__

    def spy(self, model, x0, t, noise):
        out = real(self, model, x0, t, noise)
        seen.append((t.clone(), out.detach().clone(), self.weight(t).clone()))
        return out

    monkeypatch.setattr(objective_mod.Objective, "__call__", spy)
    bins = 4
    _, run_dir = run(
        tmp_path,
        "loss=minsnr",
        "train.batch_size=16",  # 48 samples over 3 steps: every bin gets some
        "train.total_steps=3",
        "train.log_every=3",
        f"train.loss_bins={bins}",
    )
    (row,) = [r for r in read_metrics(run_dir) if "train/loss" in r]
    t = torch.cat([s[0] for s in seen])
    weighted = torch.cat([s[1] for s in seen]).double()
    unweighted = weighted / torch.cat([s[2] for s in seen]).double()
    for lo, hi in [(0, 249), (250, 499), (500, 749), (750, 999)]:
        inside = (t >= lo) & (t <= hi)
        assert inside.any()
        name = f"t{lo}-{hi}"
        assert row[f"train/loss_by_t/{name}"] == pytest.approx(
            weighted[inside].mean().item(), rel=1e-5
        )
        assert row[f"train/mse_unweighted_by_t/{name}"] == pytest.approx(
            unweighted[inside].mean().item(), rel=1e-5
        )
    assert sum(k.startswith("train/loss_by_t/") for k in row) == bins


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_optimizer_choice_is_the_first_adam_step_of_its_kind(tmp_path, name):
    """Adam's first step moves each weight by lr·ĝ/(|ĝ| + ε) (bias-corrected moments of
    one gradient): ĝ = g + λθ for adam (L2), and for adamw ĝ = g with θ first shrunk by
    (1 − lr·λ), computed here from the step's own gradient and the weights before it."""
    lr, wd, eps = 1e-3, 0.5, 1e-8
    cfg = to_config(
        compose(
            tiny(
                tmp_path,
                f"optim.name={name}",
                f"optim.lr={lr}",
                f"optim.weight_decay={wd}",
                "train.grad_clip=0",
                "train.amp=false",
            )
        )
    )
    trainer = trainer_mod.Trainer(cfg)
    before = trainer.optimizer.flat.detach().clone().double()
    trainer.train_step(0)
    g = trainer.optimizer.flat.grad.double()
    if name == "adam":
        g = g + wd * before
        expected = before - lr * g / (g.abs() + eps)
    else:
        expected = before * (1 - lr * wd) - lr * g / (g.abs() + eps)
    torch.testing.assert_close(
        trainer.optimizer.flat.detach().double(), expected, rtol=0, atol=1e-6
    )
