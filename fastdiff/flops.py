"""FLOPs of a training step, counted from the model, and model FLOP utilisation.

The count runs the model's forward and backward once on the ``meta`` device under
``torch.utils.flop_counter.FlopCounterMode``: every convolution, matmul and attention
call is counted from its real shapes, nothing is allocated and nothing is guessed.
Elementwise work (norms, activations, the optimizer) is left out, as in the usual MFU
definition (PaLM, appendix B), so MFU = counted FLOPs / (time · peak matmul FLOP/s).
"""

from __future__ import annotations

import functools
import os

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastdiff.unet import build_model

# Dense bf16/fp16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
}


@functools.lru_cache(maxsize=16)
def train_step_flops(name: str, base_channels: int, image_size: int, batch: int) -> int:
    """Forward + backward FLOPs of one training step of ``batch`` images (one process)."""
    with torch.device("meta"):
        model = build_model(name, base_channels, 0.0, image_size)
        x = torch.empty(batch, 3, image_size, image_size)
        t = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(x, t).square().mean().backward()
    return counter.get_total_flops()


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of the device for MFU: ``FASTDIFF_PEAK_TFLOPS`` if set, else the data
    sheet value of a known GPU; None (MFU not reported) for CPUs and unknown GPUs."""
    override = os.environ.get("FASTDIFF_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():  # most specific names first
        if key in name:
            return value
    return None
