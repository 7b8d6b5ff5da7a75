"""Triton kernels for group-wise asymmetric low-bit weights (layout: `layout.KernelWeight`).

Three kernels share one weight decoder:
- `_gemv_kernel` (one activation row, decode at batch 1): each program owns BLOCK_N output rows
  and a slice of the input (split-K when SPLIT_K > 1, fp32 atomics). It loads every packed word
  once, with full-width coalesced loads, and walks the codes of a word with a static loop, so
  weights are read exactly once and dequantized in registers. The group factor is hoisted:
  sum_i (q_i - z) s x_i = s * (sum_i q_i x_i - z * sum_i x_i) per 32-code unit.
- `_gemm_kernel` (2..N rows): tensor-core `tl.dot` on tiles dequantized in registers.
- `_dequant_kernel`: writes the dense weight, for dequantize-then-cuBLAS at large batch.
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
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    u_begin = pid_k * units_per_split
    acc = tl.zeros([BLOCK_N, BLOCK_U], dtype=tl.float32)
    for it in range(0, units_per_split, BLOCK_U):
        offs_u = u_begin + it + tl.arange(0, BLOCK_U)
        mask_u = offs_u < n_units
        m2 = mask_n[:, None] & mask_u[None, :]
        row0 = p0_ptr + offs_n[:, None] * stride_p0
        if W0 == 1:
            wa = tl.load(row0 + offs_u[None, :], mask=m2, other=0)
        else:
            wa = tl.load(row0 + 2 * offs_u[None, :], mask=m2, other=0)
            wb = tl.load(row0 + 2 * offs_u[None, :] + 1, mask=m2, other=0)
        if BITS1 > 0:
            w1 = tl.load(p1_ptr + offs_n[:, None] * stride_p1 + offs_u[None, :], mask=m2, other=0)
        grp = (offs_u * U) // G
        s = tl.load(s_ptr + offs_n[:, None] * stride_s + grp[None, :], mask=m2, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n[:, None] * stride_s + grp[None, :], mask=m2, other=0.0).to(tl.float32)
        t = tl.zeros([BLOCK_N, BLOCK_U], dtype=tl.float32)
        xs = tl.zeros([BLOCK_U], dtype=tl.float32)
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
            t += q.to(tl.float32) * xi[None, :]
            xs += xi
        acc += s * (t - z * xs[None, :])
    y = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.atomic_add(y_ptr + offs_n, y, mask=mask_n)


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
