"""One GPTQ block (up to 256 columns) in one Triton launch.

GPTQ's inner loop walks a block's columns one at a time; written with torch ops it costs about
a dozen kernel launches per column, and on a GPU that launch overhead, not arithmetic, set
the time of `quantlrm.gptq` (5.6x llm-compressor's GPTQ on a 7B-shaped model; BENCHMARKS.md).
Here a program owns BLOCK_R rows of the block in registers and runs the whole column loop:
the group grid when a group starts, the rounding, the error, and the update of the columns to
its right. The deferred update of the later blocks stays a torch matmul (`quantlrm.gptq`).

The arithmetic is `quantlrm.gptq`'s in fp32: IEEE division (`div_rn`), round half to even,
the same grid rule as `quantlrm.quantizer.quantize`. The GPU may contract a multiply and an
add into one FMA where torch does not, so a code can differ in rare rounding ties.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rint(v):
    """Round half to even: adding 1.5 * 2^23 leaves no fraction bits below 2^22; larger values
    are left as they are (every caller clamps them into the code range)."""
    r = (v + 12582912.0) - 12582912.0
    return tl.where(tl.abs(v) < 4194304.0, r, v)


@triton.jit
def _gptq_block_kernel(w_ptr, u_ptr, invd_ptr, clip_ptr, q_ptr, e_ptr, s_ptr, z_ptr, gidx_ptr,
                       R, NCOL, stride_w, stride_u, stride_c, stride_s,
                       G: tl.constexpr, MAXQ: tl.constexpr, HAS_CLIP: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STATIC: tl.constexpr):
    # STATIC (act-order): every group's grid is given (s_ptr, z_ptr [rows, groups]) and column i
    # belongs to group gidx[i]; else a group's grid is computed here when the group starts.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < R
    m2 = rmask[:, None] & (cols < NCOL)[None, :]
    W = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=m2, other=0.0)
    Q = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    E = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    s = tl.full([BLOCK_R], 1.0, tl.float32)
    z = tl.zeros([BLOCK_R], dtype=tl.float32)
    lo = tl.zeros([BLOCK_R], dtype=tl.float32)
    hi = tl.full([BLOCK_R], MAXQ, tl.float32)
    for i in range(0, NCOL):
        if STATIC:
            gi = tl.load(gidx_ptr + i)
            s = tl.load(s_ptr + rows * stride_s + gi, mask=rmask, other=1.0)
            z = tl.load(z_ptr + rows * stride_s + gi, mask=rmask, other=0.0)
            if HAS_CLIP:
                c = tl.load(clip_ptr + rows * stride_c + gi, mask=rmask, other=1.0)
                lo = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-c, s)) + z, 0.0), MAXQ * 1.0)
                hi = tl.minimum(tl.maximum(_rint(tl.math.div_rn(c, s)) + z, 0.0), MAXQ * 1.0)
        elif i % G == 0:  # a group starts: its grid from the columns as they are now
            in_group = ((cols >= i) & (cols < i + G))[None, :]
            wc = W
            if HAS_CLIP:
                c = tl.load(clip_ptr + rows * stride_c + i // G, mask=rmask, other=1.0)
                wc = tl.minimum(tl.maximum(W, -c[:, None]), c[:, None])
            mx = tl.max(tl.where(in_group, wc, -float("inf")), axis=1)
            mn = tl.min(tl.where(in_group, wc, float("inf")), axis=1)
            s = tl.math.div_rn(tl.maximum(mx - mn, 1e-5), MAXQ * 1.0)
            z = tl.minimum(tl.maximum(-_rint(tl.math.div_rn(mn, s)), 0.0), MAXQ * 1.0)
            if HAS_CLIP:  # clip then round == round then clamp to the clip's codes
                lo = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-c, s)) + z, 0.0), MAXQ * 1.0)
                hi = tl.minimum(tl.maximum(_rint(tl.math.div_rn(c, s)) + z, 0.0), MAXQ * 1.0)
            tl.store(s_ptr + rows * stride_s + i // G, s, mask=rmask)
            tl.store(z_ptr + rows * stride_s + i // G, z, mask=rmask)
        sel = (cols == i)[None, :]
        x = tl.sum(tl.where(sel, W, 0.0), axis=1)
        q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, s)) + z, lo), hi)
        err = ((x + z * s) - s * q) * tl.load(invd_ptr + i)
        Q = tl.where(sel, q[:, None], Q)
        E = tl.where(sel, err[:, None], E)
        urow = tl.load(u_ptr + i * stride_u + cols, mask=cols < NCOL, other=0.0)
        W = W - err[:, None] * urow[None, :]
    tl.store(q_ptr + rows[:, None] * stride_w + cols[None, :], Q, mask=m2)
    tl.store(e_ptr + rows[:, None] * stride_w + cols[None, :], E, mask=m2)


def gptq_block(w1: torch.Tensor, u1: torch.Tensor, inv_d: torch.Tensor, clip: torch.Tensor | None,
               bits: int, group_size: int, static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scaled errors, scales and zero points of one block [rows, b] (fp32); u1 = the
    block's [b, b] slice of GPTQ's upper Cholesky factor, inv_d = 1 / its diagonal.

    Without `static`, the block's groups lie inside it (b a multiple of `group_size`), their
    grids are computed here, and clip = [rows, b / group_size] or None. With static = (scale,
    zero, group of each column) the grids are given ([rows, groups], act-order) and clip is
    [rows, groups] or None; the returned scales and zero points are then those given."""
    r, b = w1.shape
    w1 = w1.contiguous()
    u1 = u1.contiguous()
    q1, e1 = torch.empty_like(w1), torch.empty_like(w1)
    if static is None:
        s1 = torch.empty(r, b // group_size, dtype=torch.float32, device=w1.device)
        z1 = torch.empty_like(s1)
        gidx = s1
    else:
        s1, z1 = static[0].float().contiguous(), static[1].float().contiguous()
        gidx = static[2].to(torch.int32).contiguous()
    block_c = triton.next_power_of_2(b)
    block_r = max(1, 1024 // block_c)  # 107 registers at 8 x 128 (sm_90), no spills
    clip_t = clip.contiguous().float() if clip is not None else s1
    _gptq_block_kernel[(triton.cdiv(r, block_r),)](
        w1, u1, inv_d.contiguous(), clip_t, q1, e1, s1, z1, gidx, r, b, w1.stride(0), u1.stride(0),
        clip_t.stride(0), s1.stride(0), G=group_size, MAXQ=2**bits - 1, HAS_CLIP=clip is not None,
        BLOCK_R=block_r, BLOCK_C=block_c, STATIC=static is not None, num_warps=4)
    return q1, e1, s1, z1
