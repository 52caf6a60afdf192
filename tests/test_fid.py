"""FID: against an independent Fréchet computation, the real weight-loading path, the
sampler's batch- and process-invariant noise, and the training-loop integration."""

import json
import logging
import warnings
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch

from fastdiff.config import compose, to_config
from fastdiff.diffusion import Schedule
from fastdiff.fid import (
    FIDEvaluator,
    FIDUnavailable,
    generate,
    resolve_weights,
    sample_generators,
    shard_of,
)
from fastdiff.sampling import to_uint8
from fastdiff.trainer import training_loop
from tests.conftest import tiny


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A weights file saved from a freshly initialised torch-fidelity Inception module
    (the real weights cannot be downloaded here); the loading code is the real one."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with (
        mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None),
    ):
        torch.manual_seed(0)
        module = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(module.state_dict(), path)
    return path


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
    """Independent reference: ‖μ1−μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) with scipy's sqrtm."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    with warnings.catch_warnings():  # few samples: singular covariances, as in the code under test
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


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
    one = generate(model, sched, range(7), (3, 4, 4), sampler, nfe, seed=3, batch_size=7)
    small = generate(model, sched, range(7), (3, 4, 4), sampler, nfe, seed=3, batch_size=2)
    ranks = torch.cat(
        [
            generate(model, sched, shard_of(7, r, 2), (3, 4, 4), sampler, nfe, seed=3, batch_size=3)
            for r in range(2)
        ]
    )
    assert one.dtype == torch.uint8 and one.shape == (7, 3, 4, 4)
    assert torch.equal(one, small) and torch.equal(one, ranks)
    other = generate(model, sched, range(7), (3, 4, 4), sampler, nfe, seed=4, batch_size=7)
    assert not torch.equal(one, other)


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
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "grid_0000003.png",
        "grid_0000006.png",
    ]

    from fastdiff.fid import main as eval_main

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
    assert main([*tiny(tmp_path / "runs"), "eval.fid.enabled=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "eval.fid.weights_path" in err
    assert not (tmp_path / "runs").exists()


def test_auto_mode_without_weights_trains_and_says_fid_is_off(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    overrides = [o for o in tiny(tmp_path) if not o.startswith("eval.fid")]
    cfg = to_config(compose(overrides))
    assert cfg.eval.fid.enabled is None
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        # auto mode never downloads: it only looks at the path and the hub cache
        with mock.patch.object(torch.hub, "download_url_to_file", side_effect=AssertionError):
            summary = training_loop(cfg)
    assert summary["step"] == 6
    assert sum("FID off" in r.message for r in caplog.records) == 1
