"""Turn one pytest-benchmark JSON into ratios against peers measured in the same run.

python -m benches.ratios .benchmarks/latest.json [--out benches/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

from fastdiff.stats import t_interval


def load(path: Path) -> tuple[dict[str, dict], dict]:
    data = json.loads(path.read_text())
    return {b["name"]: b for b in data["benchmarks"]}, data.get("machine_info", {})


def median(b: dict) -> float:
    return b["stats"]["median"]


def paired_ratio(ours, theirs, level: float = 0.95) -> tuple[float, float | None, float | None]:
    """theirs / ours from steps timed in the same rounds: the geometric mean of the
    per-round ratios and its Student-t interval over rounds (on the log scale, where a
    drift that slows both sides of a round cancels). No interval from one round."""
    logs = np.log(np.asarray(theirs, float) / np.asarray(ours, float))
    if len(logs) < 2:
        return float(np.exp(logs.mean())), None, None
    mean, lo, hi, _ = t_interval(logs, level)
    return float(np.exp(mean)), float(np.exp(lo)), float(np.exp(hi))


def ratio_text(r: list) -> str:
    est, lo, hi = r
    return f"{est:.2f}×" + ("" if lo is None else f" [{lo:.2f}, {hi:.2f}]")


def precision_label(precision: str, bench: dict) -> str:
    """ "AMP (bf16)" / "fp32": what the run's ``train.amp`` resolved to on its device."""
    if precision == "fp32":
        return "fp32"
    resolved = bench["extra_info"].get("precision", "?")
    return f"AMP ({'fp32' if resolved == 'no' else resolved})"


def ratio_rows(benches: dict[str, dict]) -> list[tuple[str, str, str]]:
    rows = []

    def get(name):
        return benches.get(name)

    def add(what: str, ratio: str, absolute: str = "") -> None:
        rows.append((what, ratio, absolute))

    peers = {
        "diffusers": "diffusers (as its users run it)",
        "diffusers-reuse": "diffusers with fastdiff's allocator setting",
    }
    for batch in (4, 128, 2):
        for precision in ("amp", "fp32"):
            bench = get(f"test_train_step[{precision}-{batch}]")
            if not bench:
                continue
            info = bench["extra_info"]
            ours = info["median_s"]["fastdiff"]
            setting = f"batch {batch}, {precision_label(precision, bench)}"
            rounds = len(info["step_s"]["fastdiff"])
            for kind, how in peers.items():
                if kind in info["vs_fastdiff"]:
                    add(
                        f"train step, {setting}: {how} / fastdiff eager ({rounds} rounds)",
                        ratio_text(info["vs_fastdiff"][kind]),
                        f"{ours * 1e3:.0f} ms vs {info['median_s'][kind] * 1e3:.0f} ms",
                    )
            if info.get("flops"):
                achieved = info["flops"] / ours
                peak = info.get("peak_flops")
                add(
                    f"train step, {setting}: model FLOP/s (fastdiff eager)",
                    f"MFU {achieved / peak:.1%}" if peak else "no peak known: no MFU",
                    f"{achieved / 1e9:,.0f} GFLOP/s of {info['flops'] / 1e9:.1f} GFLOP per step",
                )
            if "fastdiff-compiled" in info["vs_fastdiff"]:
                est, lo, hi = info["vs_fastdiff"]["fastdiff-compiled"]
                add(
                    f"train step, {setting}: eager / compiled",
                    ratio_text([1 / est] + ([None, None] if lo is None else [1 / hi, 1 / lo])),
                    f"{info['median_s']['fastdiff-compiled'] * 1e3:.0f} ms compiled",
                )
    for sampler, nfe in (("ddpm", 50), ("ddim", 20), ("ddpm", 3), ("ddim", 3)):
        s = get(f"test_sampler[{sampler}-{nfe}]")
        if s:
            info = s["extra_info"]
            est = info["overhead"][0]
            add(
                f"{sampler} NFE {info['nfe']}: sampler / bare forward "
                f"({len(info['step_s']['sampler'])} rounds)",
                f"{ratio_text(info['overhead'])} (overhead {est - 1:+.1%})",
                f"{info['median_s']['sampler'] / info['images'] * 1e3:.1f} ms per image",
            )
    hutch = get("test_hutchinson")
    if hutch:
        info = hutch["extra_info"]
        rounds = len(info["step_s"]["loop"])
        for method in ("taylor", "jvp"):
            add(
                f"Hutchinson, K={info['probes']}: loop / batched probe ({method}, {rounds} rounds)",
                ratio_text(info["loop_over"][method]),
                f"{method} {info['median_s'][method]:.1f} s, loop {info['median_s']['loop']:.1f} s",
            )
        add(
            "Hutchinson: a Min-SNR run's probe set (weighted, unweighted, 4 t-bins) / one trace",
            ratio_text(info["probe_set_over_taylor"]),
            f"{info['median_s']['probe_set']:.1f} s",
        )
    step = get("test_train_step[amp-4]")
    if hutch and step:
        taylor = hutch["extra_info"]["median_s"]["taylor"]
        add(
            "Hutchinson probe cost in training steps (batch 4, the cards' AMP setting)",
            f"{taylor / step['extra_info']['median_s']['fastdiff']:.0f} steps",
            "not interleaved: the two medians come from different minutes",
        )
    for w in (0, 1, 2):
        b = get(f"test_loader_throughput[{w}]")
        if b:
            add(
                f"shard loader, {w} workers",
                f"{b['extra_info']['images'] / median(b):,.0f} images/s",
                "",
            )
    for k in (2, 4, 8):
        for precision in ("amp", "fp32"):
            fused = get(f"test_fused_vs_sequential[{k}-{precision}]")
            if fused:
                info = fused["extra_info"]
                rounds = len(info["step_s"]["fused"])
                add(
                    f"K={k} runs at batch 4, {'AMP' if precision == 'amp' else 'fp32'}: "
                    f"{k} sequential steps / one fused step ({rounds} rounds)",
                    ratio_text(info["sequential_over_fused"]),
                    f"fused {info['median_s']['fused'] * 1e3:.0f} ms, "
                    f"sequential {info['median_s']['sequential'] * 1e3:.0f} ms",
                )
    ema, per_tensor = get("test_ema_update[flat]"), get("test_ema_update[per_tensor]")
    if ema and per_tensor:
        add(
            "EMA update: foreach lerp / one lerp over the flat buffer",
            f"{median(per_tensor) / median(ema):.2f}×",
            f"{median(ema) * 1e3:.2f} ms flat",
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    benches, machine = load(args.json)
    rows = ratio_rows(benches)
    cpu = machine.get("cpu", {}).get("brand_raw", platform.processor() or "unknown CPU")
    lines = [
        "# Benchmark ratios",
        "",
        f"Machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} cores, "
        f"{machine.get('system', platform.system())}, Python "
        f"{machine.get('python_version', platform.python_version())}. "
        f"Source: `{args.json}` (one pytest-benchmark run; medians). Train-step ratios: "
        "the steps interleaved round by round, the geometric mean of the rounds' ratios "
        "with its 95% t-interval over rounds.",
        "",
        "| what | ratio | absolute |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
