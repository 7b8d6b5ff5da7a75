"""Triton kernels for group-wise asymmetric low-bit weights (layout: `layout.KernelWeight`).

Three kernels share one weight decoder:
- `_gemv_kernel` (one activation row, decode at batch 1): each program owns BLOCK_N output rows
  and a slice of the input (split-K when SPLIT_K > 1, fp32 atomics). It loads every packed word
  once, with full-width coalesced loads, and walks the codes of a word with a static loop, so
  weights are read exactly once and dequantized in registers. The group factor is hoisted:
  sum_i (q_i - z) s x_i = s * (sum_i q_i x_i - z * sum_i x_i) per 32-code unit.
  Codes turn into floats by a bit trick, not the GPU's slow int->float conversion.
- `_gemm_block_kernel` (2..N rows): tensor-core `tl.dot` on tiles dequantized in registers,
  each tile inside one group; `_dequant_block_kernel` writes the dense weight for
  dequantize-then-cuBLAS at large batch.
- `_gemm_kernel` / `_dequant_kernel`: the same with a per-element group index, for group
  sizes that a tile cannot divide (slow, always correct).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decode_tile(p0_ptr, p1_ptr, s_ptr, z_ptr, nn, kk, mask, stride_p0, stride_p1, stride_s, G,
                 BITS0: tl.constexpr, BITS1: tl.constexpr):
    """fp32 weights at (nn, kk) (broadcastable index tensors): (q - z) * s."""
    PER0: tl.constexpr = 32 // BITS0
    MASK0: tl.constexpr = (1 << BITS0) - 1
    w0 = tl.load(p0_ptr + nn * stride_p0 + kk // PER0, mask=mask, other=0)
    q = (w0 >> ((kk % PER0) * BITS0)) & MASK0
    if BITS1 > 0:
        w1 = tl.load(p1_ptr + nn * stride_p1 + kk // 32, mask=mask, other=0)
        q = q | (((w1 >> (kk % 32)) & 1) << BITS0)
    grp = kk // G
    s = tl.load(s_ptr + nn * stride_s + grp, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + nn * stride_s + grp, mask=mask, other=0.0).to(tl.float32)
    return (q.to(tl.float32) - z) * s


@triton.jit
def _gemv_kernel(x_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr, y_ptr,
                 N, K, n_units, units_per_split, stride_p0, stride_p1, stride_s, G,
                 BITS0: tl.constexpr, BITS1: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, SPLIT_K: tl.constexpr):
    # A unit is 32 codes for two planes (3-bit), else the codes of one plane-0 word.
    U: tl.constexpr = 32 if BITS1 > 0 else 32 // BITS0
    W0: tl.constexpr = U * BITS0 // 32  # plane-0 words per unit: 1, or 2 for 3-bit
    MASK0: tl.constexpr = (1 << BITS0) - 1
    # Codes become floats without an int->float conversion (a slow unit on the GPU):
    # the bits of 2^23 + q are 0x4B000000 | q, so bitcast(q | MAGIC) - (2^23 + z) = q - z exactly.
    MAGIC: tl.constexpr = 0x4B000000
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    u_begin = pid_k * units_per_split
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for it in range(0, units_per_split, BLOCK_U):
        offs_u = u_begin + it + tl.arange(0, BLOCK_U)
        mask_u = offs_u < n_units
        m2 = mask_n[:, None] & mask_u[None, :]
        row0 = p0_ptr + offs_n[:, None] * stride_p0
        if W0 == 1:
            wa = tl.load(row0 + offs_u[None, :], mask=m2, other=0)
        else:  # both plane-0 words of each unit in one contiguous load, then split
            offs_w = 2 * (u_begin + it) + tl.arange(0, 2 * BLOCK_U)
            wab = tl.load(row0 + offs_w[None, :], mask=mask_n[:, None] & (offs_w < 2 * n_units)[None, :], other=0)
            wa, wb = tl.split(tl.reshape(wab, [BLOCK_N, BLOCK_U, 2]))
        if BITS1 > 0:
            w1 = tl.load(p1_ptr + offs_n[:, None] * stride_p1 + offs_u[None, :], mask=m2, other=0)
        grp = (offs_u * U) // G
        s = tl.load(s_ptr + offs_n[:, None] * stride_s + grp[None, :], mask=m2, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n[:, None] * stride_s + grp[None, :], mask=m2, other=0.0).to(tl.float32)
        zm = z + 8388608.0
        t = tl.zeros([BLOCK_N, BLOCK_U], dtype=tl.float32)
        kbase = offs_u * U
        for i in tl.static_range(U):
            xi = tl.load(x_ptr + kbase + i, mask=mask_u & (kbase + i < K), other=0.0).to(tl.float32)
            if W0 == 1:
                q = (wa >> (i * BITS0)) & MASK0
            elif i < 16:
                q = (wa >> (i * BITS0)) & MASK0
            else:
                q = (wb >> ((i - 16) * BITS0)) & MASK0
            if BITS1 > 0:
                q = q | (((w1 >> i) & 1) << BITS0)
            d = (q | MAGIC).to(tl.float32, bitcast=True) - zm
            t += d * xi[None, :]
        acc += tl.sum(s * t, axis=1)
    y = acc
    if SPLIT_K == 1:
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.atomic_add(y_ptr + offs_n, y, mask=mask_n)


@triton.jit
def _decode_block(p0_ptr, p1_ptr, s_ptr, z_ptr, offs_n, mask_n, k0, n_words0, n_words1,
                  stride_p0, stride_p1, stride_s, G,
                  BITS0: tl.constexpr, BITS1: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 weights [BLOCK_N, BLOCK_K] for input columns k0 .. k0+BLOCK_K, which lie in ONE group.

    Each packed word is loaded once and split into its codes by a broadcast shift
    ([BLOCK_N, words, codes] -> reshape keeps k = word * codes + i order).
    """
    PER0: tl.constexpr = 32 // BITS0
    MASK0: tl.constexpr = (1 << BITS0) - 1
    BW0: tl.constexpr = BLOCK_K // PER0
    offs_w0 = k0 // PER0 + tl.arange(0, BW0)
    w0 = tl.load(p0_ptr + offs_n[:, None] * stride_p0 + offs_w0[None, :],
                 mask=mask_n[:, None] & (offs_w0 < n_words0)[None, :], other=0)
    sh0 = tl.arange(0, PER0) * BITS0
    q = tl.reshape((w0[:, :, None] >> sh0[None, None, :]) & MASK0, [BLOCK_N, BLOCK_K])
    if BITS1 > 0:
        BW1: tl.constexpr = BLOCK_K // 32
        offs_w1 = k0 // 32 + tl.arange(0, BW1)
        w1 = tl.load(p1_ptr + offs_n[:, None] * stride_p1 + offs_w1[None, :],
                     mask=mask_n[:, None] & (offs_w1 < n_words1)[None, :], other=0)
        sh1 = tl.arange(0, 32)
        q = q | (tl.reshape((w1[:, :, None] >> sh1[None, None, :]) & 1, [BLOCK_N, BLOCK_K]) << BITS0)
    grp = k0 // G
    s = tl.load(s_ptr + offs_n * stride_s + grp, mask=mask_n, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs_n * stride_s + grp, mask=mask_n, other=0.0).to(tl.float32)
    d = (q | 0x4B000000).to(tl.float32, bitcast=True) - (z + 8388608.0)[:, None]
    return d * s[:, None]


@triton.jit
def _gemm_block_kernel(x_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr, y_ptr,
                       M, N, K, k_per_split, n_words0, n_words1, stride_xm, stride_ym,
                       stride_p0, stride_p1, stride_s, G,
                       BITS0: tl.constexpr, BITS1: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr):
    """Tensor-core product; BLOCK_K divides the group size (one scale per row and tile)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_begin = pid_k * k_per_split
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for it in range(0, k_per_split, BLOCK_K):
        k0 = k_begin + it
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        b = _decode_block(p0_ptr, p1_ptr, s_ptr, z_ptr, offs_n, mask_n, k0, n_words0, n_words1,
                          stride_p0, stride_p1, stride_s, G, BITS0, BITS1, BLOCK_N, BLOCK_K)
        acc = tl.dot(a, tl.trans(b.to(a.dtype)), acc)
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    m2 = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m2)
    else:
        tl.atomic_add(ptrs, acc, mask=m2)


@triton.jit
def _dequant_block_kernel(p0_ptr, p1_ptr, s_ptr, z_ptr, w_ptr, N, K, n_words0, n_words1,
                          stride_p0, stride_p1, stride_s, G,
                          BITS0: tl.constexpr, BITS1: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    w = _decode_block(p0_ptr, p1_ptr, s_ptr, z_ptr, offs_n, mask_n, k0, n_words0, n_words1,
                      stride_p0, stride_p1, stride_s, G, BITS0, BITS1, BLOCK_N, BLOCK_K)
    m2 = mask_n[:, None] & (offs_k < K)[None, :]
    tl.store(w_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _gemm_kernel(x_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr, y_ptr,
                 M, N, K, k_per_split, stride_xm, stride_ym, stride_p0, stride_p1, stride_s, G,
                 BITS0: tl.constexpr, BITS1: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_begin = pid_k * k_per_split
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for it in range(0, k_per_split, BLOCK_K):
        offs_k = k_begin + it + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = _decode_tile(p0_ptr, p1_ptr, s_ptr, z_ptr, offs_n[None, :], offs_k[:, None],
                         mask_k[:, None] & mask_n[None, :], stride_p0, stride_p1, stride_s, G,
                         BITS0, BITS1)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, b.to(a.dtype), acc)
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    m2 = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m2)
    else:
        tl.atomic_add(ptrs, acc, mask=m2)


@triton.jit
def _dequant_kernel(p0_ptr, p1_ptr, s_ptr, z_ptr, w_ptr, N, K, stride_p0, stride_p1, stride_s, G,
                    BITS0: tl.constexpr, BITS1: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m2 = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    w = _decode_tile(p0_ptr, p1_ptr, s_ptr, z_ptr, offs_n[:, None], offs_k[None, :], m2,
                     stride_p0, stride_p1, stride_s, G, BITS0, BITS1)
    tl.store(w_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=m2)


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)
