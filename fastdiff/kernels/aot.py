"""Ahead-of-time compilation of every kernel for the GPUs fastdiff targets, on any machine.

The interpreter (TRITON_INTERPRET=1, how the tests run the kernels on a CPU) accepts
code the compiler refuses. Triton compiles to PTX and cubin without a GPU present, so
this compiles each kernel, forward and backward, for sm_80 (A100) and sm_90 (H100,
H200) with the dtypes and constexpr values the launchers choose for unet_cifar32:

    python -m fastdiff.kernels.aot     # prints one line per compiled variant

Must run without TRITON_INTERPRET (the kernels are then JIT functions, not
interpreted ones): ``tests/test_kernels_aot.py`` runs it in a subprocess.
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys
import time

ARCHS = (80, 90)
# Activations as the trainer feeds them: fp32 (train.amp=false) or bf16 autocast (sm_80+)
ACTIVATIONS = ("fp32", "bf16")


def _unet_plane_sizes(name: str = "unet_cifar32", image_size: int = 32) -> list[int]:
    """H·W at every resolution level of the model: what the GroupNorm launcher sees."""
    from fastdiff.unet import MODELS

    levels = len(MODELS[name].ch_mult)
    return [(image_size // 2**level) ** 2 for level in range(levels)]


def variants():
    """(label, kernel, signature, constexprs) for every kernel the launchers can run."""
    wm = importlib.import_module("fastdiff.kernels.weighted_mse")
    gn = importlib.import_module("fastdiff.kernels.groupnorm_silu")
    out = []
    for act in ACTIVATIONS:
        common = {"pred_ptr": f"*{act}", "target_ptr": "*fp32", "t_ptr": "*i64", "w_ptr": "*fp32"}
        const = {"BLOCK": wm.BLOCK}
        fwd = {**common, "partial_ptr": "*fp32", "N": "i32", "CHUNKS": "i32"}
        bwd = {"grad_out_ptr": "*fp32", **common, "grad_pred_ptr": f"*{act}", "N": "i32"}
        for kernel, sig in ((wm._fwd_kernel, fwd), (wm._bwd_kernel, bwd)):
            out.append((f"weighted_mse {kernel.__name__} {act}", kernel, sig, const))
    blocks = sorted({gn._launch_config(hw)["BLOCK"] for hw in _unet_plane_sizes()})
    ints = {k: "i32" for k in ("C", "HW", "CPG", "stride_b", "stride_c", "stride_hw")}
    stats = {"mean_ptr": "*fp32", "rstd_ptr": "*fp32"}
    params = {"w_ptr": "*fp32", "bias_ptr": "*fp32"}
    for act, block in itertools.product(ACTIVATIONS, blocks):
        x = f"*{act}"
        sigs = {
            gn._plane_stats_kernel: {"x_ptr": x, "sums_ptr": "*fp32"},
            gn._fwd_apply_kernel: {"x_ptr": x, "y_ptr": x, **params, **stats},
            gn._bwd_sums_kernel: {"dy_ptr": x, "x_ptr": x, **params, **stats, "sums_ptr": "*fp32"},
            gn._bwd_dx_kernel: {
                "dy_ptr": x,
                "x_ptr": x,
                "dx_ptr": x,
                **params,
                **stats,
                "m1_ptr": "*fp32",
                "m2_ptr": "*fp32",
            },
        }
        for kernel, ptrs in sigs.items():
            names = kernel.arg_names
            sig = {n: ptrs.get(n) or ints.get(n) or "constexpr" for n in names}
            out.append(
                (
                    f"groupnorm_silu {kernel.__name__} {act} BLOCK={block}",
                    kernel,
                    sig,
                    {"BLOCK": block},
                )
            )
    return out


def compile_all(archs=ARCHS) -> list[tuple[str, int, int]]:
    """Compile every variant for every arch; (label, arch, cubin bytes) per variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter has no compiler to check")
    done = []
    for label, kernel, sig, const in variants():
        for arch in archs:
            src = ASTSource(fn=kernel, signature=sig, constexprs=const)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
            done.append((label, arch, len(compiled.asm["cubin"])))
    return done


def main() -> int:
    start = time.perf_counter()
    try:
        done = compile_all()
    except Exception as err:  # the compiler's own message names the kernel and the line
        print(f"fastdiff.kernels.aot: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    for label, arch, size in done:
        print(f"sm_{arch} {label}: cubin {size} bytes")
    print(f"compiled {len(done)} variants in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
