"""Triton kernels for group-wise asymmetric low-bit weights in the block layout of `layout.py`.

No integer-to-float conversion (a quarter-rate instruction on Hopper, which made the first
version ALU-bound): or-ing a code's bits into the mantissa of a suitable power of two gives an
fp32 number whose value is that power plus the code, so q - z is one exact subtraction.
Slot s of lane j of a block (pair p of word row t, s = t*H + p, or 3 bits' spare slot) multiplies
the activation pair s*L + j (`layout.py`).

- `_gemv_kernel` (decode, one activation row): a program owns BLOCK_N rows and walks their
  blocks one per step (split-K over blocks, reduced in the kernel: `_store_rows`); weights are
  read once with wide loads and dequantized in registers, one scale and zero point per row
  and block. `_gemv_h2_kernel` is the same walk in half2 arithmetic for fp16 activations
  (bf16x2 for bf16 ones),
  U blocks per step (all of a step's word loads in flight before any is decoded).
- `_gemm_kernel` (2..N rows): tensor-core `tl.dot` on one block per step, dequantized in
  registers (the block is walked in word order; the activations are gathered).
- `_dequant_kernel`: writes the dense weight, for dequantize-then-cuBLAS at large batch.
"""

from __future__ import annotations

import triton
import triton.language as tl

_MAGIC = tl.constexpr(0x4B000000)  # fp32 bit pattern of 2^23
_TWO23 = tl.constexpr(8388608.0)


@triton.jit
def _x_pair(v, XKIND: tl.constexpr):
    """Split a loaded activation pair (int32: two fp16/bf16, int64: two fp32) into fp32 halves."""
    if XKIND == 2:
        lo = v.to(tl.int32).to(tl.float32, bitcast=True)
        hi = (v >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        dt: tl.constexpr = tl.float16 if XKIND == 0 else tl.bfloat16
        lo = v.to(tl.int16).to(dt, bitcast=True).to(tl.float32)
        hi = (v >> 16).to(tl.int16).to(dt, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _gemv_tile(N, n_blocks, blocks_per_split, L: tl.constexpr, L_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """This GEMV program's rows, lanes, their masks and its range of blocks (its split)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    jj = tl.arange(0, L_PAD)
    mask_n = rows < N
    wmask = mask_n[:, None] & (jj < L)[None, :]
    b_begin = tl.program_id(1) * blocks_per_split
    b_end = tl.minimum(b_begin + blocks_per_split, n_blocks)
    return rows, jj, mask_n, wmask, b_begin, b_end


@triton.jit
def _load_words(pw, mask, L: tl.constexpr, T: tl.constexpr, MASKED: tl.constexpr):
    """A lane tile's T word rows (row t at pw + t*L) as uint32; with T == 1 all three are row 0."""
    if MASKED:
        w0 = tl.load(pw, mask=mask, other=0)
    else:
        w0 = tl.load(pw)
    w1 = w0
    w2 = w0
    if T > 1:
        if MASKED:
            w1 = tl.load(pw + L, mask=mask, other=0)
            w2 = tl.load(pw + 2 * L, mask=mask, other=0)
        else:
            w1 = tl.load(pw + L)
            w2 = tl.load(pw + 2 * L)
    return w0.to(tl.uint32, bitcast=True), w1.to(tl.uint32, bitcast=True), w2.to(tl.uint32, bitcast=True)


@triton.jit
def _word_row(w0, w1, w2, tr: tl.constexpr):
    """Word row `tr` of a lane tile loaded by `_load_words` (tr a compile-time constant)."""
    w = w2
    if tr == 0:
        w = w0
    if tr == 1:
        w = w1
    return w


@triton.jit
def _spare(w0, w1, w2, R: tl.constexpr):
    """3 bits' spare slot, gathered from bits 15 and 31 of a lane's three words: its low code
    at bits R..R+2, its high code at R+16..R+18 (then decoded like any pair at offset R)."""
    return (((w0 >> (15 - R)) & (0x10001 << R)) | ((w1 >> (14 - R)) & (0x20002 << R))
            | ((w2 >> (13 - R)) & (0x40004 << R)))


@triton.jit
def _load_x_pairs(x_ptr, xoff, blk, K, sl: tl.constexpr, jj, B: tl.constexpr, L: tl.constexpr,
                  L_PAD: tl.constexpr, EVEN_K: tl.constexpr, xmask):
    """The activation pairs of slot `sl` of every lane of block `blk`, as a [..., L_PAD] tile
    (xoff: each tile row's start, in pairs; rows of one activation repeat the same addresses,
    served by L1): it keeps the words' layout. xmask: the tile rows that hold an activation row."""
    kp = blk * (B // 2) + sl * L + jj
    px = x_ptr + (xoff + kp)
    if 2 * (sl * L + L_PAD) > B or not EVEN_K:  # lanes past the block's (or the row's) end
        inb = (2 * (sl * L + jj) < B) & (2 * kp < K)  # broadcast to the tile by the load
        if xmask is None:
            v = tl.load(px, mask=inb, other=0)
        else:
            v = tl.load(px, mask=inb & xmask, other=0)
    elif xmask is None:  # one activation row: lanes past L read later pairs of this block (dropped)
        v = tl.load(px)
    else:
        v = tl.load(px, mask=xmask, other=0)
    return v


@triton.jit
def _store_out(v, y_ptr, rows, mask_n, mm, M, N, BLOCK_N: tl.constexpr, ACT: tl.constexpr):
    """Store a program's finished outputs v [MR, BLOCK_N] (row m of the activations at y row m).
    ACT 1: the rows of W are interleaved (gate, up) pairs of a gated MLP, and silu(gate) * up is
    stored at half the width (no separate activation launch)."""
    if ACT:
        g, u = tl.split(tl.reshape(v, [v.shape[0], BLOCK_N // 2, 2]))
        half = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(y_ptr + mm[:, None] * (N // 2) + half[None, :],
                 (g / (1.0 + tl.exp(-g)) * u).to(y_ptr.dtype.element_ty),
                 mask=(mm < M)[:, None] & (half < N // 2)[None, :])
    else:
        tl.store(y_ptr + mm[:, None] * N + rows[None, :], v.to(y_ptr.dtype.element_ty),
                 mask=(mm < M)[:, None] & mask_n[None, :])


@triton.jit
def _store_rows(acc, y_ptr, ws_ptr, cnt_ptr, rows, mask_n, mm, M, N, n_split, MODE: tl.constexpr,
                BLOCK_N: tl.constexpr, ACT: tl.constexpr):
    """A GEMV program's [MR, BLOCK_N] result. MODE 0: the only split, store. MODE 1: fp32
    atomics into a zeroed y (needs a fill and a cast launch around the kernel; no ACT). MODE 2:
    split-K reduced in the kernel: each split stores its partial to the workspace, and the last
    split of a row tile to arrive (counted with an atomic) sums them in split order and stores
    y, then re-arms the counter. One launch, no fill or cast, and deterministic."""
    m2 = (mm < M)[:, None] & mask_n[None, :]
    if MODE == 0:
        _store_out(acc, y_ptr, rows, mask_n, mm, M, N, BLOCK_N, ACT)
    elif MODE == 1:
        tl.atomic_add(y_ptr + mm[:, None] * N + rows[None, :], acc, mask=m2)
    else:
        pid_n = tl.program_id(0)
        part = ws_ptr + (tl.program_id(1) * M + mm[:, None]) * N + rows[None, :]
        tl.store(part, acc, mask=m2)
        tl.debug_barrier()  # every thread's partial is written before the release below
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if done == n_split - 1:
            tot = tl.zeros_like(acc)
            for k in range(n_split):  # .cg: read L2, never a stale L1 line of an earlier call
                tot += tl.load(ws_ptr + (k * M + mm[:, None]) * N + rows[None, :], mask=m2, other=0.0,
                               cache_modifier=".cg")
            _store_out(tot, y_ptr, rows, mask_n, mm, M, N, BLOCK_N, ACT)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


@triton.jit
def _gemv_kernel(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr,
                 M, N, K, n_blocks, blocks_per_split, stride_s, stride_xp, code_mask,
                 BITS: tl.constexpr, P: tl.constexpr, B: tl.constexpr, W: tl.constexpr, L: tl.constexpr,
                 T: tl.constexpr, S: tl.constexpr, L_PAD: tl.constexpr, GB: tl.constexpr, BLOCK_N: tl.constexpr,
                 XKIND: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, MODE: tl.constexpr,
                 ACT: tl.constexpr, MR: tl.constexpr):
    # Every tensor in the loop has the lanes' layout or a slice of it: x is loaded as activation
    # pairs (x_ptr: int32 pairs of fp16/bf16, or int64 pairs of fp32; K even; stride_xp: pairs
    # per activation row) through a [MR, BLOCK_N, L_PAD] pointer (the BLOCK_N rows repeat the
    # same addresses, served by L1) rather than as a vector, so the compiler needs no
    # shared-memory layout conversion per code. MR activation rows (skinny batches up to MR):
    # each code is decoded once and multiplies all of them.
    # A code is decoded where it lies: its bits r..r+BITS-1 or-ed into the fp32 number
    # 2^(23-r), whose mantissa unit is 2^-r, give 2^(23-r) + q exactly. One and-or (the mask is
    # a run-time value, so it sits in a register and and+or fuse into one LOP3), no shift; the
    # upper 16 bits of the word (the pair's second code) are shifted down once.
    # Every tile is 3-D, [MR, BLOCK_N, L_PAD] or a broadcast slice of it, so that one layout
    # serves the words, the activations and the products.
    # The packed rows are contiguous, n_blocks * W words apart: written so, the compiler sees
    # the rows' starts keep the words' alignment (16-byte loads) whatever n_blocks is.
    H: tl.constexpr = P // 2
    rows, jj, mask_n, wmask, b_begin, b_end = _gemv_tile(N, n_blocks, blocks_per_split, L, L_PAD, BLOCK_N)
    mm = tl.arange(0, MR)
    r3, j3 = rows[None, :, None], jj[None, None, :]
    w3mask = wmask[None, :, :]
    xoff = tl.zeros([MR, BLOCK_N, L_PAD], dtype=tl.int32)
    xmask = None
    if MR > 1:  # (one row: no offsets or masks, so batch 1 compiles as it did without MR)
        xoff += (mm * stride_xp)[:, None, None]
        xmask = (xoff >= 0) & (mm < M)[:, None, None]
    cmask = code_mask.to(tl.uint32)
    acc = tl.zeros([MR, BLOCK_N], dtype=tl.float32)
    pw0 = p_ptr + r3 * (n_blocks * W) + j3
    for blk in range(b_begin, b_end):
        w0, w1, w2 = _load_words(pw0 + blk * W, w3mask, L, T, not (EVEN_N and L == L_PAD))  # [1, BLOCK_N, L_PAD]
        grp = blk // GB if GB > 0 else 0
        s = tl.load(s_ptr + r3 * stride_s + grp, mask=r3 < N, other=0.0).to(tl.float32)  # [1, BLOCK_N, 1]
        z = tl.load(z_ptr + r3 * stride_s + grp, mask=r3 < N, other=0.0).to(tl.float32)
        t = tl.zeros([MR, BLOCK_N, L_PAD], dtype=tl.float32)
        word = w0
        upper = w0 >> 16
        for sl in tl.static_range(S):
            if sl < T * H:  # pair p of word row tr
                tr = sl // H
                p = sl % H
                if p == 0:
                    word = _word_row(w0, w1, w2, tr)
                    upper = word >> 16
                R = BITS * p  # bit offset of the pair's codes in the word and in `upper`
                lo_src = word
                hi_src = upper
            else:  # the 3-bit spare slot
                R = 0
                lo_src = _spare(w0, w1, w2, 0)
                hi_src = lo_src >> 16
            zc = z + 8388608.0 / (1 << R)  # 2^(23-R) + z
            x_lo, x_hi = _x_pair(_load_x_pairs(x_ptr, xoff, blk, K, sl, j3, B, L, L_PAD, EVEN_K, xmask), XKIND)
            q_lo = (lo_src & (cmask << R)) | ((150 - R) << 23)  # fp32 bits of 2^(23-R) + q
            q_hi = (hi_src & (cmask << R)) | ((150 - R) << 23)
            t += (q_lo.to(tl.float32, bitcast=True) - zc) * x_lo
            t += (q_hi.to(tl.float32, bitcast=True) - zc) * x_hi
        if L != L_PAD:
            t = tl.where(j3 < L, t, 0.0)
        acc += tl.sum(t, axis=2) * tl.sum(s, axis=2)  # (the sum over the size-1 axis drops it)
    _store_rows(acc, y_ptr, ws_ptr, cnt_ptr, rows, mask_n, mm, M, N, tl.num_programs(1), MODE, BLOCK_N, ACT)


@triton.jit
def _gemm_kernel(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr,
                 M, N, K, n_blocks, blocks_per_split, stride_xm, stride_ym, stride_p, stride_s, G,
                 BITS: tl.constexpr, P: tl.constexpr, B: tl.constexpr, W: tl.constexpr, L: tl.constexpr,
                 T: tl.constexpr, S: tl.constexpr, B_PAD: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # The tile walks the block in word order (slot r: code r // W of word r % W, so the words
    # are read as contiguous runs) and gathers the activations of each slot's channel instead.
    # 3 bits: the 2L codes of the spare slot follow (r >= W*P), each gathered from three words.
    H: tl.constexpr = P // 2
    NREG: tl.constexpr = W * P
    r = tl.arange(0, B_PAD)
    widx = r % W
    code = r // W
    reg = code < P
    shift = tl.where(reg, BITS * (code % H) + 16 * (code // H), 0)
    ch = 2 * (((widx // L) * H + code % H) * L + widx % L) + code // H  # channel within the block
    live = reg
    if S > T * H:
        q = tl.where(r >= NREG, r - NREG, 0)
        spare = (r >= NREG) & (q < 2 * L)
        ch = tl.where(spare, 2 * (T * H * L + q % L) + q // L, ch)
        live = reg | spare
    b_begin = pid_k * blocks_per_split
    b_end = tl.minimum(b_begin + blocks_per_split, n_blocks)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    prow = p_ptr + offs_n[None, :] * stride_p
    for blk in range(b_begin, b_end):
        k = blk * B + ch
        mask_k = live & (ch < B) & (k < K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        words = tl.load(prow + blk * W + widx[:, None], mask=reg[:, None] & mask_n[None, :], other=0)  # [B_PAD, BLOCK_N]
        cq = (words >> shift[:, None]) & MASK
        if S > T * H:
            for kk in tl.static_range(3):
                wk = tl.load(prow + blk * W + (kk * L + q % L)[:, None], mask=spare[:, None] & mask_n[None, :], other=0)
                cq |= (wk >> tl.where(spare, 15 + 16 * (q // L) - kk, 0)[:, None]) & (1 << kk)  # bit kk
        cq = cq | _MAGIC
        grp = (blk * B) // G
        s = tl.load(s_ptr + offs_n * stride_s + grp, mask=mask_n, other=0.0).to(tl.float32)
        zc = tl.load(z_ptr + offs_n * stride_s + grp, mask=mask_n, other=0.0).to(tl.float32) + _TWO23
        wt = (cq.to(tl.float32, bitcast=True) - zc[None, :]) * s[None, :]
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
                    BITS: tl.constexpr, P: tl.constexpr, B: tl.constexpr, W: tl.constexpr, L: tl.constexpr,
                    T: tl.constexpr, S: tl.constexpr, L_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                    PAIRS: tl.constexpr):
    # PAIRS 1/2 (fp16/bf16 output, K even): a code pair's two weights are neighbours, so they
    # are stored as one 32-bit word (w_ptr is then the int32 view), contiguous across lanes.
    MASK: tl.constexpr = (1 << BITS) - 1
    H: tl.constexpr = P // 2
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    blk = tl.program_id(1)
    jj = tl.arange(0, L_PAD)
    mask_n = rows < N
    w0, w1, w2 = _load_words(p_ptr + rows[:, None] * stride_p + blk * W + jj[None, :],
                             mask_n[:, None] & (jj < L)[None, :], L, T, True)
    grp = (blk * B) // G
    s = tl.load(s_ptr + rows * stride_s + grp, mask=mask_n, other=0.0).to(tl.float32)
    zc = tl.load(z_ptr + rows * stride_s + grp, mask=mask_n, other=0.0).to(tl.float32) + _TWO23
    word = w0
    for sl in tl.static_range(S):
        if sl < T * H:
            p = sl % H
            word = _word_row(w0, w1, w2, sl // H)
            c_lo = (word >> (BITS * p)) & MASK
            c_hi = (word >> (BITS * p + 16)) & MASK
        else:
            v = _spare(w0, w1, w2, 0)
            c_lo = v & MASK
            c_hi = (v >> 16) & MASK
        w_lo = ((c_lo | _MAGIC).to(tl.float32, bitcast=True) - zc[:, None]) * s[:, None]
        w_hi = ((c_hi | _MAGIC).to(tl.float32, bitcast=True) - zc[:, None]) * s[:, None]
        ch = 2 * (sl * L + jj)  # first channel of the pair, within the block
        k = blk * B + ch
        lane_ok = (jj < L) & (ch < B)
        if PAIRS:
            lo = w_lo.to(tl.float16) if PAIRS == 1 else w_lo.to(tl.bfloat16)
            hi = w_hi.to(tl.float16) if PAIRS == 1 else w_hi.to(tl.bfloat16)
            lo16 = lo.to(tl.uint16, bitcast=True).to(tl.uint32)
            hi16 = hi.to(tl.uint16, bitcast=True).to(tl.uint32)
            kp = blk * (B // 2) + sl * L + jj  # pair index: contiguous, so the stores vectorize
            m = mask_n[:, None] & (lane_ok & (2 * kp < K))[None, :]
            tl.store(w_ptr + rows[:, None] * (K // 2) + kp[None, :], (lo16 | (hi16 << 16)).to(tl.int32, bitcast=True),
                     mask=m)
        else:
            m = mask_n[:, None] & (lane_ok & (k < K))[None, :]
            tl.store(w_ptr + rows[:, None] * K + k[None, :], w_lo.to(w_ptr.dtype.element_ty), mask=m)
            m1 = mask_n[:, None] & (lane_ok & (ch + 1 < B) & (k + 1 < K))[None, :]
            tl.store(w_ptr + rows[:, None] * K + k[None, :] + 1, w_hi.to(w_ptr.dtype.element_ty), mask=m1)


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)


# fp16 GEMV with half2 arithmetic. One and-or puts a code pair (bits r and r + 16 of a word,
# r + BITS <= 10) into the mantissas of two fp16 1024s: 1024 + c * 2^r each. One half2 fma
# scales that to (c - z) / 16 (exact: small integers over 16), one more multiplies the
# activation pair and accumulates. So a pair of codes costs 3 instructions instead of about 7
# in fp32. The /16 keeps every product at most |x|: the fp16 sum of one word's P products
# overflows only if the activations reach ~65504 / P; it is widened to fp32 once per word
# (3 bits: once per word row, its 10 products plus the spare slot's 2 in the last row).
def _pair_asm(magic: str, fma: str) -> str:
    return ("{\n.reg .b32 v;\n"
            f"lop3.b32 v, $2, $3, {magic}, 0xEA;\n"
            f"fma.rn.{fma} v, v, $4, $5;\n"
            f"fma.rn.{fma} $0, v, $6, $1;\n}}")


_PAIR_ASM = tl.constexpr(_pair_asm("0x64006400", "f16x2"))
_WIDEN_ASM = tl.constexpr("""{
.reg .b16 l, h;
.reg .f32 a;
mov.b32 {l, h}, $1;
add.rn.f16 l, l, h;
cvt.f32.f16 a, l;
mov.b32 $0, a;
}""")


# The same pair in bf16x2 (bf16 activations): the codes go into the mantissas of two bf16 128s
# (0x4300; 7 mantissa bits, so r + BITS <= 7 and more pairs need a shift), one fma gives
# c - z exactly (small integers), one more multiplies the activation pair and accumulates. The
# bf16 sum covers one word (its H products per half), then it is widened to fp32.
_PAIR_ASM_BF16 = tl.constexpr(_pair_asm("0x43004300", "bf16x2"))


@triton.jit
def _h2_pair(acc, src, mask, mult, nz, x, BF16: tl.constexpr = False):
    asm: tl.constexpr = _PAIR_ASM_BF16 if BF16 else _PAIR_ASM
    return tl.inline_asm_elementwise(asm, "=r,r,r,r,r,r,r", [acc, src, mask, mult, nz, x],
                                     dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def _load_scale_zero(s_ptr, z_ptr, rows, stride_s, blk, b_end, N, U: tl.constexpr, GB: tl.constexpr):
    """Scale and zero point per (row, block) of a step's U blocks, as [BLOCK_N, U] (expanded by
    the caller, so they arrive in the slice of the words' layout; a [BLOCK_N, U, 1] load needed
    a shuffle). The first use of a step's zero point waited on this load more than on any other
    (Nsight Compute, BENCHMARKS.md, Kernels, version 10), so the prefetching walk issues it a
    step ahead, with the words."""
    ub = blk + tl.arange(0, U)[None, :]
    grp = ub // GB if GB > 0 else ub * 0
    sz_mask = (rows[:, None] < N) & (ub < b_end)
    s = tl.load(s_ptr + rows[:, None] * stride_s + grp, mask=sz_mask, other=0.0)
    z = tl.load(z_ptr + rows[:, None] * stride_s + grp, mask=sz_mask, other=0.0)
    return s, z


@triton.jit
def _slot_src(w0, w1, w2, sl: tl.constexpr, H: tl.constexpr, T: tl.constexpr, FIT: tl.constexpr,
              BITS: tl.constexpr, RS: tl.constexpr):
    """The word holding slot `sl`'s code pair at a known offset (see the kernel): pair p of word
    row sl // H, shifted by whole groups of FIT pairs, or 3 bits' spare slot (gathered)."""
    if sl < T * H:
        word = _word_row(w0, w1, w2, sl // H)
        shift: tl.constexpr = BITS * FIT * ((sl % H) // FIT)
        if shift > 0:
            word = word >> shift
    else:
        word = _spare(w0, w1, w2, RS)
    return word


@triton.jit
def _neg_zero(z, R: tl.constexpr, zero3, BF16: tl.constexpr):
    """The pair's subtrahend (16-bit pair of equal halves) for codes at bit offset R."""
    if BF16:  # (c - z) exactly: (128 + c*2^R) * 2^-R - (z + 128*2^-R)
        nz16 = _rn_bf16(-z.to(tl.float32) - 128.0 / (1 << R))
    else:  # (c - z) / 16: (1024 + c*2^R) * 2^-(R+4) - (z/16 + 64*2^-R)
        nz16 = (z.to(tl.float16) * -0.0625 - 64.0 / (1 << R)).to(tl.float16).to(tl.uint16, bitcast=True)
        nz16 = nz16.to(tl.uint32)
    return zero3 + (nz16 | (nz16 << 16))[:, :, None]


@triton.jit
def _pair_step(h, src, mask, mult, nz, xp, BF16: tl.constexpr, EMULATE: tl.constexpr):
    if BF16 and EMULATE:
        h = _bf2_pair_emulated(h, src, mask, mult, nz, xp)
    elif EMULATE:
        h = _h2_pair_emulated(h, src, mask, mult, nz, xp)
    else:
        h = _h2_pair(h, src, mask, mult, nz, xp, BF16)
    return h


@triton.jit
def _widen(h, BF16: tl.constexpr, EMULATE: tl.constexpr):
    """The fp32 sum of a 16-bit pair sum's halves."""
    if BF16:  # bf16 -> fp32 is a 16-bit shift
        part = _bf16_lo(h) + _bf16_lo(h >> 16)
    elif EMULATE:
        part = (_f16(h) + _f16(h >> 16)).to(tl.float16).to(tl.float32)
    else:
        part = tl.inline_asm_elementwise(_WIDEN_ASM, "=r,r", [h], dtype=tl.uint32, is_pure=True,
                                         pack=1).to(tl.float32, bitcast=True)
    return part


@triton.jit
def _grid_dependency_sync(PDL: tl.constexpr = 1):
    """Under programmatic dependent launch (PDL): wait until the kernel before this one has
    finished and its writes are visible, then (PDL 1) let the kernel after this one launch.
    Everything above the call may read only the weights (which no kernel writes); the kernel
    after ours waits in the same way before it reads what we write. (Both are no-ops without
    PDL.) PDL 2: the caller lets the next kernel launch later (`_launch_dependents`)."""
    tl.extra.cuda.gdc_wait()
    if PDL != 2:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _launch_dependents(PDL: tl.constexpr):
    """PDL 2: let the next kernel launch once every program of this one has got here (its main
    loop done), not as soon as every program has started."""
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _gemv_h2_kernel(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr,
                    N, K, n_blocks, blocks_per_split, stride_s,
                    BITS: tl.constexpr, P: tl.constexpr, B: tl.constexpr, W: tl.constexpr, L: tl.constexpr,
                    T: tl.constexpr, S: tl.constexpr, L_PAD: tl.constexpr, GB: tl.constexpr,
                    BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, MODE: tl.constexpr,
                    PREFETCH: tl.constexpr, U: tl.constexpr, FULL: tl.constexpr, ACT: tl.constexpr,
                    EMULATE: tl.constexpr = False, BF16: tl.constexpr = False, RG: tl.constexpr = 1,
                    PDL: tl.constexpr = False, XONCE: tl.constexpr = False):
    # x_ptr: the fp16 (BF16: bf16) activations seen as int32 pairs (K even, B even). Same walk as
    # `_gemv_kernel`, but U blocks per step: the tile is [BLOCK_N, U, L_PAD] lanes, so a
    # program issues all U blocks' loads before it waits for any (the short GEMVs were bound by
    # one load's latency per block, not by bandwidth). Slot s of lane j of block u multiplies
    # the activation pair s*L + j of that block. FULL (host-checked): every step holds U whole
    # blocks of this split and L == L_PAD, so no load needs a mask.
    # RG 2: a program owns 2 * BLOCK_N rows, as two tiles of the even and the odd rows that
    # share every activation load: each thread holds a row pair. (The activations are 2 bytes
    # a code against the words' 3/8: their loads were most of the L1 traffic, and L1 was the
    # busiest unit, Nsight Compute, BENCHMARKS.md, Kernels, version 10.) RG 4: four tiles, rows
    # 4i .. 4i+3, for a quarter of the activation loads a code.
    # PREFETCH: the next step's words, scales and zero points are loaded before this step is
    # decoded. (Triton's software pipeline of this loop, its loads copied into shared memory
    # with cp.async, made every tile 2-32x slower on an H100: BENCHMARKS.md, Kernels, after version 11.)
    # PDL (launched as a programmatic dependent launch): the program starts while the
    # kernel before it finishes and waits for that kernel's writes (the activations) only after
    # loading (PREFETCH) its first step's weights. (Without PREFETCH, an L2 prefetch of the first
    # step there changed ptxas's allocation of the W4 gate/up tile, 126 registers to 96 and 11
    # more instructions a step, and W4 decoded 4.8% slower with PDL: BENCHMARKS.md, Kernels,
    # version 11.) PDL 1 lets the next kernel launch right after the wait; PDL 2 only after the
    # main loop (`kernels.pdl_launch`).
    # XONCE: the activation pairs are loaded as [1, U, L_PAD] and broadcast, so a thread that
    # holds several rows of a (block, lane) in registers (tiles with few rows and many blocks a
    # step) loads them once for all of those rows. Other tiles keep the whole-tile load: XONCE
    # made some of them longer (a W4 row-pair tile from 358 to 554 SASS instructions a step).
    # EMULATE: the PTX pair in plain Triton, for the CPU interpreter (which cannot run
    # inline assembly).
    # The 16-bit sum of a word row's products (H pairs, plus 3 bits' spare slot in the last row)
    # is widened to fp32 once per row, as long a 16-bit sum as a one-row word of H pairs. (Once
    # per three-word lane in fp16 was 1% faster end to end, within noise, and halved the
    # activation size that can overflow the sum: BENCHMARKS.md, Kernels, version 9.)
    H: tl.constexpr = P // 2
    MANT: tl.constexpr = 7 if BF16 else 10  # mantissa bits of the 16-bit format
    FIT: tl.constexpr = (MANT - BITS) // BITS + 1  # pairs decodable per shift (r + BITS <= MANT)
    RS: tl.constexpr = BITS * (FIT - 1)  # the spare slot's offset: one the word pairs use already
    rows = tl.program_id(0) * (BLOCK_N * RG) + tl.arange(0, BLOCK_N) * RG  # group a's rows (RG > 1: every RG-th)
    r3 = rows[:, None, None]
    uu = tl.arange(0, U)[None, :, None]
    jj = tl.arange(0, L_PAD)[None, None, :]
    b_begin = tl.program_id(1) * blocks_per_split
    b_end = tl.minimum(b_begin + blocks_per_split, n_blocks)
    zero3 = tl.zeros([BLOCK_N, U, L_PAD], dtype=tl.uint32)
    RW = n_blocks * W  # words a row
    MASKED: tl.constexpr = not (FULL and EVEN_N and L == L_PAD)
    acc3 = tl.zeros([BLOCK_N, U, L_PAD], dtype=tl.float32)  # reduced once, at the end
    pw0 = p_ptr + r3 * RW + uu * W + jj  # contiguous rows (see `_gemv_kernel`)
    if RG >= 2:  # group b: rows + 1
        acc3b = tl.zeros([BLOCK_N, U, L_PAD], dtype=tl.float32)
    if RG == 4:  # groups c and d: rows + 2, rows + 3
        acc3c = tl.zeros([BLOCK_N, U, L_PAD], dtype=tl.float32)
        acc3d = tl.zeros([BLOCK_N, U, L_PAD], dtype=tl.float32)
    if PREFETCH:  # the first step's words, scales and zero points
        n0, n1, n2, n_s, n_z = _group_loads(0, b_begin, True,
                                            pw0, r3, jj, rows, uu, b_end, s_ptr, z_ptr, stride_s, N, RW, L, T, U, GB, W)
        if RG >= 2:
            m0, m1, m2, m_s, m_z = _group_loads(1, b_begin, True,
                                                pw0, r3, jj, rows, uu, b_end, s_ptr, z_ptr, stride_s, N, RW, L, T, U, GB, W)
        if RG == 4:
            o0, o1, o2, o_s, o_z = _group_loads(2, b_begin, True,
                                                pw0, r3, jj, rows, uu, b_end, s_ptr, z_ptr, stride_s, N, RW, L, T, U, GB, W)
            q0, q1, q2, q_s, q_z = _group_loads(3, b_begin, True,
                                                pw0, r3, jj, rows, uu, b_end, s_ptr, z_ptr, stride_s, N, RW, L, T, U, GB, W)
    if PDL:  # nothing above reads what an earlier kernel writes
        _grid_dependency_sync(PDL)
    for blk in range(b_begin, b_end, U):
        if PREFETCH:  # this step's loads were issued a step ago; issue the next step's now
            w0, w1, w2, s, z = n0, n1, n2, n_s, n_z
            n0, n1, n2, n_s, n_z = _group_loads(0, blk + U, True,
                                                pw0, r3, jj, rows, uu, b_end, s_ptr, z_ptr, stride_s, N, RW, L, T, U, GB, W)
            if RG >= 2:
                v0, v1, v2, sb, zb = m0, m1, m2, m_s, m_z
                m0, m1, m2, m_s, m_z = _group_loads(1, blk + U, True,
                                                    pw0, r3, jj, rows, uu, b_end, s_ptr, z_ptr, stride_s, N, RW, L, T, U, GB, W)
            if RG == 4:
                c0, c1, c2, sc, zc = o0, o1, o2, o_s, o_z
                o0, o1, o2, o_s, o_z = _group_loads(2, blk + U, True,
                                                    pw0, r3, jj, rows, uu, b_end, s_ptr, z_ptr, stride_s, N, RW, L, T, U, GB, W)
                d0, d1, d2, sd, zd = q0, q1, q2, q_s, q_z
                q0, q1, q2, q_s, q_z = _group_loads(3, blk + U, True,
                                                    pw0, r3, jj, rows, uu, b_end, s_ptr, z_ptr, stride_s, N, RW, L, T, U, GB, W)
        else:
            w0, w1, w2, s, z = _group_loads(0, blk, MASKED,
                                            pw0, r3, jj, rows, uu, b_end, s_ptr, z_ptr, stride_s, N, RW, L, T, U, GB, W)
            if RG >= 2:
                v0, v1, v2, sb, zb = _group_loads(1, blk, MASKED,
                                                  pw0, r3, jj, rows, uu, b_end, s_ptr, z_ptr, stride_s, N, RW, L, T, U, GB, W)
            if RG == 4:
                c0, c1, c2, sc, zc = _group_loads(2, blk, MASKED,
                                                  pw0, r3, jj, rows, uu, b_end, s_ptr, z_ptr, stride_s, N, RW, L, T, U, GB, W)
                d0, d1, d2, sd, zd = _group_loads(3, blk, MASKED,
                                                  pw0, r3, jj, rows, uu, b_end, s_ptr, z_ptr, stride_s, N, RW, L, T, U, GB, W)
        s = _step_scale(s, BF16)
        h = zero3
        if RG >= 2:
            sb = _step_scale(sb, BF16)
            hb = zero3
        if RG == 4:
            sc = _step_scale(sc, BF16)
            sd = _step_scale(sd, BF16)
            hc = zero3
            hd = zero3
        for sl in tl.static_range(S):
            # bit offset of the pair in its source word (shifted every FIT pairs), or the spare slot's
            if sl < T * H:
                R = BITS * ((sl % H) % FIT)
            else:
                R = RS
            if BF16:
                mult = zero3 + ((127 - R) << 7) * 0x10001  # bf16x2 of 2^-R
            else:
                mult = zero3 + ((11 - R) << 10) * 0x10001  # half2 of 2^-(R+4): fp16 exponent field e+15
            mask = zero3 + (((1 << BITS) - 1) << R) * 0x10001
            kp = (blk + uu) * (B // 2) + sl * L + jj  # [1, U, L_PAD] activation pair indices
            # XONCE: the pairs as [1, U, L_PAD], loaded once by a thread for all of its rows;
            # else as the whole tile, rows repeating the same addresses (L1)
            px = x_ptr + kp if XONCE else x_ptr + (zero3.to(tl.int32) + kp)
            # lanes past L read later pairs of this block (dropped below), unless that runs past
            # the block's end; partial steps and a ragged row end are zeroed (a mask takes the
            # pointers' shape)
            if FULL and EVEN_K and 2 * (sl * L + L_PAD) <= B:
                xp = tl.load(px)
            elif FULL and EVEN_K:
                xp = tl.load(px, mask=2 * (sl * L + jj) < B, other=0)
            else:
                inb = (2 * (sl * L + jj) < B) & (2 * kp < K) & (blk + uu < b_end)
                xp = tl.load(px, mask=inb, other=0)
            xp = zero3 + xp.to(tl.uint32, bitcast=True)
            h = _pair_step(h, _slot_src(w0, w1, w2, sl, H, T, FIT, BITS, RS), mask, mult,
                           _neg_zero(z, R, zero3, BF16), xp, BF16, EMULATE)
            if RG >= 2:
                hb = _pair_step(hb, _slot_src(v0, v1, v2, sl, H, T, FIT, BITS, RS), mask, mult,
                                _neg_zero(zb, R, zero3, BF16), xp, BF16, EMULATE)
            if RG == 4:
                hc = _pair_step(hc, _slot_src(c0, c1, c2, sl, H, T, FIT, BITS, RS), mask, mult,
                                _neg_zero(zc, R, zero3, BF16), xp, BF16, EMULATE)
                hd = _pair_step(hd, _slot_src(d0, d1, d2, sl, H, T, FIT, BITS, RS), mask, mult,
                                _neg_zero(zd, R, zero3, BF16), xp, BF16, EMULATE)
            if sl == S - 1 or (sl % H == H - 1 and sl < T * H - 1):  # a word row done: widen its sum
                acc3 += _widen(h, BF16, EMULATE) * s
                h = zero3
                if RG >= 2:
                    acc3b += _widen(hb, BF16, EMULATE) * sb
                    hb = zero3
                if RG == 4:
                    acc3c += _widen(hc, BF16, EMULATE) * sc
                    acc3d += _widen(hd, BF16, EMULATE) * sd
                    hc = zero3
                    hd = zero3
    _launch_dependents(PDL)
    acc = _lane_sum(acc3, jj, L, L_PAD)
    if RG == 2:
        # rows 2i and 2i+1 side by side: the program's rows in order (and a gated MLP's (gate,
        # up) pairs, which are interleaved rows, in one thread)
        acc = tl.reshape(tl.join(acc, _lane_sum(acc3b, jj, L, L_PAD)), [2 * BLOCK_N])
    if RG == 4:  # join(join(a, c), join(b, d)) flattens to a, b, c, d: rows 4i .. 4i+3 in order
        ac = tl.join(acc, _lane_sum(acc3c, jj, L, L_PAD))
        bd = tl.join(_lane_sum(acc3b, jj, L, L_PAD), _lane_sum(acc3d, jj, L, L_PAD))
        acc = tl.reshape(tl.join(ac, bd), [4 * BLOCK_N])
    if RG > 1:
        rows = tl.program_id(0) * (RG * BLOCK_N) + tl.arange(0, RG * BLOCK_N)
    mask_n = rows < N
    _store_rows(acc[None, :], y_ptr, ws_ptr, cnt_ptr, rows, mask_n, tl.arange(0, 1), 1, N, tl.num_programs(1), MODE,
                BLOCK_N * RG, ACT)


@triton.jit
def _group_loads(g: tl.constexpr, blk, MASKED: tl.constexpr, pw0, r3, jj, rows, uu, b_end, s_ptr, z_ptr, stride_s,
                 N, RW, L: tl.constexpr, T: tl.constexpr, U: tl.constexpr, GB: tl.constexpr, W: tl.constexpr):
    """Row group g's words, scales and zero points for the step starting at block `blk` (group g
    holds rows + g: its words a row further on each, its mask and rows derived here)."""
    wmask = (r3 + g < N) & (jj < L) & (blk + uu < b_end)
    w0, w1, w2 = _load_words(pw0 + g * RW + blk * W, wmask, L, T, MASKED)
    s, z = _load_scale_zero(s_ptr, z_ptr, rows + g, stride_s, blk, b_end, N, U, GB)
    return w0, w1, w2, s, z


@triton.jit
def _step_scale(s, BF16: tl.constexpr):
    """A step's scales in the words' layout, times 16 in fp16 (the pair computes (c - z) / 16)."""
    s = s.to(tl.float32)[:, :, None]
    if not BF16:
        s = s * 16.0
    return s


@triton.jit
def _lane_sum(acc3, jj, L: tl.constexpr, L_PAD: tl.constexpr):
    """A row group's per-row sums, padding lanes dropped."""
    if L != L_PAD:
        acc3 = tl.where(jj < L, acc3, 0.0)
    return tl.sum(tl.sum(acc3, axis=2), axis=1)


@triton.jit
def _f16(v):
    """The fp16 in the low 16 bits of a uint32, as fp32."""
    return (v & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _u16(f):
    """fp32 -> fp16 bits in a uint32."""
    return f.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)


@triton.jit
def _h2_pair_emulated(acc, src, mask, mult, nz, x):
    """`_PAIR_ASM` in plain Triton with fp16 rounding after each step: the CPU interpreter
    cannot run inline PTX, so the tests check the kernel's walk with this stand-in."""
    v = (src & mask) | 0x64006400
    lo = (_f16(v) * _f16(mult) + _f16(nz)).to(tl.float16).to(tl.float32) * _f16(x) + _f16(acc)
    hi = (_f16(v >> 16) * _f16(mult >> 16) + _f16(nz >> 16)).to(tl.float16).to(tl.float32) * _f16(x >> 16) \
        + _f16(acc >> 16)
    return _u16(lo) | (_u16(hi) << 16)


@triton.jit
def _bf16_lo(v):
    """The bf16 in the low 16 bits of a uint32, as fp32 (exact)."""
    return (v << 16).to(tl.float32, bitcast=True)


@triton.jit
def _rn_bf16(f):
    """fp32 -> bf16 bits in a uint32, rounded to nearest even (integer arithmetic, so the CPU
    interpreter, which truncates its own fp32 -> bf16 casts, rounds as the GPU does)."""
    u = f.to(tl.uint32, bitcast=True)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF  # finite inputs (a NaN may wrap to 0)


@triton.jit
def _rn_bf16_nan(f):
    """`_rn_bf16` that keeps NaN a NaN (the emulated pair, whose activations may be anything)."""
    return tl.where(f != f, 0x7FC0, _rn_bf16(f))


@triton.jit
def _bf2_pair_emulated(acc, src, mask, mult, nz, x):
    """`_PAIR_ASM_BF16` in plain Triton with bf16 rounding after each step (CPU interpreter)."""
    v = (src & mask) | 0x43004300
    lo = _bf16_lo(_rn_bf16(_bf16_lo(v) * _bf16_lo(mult) + _bf16_lo(nz))) * _bf16_lo(x) + _bf16_lo(acc)
    hi = _bf16_lo(_rn_bf16(_bf16_lo(v >> 16) * _bf16_lo(mult >> 16) + _bf16_lo(nz >> 16))) * _bf16_lo(x >> 16) \
        + _bf16_lo(acc >> 16)
    return _rn_bf16_nan(lo) | (_rn_bf16_nan(hi) << 16)

