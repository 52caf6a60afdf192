"""`make gpu-check` and `device-run.sh`: everything a lent GPU should measure, as JSON.

    python -m benches.gpu_check [--out gpu-check.json] [--budget SECONDS] [--smoke]
                                [--parts a,b] [--merge]

Each part is a list of configurations (one training step at one batch and precision,
one kernel at one shape, ...). The JSON is rewritten after every configuration, so a
part cut short keeps every row it finished; a configuration that would start after
``--budget`` is recorded as skipped; one that fails is recorded with its error and the
rest still run. ``--merge`` keeps the other parts already in ``--out``, so the separate
processes of ``device-run.sh`` (one per part, each with its own time limit) fill one file.

1. ``gpu_tests``: the GPU-marked tests (pytest -m gpu), on the compiled kernels;
2. ``kernels``: the Triton kernel benches against eager PyTorch (medians), channels_last;
3. ``steps``: the training step at batch 4 and 128, AMP and fp32, eager and compiled,
   with ``model.kernels`` torch and triton: images/s and MFU (against the precision's
   own peak) over timed steps after the first (compilation reported on its own);
4. ``cuda_graphs``: the batch-4 step with CUDA graphs (``mode="reduce-overhead"``);
5. ``e9b``: a 200-step e9b on the embedded digits with FID at its milestones against a
   generated Inception weights file (the loading and scoring path is the real one; the
   values compare with nothing published);
6. ``fused``: the fused K-arm step (issue 18) at K = 1, 2, 4, 8 against sequential
   steps, with the fit check's memory estimate against that fused job's own peak;
7. ``fused_match``: the fused step's losses against standalone runs, with and without
   dropout;
8. ``fused_compiled``: the fused K=4 step with its vmapped forward compiled, against eager.

Every Trainer starts from a fresh compiler state (``torch._dynamo.reset()``): otherwise
the second batch size recompiles with a symbolic batch and is not the first's equal.

``--smoke`` runs every part at the tests' tiny shapes on whatever device is here, so
the script cannot rot between GPU sessions (tests/test_gpu_check.py runs it on CPU, and
tests/test_device_run.py runs ``device-run.sh --cpu-rehearsal`` on it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
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
Row = dict
Configs = list[tuple[str, Callable[[], Row]]]


@dataclass
class Context:
    smoke: bool
    work: Path
    deadline: float  # time.perf_counter() after which no configuration starts

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def machine() -> dict:
    import triton

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "driver": driver_version() if cuda else None,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda if cuda else None,
    }


def driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fresh_trainer_state() -> None:
    """Before each Trainer: accelerate refuses a second precision once its state is set,
    and a compiled graph of the last Trainer would make the next one's compile
    recompile with symbolic shapes (and keep the last one's memory)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------- gpu_tests
def run_pytest(args: list[str], timeout: float, env: dict | None = None) -> Row:
    """The outcome and summary line of a pytest run in a subprocess (its last lines too,
    when it failed: the one GPU session should bring back why)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
    try:
        full_env = {**os.environ, **(env or {})}
        out = subprocess.run(
            [*cmd, *args], capture_output=True, text=True, timeout=timeout, env=full_env
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout}
    lines = (out.stdout + out.stderr).strip().splitlines() or [""]
    row = {"status": "ok" if out.returncode in (0, 5) else "failed", "summary": lines[-1]}
    if row["status"] == "failed":
        row["tail"] = lines[-60:]
    return row


def gpu_tests(ctx: Context) -> Configs:
    return [("pytest", lambda: run_pytest(["-m", "gpu", "tests"], max(ctx.left(), 1)))]


# --------------------------------------------------------------------- kernels
def time_call(run: Callable[[], None], rounds: int) -> Row:
    """Median milliseconds of ``run`` (which synchronises) after one untimed call, which
    compiles the kernels."""
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(times) * 1e3, "rounds": rounds, "first_call_s": first}


def kernel_benches(ctx: Context) -> Configs:
    from benches.test_bench_kernels import cases

    rounds = 1 if ctx.smoke else 30
    return [(name, lambda m=make: time_call(m(), rounds)) for name, make in cases(ctx.smoke)]


# ----------------------------------------------------------------------- steps
def time_steps(overrides: list[str], steps: int, warmup: int) -> Row:
    """Seconds per training step of a Trainer built from ``overrides``, timed after
    ``warmup`` steps (the first compiles, and is reported on its own), with images/s and
    MFU against the peak of the step's own precision."""
    from fastdiff.config import compose, to_config
    from fastdiff.flops import peak_flops
    from fastdiff.trainer import Trainer

    fresh_trainer_state()
    trainer = Trainer(to_config(compose(overrides)))
    t0 = time.perf_counter()
    trainer.train_step(0).loss.item()
    first = time.perf_counter() - t0
    for s in range(1, warmup):
        trainer.train_step(s).loss.item()
    sync()
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        out = trainer.train_step(s)
    out.loss.item()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    batch = trainer.cfg.train.batch_size
    precision = trainer.acc.mixed_precision
    peak = peak_flops(trainer.device, precision)
    return {
        "seconds_per_step": seconds,
        "images_per_sec": batch / seconds,
        "first_step_s": first,
        "tflops": trainer.step_flops / seconds / 1e12,
        "mfu": trainer.step_flops / seconds / peak if peak else None,
        "peak_tflops": peak / 1e12 if peak else None,
        "precision": precision,
        "kernels": trainer.cfg.model.kernels,
        "compiled": bool(trainer.cfg.train.compile),
    }


TWO_KERNELS = ("torch", "triton")


def step_rows(smoke: bool) -> list[tuple[int, str, str, str]]:
    """(batch, precision, eager/compiled, kernels) in the order they are measured: what
    the cards run first (AMP), every eager row before the compiled ones (each compile
    costs a minute on a GPU: the budget cuts those last)."""
    if smoke:
        return [
            (2, "amp", "eager", "torch"),
            (2, "amp", "eager", "triton"),
            (2, "fp32", "eager", "torch"),
            (2, "amp", "compiled", "triton"),
        ]
    rows = [(b, p, "eager", k) for p in ("amp", "fp32") for b in (4, 128) for k in TWO_KERNELS]
    rows += [(b, "amp", "compiled", k) for b in (4, 128) for k in TWO_KERNELS]
    return rows + [(b, "fp32", "compiled", "torch") for b in (4, 128)]


def step_timings(ctx: Context) -> Configs:
    base = TINY if ctx.smoke else CARDS
    steps, warmup = (2, 1) if ctx.smoke else (20, 3)
    backend = "eager" if ctx.smoke else "inductor"
    out = []
    for batch, precision, mode, kernels in step_rows(ctx.smoke):
        key = f"b{batch}-{precision}-{mode}" + ("-triton" if kernels == "triton" else "")
        overrides = [
            *base,
            f"train.batch_size={batch}",
            f"train.amp={str(precision == 'amp').lower()}",
            f"train.compile={str(mode == 'compiled').lower()}",
            f"train.compile_backend={backend}",
            f"model.kernels={kernels}",
            f"train.runs_root={ctx.work / 'runs'}",
        ]
        out.append((key, lambda o=overrides: time_steps(o, steps, warmup)))
    return out


def cuda_graphs(ctx: Context) -> Configs:
    """The batch-4 step with model + loss under torch.compile's reduce-overhead mode
    (CUDA graphs)."""

    def run() -> Row:
        if not torch.cuda.is_available():
            return {"status": "skipped", "why": "CUDA graphs need a CUDA device"}
        from fastdiff.config import compose, to_config
        from fastdiff.trainer import Trainer

        overrides = [*(TINY if ctx.smoke else CARDS), "train.batch_size=4"]
        fresh_trainer_state()
        trainer = Trainer(to_config(compose([*overrides, f"train.runs_root={ctx.work}"])))
        trainer.loss = torch.compile(trainer.objective, mode="reduce-overhead")
        t0 = time.perf_counter()
        for s in range(3):
            trainer.train_step(s).loss.item()
        first = time.perf_counter() - t0
        n = 20
        t0 = time.perf_counter()
        for s in range(3, 3 + n):
            out = trainer.train_step(s)
        out.loss.item()
        sync()
        return {"seconds_per_step": (time.perf_counter() - t0) / n, "first_3_steps_s": first}

    return [("b4-amp", run)]


# ------------------------------------------------------------------------- e9b
def short_e9b(ctx: Context) -> Configs:
    """A 200-step e9b (8 in smoke mode) with milestone and final FID."""
    return [("run", lambda: _short_e9b(ctx.smoke, ctx.work))]


def _short_e9b(smoke: bool, work: Path) -> Row:
    from fastdiff.config import compose, to_config
    from fastdiff.fid import random_inception_weights
    from fastdiff.trainer import training_loop

    weights = random_inception_weights(work / "inception.pth", seed=0)
    steps = 8 if smoke else 200
    overrides = [
        "experiment=e9b",
        *(TINY if smoke else CARDS),
        f"train.total_steps={steps}",
        f"train.log_every={steps // 4}",
        f"train.ckpt_every={steps}",
        f"curvature.every={steps // 2}",
        f"curvature.probes={2 if smoke else 16}",
        "eval.fid.enabled=true",
        f"eval.fid.weights_path={weights}",
        f"eval.fid.cache_dir={work / 'fid-cache'}",
        f"eval.milestone_every={steps if smoke else steps // 2}",
        f"eval.milestone_samples={4 if smoke else 500}",
        f"eval.final_samples={4 if smoke else 1000}",
        f"eval.nfe={2 if smoke else 50}",
        f"eval.fid.reference_limit={8 if smoke else 5000}",
        f"sampling.grid_every={steps}",
        f"sampling.grid_images={4 if smoke else 64}",
        f"sampling.grid_nfe={2 if smoke else 20}",
        f"train.runs_root={work / 'runs'}",
    ]
    fresh_trainer_state()
    t0 = time.perf_counter()
    summary = training_loop(to_config(compose(overrides)))
    (metrics,) = (work / "runs" / "e9b").glob("*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    fid = {
        f"{key}@{r['step']}": r[key]
        for r in rows
        for key in ("val/fid_milestone/fid", "eval/final/fid")
        if key in r
    }
    keep = ("train/loss", "wall_time_s", "train_time_s")
    return (
        {"seconds": time.perf_counter() - t0, "fid": fid}
        | throughput(rows)
        | {"images_per_sec_whole_run": summary.get("images_per_sec")}
        | {k: summary[k] for k in keep if k in summary}
    )


def throughput(rows: list[dict]) -> Row:
    """A run's images/s from its log windows after the first: the first holds the
    step's compilation (train.compile is on by default on CUDA), reported on its own."""
    windows = [r["perf/images_per_sec"] for r in rows if "perf/images_per_sec" in r]
    return {
        "images_per_sec": statistics.mean(windows[1:]) if len(windows) > 1 else None,
        "images_per_sec_first_window": windows[0] if windows else None,
    }


# ----------------------------------------------------------------------- fused
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


def job_peak_gib(job: Callable[[], Row]) -> tuple[Row, float | None]:
    """``job()`` and the most CUDA memory it held at once beyond what was allocated when
    it started (None without CUDA): the job's own peak, not the process's."""
    if not torch.cuda.is_available():
        return job(), None
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    row = job()
    return row, (torch.cuda.max_memory_allocated() - before) / 2**30


def fused(ctx: Context) -> Configs:
    """The fused K-arm step (fastdiff.fused) at K = 1, 2, 4, 8 against K sequential
    steps of the same runs, batch 4, AMP; on CUDA also the fit check's memory estimate
    against the fused job's peak (its runs, optimizers, EMAs and step)."""
    ks = (1, 2) if ctx.smoke else (1, 2, 4, 8)
    return [(f"K{k}", lambda k=k: _fused_k(k, ctx.smoke, ctx.work)) for k in ks]


def _fused_k(k: int, smoke: bool, work: Path) -> Row:
    from benches.test_bench_fused import k_run_configs
    from fastdiff.fused import FusedRuns, run_bytes
    from fastdiff.trainer import Trainer

    steps = 2 if smoke else 10
    row: Row = {}
    fresh_trainer_state()
    cfgs = k_run_configs(k, "amp", work / f"fused{k}", smoke)
    if torch.cuda.is_available():
        state, fixed, per_sample = run_bytes(cfgs[0], torch.device("cuda"))
        batch = cfgs[0].train.batch_size
        row["estimate_gib"] = k * (state + fixed + per_sample * batch) / 2**30

    def fused_job() -> float:
        return per_step(FusedRuns(cfgs).step, steps)

    row["fused"], peak = job_peak_gib(fused_job)
    if peak is not None:
        row["fused_peak_gib"] = peak
    fresh_trainer_state()
    trainers = [Trainer(c) for c in k_run_configs(k, "amp", work / f"seq{k}", smoke)]
    row["sequential"] = per_step(lambda s: [t.train_step(s) for t in trainers], steps)
    return row | {"speedup": row["sequential"] / row["fused"]}


def fused_match(ctx: Context) -> Configs:
    """The fused step's per-step losses against the same runs trained alone, fp32, tiny
    preset, K=2, 20 steps (4 in smoke mode): without dropout (the batched kernels'
    rounding) and with it (each run's masks drawn as its standalone step draws them, on
    its device)."""
    return [(f"dropout{p}", lambda p=p: _fused_match(p, ctx.smoke, ctx.work)) for p in (0.0, 0.1)]


def _fused_match(p: float, smoke: bool, work: Path) -> Row:
    from benches.test_bench_fused import k_run_configs
    from fastdiff.fused import FusedRuns
    from fastdiff.trainer import Trainer

    steps = 4 if smoke else 20
    losses = {}
    for mode in ("fused", "alone"):
        fresh_trainer_state()
        cfgs = k_run_configs(2, "fp32", work / f"match{p}{mode}", smoke=True)
        for c in cfgs:  # (an lr at which the zero-initialised convs after dropout move)
            c.model.dropout, c.optim.lr = p, 1e-3
        if mode == "fused":
            runs = FusedRuns(cfgs)
            losses[mode] = [[o.loss.item() for o in runs.step(s)] for s in range(steps)]
        else:
            ts = [Trainer(c) for c in cfgs]
            losses[mode] = [[t.train_step(s).loss.item() for t in ts] for s in range(steps)]
    rel = [
        abs(a - b) / abs(b)
        for fa, al in zip(losses["fused"], losses["alone"])
        for a, b in zip(fa, al)
    ]
    return {"max_rel_diff": max(rel), "steps": steps}


def fused_compiled(ctx: Context) -> Configs:
    """The fused K=4 step with its vmapped forward compiled (train.compile=true), against
    the same step eager, AMP: the first step (compilation) and seconds per step after it.
    Smoke: K=2, Dynamo's capture alone (the eager backend: tests/test_fused.py checks
    the compiled step's values with aot_eager)."""
    k, steps = (2, 2) if ctx.smoke else (4, 10)
    done: dict[str, Row] = {}

    def run(mode: str) -> Row:
        from benches.test_bench_fused import k_run_configs
        from fastdiff.fused import FusedRuns

        fresh_trainer_state()
        cfgs = k_run_configs(k, "amp", ctx.work / f"fc{mode}", ctx.smoke)
        for c in cfgs:
            c.train.compile = mode == "compiled"
            c.train.compile_backend = "eager" if ctx.smoke else "inductor"
        runs = FusedRuns(cfgs)
        t0 = time.perf_counter()
        runs.step(0)[-1].loss.item()
        sync()
        row = {"k": k, "first_step_s": time.perf_counter() - t0}
        row["seconds_per_step"] = per_step(lambda s: runs.step(s + 1), steps)
        if mode == "compiled" and "seconds_per_step" in done.get("eager", {}):
            row["speedup"] = done["eager"]["seconds_per_step"] / row["seconds_per_step"]
        done[mode] = row
        return row

    return [(mode, lambda m=mode: run(m)) for mode in ("eager", "compiled")]


PARTS: dict[str, Callable[[Context], Configs]] = {
    "gpu_tests": gpu_tests,
    "kernels": kernel_benches,
    "steps": step_timings,
    "cuda_graphs": cuda_graphs,
    "e9b": short_e9b,
    "fused": fused,
    "fused_match": fused_match,
    "fused_compiled": fused_compiled,
}


# ------------------------------------------------------------------------ main
def write_json(path: Path, result: dict) -> None:
    """Whole or not at all: a process killed while writing leaves the last good file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)


def run_part(name: str, ctx: Context, result: dict, save: Callable[[], None]) -> None:
    """Every configuration of part ``name`` into ``result["parts"][name]``, saved after each."""
    part: dict = {"status": "running"}
    result["parts"][name] = part
    save()
    t0 = time.perf_counter()
    try:
        configs = PARTS[name](ctx)
    except Exception as err:
        traceback.print_exc()
        configs = []
        part["error"] = f"{type(err).__name__}: {err}"
    for key, config in configs:
        if ctx.left() <= 0:
            part[key] = {"status": "skipped", "why": "out of --budget"}
        else:
            part[key] = {"status": "running"}  # what was in flight, if the process is killed
            save()
            try:
                part[key] = config()
            except Exception as err:  # a configuration that breaks is reported, the rest run
                traceback.print_exc()
                tail = traceback.format_exc().strip().splitlines()[-12:]
                part[key] = {"status": "error", "error": f"{type(err).__name__}: {err}"}
                part[key]["traceback"] = tail
        part["part_seconds"] = time.perf_counter() - t0
        save()
        print(f"gpu-check: {name}/{key}: {json.dumps(part[key])[:400]}", flush=True)
    statuses = {row.get("status", "ok") for row in part.values() if isinstance(row, dict)}
    if "error" in part or statuses & {"error", "failed", "timeout"}:
        part["status"] = "error"
    elif "skipped" in statuses:
        part["status"] = "skipped" if statuses == {"skipped"} else "partial"
    else:
        part["status"] = "ok"
    save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-check.json", help="the JSON summary")
    parser.add_argument("--budget", type=float, default=290, help="seconds for the whole run")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"of {','.join(PARTS)}")
    parser.add_argument("--merge", action="store_true", help="keep the other parts in --out")
    args = parser.parse_args(argv)
    chosen = args.parts.split(",")
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        parser.error(f"unknown part {unknown[0]!r}: choose from {', '.join(PARTS)}")
    out, start = Path(args.out), time.perf_counter()
    result = {"parts": {}}
    if args.merge and out.is_file():
        result = json.loads(out.read_text())
    result |= {"machine": machine(), "smoke": args.smoke}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(args.smoke, Path(tmp), start + args.budget)
        for name in PARTS:
            if name in chosen:
                run_part(name, ctx, result, lambda: write_json(out, result))
    print(f"gpu-check: wrote {out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
