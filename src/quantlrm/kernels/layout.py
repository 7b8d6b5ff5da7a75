"""Weight layouts: compressed-tensors `pack-quantized` <-> the kernels' layout, plus a torch reference.

compressed-tensors 0.20.0 (`compressors/pack_quantized/helpers.py`) packs codes densely and
LSB-first: element k of a row starts at bit k*bits of the row's bit stream, 32 elements fill
exactly `bits` int32 words, a row has ceil(in*bits/32) words. It stores the signed value plus
2^(bits-1), which for our asymmetric codes (0 .. 2^bits-1, zero point z) is the unsigned code
itself. The zero point is packed the same way but along the *output* dim
(`weight_zero_point` int32 [ceil(out*bits/32), in/g]); `weight_scale` is [out, in/g].

Kernel layout (built once at load, `KernelWeight`), chosen so that the GEMV decodes every code
with one shift and one mask, reads the words with 16-byte loads and the activations it needs as
short contiguous runs:
- a row is cut into blocks of B input channels (B = 128 when the group size is a multiple of
  128 or the row has one group; else B = the group size, or its largest divisor in 32..128),
  so every block lies inside one group and needs one scale and one zero point;
- a word holds P = 2H codes (P = 32 // bits, but 10 for 3 bits) as two 16-bit halves of H
  codes: pair p of a word is the codes at bits bits*p and bits*p + 16;
- a block has L lanes of T words each (T = 3 for 3 bits, else 1), stored word-row by word-row:
  word (t, j) at t*L + j, W = T*L words a block. Lane j's code pairs are numbered by slot
  s = t*H + p, and 3 bits add one slot, s = 3H = 15, whose codes are spread over the three
  words' spare bits: bit k of its low code is bit 15 of word (k, j), of its high code bit 31.
  So a 3-bit lane is exactly 32 codes in 3 words, and a 3-bit block of 128 is 12 words (three
  16-byte loads of 4 lanes), where the first layout took 13 (10 codes a word, 3.25 bits);
- slot s of lane j multiplies the activation pair m = s*L + j, channels 2m (low code) and
  2m + 1 (high code): one 32-bit load of fp16 activations and one and-or per pair give the
  half2 operands of the fp16 GEMV (`_gemv_h2_kernel`), and the L lanes of a slot read L
  consecutive pairs. L = ceil(B / codes per lane); channels past B are zero padding;
- the row is padded with zero codes to a whole number of blocks.
Sizes per weight: W4 exactly 4 bits, W3 3 (more where a block is not a multiple of 32
channels, its last lane part padding: 3.43 bits for blocks of 112, 3.6 for 80, 4 for 48), W2 2,
W8 8; plus the scale and zero point per group in the activation dtype (zero points are small
integers, exact in fp16/bf16). Dequantization is w = (q - z) * s, the quantizer's formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantlrm.errors import QuantLRMError
from quantlrm.export.packing import pack_dense

KERNEL_BITS = (2, 3, 4, 8)


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


def codes_per_word(bits: int) -> int:
    """P: codes in one int32 word's two halves (3 bits: 10; the spare bits 15 and 31 hold a
    further slot spread over a lane's three words)."""
    if bits not in KERNEL_BITS:
        raise QuantLRMError(f"the kernels do not handle {bits}-bit weights.", "use 2, 3, 4 or 8 bits.")
    return 10 if bits == 3 else 32 // bits


def word_rows(bits: int) -> int:
    """T: words per lane (3 bits: three words hold 30 codes in their halves and 2 in spare bits)."""
    return 3 if bits == 3 else 1


def codes_per_lane(bits: int) -> int:
    return 32 if bits == 3 else codes_per_word(bits)


def block_size(group_size: int, in_features: int) -> int:
    """B: input channels per block; every block lies inside one group."""
    if group_size == in_features or group_size % 128 == 0:
        return 128
    if group_size <= 128:
        return group_size
    for b in range(128, 31, -1):
        if group_size % b == 0:
            return b
    raise QuantLRMError(
        f"group size {group_size} has no divisor between 32 and 128, so the kernels cannot tile it.",
        "quantize with a group size of at most 128 or a multiple of 32 such as 128 or 256.",
    )


def lanes(bits: int, block: int) -> int:
    """L: lanes per block."""
    return math.ceil(block / codes_per_lane(bits))


def kernel_constants(bits: int, group_size: int, in_features: int) -> dict[str, int]:
    """The kernels' layout constexprs: BITS, P, B, W, L, T and S (pair slots per lane: its
    words' H pairs each, plus 3 bits' spare slot)."""
    b, p, w, _ = geometry(bits, group_size, in_features)
    return dict(BITS=bits, P=p, B=b, W=w, L=lanes(bits, b), T=word_rows(bits), S=codes_per_lane(bits) // 2)


def geometry(bits: int, group_size: int, in_features: int) -> tuple[int, int, int, int]:
    """(B, P, W, n_blocks): channels per block, codes per word, words per block, blocks per row."""
    b, p = block_size(group_size, in_features), codes_per_word(bits)
    if b % 2:
        raise QuantLRMError(f"group size {group_size} gives blocks of {b} channels, an odd number; the kernels' "
                            "layout pairs channels.",
                            "quantize with an even group size such as 128.")
    return b, p, word_rows(bits) * lanes(bits, b), math.ceil(in_features / b)


@dataclass
class KernelWeight:
    """One linear's weight in the kernels' layout (see module docstring)."""

    packed: torch.Tensor  # int32 [out, n_blocks * words_per_block]
    scale: torch.Tensor  # [out, groups], activation dtype
    zero: torch.Tensor  # [out, groups], activation dtype (integer values)
    bits: int
    group_size: int
    in_features: int
    out_features: int

    @property
    def block(self) -> int:
        return block_size(self.group_size, self.in_features)

    @property
    def per_word(self) -> int:
        return codes_per_word(self.bits)

    @property
    def words_per_block(self) -> int:
        return geometry(self.bits, self.group_size, self.in_features)[2]

    @property
    def lanes(self) -> int:
        return lanes(self.bits, self.block)

    @property
    def word_rows(self) -> int:
        return word_rows(self.bits)

    @property
    def n_blocks(self) -> int:
        return geometry(self.bits, self.group_size, self.in_features)[3]

    def to(self, device: torch.device | str) -> KernelWeight:
        return KernelWeight(self.packed.to(device), self.scale.to(device), self.zero.to(device),
                            self.bits, self.group_size, self.in_features, self.out_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))


def _shifts(bits: int, h: int, device) -> torch.Tensor:
    """Bit offset of pair p's low and high code in a word, [H, 2]."""
    r = torch.arange(h, device=device, dtype=torch.int64).mul_(bits).view(h, 1)
    return r + torch.tensor([0, 16], device=device, dtype=torch.int64).view(1, 2)


def _slots(codes: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Codes [out, in] as [out, n_blocks, slots, L, 2] (channel 2*(s*L + j) + half), zero padded."""
    out, inp = codes.shape
    b, _, _, nb = geometry(bits, group_size, inp)
    n_lanes, per_lane = lanes(bits, b), codes_per_lane(bits)
    c = torch.zeros(out, nb * b, dtype=torch.int64, device=codes.device)
    c[:, :inp] = codes.to(torch.int64)
    c = torch.nn.functional.pad(c.view(out, nb, b), (0, per_lane * n_lanes - b))
    return c.view(out, nb, per_lane // 2, n_lanes, 2), (out, nb, n_lanes, per_lane)


def pack_blocks(codes: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Codes uint8 [out, in] -> int32 [out, n_blocks * W] in the kernel layout."""
    c, (out, nb, n_lanes, _) = _slots(codes, bits, group_size)
    h, t = codes_per_word(bits) // 2, word_rows(bits)
    regular = c[:, :, : t * h].reshape(out, nb, t, h, n_lanes, 2)
    sh = _shifts(bits, h, codes.device).view(1, 1, 1, h, 1, 2)
    words = (regular << sh).sum(dim=(3, 5))  # [out, nb, T, L]; disjoint bit fields, so sum == or
    if bits == 3:  # the spare slot: bit k of its codes at bits 15 and 31 of word row k
        spare = c[:, :, t * h]  # [out, nb, L, 2]
        for k in range(t):
            words[:, :, k] += (((spare >> k) & 1) << torch.tensor([15, 31], device=codes.device)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).view(out, -1)


def unpack_blocks(packed: torch.Tensor, bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_blocks`: uint8 codes [out, in]."""
    out = packed.shape[0]
    b, p, _, nb = geometry(bits, group_size, in_features)
    h, t, n_lanes = p // 2, word_rows(bits), lanes(bits, b)
    words = (packed.to(torch.int64) & 0xFFFFFFFF).view(out, nb, t, 1, n_lanes, 1)
    sh = _shifts(bits, h, packed.device).view(1, 1, 1, h, 1, 2)
    slots = [((words >> sh) & ((1 << bits) - 1)).reshape(out, nb, t * h, n_lanes, 2)]
    if bits == 3:
        hi = torch.tensor([15, 31], device=packed.device)
        spare = sum(((words[:, :, k, 0, :, :] >> hi) & 1) << k for k in range(t))  # [out, nb, L, 2]
        slots.append(spare.unsqueeze(2))
    c = torch.cat(slots, dim=2).reshape(out, nb, -1)[:, :, :b]
    return c.reshape(out, nb * b)[:, :in_features].to(torch.uint8)


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
        pack_blocks(codes, bits, group_size), scale.to(dtype).contiguous(), zero.to(dtype).contiguous(),
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
    codes = unpack_blocks(kw.packed, kw.bits, kw.group_size, kw.in_features).to(torch.float32)
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
