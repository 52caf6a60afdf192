"""Turn one pytest-benchmark JSON into ratios against peers measured in the same run.

python -m benches.ratios .benchmarks/latest.json [--out benches/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path


def load(path: Path) -> tuple[dict[str, dict], dict]:
    data = json.loads(path.read_text())
    return {b["name"]: b for b in data["benchmarks"]}, data.get("machine_info", {})


def median(b: dict) -> float:
    return b["stats"]["median"]


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

    for batch in (4, 128, 2):
        for precision in ("amp", "fp32"):
            ours = get(f"test_fastdiff_train_step[eager-{precision}-{batch}]")
            comp = get(f"test_fastdiff_train_step[compiled-{precision}-{batch}]")
            if not ours:
                continue
            setting = f"batch {batch}, {precision_label(precision, ours)}"
            for peer, how in (
                ("test_diffusers_train_step", "diffusers (as its users run it)"),
                (
                    "test_diffusers_train_step_reusing_memory",
                    "diffusers with fastdiff's allocator setting",
                ),
            ):
                theirs = get(f"{peer}[{precision}-{batch}]")
                if theirs:
                    add(
                        f"train step, {setting}: {how} / fastdiff eager",
                        f"{median(theirs) / median(ours):.2f}×",
                        f"{median(ours) * 1e3:.0f} ms vs {median(theirs) * 1e3:.0f} ms",
                    )
            if ours["extra_info"].get("flops"):
                achieved = ours["extra_info"]["flops"] / median(ours)
                peak = ours["extra_info"].get("peak_flops")
                add(
                    f"train step, {setting}: model FLOP/s (fastdiff eager)",
                    f"MFU {achieved / peak:.1%}" if peak else "no peak known: no MFU",
                    f"{achieved / 1e9:,.0f} GFLOP/s of {ours['extra_info']['flops'] / 1e9:.1f} "
                    "GFLOP per step",
                )
            if comp:
                add(
                    f"train step, {setting}: eager / compiled",
                    f"{median(ours) / median(comp):.2f}×",
                    f"{median(comp) * 1e3:.0f} ms compiled",
                )
    for sampler, nfe in (("ddpm", 50), ("ddim", 20), ("ddpm", 3), ("ddim", 3)):
        s = get(f"test_sampler[{sampler}-{nfe}]")
        f = get(f"test_bare_forward[{nfe}]")
        if s and f:
            per_image = median(s) / s["extra_info"]["images"]
            add(
                f"{sampler} NFE {s['extra_info']['nfe']}: sampler / bare forward",
                f"{median(s) / median(f):.3f}× (overhead {(median(s) / median(f) - 1):+.1%})",
                f"{per_image * 1e3:.1f} ms per image",
            )
    lp = get("test_hutchinson_loop")
    for method in ("taylor", "jvp"):
        vm = get(f"test_hutchinson_probe[{method}]")
        if vm and lp:
            add(
                f"Hutchinson, K={vm['extra_info']['probes']}: loop / batched probe ({method})",
                f"{median(lp) / median(vm):.2f}×",
                f"{method} {median(vm):.1f} s, loop {median(lp):.1f} s",
            )
    vm = get("test_hutchinson_probe[taylor]")
    step = get("test_fastdiff_train_step[eager-amp-4]")
    if vm and step:
        add(
            "Hutchinson probe cost in training steps (batch 4, the cards' AMP setting)",
            f"{median(vm) / median(step):.0f} steps",
            "",
        )
    for w in (0, 1, 2):
        b = get(f"test_loader_throughput[{w}]")
        if b:
            add(
                f"shard loader, {w} workers",
                f"{b['extra_info']['images'] / median(b):,.0f} images/s",
                "",
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
        f"Source: `{args.json}` (one pytest-benchmark run; medians).",
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
