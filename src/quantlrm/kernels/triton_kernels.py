"""Triton kernels for group-wise asymmetric low-bit weights in the block layout of `layout.py`.

No integer-to-float conversion (a quarter-rate instruction on Hopper, which made the first
version ALU-bound): or-ing a code's bits into the mantissa of a suitable power of two gives an
fp32 number whose value is that power plus the code, so q - z is one exact subtraction.
Code i of the words of a block multiplies a contiguous run of W activations.

- `_gemv_kernel` (decode, one activation row): a program owns BLOCK_N rows and walks their
  blocks one per step (split-K over blocks with fp32 atomics); weights are read once with wide
  loads and dequantized in registers, one scale and zero point per row and block.
- `_gemm_kernel` (2..N rows): tensor-core `tl.dot` on one block per step, dequantized in
  registers (words are gathered P times from L1).
- `_dequant_kernel`: writes the dense weight, for dequantize-then-cuBLAS at large batch.
"""

from __future__ import annotations

import triton
import triton.language as tl

_MAGIC = tl.constexpr(0x4B000000)  # fp32 bit pattern of 2^23
_TWO23 = tl.constexpr(8388608.0)


@triton.jit
def _gemv_kernel(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr,
                 N, K, n_blocks, blocks_per_split, stride_p, stride_s, code_mask,
                 BITS: tl.constexpr, P: tl.constexpr, B: tl.constexpr, W: tl.constexpr,
                 W_PAD: tl.constexpr, GB: tl.constexpr, BLOCK_N: tl.constexpr,
                 EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, ATOMIC: tl.constexpr):
    # Every tensor in the loop has the words' layout or a slice of it: x is loaded through a
    # [BLOCK_N, W_PAD] pointer (rows repeat the same addresses, served by L1) rather than as a
    # vector, so the compiler needs no shared-memory layout conversion per code.
    # A code is decoded where it lies: its bits r..r+BITS-1 or-ed into the fp32 number
    # 2^(23-r), whose mantissa unit is 2^-r, give 2^(23-r) + q exactly. One and-or (the mask is
    # a run-time value, so it sits in a register and and+or fuse into one LOP3), no shift; the
    # upper half of the word is shifted down once.
    H: tl.constexpr = P // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    jj = tl.arange(0, W_PAD)
    mask_n = rows < N
    wmask = mask_n[:, None] & (jj < W)[None, :]
    b_begin = pid_k * blocks_per_split
    b_end = tl.minimum(b_begin + blocks_per_split, n_blocks)
    zero2 = tl.zeros([BLOCK_N, W_PAD], dtype=tl.int32)
    cmask = code_mask.to(tl.uint32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for blk in range(b_begin, b_end):
        pw = p_ptr + rows[:, None] * stride_p + blk * W + jj[None, :]
        if EVEN_N and W == W_PAD:
            words = tl.load(pw)
        else:
            words = tl.load(pw, mask=wmask, other=0)
        words = words.to(tl.uint32, bitcast=True)
        upper = words >> (BITS * H)
        grp = blk // GB if GB > 0 else 0
        s = tl.load(s_ptr + rows * stride_s + grp, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows * stride_s + grp, mask=mask_n, other=0.0).to(tl.float32)
        t = tl.zeros([BLOCK_N, W_PAD], dtype=tl.float32)
        for i in tl.static_range(P):
            R = BITS * (i % H)  # bit offset of code i in its half of the word (P is even)
            src = words if i < H else upper
            q = (src & (cmask << R)) | ((150 - R) << 23)  # fp32 bits of 2^(23-R) + q
            zc = z + 8388608.0 / (1 << R)  # 2^(23-R) + z
            kx = blk * B + i * W + jj  # [W_PAD]: channels of code i of this block's words
            px = x_ptr + (zero2 + kx[None, :])
            if (i + 1) * W > B or not EVEN_K:  # past the block's (or the row's) last channel
                mx = (i * W + jj < B) & (kx < K)
                xi = tl.load(px, mask=(zero2 == 0) & mx[None, :], other=0.0)
            else:  # lanes past W read the next block's x; they are dropped below
                xi = tl.load(px)
            t += (q.to(tl.float32, bitcast=True) - zc[:, None]) * xi.to(tl.float32)
        if W != W_PAD:
            t = tl.where((jj < W)[None, :], t, 0.0)
        acc += tl.sum(t, axis=1) * s
    if ATOMIC:
        tl.atomic_add(y_ptr + rows, acc, mask=mask_n)
    else:
        tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _gemm_kernel(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr,
                 M, N, K, n_blocks, blocks_per_split, stride_xm, stride_ym, stride_p, stride_s, G,
                 BITS: tl.constexpr, B: tl.constexpr, W: tl.constexpr, B_PAD: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    r = tl.arange(0, B_PAD)  # channel within a block
    widx = r % W
    shift = (r // W) * BITS
    b_begin = pid_k * blocks_per_split
    b_end = tl.minimum(b_begin + blocks_per_split, n_blocks)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for blk in range(b_begin, b_end):
        k = blk * B + r
        mask_k = (r < B) & (k < K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        words = tl.load(p_ptr + offs_n[None, :] * stride_p + blk * W + widx[:, None],
                        mask=(r < B)[:, None] & mask_n[None, :], other=0)  # [B_PAD, BLOCK_N]
        q = ((words >> shift[:, None]) & MASK) | _MAGIC
        grp = (blk * B) // G
        s = tl.load(s_ptr + offs_n * stride_s + grp, mask=mask_n, other=0.0).to(tl.float32)
        zc = tl.load(z_ptr + offs_n * stride_s + grp, mask=mask_n, other=0.0).to(tl.float32) + _TWO23
        wt = (q.to(tl.float32, bitcast=True) - zc[None, :]) * s[None, :]
        wt = tl.where(mask_k[:, None], wt, 0.0)
        acc = tl.dot(a, wt.to(a.dtype), acc)
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    m2 = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m2)
    else:
        tl.atomic_add(ptrs, acc, mask=m2)


@triton.jit
def _dequant_kernel(p_ptr, s_ptr, z_ptr, w_ptr, N, K, stride_p, stride_s, G,
                    BITS: tl.constexpr, P: tl.constexpr, B: tl.constexpr, W: tl.constexpr,
                    W_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    MASK: tl.constexpr = (1 << BITS) - 1
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    blk = tl.program_id(1)
    jj = tl.arange(0, W_PAD)
    mask_n = rows < N
    words = tl.load(p_ptr + rows[:, None] * stride_p + blk * W + jj[None, :],
                    mask=mask_n[:, None] & (jj < W)[None, :], other=0)
    grp = (blk * B) // G
    s = tl.load(s_ptr + rows * stride_s + grp, mask=mask_n, other=0.0).to(tl.float32)
    zc = tl.load(z_ptr + rows * stride_s + grp, mask=mask_n, other=0.0).to(tl.float32) + _TWO23
    for i in tl.static_range(P):
        q = ((words >> (i * BITS)) & MASK) | _MAGIC
        w = (q.to(tl.float32, bitcast=True) - zc[:, None]) * s[:, None]
        k = blk * B + i * W + jj
        m = mask_n[:, None] & ((jj < W) & (i * W + jj < B) & (k < K))[None, :]
        tl.store(w_ptr + rows[:, None] * K + k[None, :], w.to(w_ptr.dtype.element_ty), mask=m)


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)
