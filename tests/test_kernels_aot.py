"""Every Triton kernel compiles (PTX and cubin) for sm_80 and sm_90 on this GPU-less
machine, with the dtypes and block sizes the launchers choose for unet_cifar32: the
interpreter the other kernel tests use accepts code the compiler refuses."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "fastdiff.kernels.aot"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    compiled = [line for line in lines if line.startswith("sm_")]
    # weighted MSE: fwd + bwd x {fp32, bf16} (every weighting is a table it reads);
    # GroupNorm+SiLU: 4 kernels x {fp32, bf16} x the 4 block sizes of unet_cifar32's
    # planes; 2 archs each
    assert len(compiled) == (2 * 2 + 4 * 2 * 4) * 2
    for arch in ("sm_80", "sm_90"):
        for kernel in ("_fwd_kernel", "_bwd_kernel", "_plane_stats_kernel", "_bwd_dx_kernel"):
            assert any(line.startswith(arch) and kernel in line for line in compiled)
    for block in (16, 64, 256, 1024):
        assert any(f"BLOCK={block}:" in line for line in compiled)
    assert all(int(line.split("cubin ")[1].split()[0]) > 1000 for line in compiled)
