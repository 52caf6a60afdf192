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

# Dense peaks (no sparsity), FLOP/s, from the vendors' data sheets, per precision: 16-bit
# tensor cores (bf16, or fp16 where a chip has no bf16), TF32 tensor cores (None where a
# chip has none) and plain fp32. Most specific names first.
PEAK_FLOPS = {
    "H200": {"16bit": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H100 SXM": {"16bit": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H100 NVL": {"16bit": 835e12, "tf32": 417e12, "fp32": 60e12},
    "H100 PCIe": {"16bit": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100": {"16bit": 989e12, "tf32": 494e12, "fp32": 67e12},
    "A100": {"16bit": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"16bit": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "A10G": {"16bit": 70e12, "tf32": 35e12, "fp32": 31.2e12},
    "L4": {"16bit": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "V100": {"16bit": 125e12, "tf32": None, "fp32": 15.7e12},
    "T4": {"16bit": 65e12, "tf32": None, "fp32": 8.1e12},
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


def peak_flops(device: torch.device, precision: str = "bf16") -> float | None:
    """Peak FLOP/s of the device for MFU at ``precision`` (accelerate's mixed_precision:
    "bf16", "fp16", or "no" for fp32): ``FASTDIFF_PEAK_TFLOPS`` if set, else the data
    sheet value of a known GPU; None (MFU not reported) for CPUs and unknown GPUs.

    fp32 is measured against the TF32 peak while cuDNN may run fp32 convolutions as TF32
    (PyTorch's default), since the UNet's FLOPs are nearly all convolutions; against the
    16-bit peak an fp32 run's MFU would read 2x (TF32) to 15x (fp32) too low."""
    override = os.environ.get("FASTDIFF_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            if precision in ("bf16", "fp16"):
                return peaks["16bit"]
            if torch.backends.cudnn.allow_tf32 and peaks["tf32"]:
                return peaks["tf32"]
            return peaks["fp32"]
    return None
