"""FID: against an independent Fréchet computation, the real weight-loading path, the
sampler's batch- and process-invariant noise, and the training-loop integration."""

import json
import logging
from unittest import mock

import numpy as np
import pytest
import torch

from fastdiff.config import ConfigError, compose, to_config
from fastdiff.diffusion import Schedule
from fastdiff.fid import (
    FIDEvaluator,
    FIDUnavailable,
    generate,
    random_inception_weights,
    resolve_weights,
    sample_generators,
    shard_of,
)
from fastdiff.sampling import sample, to_uint8
from fastdiff.trainer import training_loop
from tests.conftest import tiny


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth", 0)


def images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)


def features(weights, x):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    ext = fe.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)
    )
    with torch.no_grad():
        return ext(x)[0].double().numpy()


@pytest.fixture(scope="module")
def features_ab(inception_weights):
    a, b = images(8, 1), images(8, 2)
    return a, b, features(inception_weights, a), features(inception_weights, b)


def frechet(f1, f2):
    """Independent reference: ‖μ1−μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), the last trace as
    the sum of the square roots of the eigenvalues of the non-symmetric product Σ1 Σ2
    (LAPACK geev; the code under test takes symmetric ones of √Σ2 Σ1 √Σ2). Equal to
    scipy's sqrtm trace, at 2.2 s instead of 16.7 s for D=2048 on a 2-core CPU."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2).real  # real and ≥ 0 up to rounding: a product of PSDs
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * tr_covmean)


def test_fid_matches_an_independent_frechet_distance(inception_weights, features_ab, tmp_path):
    a, b, fa, fb = features_ab
    evaluator = FIDEvaluator(b, "test-b", inception_weights, cache_dir=str(tmp_path))
    got = evaluator(a)
    assert got["fid"] == pytest.approx(frechet(fa, fb), rel=2e-2)
    assert got["fid"] > 0 and np.isfinite(got["kid_mean"])
    same = FIDEvaluator(a, "test-a", inception_weights, cache_dir=str(tmp_path))(a)["fid"]
    assert abs(same) < 1e-3 * np.trace(np.cov(fa, rowvar=False))


def test_precomputed_statistics_file(inception_weights, features_ab, tmp_path):
    a, b, _, fb = features_ab
    stats = tmp_path / "ref.npz"
    np.savez(stats, mu=fb.mean(0), sigma=np.cov(fb, rowvar=False))
    by_stats = FIDEvaluator(
        b, "x", inception_weights, stats_path=str(stats), cache_dir=str(tmp_path)
    )(a)
    by_images = FIDEvaluator(b, "y", inception_weights, cache_dir=str(tmp_path))(a)
    assert by_stats["fid"] == pytest.approx(by_images["fid"], rel=1e-3)


def test_weights_resolution_and_clear_error(tmp_path, monkeypatch, inception_weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    assert resolve_weights(str(inception_weights)) == inception_weights
    with pytest.raises(FIDUnavailable, match="does not exist"):
        resolve_weights(str(tmp_path / "missing.pth"))

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FIDUnavailable, match="put the file at .*checkpoints"):
        resolve_weights(None)
    cached = tmp_path / "hub" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(inception_weights.read_bytes())
    assert resolve_weights(None) == cached


class Halving(torch.nn.Module):
    """A per-sample deterministic ε model, so outputs can be compared bit for bit."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t):
        return self.w * x


@pytest.mark.parametrize("sampler, nfe", [("ddpm", 5), ("ddim", 4)])
def test_samples_do_not_depend_on_batch_size_or_process_count(sampler, nfe):
    sched = Schedule.make("linear", 100)
    model = Halving()
    one = generate(
        model, sched, range(7), (3, 4, 4), sampler=sampler, nfe=nfe, seed=3, batch_size=7
    )
    small = generate(
        model, sched, range(7), (3, 4, 4), sampler=sampler, nfe=nfe, seed=3, batch_size=2
    )
    ranks = torch.cat(
        [
            generate(
                model,
                sched,
                shard_of(7, r, 2),
                (3, 4, 4),
                sampler=sampler,
                nfe=nfe,
                seed=3,
                batch_size=3,
            )
            for r in range(2)
        ]
    )
    assert one.dtype == torch.uint8 and one.shape == (7, 3, 4, 4)
    assert torch.equal(one, small) and torch.equal(one, ranks)
    other = generate(
        model, sched, range(7), (3, 4, 4), sampler=sampler, nfe=nfe, seed=4, batch_size=7
    )
    assert not torch.equal(one, other)


@pytest.mark.parametrize("sampler, nfe", [("ddpm", 5), ("ddim", 4)])
@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_fid_samples_are_the_grid_samplers_images(sampler, nfe, variance):
    """FID's generator and the grids go through sampling.sample: given the same noise
    (the samples' own generators), the same sampler and options give the same images."""
    sched = Schedule.make("linear", 100)
    model = Halving()
    fid = generate(
        model,
        sched,
        range(2, 7),
        (3, 4, 4),
        sampler=sampler,
        nfe=nfe,
        seed=3,
        batch_size=2,
        ddpm_variance=variance,
    )
    grid = sample(
        sampler,
        model,
        (5, 3, 4, 4),
        sched,
        nfe=nfe,
        generator=sample_generators(3, range(2, 7), "cpu"),
        ddpm_variance=variance,
    )
    assert torch.equal(fid, to_uint8(grid))


def test_initial_noise_of_sample_i_is_fixed():
    first = [torch.randn(3, generator=g) for g in sample_generators(0, range(5), "cpu")]
    later = [torch.randn(3, generator=g) for g in sample_generators(0, range(3, 5), "cpu")]
    assert torch.equal(first[3], later[0]) and torch.equal(first[4], later[1])
    assert shard_of(7, 0, 2) == range(0, 4) and shard_of(7, 1, 2) == range(4, 7)
    assert shard_of(1, 1, 2) == range(1, 1)


def test_uint8_conversion_round_trips_exactly():
    k = torch.arange(256, dtype=torch.float32)
    assert torch.equal(to_uint8(k / 127.5 - 1), torch.arange(256).to(torch.uint8))


def test_training_logs_milestone_and_final_fid(inception_weights, tmp_path):
    cfg = to_config(
        compose(
            tiny(
                tmp_path,
                "eval.fid.enabled=true",
                f"eval.fid.weights_path={inception_weights}",
                f"eval.fid.cache_dir={tmp_path / 'cache'}",
                "eval.fid.reference_limit=12",
                "eval.milestone_every=3",
                "eval.milestone_samples=4",
                "eval.final_samples=6",
                "eval.nfe=2",
                "eval.batch_size=4",
                "eval.fid.bootstrap=20",
            )
        )
    )
    training_loop(cfg)
    (run_dir,) = (tmp_path / "custom").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    milestones = [r for r in rows if "val/fid_milestone/fid" in r]
    assert [r["step"] for r in milestones] == [3, 6]
    assert all(
        r["val/fid_milestone/samples"] == 4 and r["val/fid_milestone/seconds"] > 0
        for r in milestones
    )
    (final,) = [r for r in rows if "eval/final/fid" in r]
    assert final["step"] == 6 and np.isfinite(final["eval/final/fid"])
    assert "eval/final/kid_mean" in final
    assert (
        final["eval/final/fid_lo"] < final["eval/final/fid_hi"] and final["eval/final/fid_se"] > 0
    )
    assert 0 <= final["eval/final/recall"] <= 1 and 0 <= final["eval/final/precision"] <= 1
    assert all("val/fid_milestone/fid_lo" not in r for r in milestones)
    import hashlib

    provenance = json.loads((run_dir / "summary.json").read_text())["fid_provenance"]
    assert (
        provenance["weights_sha256"] == hashlib.sha256(inception_weights.read_bytes()).hexdigest()
    )
    assert provenance["reference"]["count"] == 12
    assert (provenance["sampler"], provenance["nfe"], provenance["final_samples"]) == ("ddpm", 2, 6)
    assert sorted(p.name for p in (run_dir / "samples").glob("grid_*")) == [
        "grid_0000003.png",
        "grid_0000006.png",
    ]

    from fastdiff.eval import main as eval_main

    assert (
        eval_main(
            [str(run_dir), "--samples", "4", "--nfe", "2", "--sampler", "ddim", "--batch-size", "4"]
        )
        == 0
    )
    assert list(run_dir.glob("eval_step0000006_ddim2_n4.json"))


def test_asking_for_fid_without_weights_fails_before_any_work(tmp_path, monkeypatch, capsys):
    from fastdiff.train import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setattr(
        torch.hub, "download_url_to_file", mock.Mock(side_effect=OSError("offline"))
    )
    asked = ["eval.fid.enabled=true", "eval.fid.extractor=inception"]
    assert main([*tiny(tmp_path / "runs"), *asked]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "eval.fid.weights_path" in err
    assert not (tmp_path / "runs").exists()


def test_auto_mode_without_weights_trains_and_says_fid_is_off(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    overrides = [o for o in tiny(tmp_path) if not o.startswith("eval.fid")]
    cfg = to_config(compose([*overrides, "eval.fid.extractor=inception"]))
    assert cfg.eval.fid.enabled is None
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        # auto mode never downloads: it only looks at the path and the hub cache
        with mock.patch.object(torch.hub, "download_url_to_file", side_effect=AssertionError):
            summary = training_loop(cfg)
    assert summary["step"] == 6
    assert sum("FID off" in r.message for r in caplog.records) == 1
    assert "Inception weights" in summary["fid_off"]  # the run's record says why


def test_reference_statistics_do_not_go_stale_when_the_weights_change(
    inception_weights, features_ab, tmp_path
):
    """Weights A, then B, against the same data and cache dir: B must be scored against
    B's reference features, never A's cached ones."""
    a, b = images(4, 5), images(4, 6)
    other = random_inception_weights(tmp_path / "b.pth", seed=1)
    shared = str(tmp_path / "shared")
    FIDEvaluator(b, "same-data", inception_weights, cache_dir=shared)._reference()  # cached
    after_a = FIDEvaluator(b, "same-data", other, cache_dir=shared)(a)["fid"]
    fresh = FIDEvaluator(b, "same-data", other, cache_dir=str(tmp_path / "fresh"))(a)["fid"]
    assert after_a == pytest.approx(fresh, rel=1e-9)


def test_cache_name_holds_every_input_of_the_features(inception_weights, features_ab, tmp_path):
    import torch_fidelity

    _, b, _, _ = features_ab
    name = FIDEvaluator(b, "d", inception_weights, cache_dir=str(tmp_path)).cache_name
    assert FIDEvaluator(b, "d", inception_weights, cache_dir=str(tmp_path)).cache_name == name
    assert FIDEvaluator(b[:6], "d", inception_weights).cache_name != name  # count
    assert FIDEvaluator(b, "e", inception_weights).cache_name != name  # data
    with mock.patch.object(torch_fidelity, "__version__", "9.9.9"):
        assert FIDEvaluator(b, "d", inception_weights).cache_name != name
    with mock.patch("fastdiff.fid.RESIZE", "other-resize"):
        assert FIDEvaluator(b, "d", inception_weights).cache_name != name


def test_provenance_records_weights_hash_version_and_reference(inception_weights, tmp_path):
    import hashlib

    import torch_fidelity

    ref = images(5, 3)
    p = FIDEvaluator(ref, "abc", inception_weights).provenance
    assert p["weights_sha256"] == hashlib.sha256(inception_weights.read_bytes()).hexdigest()
    assert p["torch_fidelity"] == torch_fidelity.__version__
    assert p["reference"] == {"data_sha256": "abc", "count": 5}
    assert (p["extractor"], p["layer"]) == ("inception-v3-compat", "2048")
    stats = tmp_path / "ref.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
    p = FIDEvaluator(ref, "abc", inception_weights, stats_path=str(stats)).provenance
    assert p["reference"] == {
        "stats_file": str(stats),
        "stats_sha256": hashlib.sha256(stats.read_bytes()).hexdigest(),
    }


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: np.savez(p, m=np.zeros(2048), s=np.eye(2048)), "keys \\['m', 's'\\], not mu"),
        (lambda p: np.savez(p, mu=np.zeros(64), sigma=np.eye(64)), "2048-dimensional"),
        (lambda p: p.write_bytes(b"garbage"), "cannot be read as .npz"),
    ],
)
def test_a_bad_statistics_file_is_one_line_at_start_up(tmp_path, make, message, capsys):
    from fastdiff.train import main

    stats = tmp_path / "stats.npz"
    make(stats)
    given = [f"eval.fid.stats_path={stats}", "eval.fid.extractor=inception"]
    with pytest.raises(ConfigError, match=message):
        to_config(compose(tiny(tmp_path, *given)))
    assert main(tiny(tmp_path / "runs", *given)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(stats) in err[0]
    assert not (tmp_path / "runs").exists()


def test_the_standard_stats_layouts_are_accepted(tmp_path):
    """pytorch-fid writes savez_compressed(mu=, sigma=); TTUR's files are plain savez."""
    for save in (np.savez, np.savez_compressed):
        stats = tmp_path / f"{save.__name__}.npz"
        save(stats, mu=np.zeros(2048, np.float32), sigma=np.eye(2048, dtype=np.float32))
        given = [f"eval.fid.stats_path={stats}", "eval.fid.extractor=inception"]
        cfg = to_config(compose(tiny(tmp_path, *given)))
        assert cfg.eval.fid.stats_path == str(stats)


@pytest.mark.parametrize("enabled", ["null", "false", "true"])
def test_a_missing_weights_file_is_an_error_whatever_enabled_says(tmp_path, enabled, capsys):
    from fastdiff.train import main

    missing = tmp_path / "no-such-inception.pth"
    overrides = [o for o in tiny(tmp_path / "runs") if not o.startswith("eval.fid")]
    assert (
        main([*overrides, f"eval.fid.enabled={enabled}", f"eval.fid.weights_path={missing}"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "does not exist" in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def digits_weights(tmp_path_factory):
    """The digits extractor, trained once into a temporary cache (the real training)."""
    from fastdiff import digits_fd

    path = tmp_path_factory.mktemp("extractors") / "digits.pt"
    with mock.patch.object(digits_fd, "default_path", lambda: path):
        assert digits_fd.ensure_weights() == path
        yield path


def test_digits_fd_is_small_between_real_halves_and_large_for_noise(digits_weights):
    from fastdiff.data.sources import load_digits
    from fastdiff.digits_fd import DigitsCNN

    real = load_digits(16)[0]
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
    a, b = real[order[:800]], real[order[800:1600]]
    noise = torch.randint(0, 256, (800, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    fd = FIDEvaluator(b, "digits-b", digits_weights, extractor="digits")
    halves, pure_noise = fd(a)["fid"], fd(noise.to(torch.uint8))["fid"]
    assert halves < 0.05 * pure_noise
    net = DigitsCNN()
    net.load_state_dict(torch.load(digits_weights))
    with torch.no_grad():
        fa, fb = (net.features(DigitsCNN.prepare(x)).double().numpy() for x in (a, b))
    assert halves == pytest.approx(frechet(fa, fb), rel=1e-3)  # torch-fidelity's FD, our features
    assert fd.provenance["extractor"] == "fastdiff-digits" and fd.provenance["layer"] == "64"


def test_digits_extractor_training_is_deterministic():
    from fastdiff.digits_fd import train_digits_cnn

    one, two = train_digits_cnn(steps=3).state_dict(), train_digits_cnn(steps=3).state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)
    other = train_digits_cnn(seed=1, steps=3).state_dict()
    assert not all(torch.equal(one[k], other[k]) for k in one)


def test_digits_extractor_scores_fd_without_inception_weights(
    digits_weights, tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # no Inception weights here
    overrides = [o for o in tiny(tmp_path) if not o.startswith("eval.fid")]
    cfg = to_config(
        compose(
            [
                *overrides,
                f"eval.fid.cache_dir={tmp_path / 'cache'}",
                "eval.milestone_every=3",
                "eval.milestone_samples=8",
                "eval.final_samples=8",
                "eval.nfe=2",
                "eval.fid.bootstrap=10",
            ]
        )
    )
    # auto: no Inception weights, data=digits -> the digits extractor, and on, as its
    # sampling (2 milestones x 8 + 8, x NFE 2 = 48 evaluations) costs less than training (72)
    assert cfg.eval.fid.enabled is None and cfg.eval.fid.extractor == "auto"
    from fastdiff import digits_fd

    with mock.patch.object(digits_fd, "default_path", lambda: digits_weights):
        training_loop(cfg)
    (run_dir,) = (tmp_path / "custom").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val/fid_milestone/fid" in r] == [3, 6]
    (final,) = [r for r in rows if "eval/final/fid" in r]
    assert final["eval/final/fid"] > 0 and final["eval/final/fid_lo"] < final["eval/final/fid_hi"]
    provenance = json.loads((run_dir / "summary.json").read_text())["fid_provenance"]
    assert provenance["extractor"] == "fastdiff-digits"


def test_auto_extractor_prefers_inception_weights_at_hand(tmp_path, monkeypatch):
    from fastdiff.fid import chosen_extractor, hub_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    fid = to_config(compose(tiny(tmp_path))).eval.fid
    assert fid.extractor == "auto"
    assert chosen_extractor(fid, "digits") == "digits"
    assert chosen_extractor(fid, "cifar10") == "inception"  # which auto then leaves off
    hub_weights_path().parent.mkdir(parents=True)
    hub_weights_path().write_bytes(b"weights")
    assert chosen_extractor(fid, "digits") == "inception"
    fid.extractor = "digits"  # an explicit choice is kept
    assert chosen_extractor(fid, "digits") == "digits"


def test_sampling_cost_counts_milestones_final_and_training():
    from fastdiff.fid import sampling_cost

    cfg = to_config(compose(["experiment=e9b", "data=digits", "train.total_steps=60"]))
    # no milestone in 60 steps; 10,000 final samples at NFE 50; 60 steps x batch 4 x 3
    assert sampling_cost(cfg) == (10_000 * 50, 60 * 4 * 3)
    cfg = to_config(compose(["experiment=quickstart"]))
    # milestones at 500, 1000, 1500, 2000 of 250 samples, 500 final, NFE 50; 2000 x 32 x 3
    assert sampling_cost(cfg) == ((4 * 250 + 500) * 50, 2000 * 32 * 3)
    from fastdiff.fid import too_costly

    assert too_costly(cfg, cuda=False) is None  # the quickstart keeps its FD on a CPU


def test_auto_mode_leaves_a_costly_fid_off_on_cpu_with_one_line(tmp_path, monkeypatch, caplog):
    """A card's 60-step smoke run on digits: its FID would sample 10,000 images at NFE 50,
    694x the training. Auto mode says so once and trains on; enabled=true still asks."""
    from fastdiff import digits_fd
    from fastdiff.data import make_batches
    from fastdiff.fid import build_evaluator

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    cfg = to_config(compose(["experiment=e9b", "data=digits", "train.total_steps=60"]))
    batches = make_batches(cfg.data, 4, 0, rank=0, world_size=1, device="cpu")
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        with mock.patch.object(digits_fd, "ensure_weights", side_effect=AssertionError):
            evaluator, why = build_evaluator(cfg, batches, "cpu", explicit=False)
    assert evaluator is None and "500,000 UNet evaluations" in why
    (line,) = [r.getMessage() for r in caplog.records if "FID off" in r.getMessage()]
    assert "500,000 UNet evaluations" in line and "694x" in line
    assert "eval.fid.enabled=true" in line
    # on a GPU, or asked for, it is computed
    from fastdiff.fid import too_costly

    assert too_costly(cfg, cuda=True) is None
    weights = tmp_path / "digits.pt"
    with mock.patch.object(digits_fd, "ensure_weights", return_value=weights):
        with mock.patch("fastdiff.fid.FIDEvaluator") as evaluator:
            made = build_evaluator(cfg, batches, "cpu", explicit=True)
            assert made == (evaluator.return_value, "")
    assert evaluator.call_args.kwargs["extractor"] == "digits"


def test_digits_fd_falls_over_a_shortened_quickstart(tmp_path):
    """The quickstart's recipe (its experiment, the digits extractor, DDPM sampling) cut
    to 100 steps at the tests' size, with a higher lr and a short EMA so that it learns
    within them: the milestone FD falls as it trains. Measured on the 2-core CPU, fp32:
    334, 256, 214, 152, 141 at steps 20-100 (15 s)."""
    drop = ("eval.fid", "train.total_steps", "train.batch_size", "sampling.grid_every")
    base = [a for a in tiny(tmp_path) if not a.startswith(drop)]
    overrides = [
        "experiment=quickstart",
        *base,
        "train.amp=false",  # the same numbers on CPUs with and without bf16
        "train.report=false",
        "train.total_steps=100",
        "train.batch_size=32",
        "optim.lr=2e-3",
        "train.ema_decay=0.9",
        "train.ckpt_every=1000",
        "sampling.grid_every=1000",
        "eval.fid.enabled=true",
        "eval.fid.bootstrap=0",
        "eval.milestone_every=20",
        "eval.milestone_samples=128",
        "eval.final_samples=128",
        "eval.sampler=ddpm",
        "eval.nfe=50",
    ]
    training_loop(to_config(compose(overrides)))
    (metrics,) = tmp_path.glob("*/*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    fd = [r["val/fid_milestone/fid"] for r in rows if "val/fid_milestone/fid" in r]
    assert len(fd) == 5
    assert fd[-1] < 0.6 * fd[0]  # measured 0.42
    assert sum(fd[3:]) / 2 < sum(fd[:2]) / 2  # the later milestones, not one lucky draw
