"""`make gpu-check`: everything a lent GPU should measure, in one short run, as JSON.

    python -m benches.gpu_check [--out gpu-check.json] [--budget SECONDS] [--smoke]

Parts, in order (each with its own time limit; the JSON is rewritten after each, so a
run cut short keeps what it measured):

1. ``gpu_tests``: the GPU-marked tests (pytest -m gpu);
2. ``kernels``: the Triton kernel benches against eager PyTorch (medians);
3. ``steps``: the training step, eager and compiled, at batch 4 and 128, fp32 and AMP,
   with images/s and MFU; and the batch-4 step with CUDA graphs
   (``torch.compile(mode="reduce-overhead")``);
4. ``e9b``: a 200-step e9b on the embedded digits with FID at its milestones against a
   generated Inception weights file (the loading and scoring path is the real one; the
   values compare with nothing published);
5. ``fused``: the fused K-arm step (issue 18) at K = 1, 2, 4, 8 against sequential
   steps, with the fit check's memory estimate against the fused peak;
6. ``fused_match``: the fused step's losses against standalone runs, with and without
   dropout;
7. ``fused_compiled``: the fused K=4 step with its vmapped forward compiled, against
   eager (last: its compilation may take what is left of the budget).

``--smoke`` runs every part at the tests' tiny shapes on whatever device is here, so
the script cannot rot between GPU sessions (tests/test_gpu_check.py runs it on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TINY = [
    "model=unet_tiny",
    "model.base_channels=16",
    "data=digits",
    "data.image_size=8",
    "train.progress=false",
]
CARDS = ["model=unet_cifar32", "data=digits", "data.image_size=32", "train.progress=false"]


def machine() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
    }


def run_pytest(args: list[str], timeout: float, env: dict | None = None) -> dict:
    """The outcome and summary line of a pytest run in a subprocess."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *args]
    try:
        full_env = {**os.environ, **(env or {})}
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout}
    tail = (out.stdout + out.stderr).strip().splitlines()[-1:] or [""]
    return {"status": "ok" if out.returncode in (0, 5) else "failed", "summary": tail[0]}


def kernel_benches(smoke: bool, timeout: float, work: Path) -> dict:
    report = work / "kernels.json"
    if smoke:  # once, untimed, on the interpreter
        args = ["benches/test_bench_kernels.py", "--benchmark-disable"]
        env = {"FASTDIFF_BENCH_SMOKE": "1", "TRITON_INTERPRET": "1"}
    else:
        args = ["benches/test_bench_kernels.py", "--benchmark-only", f"--benchmark-json={report}"]
        env = {}
    result = run_pytest(args, timeout, env)
    if report.is_file():
        data = json.loads(report.read_text())
        result["medians_ms"] = {
            b["name"]: b["stats"]["median"] * 1e3 for b in data.get("benchmarks", [])
        }
    return result


def time_steps(overrides: list[str], steps: int, warmup: int) -> dict:
    """Seconds per training step of a Trainer built from ``overrides`` (after warm-up,
    which covers compilation), with images/s and MFU where the peak is known."""
    from fastdiff.config import compose, to_config
    from fastdiff.trainer import Trainer

    fresh_trainer_state()
    trainer = Trainer(to_config(compose(overrides)))
    for s in range(warmup):
        trainer.train_step(s).loss.item()
    sync()
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        out = trainer.train_step(s)
    out.loss.item()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    batch = trainer.cfg.train.batch_size
    peak = trainer.peak_flops
    return {
        "seconds_per_step": seconds,
        "images_per_sec": batch / seconds,
        "tflops": trainer.step_flops / seconds / 1e12,
        "mfu": trainer.step_flops / seconds / peak if peak else None,
        "precision": trainer.acc.mixed_precision,
    }


def fresh_trainer_state() -> None:
    """One process builds several Trainers with different precisions here, which
    accelerate refuses once its state is set."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_timings(smoke: bool, work: Path) -> dict:
    base = TINY if smoke else CARDS
    batches = [2] if smoke else [4, 128]
    steps, warmup = (2, 1) if smoke else (20, 3)
    backend = "aot_eager" if smoke else "inductor"
    out = {}
    for batch in batches:
        for amp in ("false", "true"):
            for compiled in ("false",) if smoke else ("false", "true"):
                key = f"b{batch}-{'amp' if amp == 'true' else 'fp32'}-" + (
                    "compiled" if compiled == "true" else "eager"
                )
                out[key] = time_steps(
                    [
                        *base,
                        f"train.batch_size={batch}",
                        f"train.amp={amp}",
                        f"train.compile={compiled}",
                        f"train.compile_backend={backend}",
                        f"train.runs_root={work / 'runs'}",
                    ],
                    steps,
                    warmup,
                )
    return out


def cuda_graphs(smoke: bool, work: Path) -> dict:
    """The batch-4 step with model + loss under torch.compile's reduce-overhead mode
    (CUDA graphs), against the same step compiled without graphs."""
    if not torch.cuda.is_available():
        return {"status": "skipped", "why": "CUDA graphs need a CUDA device"}
    from fastdiff.config import compose, to_config
    from fastdiff.trainer import Trainer

    overrides = [*(TINY if smoke else CARDS), "train.batch_size=4", f"train.runs_root={work}"]
    fresh_trainer_state()
    trainer = Trainer(to_config(compose(overrides)))
    trainer.loss = torch.compile(trainer.objective, mode="reduce-overhead")
    for s in range(3):
        trainer.train_step(s).loss.item()
    sync()
    t0 = time.perf_counter()
    n = 20
    for s in range(3, 3 + n):
        out = trainer.train_step(s)
    out.loss.item()
    sync()
    return {"status": "ok", "seconds_per_step": (time.perf_counter() - t0) / n}


def short_e9b(smoke: bool, work: Path) -> dict:
    """A 200-step e9b (20 in smoke mode) with milestone and final FID."""
    from fastdiff.config import compose, to_config
    from fastdiff.fid import random_inception_weights
    from fastdiff.trainer import training_loop

    weights = random_inception_weights(work / "inception.pth", seed=0)
    steps = 20 if smoke else 200
    overrides = [
        "experiment=e9b",
        *(TINY if smoke else CARDS),
        f"train.total_steps={steps}",
        f"train.log_every={steps // 4}",
        f"train.ckpt_every={steps}",
        f"curvature.every={steps // 2}",
        "eval.fid.enabled=true",
        f"eval.fid.weights_path={weights}",
        f"eval.fid.cache_dir={work / 'fid-cache'}",
        f"eval.milestone_every={steps // 2}",
        f"eval.milestone_samples={8 if smoke else 500}",
        f"eval.final_samples={8 if smoke else 1000}",
        f"eval.nfe={2 if smoke else 50}",
        f"eval.fid.reference_limit={16 if smoke else 5000}",
        f"sampling.grid_every={steps}",
        f"sampling.grid_images={4 if smoke else 64}",
        f"train.runs_root={work / 'runs'}",
    ]
    fresh_trainer_state()
    t0 = time.perf_counter()
    summary = training_loop(to_config(compose(overrides)))
    keep = ("train/loss", "images_per_sec", "wall_time_s", "train_time_s")
    (metrics,) = (work / "runs" / "e9b").glob("*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    fid = {
        f"{key}@{r['step']}": r[key]
        for r in rows
        for key in ("val/fid_milestone/fid", "eval/final/fid")
        if key in r
    }
    return {"status": "ok", "seconds": time.perf_counter() - t0, "fid": fid} | {
        k: summary[k] for k in keep if k in summary
    }


def per_step(step, steps: int) -> float:
    """Seconds per call of ``step(s)`` after one warm-up call."""
    step(0)[-1].loss.item()
    sync()
    t0 = time.perf_counter()
    for s in range(1, 1 + steps):
        outs = step(s)
    outs[-1].loss.item()
    sync()
    return (time.perf_counter() - t0) / steps


def fused(smoke: bool, work: Path) -> dict:
    """The fused K-arm step (fastdiff.fused) at K = 1, 2, 4, 8 against K sequential
    steps of the same runs, batch 4, AMP; on CUDA also the fit check's memory estimate
    against the fused step's peak."""
    from benches.test_bench_fused import k_run_configs
    from fastdiff.fused import FusedRuns, run_bytes
    from fastdiff.trainer import Trainer

    out = {}
    steps = 2 if smoke else 10
    cuda = torch.cuda.is_available()
    for k in (1, 2) if smoke else (1, 2, 4, 8):
        fresh_trainer_state()
        cfgs = k_run_configs(k, "amp", work / f"fused{k}", smoke)
        runs = FusedRuns(cfgs)
        row = {}
        if cuda:
            state, fixed, per_sample = run_bytes(cfgs[0], runs.trainers[0].device)
            batch = cfgs[0].train.batch_size
            row["estimate_gib"] = k * (state + fixed + per_sample * batch) / 2**30
            torch.cuda.reset_peak_memory_stats()
        row["fused"] = per_step(runs.step, steps)
        if cuda:
            row["fused_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del runs
        fresh_trainer_state()
        trainers = [Trainer(c) for c in k_run_configs(k, "amp", work / f"seq{k}", smoke)]
        row["sequential"] = per_step(lambda s, ts=trainers: [t.train_step(s) for t in ts], steps)
        out[f"K{k}"] = row | {"speedup": row["sequential"] / row["fused"]}
    return {"status": "ok", **out}


def fused_match(smoke: bool, work: Path) -> dict:
    """The fused step's per-step losses against the same runs trained alone, fp32, tiny
    preset, K=2, 20 steps: without dropout (the batched kernels' rounding) and with it
    (on CUDA the fused masks come from the CPU dropout stream and a standalone run's
    from F.dropout's Philox, so there they differ by design; on CPU they are equal)."""
    from benches.test_bench_fused import k_run_configs
    from fastdiff.fused import FusedRuns
    from fastdiff.trainer import Trainer

    out = {}
    for p in (0.0, 0.1):
        losses = {}
        for mode in ("fused", "alone"):
            fresh_trainer_state()
            cfgs = k_run_configs(2, "fp32", work / f"match{p}{mode}", smoke=True)
            for c in cfgs:  # (an lr at which the zero-initialised convs after dropout move)
                c.model.dropout, c.optim.lr = p, 1e-3
            if mode == "fused":
                runs = FusedRuns(cfgs)
                losses[mode] = [[o.loss.item() for o in runs.step(s)] for s in range(20)]
            else:
                ts = [Trainer(c) for c in cfgs]
                losses[mode] = [[t.train_step(s).loss.item() for t in ts] for s in range(20)]
        rel = [
            abs(a - b) / abs(b)
            for fa, al in zip(losses["fused"], losses["alone"])
            for a, b in zip(fa, al)
        ]
        out[f"dropout{p}"] = {"max_rel_diff": max(rel)}
    return {"status": "ok", **out}


def fused_compiled(smoke: bool, work: Path) -> dict:
    """The fused K=4 step with its vmapped forward compiled (train.compile=true), against
    the same step eager, AMP: the compile time and seconds per step. Smoke: K=2, the
    aot_eager backend (the tracing path, without inductor's code generation)."""
    from benches.test_bench_fused import k_run_configs
    from fastdiff.fused import FusedRuns

    k, steps = (2, 2) if smoke else (4, 10)
    row = {}
    for mode in ("eager", "compiled"):
        fresh_trainer_state()
        cfgs = k_run_configs(k, "amp", work / f"fc{mode}", smoke)
        for c in cfgs:
            c.train.compile = mode == "compiled"
            c.train.compile_backend = "aot_eager" if smoke else "inductor"
        runs = FusedRuns(cfgs)
        t0 = time.perf_counter()
        runs.step(0)[-1].loss.item()
        sync()
        row[f"{mode}_first_step_s"] = time.perf_counter() - t0
        row[mode] = per_step(lambda s, r=runs: r.step(s + 1), steps)
    return {"status": "ok", "k": k, **row, "speedup": row["eager"] / row["compiled"]}


PARTS = (
    "gpu_tests",
    "kernels",
    "steps",
    "cuda_graphs",
    "e9b",
    "fused",
    "fused_match",
    "fused_compiled",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-check.json", help="the JSON summary")
    parser.add_argument("--budget", type=float, default=290, help="seconds for the whole run")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"of {','.join(PARTS)}")
    args = parser.parse_args(argv)
    chosen = args.parts.split(",")
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        parser.error(f"unknown part {unknown[0]!r}: choose from {', '.join(PARTS)}")
    out, start = Path(args.out), time.perf_counter()
    result = {"machine": machine(), "smoke": args.smoke, "parts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        parts = [
            ("gpu_tests", lambda left: run_pytest(["-m", "gpu", "tests"], left)),
            ("kernels", lambda left: kernel_benches(args.smoke, left, work)),
            ("steps", lambda left: step_timings(args.smoke, work)),
            ("cuda_graphs", lambda left: cuda_graphs(args.smoke, work)),
            ("e9b", lambda left: short_e9b(args.smoke, work)),
            ("fused", lambda left: fused(args.smoke, work)),
            ("fused_match", lambda left: fused_match(args.smoke, work)),
            ("fused_compiled", lambda left: fused_compiled(args.smoke, work)),
        ]
        for name, part in parts:
            if name not in chosen:
                continue
            left = args.budget - (time.perf_counter() - start)
            if left <= 0:
                result["parts"][name] = {"status": "skipped", "why": "out of --budget"}
                continue
            t0 = time.perf_counter()
            try:
                result["parts"][name] = part(left)
            except Exception as err:  # a part that breaks is reported, the rest still run
                result["parts"][name] = {"status": "error", "error": f"{type(err).__name__}: {err}"}
            result["parts"][name]["part_seconds"] = time.perf_counter() - t0
            result["seconds"] = time.perf_counter() - start
            out.write_text(json.dumps(result, indent=1) + "\n")
            print(f"gpu-check: {name}: {result['parts'][name].get('status', 'ok')}", flush=True)
    print(f"gpu-check: wrote {out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
