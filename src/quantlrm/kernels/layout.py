"""Weight layouts: compressed-tensors `pack-quantized` <-> the kernels' layout, plus a torch reference.

compressed-tensors 0.20.0 (`compressors/pack_quantized/helpers.py`) packs codes densely and
LSB-first: element k of a row starts at bit k*bits of the row's bit stream, 32 elements fill
exactly `bits` int32 words, a row has ceil(in*bits/32) words. It stores the signed value plus
2^(bits-1), which for our asymmetric codes (0 .. 2^bits-1, zero point z) is the unsigned code
itself. The zero point is packed the same way but along the *output* dim
(`weight_zero_point` int32 [ceil(out*bits/32), in/g]); `weight_scale` is [out, in/g].

Kernel layout (built once at load, `KernelWeight`): the codes of a row are split into at most
two bit *planes* so that no value straddles an int32 word and every word index is a shift:
- bits 2, 4, 8: one plane, `32/bits` codes per word, LSB-first. For 4 bits this is byte for
  byte the compressed-tensors `weight_packed`, so a W4 checkpoint is used as stored.
- bits 3: plane 0 holds the low 2 bits (16 codes per word), plane 1 the high bit (32 codes
  per word). 3 bits per weight exactly, like the dense layout.
Each plane is padded per row to whole 32-code units (plane 0 of 3-bit: 2 words per unit).
Scales and zero points are [out, groups] in the activation dtype (zero points are small
integers, exact in fp16/bf16), so dequantization is w = (q - z) * s, the quantizer's formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantlrm.errors import QuantLRMError
from quantlrm.export.packing import pack_dense

KERNEL_BITS = (2, 3, 4, 8)


def plane_bits(bits: int) -> tuple[int, ...]:
    """Bits per code held by each plane, lowest bits first."""
    if bits == 3:
        return (2, 1)
    if bits in (2, 4, 8):
        return (bits,)
    raise QuantLRMError(f"the kernels do not handle {bits}-bit weights.", "use 2, 3, 4 or 8 bits.")


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Dense LSB-first packing of unsigned codes along dim 1 (compressed-tensors' bit order).

    codes: integer [rows, cols] in 0 .. 2^bits-1 -> int32 [rows, ceil(cols*bits/32)]; the
    export's packer, so the kernels read exactly what the exports write.
    """
    return pack_dense(codes.to(torch.int32), bits, dim=1)


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack_rows`: int32 [rows, words] -> uint8 codes [rows, cols]."""
    rows, n_words = packed.shape
    units = math.ceil(cols / 32)
    need = units * bits
    w = packed.to(torch.int64) & 0xFFFFFFFF
    if n_words < need:
        w = torch.nn.functional.pad(w, (0, need - n_words))
    w = w[:, :need].reshape(rows, units, bits)  # [rows, units, bits]
    out = torch.zeros(rows, units, 32, dtype=torch.int64, device=packed.device)
    mask = (1 << bits) - 1
    for e in range(32):
        start = e * bits
        i, off = divmod(start, 32)
        val = w[:, :, i] >> off
        spill = off + bits - 32
        if spill > 0:
            val = val | (w[:, :, i + 1] << (bits - spill))
        out[:, :, e] = val & mask
    return out.view(rows, units * 32)[:, :cols].to(torch.uint8)


@dataclass
class KernelWeight:
    """One linear's weight in the kernels' layout (see module docstring)."""

    planes: list[torch.Tensor]  # int32 [out, words_p] per plane
    scale: torch.Tensor  # [out, groups], activation dtype
    zero: torch.Tensor  # [out, groups], activation dtype (integer values)
    bits: int
    group_size: int
    in_features: int
    out_features: int

    def to(self, device: torch.device | str) -> KernelWeight:
        return KernelWeight(
            [p.to(device) for p in self.planes], self.scale.to(device), self.zero.to(device),
            self.bits, self.group_size, self.in_features, self.out_features,
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.planes, self.scale, self.zero))


def make_planes(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Codes uint8 [out, in] -> the kernel planes (each padded to whole 32-code units)."""
    out, inp = codes.shape
    pad = math.ceil(inp / 32) * 32
    c = torch.zeros(out, pad, dtype=torch.uint8, device=codes.device)
    c[:, :inp] = codes
    planes = []
    shift = 0
    for pb in plane_bits(bits):
        planes.append(pack_rows((c >> shift) & ((1 << pb) - 1), pb))
        shift += pb
    return planes


def codes_from_planes(planes: list[torch.Tensor], bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `make_planes` (uint8 codes [out, in])."""
    codes = None
    shift = 0
    for p, pb in zip(planes, plane_bits(bits), strict=True):
        c = unpack_rows(p, pb, in_features).to(torch.int32) << shift
        codes = c if codes is None else codes | c
        shift += pb
    return codes.to(torch.uint8)


def from_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
    dtype: torch.dtype = torch.float16,
) -> KernelWeight:
    """Build the kernel layout from a `QuantResult`'s codes [out,in], scale and zero [out,in/g]."""
    out, inp = codes.shape
    if inp % group_size or scale.shape != (out, inp // group_size) or zero.shape != scale.shape:
        raise QuantLRMError(
            f"inconsistent quantized weight: codes {tuple(codes.shape)}, scale {tuple(scale.shape)}, "
            f"zero {tuple(zero.shape)}, group size {group_size}.",
            "re-export the checkpoint with quantlrm.",
        )
    return KernelWeight(
        make_planes(codes, bits), scale.to(dtype).contiguous(), zero.to(dtype).contiguous(),
        bits, group_size, inp, out,
    )


def from_compressed_tensors(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    weight_shape: torch.Tensor | tuple[int, int],
    bits: int,
    group_size: int | None,
    dtype: torch.dtype = torch.float16,
) -> KernelWeight:
    """Re-layout one `pack-quantized` linear (asymmetric or symmetric, group or channel)."""
    out, inp = (int(v) for v in weight_shape)
    groups = weight_scale.shape[-1]
    g = group_size if group_size else inp // groups
    if weight_scale.shape != (out, groups) or groups * g != inp:
        raise QuantLRMError(
            f"weight_scale shape {tuple(weight_scale.shape)} does not fit weight_shape ({out}, {inp}) "
            f"with group size {g}.",
            "check that the checkpoint was written by compressed-tensors pack-quantized.",
        )
    if weight_packed.shape != (out, math.ceil(inp * bits / 32)):
        raise QuantLRMError(
            f"weight_packed shape {tuple(weight_packed.shape)} is not ({out}, ceil({inp}*{bits}/32)).",
            "check the checkpoint's num_bits.",
        )
    codes = unpack_rows(weight_packed, bits, inp)
    if weight_zero_point is None:  # symmetric: stored value q + 2^(b-1), zero at 2^(b-1)
        zero = torch.full((out, groups), 2 ** (bits - 1), dtype=torch.float32, device=codes.device)
    else:  # packed along the output dim
        zero = unpack_rows(weight_zero_point.t().contiguous(), bits, out).t().to(torch.float32)
    return from_codes(codes, weight_scale.float(), zero, bits, g, dtype)


def dequantize(kw: KernelWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference dequantization [out, in] (torch only; runs anywhere)."""
    codes = codes_from_planes(kw.planes, kw.bits, kw.in_features).to(torch.float32)
    g = kw.group_size
    q = codes.view(kw.out_features, -1, g)  # [out, in/g, g]
    w = (q - kw.zero.float().unsqueeze(-1)) * kw.scale.float().unsqueeze(-1)
    return w.view(kw.out_features, kw.in_features).to(dtype or kw.scale.dtype)


def reference_matmul(x: torch.Tensor, kw: KernelWeight) -> torch.Tensor:
    """Dequantize-then-matmul: y = x @ W^T in x's dtype (the kernels' correctness reference)."""
    w = dequantize(kw, x.dtype)
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        return (x.float() @ w.float().t()).to(x.dtype)
    return x @ w.t()
