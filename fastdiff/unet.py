"""The DDPM CIFAR-10 UNet (Ho et al. 2020, appendix B) and its named presets.

The network maps (x_t, t) to an output of x_t's shape; what that output means
(ε) and how the loss weights it live in :mod:`fastdiff.diffusion`.

Layout: a sinusoidal time embedding (Vaswani et al. 2017) through a 2-layer MLP;
per resolution level ``num_res_blocks`` ResBlocks (GroupNorm → SiLU → conv, the
time embedding added between the convs, dropout before the second conv) with
single-head self-attention at the resolutions in ``attn_resolutions``; a
middle ResBlock–Attention–ResBlock; a mirrored decoder with skip connections.
The last conv of every residual branch starts at zero so each block starts as
the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.tuning import Dropout, GroupNorm32


@dataclass(frozen=True)
class UNetSpec:
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    norm_groups: int = 32


# Named presets. `unet_cifar32` is the DDPM CIFAR-10 network (35.7M params at
# base_channels=128; the cards use 64). `unet_tiny` is for the quickstart and the tests.
MODELS: dict[str, UNetSpec] = {
    "unet_cifar32": UNetSpec(ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,)),
    "unet_tiny": UNetSpec(
        ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), norm_groups=8
    ),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, (B,) -> (B, dim) (Transformer §3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class GroupNormSiLU(GroupNorm32):
    """GroupNorm followed by SiLU: the pair every block of this UNet starts with. With
    ``fused`` set (``model.kernels=triton``) it runs the fused kernel of
    ``fastdiff.kernels``, except inside ``kernels.reference_only()``."""

    fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from fastdiff.kernels import group_norm_silu, kernels_allowed

            if kernels_allowed():
                return group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps)
        return F.silu(super().forward(x))


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, *, groups: int):
        super().__init__()
        self.norm1 = GroupNormSiLU(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # This block's time projection, initialised here (in the block's place in the
        # parameter init order) and then owned by the UNet, which applies all blocks'
        # projections as one product (UNet.temb_proj).
        init = nn.Linear(temb_ch, out_ch)
        self.temb_init = (init.weight.detach(), init.bias.detach())
        self.out_channels = out_ch
        self.norm2 = GroupNormSiLU(groups, out_ch)
        self.dropout = Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        """``proj``: this block's rows of ``UNet.temb_proj`` applied to the activated
        time embedding SiLU(MLP(t)), shape (B, out_channels)."""
        h = self.conv1(self.norm1(x))
        h = h + proj[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H·W positions, through SDPA."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = GroupNorm32(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # (B, 3C, H, W) -> tokens (B, HW, 3, C): a view, no copy, when channels_last
        tokens = self.qkv(self.norm(x)).permute(0, 2, 3, 1).reshape(B, H * W, 3, C)
        q, k, v = tokens.unsqueeze(1).unbind(3)  # (B, 1, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v).reshape(B, H, W, C).permute(0, 3, 1, 2)
        if not _channels_last(x):
            h = h.contiguous()
        return x + self.proj(h)


def _channels_last(x: torch.Tensor) -> bool:
    # inside vmap (fastdiff.fused) a layout cannot be queried, eager or traced
    if torch._C._functorch.is_batchedtensor(x):
        return False
    return x.is_contiguous(memory_format=torch.channels_last)


class UNet(nn.Module):
    def __init__(
        self,
        spec: UNetSpec,
        base_channels: int = 64,
        dropout: float = 0.1,
        image_size: int = 32,
        *,
        in_channels: int = 3,
        kernels: str = "torch",
    ):
        super().__init__()
        ch, g = base_channels, spec.norm_groups
        if ch % g:
            raise ValueError(
                f"model.base_channels={ch} must be a multiple of {g} (the GroupNorm groups)"
            )
        if image_size % 2 ** (len(spec.ch_mult) - 1):
            raise ValueError(
                f"image size {image_size} is not divisible by "
                f"{2 ** (len(spec.ch_mult) - 1)} (the UNet's downsampling)"
            )
        temb_ch = 4 * ch
        self.base_channels = ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips, cur, res = [ch], ch, image_size
        for level, mult in enumerate(spec.ch_mult):
            for _ in range(spec.num_res_blocks):
                self.down.append(
                    self._block(
                        cur,
                        ch * mult,
                        temb_ch,
                        dropout,
                        groups=g,
                        attn=res in spec.attn_resolutions,
                    )
                )
                cur = ch * mult
                skips.append(cur)
            if level != len(spec.ch_mult) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
                res //= 2

        self.mid = nn.ModuleList(
            [
                ResBlock(cur, cur, temb_ch, dropout, groups=g),
                Attention(cur, g),
                ResBlock(cur, cur, temb_ch, dropout, groups=g),
            ]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(spec.ch_mult))):
            for _ in range(spec.num_res_blocks + 1):
                self.up.append(
                    self._block(
                        cur + skips.pop(),
                        ch * mult,
                        temb_ch,
                        dropout,
                        groups=g,
                        attn=res in spec.attn_resolutions,
                    )
                )
                cur = ch * mult
            if level != 0:
                self.up.append(
                    nn.Sequential(
                        nn.Upsample(scale_factor=2, mode="nearest"),
                        nn.Conv2d(cur, cur, 3, padding=1),
                    )
                )
                res *= 2

        self.out = nn.Sequential(
            GroupNormSiLU(g, cur), _zero(nn.Conv2d(cur, in_channels, 3, padding=1))
        )
        for module in self.modules():
            if isinstance(module, GroupNormSiLU):
                module.fused = kernels == "triton"
        # Every ResBlock's time projection, stacked in forward order (modules() lists
        # down, mid, up as they run): one matrix product for all 22 blocks instead of 22
        # small ones (fastdiff.tuning has the measurement).
        blocks = [m for m in self.modules() if isinstance(m, ResBlock)]
        self.temb_sizes = [b.out_channels for b in blocks]
        self.temb_proj = nn.Linear(temb_ch, sum(self.temb_sizes))
        with torch.no_grad():
            self.temb_proj.weight.copy_(torch.cat([b.temb_init[0] for b in blocks]))
            self.temb_proj.bias.copy_(torch.cat([b.temb_init[1] for b in blocks]))
        for b in blocks:
            del b.temb_init
        self._register_load_state_dict_pre_hook(_stack_block_projections)

    @staticmethod
    def _block(in_ch, out_ch, temb_ch, dropout, *, groups, attn: bool) -> nn.Module:
        res = ResBlock(in_ch, out_ch, temb_ch, dropout, groups=groups)
        return nn.ModuleList([res, Attention(out_ch, groups)]) if attn else nn.ModuleList([res])

    @staticmethod
    def _run(layer: nn.Module, h: torch.Tensor, projs) -> torch.Tensor:
        if isinstance(layer, nn.ModuleList):  # ResBlock [+ Attention]
            h = layer[0](h, next(projs))
            return layer[1](h) if len(layer) > 1 else h
        return layer(h)  # down/upsampling

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # (B, 4ch); the SiLU before each block's projection, computed once for all 22
        temb = F.silu(self.temb(timestep_embedding(t, self.base_channels).to(x.dtype)))
        projs = iter(self.temb_proj(temb).split(self.temb_sizes, dim=1))
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = self._run(layer, h, projs)
            hs.append(h)
        h = self.mid[0](h, next(projs))
        h = self.mid[2](self.mid[1](h), next(projs))
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(layer, h, projs)
        return self.out(h)


def _stack_block_projections(state: dict, prefix: str, *args) -> None:
    """Weights saved when each ResBlock held its own ``temb_proj`` load into the stacked
    one (the blocks' rows in forward order, as the UNet stacks them)."""
    old = [k for k in state if k.startswith(prefix) and k.endswith(".temb_proj.weight")]
    if not old or f"{prefix}temb_proj.weight" in state:
        return
    for part in ("weight", "bias"):
        keys = [k.removesuffix(".weight") + f".{part}" for k in old]
        state[f"{prefix}temb_proj.{part}"] = torch.cat([state.pop(k) for k in keys])


def build_model(
    name: str, base_channels: int, dropout: float, image_size: int, *, kernels: str = "torch"
) -> UNet:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(MODELS)}")
    return UNet(MODELS[name], base_channels, dropout, image_size, kernels=kernels)
