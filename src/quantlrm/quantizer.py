"""Group-wise asymmetric integer quantization that keeps its integer codes.

Packed exports are built from `QuantResult.codes/scale/zero`, so a packed checkpoint
dequantizes to exactly the fake-quant weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantlrm.errors import QuantLRMError

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass
class QuantResult:
    codes: torch.Tensor  # uint8 [out, in], values in 0 .. 2^bits-1
    scale: torch.Tensor  # fp32 [out, in/g]
    zero: torch.Tensor  # uint8 [out, in/g], integer zero point in 0 .. 2^bits-1
    bits: int
    group_size: int  # resolved: in_features when per-channel was asked for

    def dequant(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize as a loader of a packed export does: a 16-bit checkpoint stores its
        scales in that dtype, so the fake-quant weights use the same rounded scales."""
        out, inp = self.codes.shape
        g = self.group_size
        scale = self.scale if dtype == torch.float32 else self.scale.to(dtype).to(torch.float32)
        q = self.codes.to(torch.float32).view(out, inp // g, g)  # [out, in/g, g]
        w = (q - self.zero.to(torch.float32).unsqueeze(-1)) * scale.unsqueeze(-1)
        return w.view(out, inp).to(dtype)


def check_config(bits: int, group_size: int, in_features: int | None = None) -> int:
    """Validate bits/group size; return the effective group size."""
    if bits not in SUPPORTED_BITS:
        raise QuantLRMError(
            f"{bits}-bit quantization is not supported.",
            f"use --bits one of {', '.join(map(str, SUPPORTED_BITS))}.",
        )
    if group_size == -1:
        return in_features if in_features is not None else -1
    if group_size <= 0:
        raise QuantLRMError(
            f"group size {group_size} is invalid.", "use a positive group size such as 128, or -1 for per-channel."
        )
    if in_features is not None and in_features % group_size:
        raise QuantLRMError(
            f"group size {group_size} does not divide in_features={in_features}.",
            "choose a group size that divides every layer's input width (e.g. 32, 64, 128) or -1.",
        )
    return group_size


def quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int = 128,
    clip_max: torch.Tensor | None = None,
) -> QuantResult:
    """Quantize a weight [out, in] per group of `group_size` input channels.

    `clip_max` [out, in/g] (from the clip search) clamps each group to [-clip, clip]
    first, as AWQ's weight clipping does.
    """
    if w.dim() != 2:
        raise QuantLRMError(f"expected a 2-D weight, got shape {tuple(w.shape)}.", "quantize linear weights only.")
    out, inp = w.shape
    g = check_config(bits, group_size, inp)
    max_int = 2**bits - 1
    wg = w.detach().to(torch.float32).reshape(out, inp // g, g)  # [out, in/g, g]
    if clip_max is not None:
        c = clip_max.to(wg).unsqueeze(-1)
        wg = torch.maximum(torch.minimum(wg, c), -c)
    w_max = wg.amax(dim=-1)
    w_min = wg.amin(dim=-1)
    scale = ((w_max - w_min).clamp(min=1e-5) / max_int)  # [out, in/g]
    zero = (-torch.round(w_min / scale)).clamp(0, max_int)
    codes = (torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, max_int)
    return QuantResult(
        codes=codes.to(torch.uint8).view(out, inp),
        scale=scale,
        zero=zero.to(torch.uint8),
        bits=bits,
        group_size=g,
    )


def fake_quantize(
    w: torch.Tensor, bits: int, group_size: int = 128, clip_max: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize in the weight's own dtype (the search's inner loop)."""
    return quantize(w, bits, group_size, clip_max).dequant(w.dtype)
