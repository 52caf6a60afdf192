"""FID (and KID) of EMA samples against the training set, through torch-fidelity.

- Samples come from :func:`generate`: large batches, converted to uint8 on the device
  and copied asynchronously into one preallocated pinned host buffer while the next
  batch is generated. Sample i always starts from the noise of its own generator,
  seeded by (seed, i): the set of samples depends on the seed and N only, never on the
  batch size, the number of processes or the training step, so milestone FIDs of two
  runs are measured on the same noise.
- The reference side is the run's training images (uint8, no flips). Its feature
  statistics are cached by torch-fidelity under a name keyed by everything the
  features depend on: the data's hash and count, the extractor and its layer, the
  resize path, a hash of the weights file and torch-fidelity's version. A precomputed
  statistics file (``.npz`` with ``mu`` and ``sigma``, as pytorch-fid, TTUR and
  clean-fid write them) can be used instead; its keys and feature dimension are
  checked when the run starts.
- :attr:`FIDEvaluator.provenance` says how the numbers were computed; runs record it in
  summary.json, and the report compares FIDs only between runs whose provenance agrees.
- The Inception weights are resolved from ``eval.fid.weights_path``, then the torch hub
  cache, then a download; a run that needs them and cannot have them fails at
  start-up with one line saying where to put the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fastdiff.diffusion import Schedule
from fastdiff.errors import FIDUnavailable
from fastdiff.sampling import sample, to_uint8
from fastdiff.seeding import stream_generator
from fastdiff.stats import bootstrap_fid, frechet_from_features, sqrt_psd

log = logging.getLogger("fastdiff")

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_NAME}"
EXTRACTOR = "inception-v3-compat"
FEATURE_LAYER = "2048"  # the pool3 features FID is defined on
FEATURE_DIM = 2048
# inception-v3-compat resizes inside the network with TF1's bilinear to 299x299
RESIZE = "tf1x-bilinear-299"


@dataclass(frozen=True)
class Extractor:
    name: str  # torch-fidelity's registry name
    layer: str
    dim: int
    resize: str


def extractor_spec(choice: str) -> Extractor:
    """``eval.fid.extractor``: "inception" (FID proper) or "digits" (fastdiff.digits_fd)."""
    if choice == "digits":
        from fastdiff import digits_fd

        digits_fd.register()
        return Extractor(digits_fd.NAME, digits_fd.LAYER, digits_fd.DIM, digits_fd.RESIZE)
    return Extractor(EXTRACTOR, FEATURE_LAYER, FEATURE_DIM, RESIZE)


_SHA256: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, once per (path, size, mtime) in this process."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def read_stats_file(
    path: str | Path, dim: int = FEATURE_DIM, extractor: str = EXTRACTOR
) -> dict[str, np.ndarray]:
    """A reference-statistics .npz (``mu`` (D,), ``sigma`` (D, D)), checked against the
    extractor's feature dimension. ValueError with one line naming the file otherwise."""
    try:
        with np.load(path) as npz:
            found = {k: npz[k] for k in npz.files}
    except Exception as err:
        raise ValueError(
            f"eval.fid.stats_path={path} cannot be read as .npz ({type(err).__name__})"
        ) from None
    if not {"mu", "sigma"} <= found.keys():
        raise ValueError(
            f"eval.fid.stats_path={path} has keys {sorted(found)}, not mu and sigma "
            "(the layout pytorch-fid, TTUR and clean-fid write)"
        )
    mu, sigma = found["mu"], found["sigma"]
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(
            f"eval.fid.stats_path={path} holds mu {mu.shape} and sigma {sigma.shape}, but "
            f"{extractor} features are {dim}-dimensional: use statistics of that layer"
        )
    return {"mu": mu, "sigma": sigma}


def random_inception_weights(path: Path, seed: int) -> Path:
    """A weights file saved from a freshly initialised torch-fidelity Inception module,
    for tests and GPU smoke runs where the real weights cannot be downloaded: the
    loading and scoring code is the real one, the numbers compare with nothing
    published. (Fresh weights give features near 1e-8.)"""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with (
        mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None),
    ):
        torch.manual_seed(seed)
        module = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(module.state_dict(), path)
    return Path(path)


def hub_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def chosen_extractor(fid_cfg, data_name: str) -> str:
    """``eval.fid.extractor``, with "auto" resolved: Inception whenever its weights are at
    hand (given, or in the torch hub cache), else the digits' own extractor for
    ``data=digits`` (never a download), else Inception (which auto mode then leaves off)."""
    if fid_cfg.extractor != "auto":
        return fid_cfg.extractor
    if fid_cfg.weights_path or hub_weights_path().is_file():
        return "inception"
    return "digits" if data_name == "digits" else "inception"


def sampling_cost(cfg) -> tuple[int, int]:
    """(UNet evaluations of the run's FID sampling, its training in the same units).

    FID sampling is (milestones x milestone_samples + final_samples) x NFE forward passes;
    a training step is about three (forward, and a backward of twice its cost) per image."""
    ev, train = cfg.eval, cfg.train
    milestones = train.total_steps // ev.milestone_every
    sampling = (milestones * ev.milestone_samples + ev.final_samples) * ev.nfe
    return sampling, 3 * train.total_steps * train.batch_size


def too_costly(cfg, cuda: bool) -> str | None:
    """Why auto mode leaves FID off on a CPU: its sampling would cost more than the
    training itself (a 60-step smoke run of a card would otherwise sample 10,000 images
    at NFE 50, hours here). None: affordable, or on a GPU."""
    sampling, training = sampling_cost(cfg)
    if cuda or sampling <= training:
        return None
    ev = cfg.eval
    return (
        f"its sampling ({sampling:,} UNet evaluations: "
        f"{cfg.train.total_steps // ev.milestone_every} milestones x {ev.milestone_samples:,}"
        f" + {ev.final_samples:,} final, x NFE {ev.nfe}) would be {sampling / training:.0f}x "
        f"this run's training on a CPU; eval.fid.enabled=true computes it anyway, or lower "
        "eval.milestone_samples / eval.final_samples"
    )


WEIGHTS_OPTION = "eval.fid.weights_path"


def resolve_weights(
    weights_path: str | None, download: bool = True, option: str = WEIGHTS_OPTION
) -> Path:
    """eval.fid.weights_path, else the torch hub cache, else a download into that cache.

    ``option``: how the caller's user gives the path (a command's own flag), named in
    the errors so that the fix they suggest is one the user can type."""
    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise FIDUnavailable(
                f"{option}={weights_path} does not exist: point it "
                f"at {WEIGHTS_NAME} (from {WEIGHTS_URL})"
            )
        return path
    hub = hub_weights_path()
    if hub.is_file():
        return hub
    if download:
        try:
            hub.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(WEIGHTS_URL, str(hub), progress=False)
            return hub
        except Exception:  # no network: say where the file goes
            if hub.exists():
                hub.unlink()
    off = " (or turn FID off with eval.fid.enabled=false)" if option == WEIGHTS_OPTION else ""
    raise FIDUnavailable(
        f"FID needs the Inception weights {WEIGHTS_NAME}, which could not be "
        f"downloaded: put the file at {hub} or pass {option}=FILE{off}"
    )


class UInt8Images(Dataset):
    """Map-style view of a uint8 (N, 3, H, W) tensor, as torch-fidelity wants it."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}"
            )
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def sample_generators(seed: int, indices: range, device) -> list[torch.Generator]:
    """One generator per sample, seeded by (seed, sample index) only."""
    gen_device = device if torch.device(device).type == "cuda" else "cpu"
    return [stream_generator(seed, "fid-sample", i, device=gen_device) for i in indices]


def shard_of(n: int, rank: int, world_size: int) -> range:
    """Contiguous share of sample indices [0, n) for one rank."""
    per = -(-n // world_size)
    return range(min(rank * per, n), min((rank + 1) * per, n))


@torch.no_grad()
def spacing_record(spacing: str) -> dict:
    """The spacing as FID provenance records it: only when it is not the default, so the
    records of runs from before the choice existed (all linspace) compare equal."""
    return {} if spacing == "linspace" else {"spacing": spacing}


def generate(
    model,
    schedule: Schedule,
    indices: range,
    image_shape,
    *,
    sampler: str,
    nfe: int,
    seed: int,
    batch_size: int,
    ddpm_variance: str = "posterior",
    prediction: str = "eps",
    spacing: str = "linspace",
    progress: bool = False,
) -> torch.Tensor:
    """Samples ``indices`` as uint8 (len(indices), C, H, W) in a (pinned) host buffer, each
    from its own generator (:func:`sample_generators`) through :func:`fastdiff.sampling.sample`
    (``prediction``: the model's ``loss.prediction``; ``spacing``: ``sampling.spacing``)."""
    # The buffer is uninitialised memory until a batch lands in it: a batch size that
    # fills none of it (range(0, n, -5) is empty) must not hand it back as samples.
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    pinned = device.type == "cuda"
    out = torch.empty((len(indices), *image_shape), dtype=torch.uint8, pin_memory=pinned)
    from tqdm.auto import tqdm

    for start in tqdm(
        range(0, len(indices), batch_size),
        desc=f"{sampler} samples",
        disable=not progress,
        leave=False,
    ):
        idx = indices[start : start + batch_size]
        gens = sample_generators(seed, idx, device)
        x = sample(
            sampler,
            model,
            (len(idx), *image_shape),
            schedule,
            nfe=nfe,
            generator=gens,
            ddpm_variance=ddpm_variance,
            prediction=prediction,
            spacing=spacing,
        )
        # Device-side uint8, then an async copy: the next batch starts while this one lands.
        out[start : start + len(idx)].copy_(to_uint8(x), non_blocking=pinned)
    if pinned:
        torch.cuda.synchronize(device)
    return out


def data_hash(images: torch.Tensor | None = None, manifest: dict | None = None) -> str:
    if manifest is not None:
        return manifest["sha256"][:16]
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]


class FIDEvaluator:
    """FID + KID of uint8 samples against a fixed reference set (or statistics file)."""

    def __init__(
        self,
        reference: torch.Tensor,
        ref_name: str,
        weights: Path,
        stats_path: str | None = None,
        *,
        cache_dir: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        extractor: str = "inception",
    ):
        import torch_fidelity

        self.spec = spec = extractor_spec(extractor)
        self.reference = UInt8Images(reference)
        self.weights, self.stats_path = weights, stats_path
        if stats_path is not None:
            self.ref_stats = read_stats_file(stats_path, spec.dim, spec.name)
            ref = {"stats_file": str(stats_path), "stats_sha256": file_sha256(stats_path)}
        else:
            ref = {"data_sha256": ref_name, "count": len(reference)}
        self.provenance = {
            "extractor": spec.name,
            "layer": spec.layer,
            "resize": spec.resize,
            "weights_sha256": file_sha256(weights),
            "torch_fidelity": torch_fidelity.__version__,
            "reference": ref,
        }
        # Keyed by everything the reference features depend on: new weights, extractor,
        # resize path or torch-fidelity version each compute (and cache) anew.
        key = hashlib.sha256(json.dumps(self.provenance, sort_keys=True).encode()).hexdigest()
        self.cache_name = f"fastdiff-{ref_name}-n{len(reference)}-{key[:16]}"
        self.cache_dir = cache_dir or os.path.join(Path.home(), ".cache", "fastdiff", "fid")
        self.cuda = torch.device(device).type == "cuda"
        self.batch_size = batch_size
        self._feature_extractor = None
        self._sqrt_ref: np.ndarray | None = None

    def _extractor(self):
        if self._feature_extractor is None:
            from torch_fidelity.utils import create_feature_extractor

            self._feature_extractor = create_feature_extractor(
                self.spec.name,
                [self.spec.layer],
                cuda=self.cuda,
                feature_extractor_weights_path=str(self.weights),
                verbose=False,
            )
        return self._feature_extractor

    def _kwargs(self) -> dict:
        return dict(
            cuda=self.cuda,
            batch_size=self.batch_size,
            verbose=False,
            save_cpu_ram=True,
            cache_root=self.cache_dir,
        )

    def features(self, samples: torch.Tensor) -> torch.Tensor:
        """Features (N, D) of uint8 (N, 3, H, W) images, through torch-fidelity."""
        from torch_fidelity.utils import extract_featuresdict_from_input_id

        out = extract_featuresdict_from_input_id(
            1, self._extractor(), input1=UInt8Images(samples), **self._kwargs()
        )
        return out[self.spec.layer]

    def _reference(self) -> tuple[torch.Tensor | None, dict[str, np.ndarray]]:
        """The reference features (None with a statistics file) and statistics, computed
        once and cached under :attr:`cache_name`."""
        if self.stats_path is not None:
            return None, self.ref_stats
        from torch_fidelity.metric_fid import fid_featuresdict_to_statistics_cached
        from torch_fidelity.utils import extract_featuresdict_from_input_id_cached

        kwargs = dict(input2=self.reference, input2_cache_name=self.cache_name, **self._kwargs())
        feats = extract_featuresdict_from_input_id_cached(2, self._extractor(), **kwargs)
        stats = fid_featuresdict_to_statistics_cached(
            feats, self.cache_name, self._extractor(), self.spec.layer, **kwargs
        )
        return feats[self.spec.layer], stats

    def _root(self, sigma_ref: np.ndarray) -> np.ndarray:
        """√Σ_ref, once per evaluator (the reference does not change between calls)."""
        if self._sqrt_ref is None:
            self._sqrt_ref = sqrt_psd(sigma_ref)
        return self._sqrt_ref

    def __call__(
        self, samples: torch.Tensor, bootstrap: int = 0, prc: bool = False, seed: int = 0
    ) -> dict[str, float]:
        """FID (torch-fidelity's), KID mean and std, and on request a bootstrap interval
        of the FID over the samples (``fid_lo``, ``fid_hi``, ``fid_se``) and precision /
        recall: all from one extraction of the samples' features."""
        from torch_fidelity.metric_kid import kid_features_to_metric
        from torch_fidelity.metric_prc import prc_features_to_metric

        feats = self.features(samples)
        ref_feats, ref_stats = self._reference()
        # The Fréchet distance from eigendecompositions of symmetric matrices (fastdiff.
        # stats) rather than scipy's sqrtm of the non-symmetric Σ Σ_ref: the same value
        # (tested against sqrtm), and much faster at D=2048 on a CPU
        # (docs/performance.md#measurements-behind-choices-in-the-code).
        mu_ref, sigma_ref = (np.asarray(ref_stats[k], np.float64) for k in ("mu", "sigma"))
        root, tr_ref = self._root(sigma_ref), float(np.trace(sigma_ref))
        out = {"fid": frechet_from_features(feats.double().numpy(), mu_ref, root, tr_ref)}
        if ref_feats is not None:
            kid = kid_features_to_metric(
                feats,
                ref_feats,
                kid_subsets=100,
                kid_subset_size=min(1000, len(feats), len(ref_feats)),
                rng_seed=seed,
                verbose=False,
            )
            out["kid_mean"] = kid["kernel_inception_distance_mean"]
            out["kid_std"] = kid["kernel_inception_distance_std"]
            if prc:
                pr = prc_features_to_metric(
                    feats,
                    ref_feats,
                    prc_neighborhood=3,
                    prc_batch_size=10000,
                    save_cpu_ram=True,
                    verbose=False,
                )
                out["precision"] = pr["precision"]
                out["recall"] = pr["recall"]
        if bootstrap:
            boot = bootstrap_fid(
                feats.double().numpy(), mu_ref, sigma_ref, bootstrap, seed=seed, root=root
            )
            out |= {f"fid_{k}": boot[k] for k in ("lo", "hi", "se", "debiased")}
        return out


def build_evaluator(cfg, batches, device, explicit: bool) -> tuple[FIDEvaluator | None, str]:
    """The run's evaluator and "", or None and why FID is off (said once in the log, and
    recorded by the run for its report). Raises FIDUnavailable at start-up when FID was
    asked for explicitly and the weights cannot be had."""
    from fastdiff.data import DeviceBatches, ShardImages, is_sharded

    fid_cfg = cfg.eval.fid
    extractor = chosen_extractor(fid_cfg, cfg.data.name)
    why = None
    if extractor == "inception":  # first: a missing weights file is the thing to fix
        try:
            weights = resolve_weights(fid_cfg.weights_path, download=explicit)
        except FIDUnavailable as err:
            if explicit:
                raise
            why = str(err)
    if why is None and not explicit:
        why = too_costly(cfg, torch.device(device).type == "cuda")
    if why:
        log.warning("FID off: %s", why)
        return None, why
    if extractor == "digits":  # (trains the extractor once per machine: seconds)
        from fastdiff import digits_fd

        weights = digits_fd.ensure_weights()
    if is_sharded(cfg.data.path):
        view = ShardImages(cfg.data.path)
        images, name = view.images, data_hash(manifest=view.manifest)
    elif isinstance(batches, DeviceBatches):
        images = batches.images.cpu()
        name = data_hash(images)
    else:  # pragma: no cover - every source is one of the two
        raise TypeError(type(batches))
    if fid_cfg.reference_limit:
        images = images[: fid_cfg.reference_limit]
    log.info(
        "FID: %s (%s weights), reference %s (%d images)%s",
        extractor,
        weights,
        name,
        len(images),
        f", statistics {fid_cfg.stats_path}" if fid_cfg.stats_path else "",
    )
    evaluator = FIDEvaluator(
        images,
        name,
        weights,
        fid_cfg.stats_path,
        cache_dir=fid_cfg.cache_dir,
        device=device,
        extractor=extractor,
    )
    return evaluator, ""
