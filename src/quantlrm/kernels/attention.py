"""Single-token decode attention over a KV cache, grouped-query aware, in one Triton launch.

Why: at batch 1 the quantized linears are no longer the whole step. transformers' SDPA path
copies the cache for every query head (`repeat_kv`: keys and values expanded, then cloned) and
dispatches to a kernel built for long queries. The profile of an 8B-shaped decode step
(BENCHMARKS.md, Kernels) put that at 5 launches and ~15 us per layer. Here one program serves
one KV head and all its query heads: it reads each cached key and value once, skips cache
blocks the mask rules out (the unused tail of a static cache), and keeps an online softmax.

Shapes follow transformers' attention functions: q [B, Hq, 1, D], k/v [B, Hkv, L, D] (any
strides along B, H, L; D contiguous), mask None (every position attends) or bool broadcastable to
[B, 1, 1, L] (True attends). Output [B, 1, Hq, D], the layout `sdpa_attention_forward` returns.
"""

from __future__ import annotations

import os

import torch

from quantlrm.kernels import on_device, pdl_launch, workspace

try:
    import triton
    import triton.language as tl

    from quantlrm.kernels.triton_kernels import _grid_dependency_sync
except ImportError:  # pragma: no cover - triton ships with torch's CUDA wheels
    triton = None

MAX_GROUP = 16  # query heads per KV head the kernel serves (its tile has 16 rows)


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The shapes the kernel handles; everything else goes to SDPA."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    return (q.dim() == 4 and q.shape[2] == 1 and hq % hkv == 0 and hq // hkv <= MAX_GROUP
            and d == v.shape[-1] and 16 <= d <= 256 and d & (d - 1) == 0
            and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype == v.dtype
            and k.stride(-1) == 1 and v.stride(-1) == 1)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """Plain fp32 attention with the key/value heads repeated; the tests' yardstick."""
    rep = q.shape[1] // k.shape[1]
    kk = k.float().repeat_interleave(rep, dim=1)
    vv = v.float().repeat_interleave(rep, dim=1)
    s = (q.float() @ kk.transpose(-1, -2)) * scale  # [B, Hq, 1, L]
    if mask is not None:
        s = s.masked_fill(~mask.bool(), float("-inf"))
    out = torch.nan_to_num(torch.softmax(s, dim=-1)) @ vv  # [B, Hq, 1, D]; a row attending nowhere: 0
    return out.transpose(1, 2).to(q.dtype)


if triton is not None:

    @triton.jit
    def _rope_rows(x_ptr, rows, ok_rows, d, D: tl.constexpr, cos, sin, nw_ptr, eps, QK_NORM: tl.constexpr):
        """Rows of new q or k (fp32): RMS-normed per head when QK_NORM (Qwen3), then rotated
        as transformers' `rotate_half` does: x * cos + [-x2, x1] * sin."""
        half: tl.constexpr = D // 2
        partner = (d + half) % D
        xa = tl.load(x_ptr + rows[:, None] + d[None, :], mask=ok_rows[:, None], other=0.0).to(tl.float32)
        xb = tl.load(x_ptr + rows[:, None] + partner[None, :], mask=ok_rows[:, None], other=0.0).to(tl.float32)
        if QK_NORM:
            inv = 1.0 / tl.sqrt(tl.sum(xa * xa, axis=1) / D + eps)
            xa = xa * inv[:, None] * tl.load(nw_ptr + d).to(tl.float32)[None, :]
            xb = xb * inv[:, None] * tl.load(nw_ptr + partner).to(tl.float32)[None, :]
        sign = tl.where(d < half, -1.0, 1.0)
        return xa * cos[None, :] + (sign * sin)[None, :] * xb

    @triton.jit
    def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, ws_ptr, cnt_ptr, L, blocks_per_split, scale,
                            sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_l, so_b, so_h,
                            nk_ptr, nv_ptr, snk_b, snv_b, cos_ptr, sin_ptr, sc_b, qn_ptr, kn_ptr, eps, pos_ptr,
                            REP: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr, HAS_MASK: tl.constexpr,
                            SPLIT: tl.constexpr, FUSED: tl.constexpr, QK_NORM: tl.constexpr,
                            ADVANCE: tl.constexpr = False, PDL: tl.constexpr = False):
        # program (b, KV head, split): the split's cache blocks with an online softmax; with
        # SPLIT > 1 each split leaves (max, sum, acc) in the workspace and the last split of a
        # head to arrive (atomic count) merges them in split order, as the split-K GEMV does.
        # FUSED: q (q_ptr) and the new k/v (nk_ptr, nv_ptr) come straight from the projection;
        # each program normalises and rotates them, attends to the new token from registers,
        # and the program whose split holds the cache position writes it to the cache. So the
        # cache is never read before it is written, and RoPE and the write need no launch.
        # ADVANCE: the last program of the grid to read the position (counted at cnt_ptr[heads])
        # moves it on by one as it finishes: no increment launch per layer.
        # PDL: launched while the kernel before (the q/k/v projection, or the cache write when
        # not FUSED) finishes; waits for it before reading anything.
        if PDL:
            _grid_dependency_sync()
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        r = tl.arange(0, 16)  # the group's query heads, padded to a tensor-core tile
        d = tl.arange(0, D)
        heads = kvh * REP + r
        k_base = k_ptr + b * sk_b + kvh * sk_h
        v_base = v_ptr + b * sv_b + kvh * sv_h
        lo = sp * blocks_per_split * BLOCK_L
        hi = tl.minimum(lo + blocks_per_split * BLOCK_L, L)
        if FUSED:
            cur = tl.load(pos_ptr)  # the cache position of this token (StaticLayer.cumulative_length)
            cos = tl.load(cos_ptr + b * sc_b + d).to(tl.float32)
            sin = tl.load(sin_ptr + b * sc_b + d).to(tl.float32)
            q = _rope_rows(q_ptr + b * sq_b, heads * sq_h, r < REP, d, D, cos, sin, qn_ptr, eps, QK_NORM)
            q = q.to(k_ptr.dtype.element_ty)
            one = tl.arange(0, 1)
            k_new = _rope_rows(nk_ptr + b * snk_b + kvh * D, one, one == 0, d, D, cos, sin, kn_ptr, eps, QK_NORM)
            k_new = k_new.to(k_ptr.dtype.element_ty)  # [1, D], rounded as the cache stores it
            v_new = tl.load(nv_ptr + b * snv_b + kvh * D + d[None, :] + one[:, None] * 0)
            if (cur >= lo) & (cur < hi):
                tl.store(k_base + cur * sk_l + d[None, :] + one[:, None] * 0, k_new)
                tl.store(v_base + cur * sv_l + d[None, :] + one[:, None] * 0, v_new)
            if ADVANCE:  # counted once every thread has used the position (the branch above), so
                # no thread can read it after the increment; relaxed, with the increment depending on
                # the position's value, because a fence (release or acquire) stalled each program
                # about a microsecond (266-284 us a token of attention with one, 247-257 relaxed;
                # 228 with no count, when inductor launched an increment per layer)
                tl.debug_barrier()
                heads_all = tl.num_programs(0) * tl.num_programs(1)
                started = tl.atomic_add(cnt_ptr + heads_all, (cur >= 0).to(tl.int32), sem="relaxed")
        else:
            q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=(r < REP)[:, None], other=0.0)
        m_i = tl.full([16], float("-inf"), tl.float32)
        l_i = tl.zeros([16], tl.float32)
        acc = tl.zeros([16, D], tl.float32)
        for start in range(lo, hi, BLOCK_L):
            pos = start + tl.arange(0, BLOCK_L)
            ok = pos < hi
            if FUSED:
                ok = ok & (pos <= cur)
            elif HAS_MASK:  # (the mask is what rules out a static cache's unused tail here)
                ok = ok & (tl.load(m_ptr + b * sm_b + pos * sm_l, mask=ok, other=0) != 0)
            if tl.max(ok.to(tl.int32), axis=0) > 0:  # a static cache's unused tail is never read
                kt = tl.load(k_base + pos[:, None] * sk_l + d[None, :], mask=ok[:, None], other=0.0)
                vt = tl.load(v_base + pos[:, None] * sv_l + d[None, :], mask=ok[:, None], other=0.0)
                if FUSED and HAS_MASK:  # loaded alongside the keys and values, not before them
                    ok = ok & (tl.load(m_ptr + b * sm_b + pos * sm_l, mask=ok, other=0) != 0)
                    vt = tl.where(ok[:, None], vt, 0.0)  # a masked value may be inf or NaN: 0 * it is NaN
                if FUSED:  # the new token from registers, not from a cache line maybe not yet written
                    kt = tl.where((pos == cur)[:, None], k_new, kt)
                    vt = tl.where((pos == cur)[:, None], v_new, vt)
                s = tl.dot(q, tl.trans(kt)) * (scale * 1.4426950408889634)  # [16, BLOCK_L] fp32, base 2
                s = tl.where(ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                # the mask read with the keys may rule out the whole block (left padding): with
                # nothing seen yet, m_new is -inf, and -inf - -inf would be NaN
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp2(s - m_ref[:, None])
                alpha = tl.exp2(m_i - m_ref)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
                m_i = m_new
        o_ptrs = o_ptr + b * so_b + heads[:, None] * so_h + d[None, :]
        o_mask = (r < REP)[:, None]
        if SPLIT == 1:
            # a head that may attend nowhere gives 0, as SDPA does (torch >= 2.5), not NaN
            out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
            tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=o_mask)
        else:
            head = b * tl.num_programs(1) + kvh
            part = ws_ptr + (head * SPLIT + sp) * (16 * D + 32)  # [acc 16 x D | max 16 | sum 16]
            tl.store(part + r[:, None] * D + d[None, :], acc)
            tl.store(part + 16 * D + r, m_i)
            tl.store(part + 16 * D + 16 + r, l_i)
            tl.debug_barrier()  # the whole partial is written before the release below
            done = tl.atomic_add(cnt_ptr + head, 1, sem="acq_rel")
            if done == SPLIT - 1:
                # every split's max and sum in one load, then the accumulators with the loop
                # unrolled, so the L2 reads are in flight together (not one round trip each)
                base = ws_ptr + head * SPLIT * (16 * D + 32)
                ss = tl.arange(0, SPLIT)[:, None] * (16 * D + 32)
                mk = tl.load(base + ss + 16 * D + r[None, :], cache_modifier=".cg")  # [SPLIT, 16]
                lk = tl.load(base + ss + 16 * D + 16 + r[None, :], cache_modifier=".cg")
                mx = tl.max(mk, axis=0)
                den = tl.sum(tl.exp2(mk - mx[None, :]) * lk, axis=0)  # an empty split weighs 0
                num = tl.zeros([16, D], tl.float32)
                for k in tl.static_range(SPLIT):  # .cg: read L2, never a stale L1 line of an earlier call
                    pk = base + k * (16 * D + 32)
                    w = tl.exp2(tl.load(pk + 16 * D + r, cache_modifier=".cg") - mx)
                    num += w[:, None] * tl.load(pk + r[:, None] * D + d[None, :], cache_modifier=".cg")
                out = tl.where(den[:, None] > 0, num / den[:, None], 0.0)
                tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=o_mask)
                tl.atomic_xchg(cnt_ptr + head, 0)
        if ADVANCE:  # the last program to have read the position (counted at the start) moves it on
            if started == heads_all * tl.num_programs(2) - 1:
                tl.atomic_xchg(cnt_ptr + heads_all, 0, sem="relaxed")
                tl.store(pos_ptr, cur + 1)


TARGET_PROGRAMS = 128  # about one program per SM of an H100 (132)
BLOCK_L = 64


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scale: float, split: int | None = None, fused: dict | None = None,
            block_l: int | None = None) -> torch.Tensor:
    """split: cache chunks per KV head run by separate programs, a power of two (default: enough
    programs to fill the GPU, at least one block of positions each). fused: see
    `fused_decode_attention_op` (q is then [B, Hq, D] before RoPE). block_l: cache positions a
    program reads per loop step (default `BLOCK_L`, half that past head size 128)."""
    bsz, hq, d = q.shape[0], q.shape[1], q.shape[-1]
    hkv, length = k.shape[1], k.shape[2]
    out = torch.empty(bsz, 1, hq, d, device=q.device, dtype=k.dtype)
    if mask is not None:
        m = mask.expand(bsz, 1, 1, length).view(torch.uint8) if mask.dtype == torch.bool else mask
        sm_b, sm_l = m.stride(0), m.stride(3)
    else:
        m, sm_b, sm_l = q, 0, 0  # never read
    block_l = block_l or (BLOCK_L if d <= 128 else BLOCK_L // 2)
    n_blocks = triton.cdiv(length, block_l)
    if split is None:  # a power of two (few compiles), at most one program per block
        split = 1 << (max(1, min(n_blocks, TARGET_PROGRAMS // (bsz * hkv))).bit_length() - 1)
    per = triton.cdiv(n_blocks, split)  # programs past the cache's end find nothing and weigh 0
    # a counter per head for the split merge, one more for the grid (the fused path's advance)
    ws = workspace(q.device, bsz * hkv * split * (16 * d + 32) if split > 1 else 1, bsz * hkv + 1) \
        if split > 1 or fused is not None else None
    advance = fused is not None and ws is not None
    if ws is None:
        split, per = 1, n_blocks
        ws = (out, out)  # never read
    if fused is None:
        f = dict(nk=q, nv=q, snk_b=0, snv_b=0, cos=q, sin=q, sc_b=0, qn=q, kn=q, eps=0.0, pos=ws[1])  # never read
    else:
        cos = fused["cos"]
        f = dict(nk=fused["new_k"], nv=fused["new_v"], snk_b=fused["new_k"].stride(0), snv_b=fused["new_v"].stride(0),
                 cos=cos, sin=fused["sin"], sc_b=cos.stride(0) if cos.shape[0] == bsz else 0,
                 qn=fused["q_norm"] if fused["q_norm"] is not None else q,
                 kn=fused["k_norm"] if fused["k_norm"] is not None else q, eps=fused["eps"], pos=fused["pos"])
    _decode_attn_kernel[(bsz, hkv, split)](
        q, k, v, m, out, ws[0], ws[1], length, per, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        sm_b, sm_l, out.stride(0), out.stride(2),
        f["nk"], f["nv"], f["snk_b"], f["snv_b"], f["cos"], f["sin"], f["sc_b"], f["qn"], f["kn"], f["eps"], f["pos"],
        REP=hq // hkv, D=d, BLOCK_L=block_l, HAS_MASK=mask is not None, SPLIT=split,
        FUSED=fused is not None, QK_NORM=fused is not None and fused["q_norm"] is not None, ADVANCE=advance,
        num_warps=4, **pdl_launch(q.device))
    if fused is not None and not advance:  # no counter (first call inside a graph capture)
        fused["pos"].add_(1)
    return out


@torch.library.custom_op("quantlrm::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """One opaque operator, so torch.compile and CUDA graphs keep the launch whole."""
    if q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        with on_device(q):
            return _launch(q, k, v, mask, scale)
    return reference(q, k, v, mask, scale)


@decode_attention_op.register_fake
def _decode_attention_fake(q, k, v, mask, scale):
    return q.new_empty((q.shape[0], 1, q.shape[1], q.shape[3]))


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
    """[B, H, D] -> fp32: per-head RMS norm (optional), then transformers' rotate_half RoPE."""
    x = x.float()
    if norm is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.float()
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.float().view(cos.shape[0], 1, -1) + rot * sin.float().view(sin.shape[0], 1, -1)


@torch.library.custom_op("quantlrm::fused_decode_attention", mutates_args=("k_cache", "v_cache", "pos"))
def fused_decode_attention_op(q: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor, cos: torch.Tensor,
                              sin: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                              k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                              mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """A decode step's attention from the raw projections: q [B, Hq, D] and the new k/v
    [B, Hkv, D] (last dims contiguous, heads D apart), per-head RMS norm weights (Qwen3) or None,
    RoPE's cos/sin [B or 1, 1, D], a static cache [B, Hkv, L, D] and the token's position `pos`
    (0-dim). Writes k (normed, rotated) and v at `pos`, advances `pos` by one (as
    StaticLayer.update would) and returns [B, 1, Hq, D]. One launch instead of RoPE, two cache
    writes, attention and the position's increment."""
    if q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        d = q.shape[-1]
        q, new_k, new_v = (t if t.stride(-1) == 1 and t.stride(1) == d else t.contiguous() for t in (q, new_k, new_v))
        fused = dict(new_k=new_k, new_v=new_v, cos=cos, sin=sin, q_norm=q_norm, k_norm=k_norm, eps=eps, pos=pos)
        with on_device(q):
            return _launch(q, k_cache, v_cache, mask, scale, fused=fused)
    p = int(pos)
    qr = rope_reference(q, cos, sin, q_norm, eps).to(k_cache.dtype).unsqueeze(2)
    k_cache[:, :, p] = rope_reference(new_k, cos, sin, k_norm, eps).to(k_cache.dtype)
    v_cache[:, :, p] = new_v.to(v_cache.dtype)
    valid = torch.arange(k_cache.shape[2], device=q.device) <= p
    m = valid.view(1, 1, 1, -1) if mask is None else (mask.bool() & valid.view(1, 1, 1, -1))
    out = reference(qr, k_cache, v_cache, m, scale)
    pos.add_(1)
    return out


@fused_decode_attention_op.register_fake
def _fused_fake(q, new_k, new_v, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, pos, mask, scale):
    return k_cache.new_empty((q.shape[0], 1, q.shape[1], q.shape[2]))

